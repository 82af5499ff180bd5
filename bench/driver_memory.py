"""Peak memory of the labeling job's driver, for many small shards and for one large shard.

    python bench/driver_memory.py --case many-shards --shards 200 --images-per-shard 4
    python bench/driver_memory.py --case one-shard --images 5000
    python bench/driver_memory.py --case one-shard --images 5000 --out BENCH.jsonl  # append a line

Writes a folder of tiny PNG images (``--size`` pixels square, seeded noise with a few flat
rectangles) and labels it with ``pipeline.labeling.job.run_label_job`` on a local Ray cluster
started in this process (the driver), with the shipped tiny model and a small vocabulary, as
``python -m jobs.label`` does. ``many-shards`` groups the images into ``--shards`` output shards;
``one-shard`` puts them all into one shard (``--shard-size`` = the number of images).

Reported, in MiB: the driver's resident memory before Ray starts, after ``ray.init`` (the
baseline of the job), its peak during the run (sampled every 50 ms by a thread, and the kernel's
``ru_maxrss``, which also counts image writing and imports), and the size of the Parquet output
(the rows, which went through the driver before the job wrote part files on the workers). The
workers' memory is not counted: they are other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

MIB = 1024 * 1024


class PeakRss:
    """The highest RSS of this process seen by a sampling thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` tiny PNGs: noise with two flat rectangles (something for the masks to find)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
        a, b = sorted(rng.integers(0, size, 2))
        img[a : b + 1, : size // 2] = rng.integers(64, 256, 3, dtype=np.uint8)
        img[size // 2 :, a : b + 1] = rng.integers(64, 256, 3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:06d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=["many-shards", "one-shard"], required=True)
    p.add_argument("--shards", type=int, default=200, help="many-shards: output shards")
    p.add_argument("--images-per-shard", type=int, default=4, help="many-shards: images each")
    p.add_argument("--images", type=int, default=5000, help="one-shard: images in the shard")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--checkpoint", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local cluster")
    p.add_argument("--workdir", default="/tmp/driver_memory", help="images and labels go here")
    p.add_argument("--out", help="append the result as a JSON line to this file")
    args = p.parse_args()

    before_imports = psutil.Process().memory_info().rss
    import ray

    from pipeline.labeling.config import LabelJobConfig
    from pipeline.labeling.job import run_label_job
    from pipeline.vocabulary import Vocabulary

    if args.case == "many-shards":
        n_images, shard_size = args.shards * args.images_per_shard, args.images_per_shard
    else:
        n_images, shard_size = args.images, args.images
    work = Path(args.workdir) / f"{args.case}-{n_images}x{args.size}"
    images, labels = work / "images", work / "labels"
    if not images.is_dir() or len(list(images.iterdir())) != n_images:
        shutil.rmtree(images, ignore_errors=True)
        write_images(images, n_images, args.size)
    shutil.rmtree(labels, ignore_errors=True)

    vocabulary = Vocabulary.from_lists(things=["robot", "car"], stuff=["sky"], parts=["head"])
    config = LabelJobConfig(
        inputs=(str(images),),
        output=str(labels),
        vocabulary_json=vocabulary.to_json(),
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        actors=1,
        cpus_per_actor=0.5,
        folder_shard_size=shard_size,
    )
    rss = psutil.Process().memory_info
    before_ray = rss().rss
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    )
    after_init = rss().rss
    start = time.perf_counter()
    with PeakRss() as peak:
        summary = run_label_job(config, progress=False)
    seconds = time.perf_counter() - start
    ray.shutdown()
    output_bytes = sum(f.stat().st_size for f in labels.glob("*.parquet"))
    result = {
        "case": args.case,
        "shards": summary.shards,
        "images": summary.images_ok + summary.images_error,
        "images_ok": summary.images_ok,
        "image_size": args.size,
        "masks": sum(summary.masks_per_level.values()),
        "seconds": round(seconds, 1),
        "rss_mib_before_imports": round(before_imports / MIB, 1),
        "rss_mib_before_ray": round(before_ray / MIB, 1),
        "rss_mib_after_ray_init": round(after_init / MIB, 1),
        "rss_mib_peak_during_run": round(peak.peak / MIB, 1),
        "growth_mib_during_run": round((peak.peak - after_init) / MIB, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "parquet_mib": round(output_bytes / MIB, 2),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, {platform.machine()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
