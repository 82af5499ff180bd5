"""`python -m hipie.train --config FILE.json|yaml [--out DIR] [--steps N] [--resume] ...`

Reads a `TrainConfig` (fields of `hipie.training.train.TrainConfig`; nested `scene` and
`criterion` mappings), applies the flag overrides, and runs `train`. A config with
`architecture: release` is a `hipie.training.release_train.ReleaseTrainConfig` and trains the
released architecture (e.g. `configs/tiny_release.yaml`). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hipie.training.config_files import read_config_file
from hipie.training.train import TrainConfig, TrainResult, load_config, train

__all__ = ["TrainConfig", "TrainResult", "main", "train"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hipie.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config (.json, .yaml or .yml)")
    p.add_argument("--out", dest="out_dir", help="output folder (checkpoint, curves)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from OUT/checkpoint if it exists",
    )
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", dest="num_threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", dest="num_workers", type=int, help="DataLoader workers")
    p.add_argument("--seed", type=int, help="seed of scenes, prompts and torch")
    p.add_argument("--init-checkpoint", dest="init_checkpoint", help="start from these weights")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="evaluation interval")
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no tqdm bar"
    )
    return p


def _train_release(data: dict, overrides: dict):
    """A config with `architecture: release` trains the released architecture."""
    from hipie.training.release_train import ReleaseTrainConfig, train_release

    unsupported = {"num_workers", "eval_every"} & {k for k, v in overrides.items() if v is not None}
    if unsupported:
        raise SystemExit(f"hipie.train: {sorted(unsupported)} do not apply to the release loop")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return train_release(ReleaseTrainConfig.from_dict(data))


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    path = args.pop("config")
    data = read_config_file(path)
    if data.get("architecture") == "release":
        result = _train_release(data, args)
    else:
        result = train(load_config(path, **args))
    print(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint),
                "step": result.step,
                "steps_per_second": round(result.steps_per_second, 4),
                "last_loss": result.history["loss"][-1] if result.history.get("loss") else None,
                **{
                    k: v[-1]
                    for k, v in result.history.items()
                    if k not in ("step", "loss", "lr", "eval_step") and v
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
