"""CPU milliseconds per image outside the model forward, per stage, at SA-1B size.

One 2250 x 1500 JPEG with 100 class-agnostic SAM masks (SA-1B json, COCO RLE) and a HIPIE
hierarchy of 150 segments (50 panoptic segments that tile the image, 100 parts inside the things),
built directly as the predictor returns it, so that the figures do not depend on a trained model.
Stages: decode (the Ray decode task: JPEG decoded and resized to the model's size, mask json
validated and packed; and the labeler's unpacking of the SAM masks), RLE (HIPIE's masks, at the
model's resolution, RLE-encoded once at the image size), vote (Eq. 5 for the SAM masks, levels,
parents), rows (schema mask structs and the row) and Parquet (Arrow table + a zstd Parquet file,
per image of a 16-image file). One thread (``torch.set_num_threads(1)``); best of ``--repeats``.

    .venv/bin/python -m bench.cpu_side              # one line per stage, the total last (JSON)
    .venv/bin/python -m bench.cpu_side --method grid   # the device path's vote, on the CPU
    .venv/bin/python -m bench.cpu_side --device cuda   # HIPIE's outputs on the GPU (grid vote)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import schemas
from hipie.predictor import Segments


def _blob(rng: np.random.Generator, height: int, width: int, lo: float, hi: float) -> np.ndarray:
    """One random ellipse (radii ``lo..hi`` of the image sides) as an (H, W) bool mask."""
    ry, rx = rng.uniform(lo, hi) * height, rng.uniform(lo, hi) * width
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    yy, xx = np.ogrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def scene(height: int, width: int, model_h: int, model_w: int, *, seed: int = 0) -> dict:
    """The bench's image, SAM json and HIPIE hierarchy (at the model's resolution)."""
    rng = np.random.default_rng(seed)
    # HIPIE at the model's resolution: 50 regions (30 things, 20 stuff) tiling the image around
    # random centres, and 100 parts, each a thing cut by an ellipse.
    n_pan, n_things, n_parts = 50, 30, 100
    cy = rng.uniform(0, model_h, n_pan)
    cx = rng.uniform(0, model_w, n_pan)
    yy, xx = np.mgrid[:model_h, :model_w]
    weight = rng.uniform(0.5, 2.0, n_pan)
    dist = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) * weight[
        :, None, None
    ]
    owner = dist.argmin(0)
    pan = np.stack([owner == k for k in range(n_pan)])
    parts, part_of = [], []
    while len(parts) < n_parts:
        k = int(rng.integers(0, n_things))
        cut = pan[k] & _blob(rng, model_h, model_w, 0.03, 0.12)
        if cut.sum() >= 4:
            parts.append(cut)
            part_of.append(k)
    things = [f"thing{i}" for i in range(20)]
    stuff = [f"stuff{i}" for i in range(10)]
    part_names = [f"{t} {p}" for t in things for p in ("head", "leg", "wheel")]
    vocab = things + stuff + part_names
    num_c = len(vocab)
    probs = torch.zeros(n_pan + n_parts, num_c)
    labels = []
    for i in range(n_pan + n_parts):
        if i < n_things:
            cols = rng.choice(len(things), 3, replace=False)
        elif i < n_pan:
            cols = len(things) + rng.choice(len(stuff), 3, replace=False)
        else:
            thing = int(rng.integers(0, len(things)))
            cols = len(things) + len(stuff) + 3 * thing + rng.choice(3, 2, replace=False)
        p = rng.dirichlet(np.ones(len(cols)))
        probs[i, torch.as_tensor(cols)] = torch.as_tensor(p, dtype=torch.float32)
        labels.append(vocab[int(probs[i].argmax())])
    masks = torch.from_numpy(np.concatenate([pan, np.stack(parts)]))
    n = n_pan + n_parts
    hier = Segments(
        masks=masks,
        boxes=torch.zeros(n, 4),
        labels=labels,
        label_ids=probs.argmax(1),
        scores=torch.as_tensor(rng.uniform(0.3, 1.0, n), dtype=torch.float32),
        probs=probs,
        is_thing=torch.tensor([i < n_things or i >= n_pan for i in range(n)]),
        parents=torch.tensor([-1] * n_pan + part_of),
        level=["instance"] * n_things + ["stuff"] * (n_pan - n_things) + ["part"] * n_parts,
        vocabulary=vocab,
    )
    # SAM at full resolution: the 50 regions and 50 of the parts, nearest-upsampled and cut by a
    # random ellipse (masks that follow HIPIE's but differ), as SA-1B json.
    rows = np.minimum((np.arange(height) * model_h) // height, model_h - 1)
    cols = np.minimum((np.arange(width) * model_w) // width, model_w - 1)
    annotations = []
    for k in range(100):
        base = pan[k] if k < n_pan else parts[k - n_pan]
        full = base[rows][:, cols]
        if k % 3 == 0:
            full = full & ~_blob(rng, height, width, 0.02, 0.08)
        rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append(
            {
                "id": k,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                "bbox": [x, y, w, h],
                "area": int(mask_utils.area(rle)),
                "predicted_iou": float(rng.uniform(0.8, 1.0)),
                "stability_score": float(rng.uniform(0.9, 1.0)),
            }
        )
    sam_json = json.dumps({"image": {"width": width, "height": height}, "annotations": annotations})
    # A photo-like image: smooth colour fields plus noise, JPEG quality 90.
    base = np.stack([owner * 5 % 256, owner * 11 % 256, owner * 17 % 256], -1).astype(np.float32)
    image = np.asarray(
        Image.fromarray(base.astype(np.uint8)).resize((width, height), Image.BILINEAR), np.float32
    )
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return {
        "jpeg": buffer.getvalue(),
        "sam_json": sam_json.encode(),
        "hier": hier,
        "things": things,
        "height": height,
        "width": width,
    }


def best_ms(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall milliseconds of ``repeats`` runs after a warm-up (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--model-side", type=int, default=320, help="the model's test size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--method", default="auto", choices=["auto", "rle", "grid"], help="the vote's intersections"
    )
    parser.add_argument(
        "--device", default="cpu", help="where HIPIE's outputs live (cuda: the GPU deployment)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)

    from hipie import HipiePredictor, build_hipie, rle_torch
    from pipeline.labeling.labeler import replace_classes, segments_to_masks
    from pipeline.labeling.transform import decode_record
    from pipeline.masks.sam_json import unpack_sam_masks

    scale = args.model_side / max(args.height, args.width)
    model_h, model_w = round(args.height * scale), round(args.width * scale)
    data = scene(args.height, args.width, model_h, model_w)
    predictor = HipiePredictor(build_hipie("tiny"))
    record = {
        "shard": "s",
        "image_id": "1",
        "uri": "u",
        "error": "",
        "data": data["jpeg"],
        "has_sam_json": True,
        "sam_json": data["sam_json"],
        "_end": False,
        "_count": 0,
    }
    hier = data["hier"]
    hier = Segments(
        **{k: v.to(device) if torch.is_tensor(v) else v for k, v in hier.__dict__.items()}
    )
    size = (args.height, args.width)
    stages: dict[str, float] = {}

    def decode():  # the decode task, and the labeler's unpacking of the SAM masks
        out = decode_record(record, max_pixels=10**9, max_side=args.model_side)
        assert out["image"].shape[:2] == (model_h, model_w), out["image"].shape
        return unpack_sam_masks(out["sam_counts"], out["sam_meta"], out["height"], out["width"])

    stages["decode"], sam = best_ms(decode, args.repeats)
    stages["rle"], encoded = best_ms(lambda: rle_torch.encode(hier.masks, size), args.repeats)
    sam_rles = [s["rle"] for s in sam]
    stages["vote"], voted = best_ms(
        lambda: predictor.vote_from_hierarchy(
            hier, sam_rles, data["things"], hipie_rles=encoded.rles, method=args.method
        ),
        args.repeats,
    )

    def rows():
        hier_masks = segments_to_masks(hier, topk=3, encoded=encoded)
        sam_masks = segments_to_masks(voted, topk=3, sam_records=sam)
        masks = replace_classes(sam_masks, hier_masks, {"thing0", "thing1"})
        return schemas.make_ok_row(
            image_id="1", uri="u", shard="s", width=args.width, height=args.height,
            masks=masks, model="m", vocabulary_hash="h",
        )  # fmt: skip

    stages["rows"], row = best_ms(rows, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.parquet")

        def parquet():
            table = pa.Table.from_pylist([row] * 16, schema=schemas.LABELS_V1)
            pq.write_table(table, path, compression="zstd")

        ms, _ = best_ms(parquet, args.repeats)
        stages["parquet"] = ms / 16
    print(
        f"{args.width} x {args.height}, model side {args.model_side} ({model_w} x {model_h}), "
        f"{len(sam)} SAM masks, {len(hier)} HIPIE segments, {len(row['masks'])} masks in the row, "
        f"vote method {args.method}, device {device}, torch threads {torch.get_num_threads()}, "
        f"JPEG {len(data['jpeg']) // 1024} KiB"
    )
    for name, ms in stages.items():
        print(f"{name:8s} {ms:8.1f} ms")
    total = sum(stages.values())
    print(json.dumps({"total_ms": round(total, 1), **{k: round(v, 1) for k, v in stages.items()}}))


if __name__ == "__main__":
    main()
