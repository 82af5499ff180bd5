"""Our port of the released HIPIE against the official code's own timings, on the same input.

    python bench/release_forward.py                    # r50, the fixtures' photo at short side 304
    python bench/release_forward.py --preset vit_h --threads 2

Builds the release architecture with random weights (BERT-base shape, offline; timings do not
depend on the values), then times the three calls the official fixtures time
(`../shared/data/official_hipie_ref/<preset>/summary.json` -> `timings`): the things+stuff pass,
the part pass and the grounding pass, each a full predictor call from the uint8 photo (resize,
encode, pass, post-processing), as `PartSegmDemo` runs them. Prints the parameter count (unique
parameters, as the release's 197.69 M / 805.25 M) and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hipie.release_build import parameter_count, release_model
from hipie.release_predictor import ReleasePredictor

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHOTO = SHARED / "data" / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"
PARTS = ["person head", "person torso", "person arm", "person leg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="r50", choices=["r50", "vit_h"])
    parser.add_argument("--size", type=int, default=304, help="test short side (fixtures: 304)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of N per pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = release_model(args.preset)
    predictor = ReleasePredictor(model, min_size=args.size)
    image = np.asarray(Image.open(PHOTO).convert("RGB"))
    calls = {
        "det": lambda: predictor.universal(
            image, ["person", "dog", "ball"], ["grass", "sky", "tree"]
        ),
        "part": lambda: predictor.universal(image, [], PARTS),
        "ref": lambda: predictor.refer(image, "the person on the left"),
    }
    ours = {}
    for name, call in calls.items():
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        ours[f"{name}_forward_s"] = round(best, 2)
    official = {}
    summary = SHARED / "data" / "official_hipie_ref" / args.preset / "summary.json"
    if summary.exists():
        timings = json.loads(summary.read_text())["timings"]
        official = {k: v for k, v in timings.items() if k.endswith("_forward_s")}
    result = {
        "preset": args.preset,
        "size": args.size,
        "threads": args.threads,
        "parameters_M": round(parameter_count(model) / 1e6, 2),
        "ours": ours,
        "official_fixture_timings": official,
    }
    for k, v in ours.items():
        print(f"{k:16s} ours {v:7.2f} s   official {official.get(k, float('nan')):7.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
