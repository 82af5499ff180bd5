"""A user's mistake on the command line of any ``jobs.*`` command: one line on stderr, exit status
2, before Ray or FiftyOne start (the commands run as real subprocesses, as a user runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Real bad files: YAML that does not parse, a folder that is no checkpoint, broken JSON, a
    folder without label files, an input file of an unsupported type, and a good image folder."""
    root = tmp_path_factory.mktemp("bad-cli")
    (root / "bad.yaml").write_text("things: [dog\nstuff: ]]\n")
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "weights.bin").write_bytes(b"\0" * 16)
    (root / "broken.json").write_text('{"categories": [')
    (root / "empty").mkdir()
    (root / "data.txt").write_text("not an input\n")
    images = root / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG not really")
    return {p.name: p for p in root.iterdir()}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


CASES = {
    "label: input missing": (
        "jobs.label",
        ["--input", "{tmp}/no-such-folder", "--output", "{tmp}/out"],
        "--input {tmp}/no-such-folder: input not found",
    ),
    "label: input of unsupported type": (
        "jobs.label",
        ["--input", "{data.txt}", "--output", "{tmp}/out"],
        "unsupported input",
    ),
    "label: vocabulary not YAML": (
        "jobs.label",
        ["--input", "{images}", "--output", "{tmp}/out", "--vocabulary", "{bad.yaml}"],
        "invalid YAML",
    ),
    "label: vocabulary missing": (
        "jobs.label",
        ["--input", "{images}", "--output", "{tmp}/out", "--vocabulary", "{tmp}/nope.yaml"],
        "--vocabulary {tmp}/nope.yaml",
    ),
    "label: checkpoint not one": (
        "jobs.label",
        ["--input", "{images}", "--output", "{tmp}/out", "--checkpoint", "{not-a-checkpoint}"],
        "not a HIPIE checkpoint folder",
    ),
    "label: checkpoint missing": (
        "jobs.label",
        ["--input", "{images}", "--output", "{tmp}/out", "--checkpoint", "{tmp}/nope"],
        "--checkpoint {tmp}/nope: no such folder",
    ),
    "label: release checkpoint missing": (
        "jobs.label",
        ["--input", "{images}", "--output", "{tmp}/out", "--checkpoint", "{tmp}/r50_parts.pth"],
        "--checkpoint {tmp}/r50_parts.pth: no release checkpoint at",
    ),
    "label: release checkpoint on the hub, offline": (
        "jobs.label",
        ["--input", "{images}", "--output", "{tmp}/out", "--checkpoint", "no-such/repo/r50.pth"],
        "Hugging Face hub",
    ),
    "review: labels missing": (
        "jobs.review",
        ["--labels", "{tmp}/no-labels", "--dataset", "never-created"],
        "--labels {tmp}/no-labels: no such file or folder",
    ),
    "review: no label files": (
        "jobs.review",
        ["--labels", "{empty}", "--dataset", "never-created"],
        "no .parquet label files",
    ),
    "export: labels missing": (
        "jobs.export",
        ["--labels", "{tmp}/no-labels", "--format", "coco", "--output", "{tmp}/x"],
        "no such file or folder",
    ),
    "export: categories not JSON": (
        "jobs.export",
        ["--labels", "{empty}", "--format", "coco", "--output", "{tmp}/x"]
        + ["--categories", "{broken.json}"],
        "--categories {broken.json}: not valid JSON",
    ),
    "train: labels missing": (
        "jobs.train",
        ["--labels", "{tmp}/no-labels", "--output", "{tmp}/run"],
        "no such file or folder",
    ),
    "train: coco not JSON": (
        "jobs.train",
        ["--coco", "{broken.json}", "--images", "{images}", "--output", "{tmp}/run"],
        "--coco {broken.json}: not valid JSON",
    ),
    "train: no label files": (
        "jobs.train",
        ["--labels", "{empty}", "--init", "{not-a-checkpoint}", "--output", "{tmp}/run"],
        "no .parquet label files",
    ),
}


def _fill(text: str, names: dict[str, str]) -> str:
    for name, value in names.items():
        text = text.replace(f"{{{name}}}", value)
    return text


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistake_gives_one_line_and_status_2(case, bad):
    module, args, expected = CASES[case]
    names = {**{k: str(v) for k, v in bad.items()}, "tmp": str(bad["images"].parent)}
    result = _run(module, *(_fill(a, names) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"python -m {module}: error: "), lines
    assert _fill(expected, names) in lines[0], lines
    assert "Ray" not in result.stdout and not result.stdout.strip(), result.stdout


def test_train_init_that_is_no_checkpoint(bad, tmp_path):
    """--init is checked too (here with label files that exist, so --init is the only mistake)."""
    import schemas

    labels = tmp_path / "labels"
    labels.mkdir()
    row = schemas.make_error_row(image_id="a", uri="a.png", shard="s", error="unreadable")
    schemas.write_parquet(schemas.rows_to_table([row]), labels / "s.parquet", vocabulary={})
    result = _run(
        "jobs.train",
        *["--labels", str(labels), "--init", str(bad["not-a-checkpoint"]), "--output", "x"],
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--init" in result.stderr and "not a HIPIE checkpoint folder" in result.stderr
