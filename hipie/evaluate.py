"""Command-line evaluation: `python -m hipie.evaluate panoptic ...` and `... synthetic ...`.

`synthetic` builds a HIPIE model (`hipie.build_hipie`), runs `hipie.HipiePredictor` on generated
scenes and prints every metric (`hipie.evaluation.benchmark.evaluate_scenes`).

`panoptic` follows the COCO-panoptic file conventions (as panopticapi's `pq_compute`): a JSON
with `annotations` (one per image: `image_id`, `file_name` of the PNG, `segments_info`) and
`categories` (`id`, `isthing`), and a folder of PNGs whose colours encode segment ids as
R + 256 G + 256^2 B. Predictions are paired with ground truth by `image_id`. Prints
{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ...} with fractions in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hipie.evaluation.metrics import PanopticImage, PanopticResult, panoptic_quality, rgb_to_id

# The released architecture's predictor has no flat semantic task; its panoptic, instance, part
# (semantic part segmentation from the part pass) and grounding outputs are scored.
RELEASE_TASKS = ("panoptic", "instance", "referring", "parts")

__all__ = ["evaluate_panoptic_files", "evaluate_synthetic", "main"]


def _load_id_map(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return rgb_to_id(rgb)


def evaluate_panoptic_files(
    *,
    gt_json: str | Path,
    gt_folder: str | Path,
    pred_json: str | Path,
    pred_folder: str | Path,
    categories_json: str | Path | None = None,
) -> PanopticResult:
    """PQ of a COCO-panoptic prediction (JSON + PNG folder) against ground truth in the same format.

    Categories come from `categories_json` (a list, or a dict with `categories`) or else from
    the ground-truth JSON. Every ground-truth image needs a prediction; predictions for images
    absent from the ground truth are an error.
    """
    gt_data = json.loads(Path(gt_json).read_text())
    pred_data = json.loads(Path(pred_json).read_text())
    if categories_json is not None:
        categories = json.loads(Path(categories_json).read_text())
        if isinstance(categories, dict):
            categories = categories["categories"]
    else:
        categories = gt_data["categories"]
    pred_by_image = {ann["image_id"]: ann for ann in pred_data["annotations"]}
    gt_ids = {ann["image_id"] for ann in gt_data["annotations"]}
    extra = sorted(set(pred_by_image) - gt_ids, key=str)
    if extra:
        raise ValueError(f"predictions for images not in the ground truth: {extra[:5]}")

    gts: list[PanopticImage] = []
    preds: list[PanopticImage] = []
    for gt_ann in gt_data["annotations"]:
        pred_ann = pred_by_image.get(gt_ann["image_id"])
        if pred_ann is None:
            raise ValueError(f"no prediction for image {gt_ann['image_id']}")
        gts.append(
            PanopticImage(
                id_map=_load_id_map(Path(gt_folder) / gt_ann["file_name"]),
                segments=gt_ann["segments_info"],
            )
        )
        preds.append(
            PanopticImage(
                id_map=_load_id_map(Path(pred_folder) / pred_ann["file_name"]),
                segments=pred_ann["segments_info"],
            )
        )
    return panoptic_quality(gts, preds, categories)


def evaluate_synthetic(
    *,
    preset: str = "tiny",
    checkpoint: str | None = "tiny",
    num_images: int = 50,
    seed: int = 1234,
    width: int = 256,
    height: int = 256,
    held_out: bool = False,
    device: str | None = None,
    tasks: Sequence[str] | None = None,
) -> dict:
    """Score a HIPIE model on freshly generated synthetic scenes (all tasks of Table 2).

    Scenes come from `hipie.synthetic.generator.SceneGenerator` with `seed`; pick a seed that was
    not used for training. `held_out=True` draws the held-out compositions.
    """
    import hipie
    from hipie.evaluation.benchmark import TASKS, evaluate_scenes
    from hipie.modeling.hipie_release import HipieRelease
    from hipie.release_hierarchy import ReleaseHierarchyPredictor
    from hipie.synthetic.generator import SceneConfig, SceneGenerator

    model = hipie.build_hipie(preset, checkpoint)
    if isinstance(model, HipieRelease):  # the released architecture (e.g. tiny retrained on it)
        predictor = ReleaseHierarchyPredictor(model, device=device)
        default_tasks = RELEASE_TASKS
    else:
        predictor = hipie.HipiePredictor(model, device=device)
        default_tasks = TASKS
    config = SceneConfig(width=width, height=height, held_out=held_out)
    scenes = SceneGenerator(config, seed).scenes(0, num_images)
    result = evaluate_scenes(predictor, scenes, tasks=tuple(tasks) if tasks else default_tasks)
    result["held_out"] = held_out
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hipie.evaluate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    pan = sub.add_parser("panoptic", help="PQ / SQ / RQ of COCO-panoptic files")
    pan.add_argument("--gt-json", required=True, help="ground-truth COCO-panoptic JSON")
    pan.add_argument("--gt-folder", required=True, help="folder of ground-truth PNGs")
    pan.add_argument("--pred-json", required=True, help="predicted COCO-panoptic JSON")
    pan.add_argument("--pred-folder", required=True, help="folder of predicted PNGs")
    pan.add_argument("--categories-json", default=None, help="categories (default: from gt JSON)")
    pan.add_argument("--per-class", action="store_true", help="also print per-category numbers")

    syn = sub.add_parser("synthetic", help="score a HIPIE model on generated synthetic scenes")
    syn.add_argument("--preset", default="tiny", help="model preset (tiny, r50, vit_h)")
    syn.add_argument("--checkpoint", default="tiny", help="checkpoint folder, a preset name for "
                     "the shipped weights, or 'none' for random weights")  # fmt: skip
    syn.add_argument("--num-images", type=int, default=50, help="scenes to generate")
    syn.add_argument("--seed", type=int, default=1234, help="scene generator seed")
    syn.add_argument("--width", type=int, default=256, help="scene width")
    syn.add_argument("--height", type=int, default=256, help="scene height")
    syn.add_argument("--held-out", action="store_true", help="use held-out compositions")
    syn.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    syn.add_argument("--tasks", nargs="+", default=None, help="subset of the tasks to run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the result as JSON on stdout and returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "panoptic":
        result = evaluate_panoptic_files(
            gt_json=args.gt_json,
            gt_folder=args.gt_folder,
            pred_json=args.pred_json,
            pred_folder=args.pred_folder,
            categories_json=args.categories_json,
        )
        out = result.to_dict()
        if args.per_class:
            out["per_class"] = {str(k): v for k, v in result.per_class.items()}
    else:
        out = evaluate_synthetic(
            preset=args.preset,
            checkpoint=None if args.checkpoint.lower() == "none" else args.checkpoint,
            num_images=args.num_images,
            seed=args.seed,
            width=args.width,
            height=args.height,
            held_out=args.held_out,
            device=args.device,
            tasks=args.tasks,
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
