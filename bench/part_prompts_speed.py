"""Cost of the part pass with and without the vocabulary's `thing_parts` (the labeler's hierarchy).

    python bench/part_prompts_speed.py                     # default vocabulary, COCO sample photos
    python bench/part_prompts_speed.py --checkpoint random:r50 --device cuda --repeats 10

Times `HipiePredictor.hierarchy_batch` (things + stuff pass and part pass on one image encoding)
for the shipped default vocabulary (133 COCO-panoptic classes + Pascal-Panoptic-Parts-style
parts) twice: with its per-thing part lists (only the listed "<thing> <part>" prompts) and with
every thing x part composition, as before `thing_parts` existed. The text features of each
prompt set are computed once before timing (the labeler caches them per actor); the first,
uncached call is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.labeling.labeler import load_model, make_predictor
from pipeline.vocabulary import load_vocabulary

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_panoptic_sample"


def _photos(folder: Path) -> list[np.ndarray]:
    files = sorted((folder / "input_images").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no photos in {folder / 'input_images'}")
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="tiny", help="tiny | random:<preset> | folder")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per setting")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="COCO sample folder")
    args = p.parse_args()

    vocab = load_vocabulary()
    predictor = make_predictor(load_model(args.checkpoint), device=args.device)
    images = _photos(args.sample)
    things, stuff, parts = list(vocab.things), list(vocab.stuff), list(vocab.parts)
    groups = dict(vocab.part_groups)
    settings = {
        "thing_parts (shipped)": dict(vocab.thing_parts),
        "every composition": None,
    }
    results = {}
    for name, thing_parts in settings.items():

        def call(thing_parts=thing_parts):
            start = time.perf_counter()
            out = predictor.hierarchy_batch(
                images, things, stuff, parts, thing_parts=thing_parts, part_groups=groups
            )
            return time.perf_counter() - start, out

        first, _ = call()  # includes the text encoder on the prompts
        times, parts_found = [], 0
        for _ in range(args.repeats):
            seconds, out = call()
            times.append(seconds)
            parts_found = sum(seg.level.count("part") + seg.level.count("subpart") for seg in out)
        prompts = len(vocab.part_prompts()) if thing_parts else len(things) * len(parts)
        results[name] = {
            "part_prompts": prompts,
            "first_call_s": round(first, 3),
            "s_per_image": round(float(np.median(times)) / len(images), 4),
            "parts_found": parts_found,
        }
    print(json.dumps({"checkpoint": args.checkpoint, "images": len(images), **results}, indent=2))


if __name__ == "__main__":
    main()
