"""End-to-end labeling throughput: SA-1B-format shards with embedded masks through `jobs.label`.

Generates (once, cached in --data) synthetic SA-1B tar shards at SA-1B size (1500 x 2250 by
default), each image with its class-agnostic COCO-RLE masks, then runs the real job (local Ray
cluster, read/decode tasks, labeler actors, vote, Parquet) and reports images/s from the job's
own summary (wall time of the run, all stages included, Ray start-up excluded).

    # CPU, shipped tiny model (what this machine can do):
    .venv/bin/python bench/label_speed.py --checkpoint tiny --images 8
    # one GPU, HIPIE-R50 with random weights (timing only), bf16:
    python bench/label_speed.py --checkpoint random:r50 --images 64 --actors 1 --gpus-per-actor 1 \
        --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch


def make_shards(folder: Path, *, images: int, per_shard: int, width: int, height: int) -> list[str]:
    """Write (or reuse) SA-1B-format shards of generated scenes; returns their paths."""
    from hipie.synthetic.generator import SceneConfig, SceneGenerator, write_sa1b_shard

    tag = f"{width}x{height}-{images}-{per_shard}"
    root = folder / tag
    done = root / "DONE"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        gen = SceneGenerator(SceneConfig(width=width, height=height, max_things=8), seed=11)
        for k, start in enumerate(range(0, images, per_shard)):
            count = min(per_shard, images - start)
            write_sa1b_shard(gen.scenes(start, count), root / f"sa_{k:06d}.tar", first_index=start)
        done.write_text("ok")
    return [str(p) for p in sorted(root.glob("sa_*.tar"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="tiny", help="tiny | random:<preset> | folder")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=4)
    p.add_argument("--width", type=int, default=2250)
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--gpus-per-actor", type=float, default=None)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--data", default="/tmp/hipie-bench-data", help="cache of generated shards")
    p.add_argument("--out", default="/tmp/hipie-bench-labels")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    shards = make_shards(
        Path(args.data),
        images=args.images,
        per_shard=args.per_shard,
        width=args.width,
        height=args.height,
    )
    print(f"{len(shards)} shards ready in {time.perf_counter() - t0:.1f} s")
    from jobs import label

    argv_label = [a for s in shards for a in ("--input", s)] + [
        "--output",
        args.out,
        "--overwrite",
        "--checkpoint",
        args.checkpoint,
        "--vocabulary",
        str(Path(__file__).resolve().parents[1] / "pipeline" / "vocabularies" / "synthetic.yaml"),
        "--batch-size",
        str(args.batch_size),
        "--actors",
        str(args.actors),
        "--cpus-per-actor",
        str(args.cpus_per_actor),
        "--no-progress",
    ]
    if args.gpus_per_actor is not None:
        argv_label += ["--gpus-per-actor", str(args.gpus_per_actor)]
    t1 = time.perf_counter()
    label.main(argv_label)
    wall = time.perf_counter() - t1
    summary = json.loads((Path(args.out) / "_summary.json").read_text())
    run = summary["runs"][-1]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "images": run["images"],
                "image_size": f"{args.width}x{args.height}",
                "job_seconds": round(run["seconds"], 2),
                "images_per_s": round(run["images_per_s"], 3),
                "wall_seconds_incl_ray_start": round(wall, 2),
                "masks_per_level": summary["masks_per_level"],
                "device": device or platform.machine(),
                "cpus": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
