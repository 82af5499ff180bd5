"""The `python -m jobs.label` command line the job tests run as a subprocess (a small run: the
random tiny model, two images per shard, one per batch, things robot and car, stuff sky)."""

from __future__ import annotations

import sys
from pathlib import Path


def label_command(folder: Path, output: str | Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.label",
        "--input", str(folder), "--output", str(output),
        "--checkpoint", "random:tiny",
        "--shard-size", "2", "--batch-size", "1",
        "--things", "robot", "car", "--stuff", "sky",
        "--no-progress", *extra,
    ]  # fmt: skip
