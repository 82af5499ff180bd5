"""Seconds per training step of the released architecture at small size (`release_model("tiny")`).

    python bench/release_train_step.py [--steps 5] [--batch-size 4] [--size 256] [--threads 2]

One step as `python -m hipie.train --config configs/tiny_release.yaml` runs it: a fresh batch of
synthetic scenes, the three passes' release losses (`hipie.training.release_step.train_losses`),
backward and an AdamW step, the MiniLM frozen. The first step (allocations) is reported apart.
Prints a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from hipie.release_build import release_model
from hipie.synthetic.generator import SceneConfig, SceneGenerator
from hipie.synthetic.scene import PART_CLASSES, STUFF_CLASSES, THING_CLASSES
from hipie.training.data import sample_from_scene
from hipie.training.release_criterion import ReleaseCriterion
from hipie.training.release_step import train_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = release_model("tiny").train()
    model.text.requires_grad_(False)
    model.text.eval()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    criterion = ReleaseCriterion()
    scenes = SceneGenerator(SceneConfig(width=args.size, height=args.size), seed=0)
    vocab = dict(things=THING_CLASSES, stuff=STUFF_CLASSES, parts=PART_CLASSES)
    times = []
    for step in range(args.steps):
        batch = [sample_from_scene(scenes.scene(step * args.batch_size + i))
                 for i in range(args.batch_size)]  # fmt: skip
        start = time.perf_counter()
        losses = train_losses(model, criterion, batch, rng=random.Random(step), **vocab)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        print(f"step {step}: {times[-1]:.2f} s, loss {float(losses['total'].detach()):.1f}")
    rest = times[1:] or times
    print(json.dumps({
        "trained_parameters": sum(p.numel() for p in trained),
        "batch_size": args.batch_size, "size": args.size, "threads": args.threads,
        "first_step_s": round(times[0], 3), "step_s": round(sum(rest) / len(rest), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
