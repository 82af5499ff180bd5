"""`python -m hipie.train --config FILE.json|yaml [--out DIR] [--steps N] [--resume] ...`

Reads a `TrainConfig` (fields of `hipie.training.train.TrainConfig`; nested `scene` and
`criterion` mappings), applies the flag overrides, and runs `train`. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    path = args.pop("config")
    cfg = load_config(path, **args)
    result = train(cfg)
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
