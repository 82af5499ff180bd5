"""Speed of the SAM vote's intersection areas (Eq. 5) at SA-1B size.

300 SAM masks x 300 HIPIE masks on a 1500 x 2250 image (random elliptical blobs), through:
- the dense path at full resolution (exact), and area-downsampled to max_side 1024 and 512;
- the RLE path (pycocotools, exact), from RLEs as SA-1B ships them.
Each line gives the best of ``--repeats`` timings of `intersection_areas` and of the whole `vote`
(which adds the coverage of every SAM mask by the union of the HIPIE masks), and for the
downsampled runs the error against the exact areas.

    .venv/bin/python bench/vote_speed.py                # CUDA if available, else CPU
    .venv/bin/python bench/vote_speed.py --device cpu --sam 100 --hipie 100
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils

from hipie.vote import intersection_areas, vote


def random_blobs(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """``(num, H, W)`` bool ellipses of random size (0.05%..10% of the image), drawn in their box."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num, height, width), dtype=bool)
    for i in range(num):
        ry = rng.uniform(0.01, 0.25) * height
        rx = rng.uniform(0.01, 0.25) * width
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, height)
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, width)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        masks[i, y0:y1, x0:x1] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return masks


def encode(masks: np.ndarray) -> list[dict]:
    """``(N, H, W)`` bool -> COCO RLEs with str counts."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in rles]


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Best wall time over ``repeats`` runs after one warm-up run; returns (seconds, result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sam", type=int, default=300, help="number of SAM masks")
    parser.add_argument("--hipie", type=int, default=300, help="number of HIPIE masks")
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--classes", type=int, default=150, help="classes of the HIPIE probs")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
    args = parser.parse_args()

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device={device} ({name or 'cpu'}), torch threads={torch.get_num_threads()}, "
        f"{args.sam} SAM x {args.hipie} HIPIE masks on {args.height} x {args.width}, "
        f"best of {args.repeats} after a warm-up"
    )

    t0 = time.perf_counter()
    sam_np = random_blobs(args.sam, args.height, args.width, seed=0)
    hipie_np = random_blobs(args.hipie, args.height, args.width, seed=1)
    sam_rle, hipie_rle = encode(sam_np), encode(hipie_np)
    sam = torch.from_numpy(sam_np).to(device)
    hipie = torch.from_numpy(hipie_np).to(device)
    del sam_np, hipie_np
    probs = torch.softmax(torch.randn(args.hipie, args.classes), dim=1).to(device)
    print(f"setup (masks, RLE encoding, transfer): {time.perf_counter() - t0:.1f} s")

    exact = None
    for max_side in (None, 1024, 512):
        label = "dense full-res" if max_side is None else f"dense max_side={max_side}"
        t_inter, inter = best_time(
            lambda m=max_side: intersection_areas(sam, hipie, max_side=m), args.repeats, device
        )
        t_vote, _ = best_time(
            lambda m=max_side: vote(sam, hipie, probs, max_side=m), args.repeats, device
        )
        line = (
            f"{label:24s} intersection_areas {t_inter * 1e3:9.1f} ms   vote {t_vote * 1e3:9.1f} ms"
        )
        inter = inter.cpu()
        if exact is None:
            exact = inter
        else:
            err = (inter - exact).abs()
            big = exact > 1000
            rel = (err[big] / exact[big]).max().item() if big.any() else 0.0
            line += f"   max abs err {err.max().item():.0f} px, max rel err (>1000 px) {rel:.2%}"
        print(line)

    t_inter, inter = best_time(lambda: intersection_areas(sam_rle, hipie_rle), args.repeats, device)
    t_vote, _ = best_time(lambda: vote(sam_rle, hipie_rle, probs), args.repeats, device)
    same = torch.equal(inter, exact)
    print(
        f"{'RLE (pycocotools)':24s} intersection_areas {t_inter * 1e3:9.1f} ms   "
        f"vote {t_vote * 1e3:9.1f} ms   equals dense exact: {same}"
    )
    nonzero = int((exact > 0).sum())
    print(f"overlapping pairs: {nonzero} of {exact.numel()}")


if __name__ == "__main__":
    main()
