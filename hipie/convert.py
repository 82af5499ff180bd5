"""Convert a released HIPIE checkpoint into our format.

    python -m hipie.convert --official r50_parts.pth --out checkpoints/hipie-r50

reads the release's `.pth` with `torch.load(weights_only=True)` (nothing in it is executed), tells
R50 from ViT-H, maps every key by the table in `hipie.release_checkpoint` (training-only entries
are listed and dropped; anything else that does not fit is an error naming the keys) and writes
`model.safetensors` + `config.json`, which `hipie.build_hipie(checkpoint=DIR)` and
`jobs.label --checkpoint DIR` load without the original file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hipie.release_build import load_release_checkpoint, parameter_count, save_release_folder
from hipie.release_checkpoint import ReleaseCheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hipie.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--official",
        required=True,
        help="the release checkpoint: a local .pth, or a Hugging Face repo_id/filename",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    args = parser.parse_args(argv)
    try:
        model = load_release_checkpoint(args.official)
    except (FileNotFoundError, ReleaseCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_release_folder(model, args.out, source=str(args.official))
    print(
        f"{args.official}: HIPIE {model.settings.name}, "
        f"{parameter_count(model) / 1e6:.2f} M parameters -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
