"""Our batched automatic mask generator vs segment-anything's ``SamAutomaticMaskGenerator``.

Same weights, same parameters, same photo-like synthetic image (default 1500 x 2250, SA-1B's
size): seconds per image of each, the speed-up, the number of masks, and how well the masks
agree (for each stock mask the IoU of the best of ours, and the other way round: mean, and the
fraction at IoU >= 0.9). Random weights give low predicted IoUs and stability scores, so the
score thresholds default to 0 here (``--stock-thresholds`` puts back 0.88 / 0.95).

    python -m bench.amg_speed --model-type vit_h --device cuda --points-per-side 32 --repeat 3
    python -m bench.amg_speed --model-type vit_h --device cuda --autocast bfloat16
    python -m bench.amg_speed --model-type vit_h --device cuda --stock-thresholds
    python -m bench.amg_speed --model-type tiny --device cpu --points-per-side 16 --repeat 1 \
        --warmup 0

Ours is timed ``--repeat`` times after ``--warmup`` untimed runs, the stock ``--stock-repeat``
times (default once: with lowered thresholds it encodes an RLE of every mask before its NMS,
which is slow). Per-image seconds of ours are for ``generate_batch`` over ``--batch`` images.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from pipeline.masks.build import SAM_BUILDERS, build_sam
from pipeline.masks.sam import BatchedMaskGenerator


def synthetic_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 scene: sky and ground gradients, shaded ellipses and boxes,
    sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    v, u = yy / height, xx / width
    horizon = 0.45 + 0.1 * np.sin(2 * np.pi * u * rng.uniform(0.5, 2))
    sky = np.stack([110 + 80 * v, 150 + 60 * v, 230 - 30 * v], -1)
    ground = np.stack([90 + 40 * v, 120 + 30 * v, 60 + 20 * v], -1)
    img = np.where((v < horizon)[..., None], sky, ground)
    for _ in range(25):
        color = rng.uniform(20, 235, 3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        if rng.random() < 0.5:
            ry, rx = rng.uniform(0.03, 0.2) * height, rng.uniform(0.03, 0.2) * width
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            inside = d < 1
            shade = 1.0 - 0.35 * np.clip(d, 0, 1)  # darker towards the rim
        else:
            hh, hw = rng.uniform(0.03, 0.15) * height, rng.uniform(0.03, 0.15) * width
            inside = (np.abs(yy - cy) < hh) & (np.abs(xx - cx) < hw)
            shade = 1.0 - 0.3 * (yy - cy + hh) / (2 * hh)  # lit from above
        img = np.where(inside[..., None], color * shade[..., None], img)
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def agreement(ours: list[dict], stock: list[dict]) -> dict:
    """Best-match IoUs between two lists of COCO RLEs, both ways."""
    if not ours or not stock:
        both_empty = not ours and not stock
        return {
            "mean_iou_stock_to_ours": float(both_empty),
            "frac_stock_matched_0.9": float(both_empty),
            "mean_iou_ours_to_stock": float(both_empty),
            "frac_ours_matched_0.9": float(both_empty),
        }
    iou = np.asarray(mask_utils.iou(ours, stock, [0] * len(stock))).reshape(len(ours), len(stock))
    area_o = np.array([mask_utils.area(r) for r in ours])
    area_s = np.array([mask_utils.area(r) for r in stock])
    iou[(area_o == 0)[:, None] & (area_s == 0)[None, :]] = 1.0  # two empty masks agree
    best_s, best_o = iou.max(axis=0), iou.max(axis=1)
    return {
        "mean_iou_stock_to_ours": float(best_s.mean()),
        "frac_stock_matched_0.9": float((best_s >= 0.9).mean()),
        "mean_iou_ours_to_stock": float(best_o.mean()),
        "frac_ours_matched_0.9": float((best_o >= 0.9).mean()),
    }


def timed(fn, device: torch.device, repeat: int) -> tuple[float, object]:
    """Mean seconds of ``repeat`` calls of ``fn()`` and its last result."""
    out = None
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.mean(times)), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="vit_h", choices=sorted(SAM_BUILDERS))
    parser.add_argument("--checkpoint", default=None, help="SAM state dict (default: random)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=256, help="ours (stock: 64)")
    parser.add_argument("--batch", type=int, default=1, help="images per generate_batch (ours)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of ours")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of ours first")
    parser.add_argument(
        "--stock-repeat", type=int, default=1, help="timed runs of the stock generator (slow)"
    )
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-score-thresh", type=float, default=0.0)
    parser.add_argument(
        "--stock-thresholds", action="store_true", help="use SAM's 0.88 / 0.95 thresholds"
    )
    parser.add_argument(
        "--autocast", choices=["bfloat16"], default=None, help="ours; meant for CUDA"
    )
    parser.add_argument("--skip-stock", action="store_true", help="time ours only")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    sam = build_sam(args.model_type, args.checkpoint, device)
    params = dict(
        points_per_side=args.points_per_side,
        pred_iou_thresh=0.88 if args.stock_thresholds else args.pred_iou_thresh,
        stability_score_thresh=0.95 if args.stock_thresholds else args.stability_score_thresh,
    )
    images = [synthetic_photo(args.height, args.width, seed=i) for i in range(args.batch)]
    ours = BatchedMaskGenerator(
        sam, points_per_batch=args.points_per_batch, autocast_dtype=args.autocast, **params
    )
    stock = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params)
    print(f"device={device} model={args.model_type} image={args.height}x{args.width} {params}")

    for _ in range(args.warmup):
        ours.generate_batch(images)
    t_ours, ours_out = timed(lambda: ours.generate_batch(images), device, args.repeat)
    t_ours /= len(images)
    ours_rles = [m.rle for m in ours_out[0]]
    print(f"ours:  {t_ours:.3f} s/image ({len(ours_rles)} masks on image 0, batch {len(images)})")
    result = {"ours_s_per_image": t_ours, "ours_masks": len(ours_rles)}
    if not args.skip_stock:
        # No warm-up of its own: ours ran first on the same model (CUDA context, kernels).
        t_stock, stock_out = timed(lambda: stock.generate(images[0]), device, args.stock_repeat)
        stock_rles = [m["segmentation"] for m in stock_out]
        agree = agreement(ours_rles, stock_rles)
        print(f"stock: {t_stock:.3f} s/image ({len(stock_rles)} masks)")
        print(f"speed-up: {t_stock / t_ours:.1f}x")
        print("agreement: " + ", ".join(f"{k}={v:.4f}" for k, v in agree.items()))
        result.update(
            stock_s_per_image=t_stock,
            stock_masks=len(stock_rles),
            speedup=t_stock / t_ours,
            **agree,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
