"""Command line: run one HIPIE task on one image and write JSON with COCO RLE masks.

    python -m hipie.predict --task panoptic --image photo.jpg --things "dog,person" \
        --stuff "grass,sky" --preset tiny --out result.json

Tasks: semantic, instance, detect, parts (use --vocabulary, parts: the part vocabulary),
panoptic (--things/--stuff), hierarchy (--things/--stuff/--parts), refer (--expression).
Without --checkpoint the preset is built with random weights (useful for plumbing only).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from schemas import rle

TASKS = ("semantic", "instance", "detect", "parts", "panoptic", "hierarchy", "refer")


def _labels(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def segments_to_json(seg) -> list[dict]:
    """`Segments` -> list of JSON-ready dicts (bbox as XYXY pixels, mask as COCO RLE)."""
    masks = seg.masks.cpu().numpy()
    out = []
    for i in range(len(seg)):
        out.append(
            {
                "label": seg.labels[i],
                "label_id": int(seg.label_ids[i]),
                "score": float(seg.scores[i]),
                "bbox_xyxy": [float(v) for v in seg.boxes[i].tolist()],
                "level": seg.level[i],
                "parent": int(seg.parents[i]),
                "is_thing": bool(seg.is_thing[i]),
                "mask": rle.encode(masks[i]) if masks.shape[1] else seg.rles[i],
            }
        )
    return out


def run(args: argparse.Namespace) -> dict:
    """Run the task described by parsed `args`; return the JSON-ready result."""
    from PIL import Image

    from hipie.build import build_hipie
    from hipie.predictor import HipiePredictor

    image = np.asarray(Image.open(args.image).convert("RGB"))
    if args.checkpoint:
        model = build_hipie(checkpoint=args.checkpoint)
    else:
        model = build_hipie(args.preset)
    predictor = HipiePredictor(model, device=args.device)
    vocab, things, stuff, parts = (
        _labels(args.vocabulary),
        _labels(args.things),
        _labels(args.stuff),
        _labels(args.parts),
    )
    result: dict = {
        "task": args.task,
        "image": {"path": str(args.image), "height": image.shape[0], "width": image.shape[1]},
    }
    if args.task == "semantic":
        sem = predictor.semantic(image, vocab)
        label_map = sem.label_map.cpu().numpy()
        result["vocabulary"] = sem.labels
        result["segments"] = [
            {"label": sem.labels[k], "label_id": int(k), "mask": rle.encode(label_map == k)}
            for k in np.unique(label_map)
        ]
        return result
    if args.task in ("instance", "detect", "parts"):
        seg = getattr(predictor, args.task)(image, vocab)
    elif args.task == "panoptic":
        seg = predictor.panoptic(image, things, stuff)
    elif args.task == "hierarchy":
        seg = predictor.hierarchy(image, things, stuff, parts)
    else:
        seg = predictor.refer(image, args.expression or "")
    result["vocabulary"] = seg.vocabulary
    result["segments"] = segments_to_json(seg)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hipie.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument(
        "--vocabulary", help="comma-separated labels (semantic/instance/detect/parts)"
    )
    parser.add_argument("--things", help="comma-separated thing labels")
    parser.add_argument("--stuff", help="comma-separated stuff labels")
    parser.add_argument("--parts", help="comma-separated part names (hierarchy)")
    parser.add_argument("--expression", help="referring expression (refer)")
    parser.add_argument("--checkpoint", help="checkpoint folder, or 'tiny' for the shipped weights")
    parser.add_argument("--preset", default="tiny", help="preset when no checkpoint is given")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps(result))
    print(f"{len(result['segments'])} segments -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
