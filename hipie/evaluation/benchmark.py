"""Evaluate a predictor on synthetic scenes: every metric of Table 2 on data we can generate.

`evaluate_scenes(predictor, scenes)` runs the predictor's tasks on each scene and scores them
against the scene's ground truth:

- panoptic: PQ / SQ / RQ (things + stuff vocabulary);
- semantic: mIoU over the 10 thing and stuff classes;
- instance: AP box and AP mask (COCOeval) of the thing classes;
- referring: oIoU of the scene's referring expressions (and the mean per-expression IoU);
- parts: mIoU_PartS, the paper's part metric: IoU over the grouped "object-part" classes
  (Sec. 4 / Pascal-Panoptic-Parts: a subpart counts as its part, "robot eye" as "robot head");
  `miou_fine` scores every object-part class, subparts on their own (stricter). Pixels outside
  every part are ignored. The prediction is the part pass's segments painted by score.

The predictor is duck-typed like `hipie.HipiePredictor`: `panoptic(image, things, stuff)`,
`instance(image, vocabulary)`, `refer(image, expression)` and `parts(image, part_vocabulary)`
return objects with `masks (N, H, W)` bool, `boxes (N, 4)` XYXY pixels, `labels` (N strings) and
`scores (N,)`; `semantic(image, vocabulary)` returns an object with `label_map (H, W)` indices
into `labels`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from hipie.evaluation.metrics import (
    PanopticImage,
    coco_ap,
    miou,
    miou_parts,
    oiou,
    panoptic_quality,
    part_label_map,
)
from hipie.synthetic.scene import (
    CATEGORIES,
    PART_CLASSES,
    PART_OF_SUBPART,
    STUFF_CLASSES,
    THING_CLASSES,
    Scene,
    category_id,
)
from schemas import rle

__all__ = ["GROUPED_PART_CLASSES", "TASKS", "evaluate_scenes", "group_part_map"]

# the part-level classes that mIoU_PartS averages over (subparts folded into them)
GROUPED_PART_CLASSES: tuple[str, ...] = tuple(c for c in PART_CLASSES if c not in PART_OF_SUBPART)
_GROUP_LUT = np.array(
    [GROUPED_PART_CLASSES.index(PART_OF_SUBPART.get(c, c)) for c in PART_CLASSES] + [255],
    dtype=np.int64,
)

TASKS: tuple[str, ...] = ("panoptic", "semantic", "instance", "referring", "parts")


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _paint(masks: np.ndarray, scores: np.ndarray) -> list[int]:
    """Drawing order for possibly overlapping masks: ascending score, so the best one wins."""
    return np.argsort(scores, kind="stable").tolist() if len(scores) else []


def _panoptic_prediction(seg: Any, shape: tuple[int, int]) -> PanopticImage:
    masks = _numpy(seg.masks).astype(bool)
    scores = _numpy(seg.scores).astype(np.float64)
    id_map = np.zeros(shape, dtype=np.int64)
    infos = {}
    for i in _paint(masks, scores):
        if seg.labels[i] not in THING_CLASSES + STUFF_CLASSES:
            continue  # e.g. "other"
        id_map[masks[i]] = i + 1
        infos[i + 1] = {"id": i + 1, "category_id": category_id(seg.labels[i])}
    present = set(np.unique(id_map).tolist())
    return PanopticImage(id_map=id_map, segments=[s for k, s in infos.items() if k in present])


def _panoptic_gt(scene: Scene) -> PanopticImage:
    return PanopticImage(id_map=scene.id_map(), segments=scene.segments_info())


def _instance_gt(scenes: Sequence[Scene]) -> dict:
    images, annotations = [], []
    for scene in scenes:
        images.append({"id": scene.image_id, "width": scene.width, "height": scene.height})
        for seg in scene.segments:
            if seg.isthing:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": scene.image_id,
                    "category_id": seg.category_id, "bbox": seg.bbox, "area": seg.area,
                    "iscrowd": 0, "segmentation": rle.encode(seg.mask),
                })  # fmt: skip
    categories = [dict(c) for c in CATEGORIES if c["isthing"]]
    return {"images": images, "annotations": annotations, "categories": categories}


def _instance_results(scene: Scene, seg: Any) -> list[dict]:
    masks = _numpy(seg.masks).astype(bool)
    boxes = _numpy(seg.boxes).astype(np.float64)
    scores = _numpy(seg.scores).astype(np.float64)
    out = []
    for i, label in enumerate(seg.labels):
        if label not in THING_CLASSES:
            continue
        x0, y0, x1, y1 = boxes[i].tolist()
        out.append({
            "image_id": scene.image_id, "category_id": category_id(label),
            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle.encode(masks[i]),
            "score": float(scores[i]),
        })  # fmt: skip
    return out


def _part_prediction(seg: Any, shape: tuple[int, int]) -> np.ndarray:
    masks = _numpy(seg.masks).astype(bool)
    scores = _numpy(seg.scores).astype(np.float64)
    order = [i for i in _paint(masks, scores) if seg.labels[i] in PART_CLASSES]
    return part_label_map(
        masks[order] if order else np.zeros((0, *shape), dtype=bool),
        [PART_CLASSES.index(seg.labels[i]) for i in order],
        shape=shape,
    )


def group_part_map(part_map: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """An (H, W) map of indices into PART_CLASSES -> indices into GROUPED_PART_CLASSES
    (subparts become their parts); `ignore_index` stays."""
    part_map = np.asarray(part_map)
    out = _GROUP_LUT[np.where(part_map == ignore_index, len(PART_CLASSES), part_map)]
    return np.where(part_map == ignore_index, ignore_index, out)


def evaluate_scenes(
    predictor: Any, scenes: Iterable[Scene], *, tasks: Sequence[str] = TASKS
) -> dict[str, dict]:
    """Run `predictor` on `scenes` and score each task in `tasks` (see the module docstring).

    Returns:
        {"panoptic": {"All", "Things", "Stuff"}, "semantic": {"miou", "pixel_accuracy"},
        "instance": {"ap_box", "ap_mask", "ap50_mask"}, "referring": {"oiou", "mean_iou", "n"},
        "parts": {"miou_parts", "per_class", "miou_fine", "per_class_fine"}, "num_images": int}
        for the tasks asked; fractions in [0, 1].
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    scenes = list(scenes)
    gt_pan, pred_pan, sem_pred, sem_gt, ref_pred, ref_gt, part_pred, part_gt = ([] for _ in range(8))  # fmt: skip
    results: list[dict] = []
    for scene in scenes:
        shape = (scene.height, scene.width)
        if "panoptic" in tasks:
            gt_pan.append(_panoptic_gt(scene))
            seg = predictor.panoptic(scene.image, list(THING_CLASSES), list(STUFF_CLASSES))
            pred_pan.append(_panoptic_prediction(seg, shape))
        if "semantic" in tasks:
            sem = predictor.semantic(scene.image, list(THING_CLASSES + STUFF_CLASSES))
            sem_pred.append(_numpy(sem.label_map))
            sem_gt.append(scene.semantic_map() - 1)  # category ids 1..10 -> indices 0..9
        if "instance" in tasks:
            results += _instance_results(
                scene, predictor.instance(scene.image, list(THING_CLASSES))
            )
        if "referring" in tasks:
            masks = {s.id: s.mask for s in scene.segments}
            for text, seg_id in scene.expressions:
                seg = predictor.refer(scene.image, text)
                pred = _numpy(seg.masks).astype(bool)
                ref_pred.append(pred[0] if len(pred) else np.zeros(shape, dtype=bool))
                ref_gt.append(masks[seg_id])
        if "parts" in tasks:
            part_pred.append(
                _part_prediction(predictor.parts(scene.image, list(PART_CLASSES)), shape)
            )
            part_gt.append(scene.part_map())

    out: dict[str, Any] = {"num_images": len(scenes)}
    if "panoptic" in tasks:
        out["panoptic"] = panoptic_quality(gt_pan, pred_pan, CATEGORIES).to_dict()
    if "semantic" in tasks:
        sem = miou(sem_pred, sem_gt, num_classes=len(CATEGORIES))
        out["semantic"] = {"miou": sem.miou, "pixel_accuracy": sem.pixel_accuracy}
    if "instance" in tasks:
        gt = _instance_gt(scenes)
        box = coco_ap(gt, results, iou_type="bbox")
        mask = coco_ap(gt, results, iou_type="segm")
        out["instance"] = {"ap_box": box.ap, "ap_mask": mask.ap, "ap50_mask": mask.ap50}
    if "referring" in tasks:
        ious = [oiou([p], [g]) for p, g in zip(ref_pred, ref_gt)]
        out["referring"] = {
            "oiou": oiou(ref_pred, ref_gt),
            "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "n": len(ious),
        }
    if "parts" in tasks:
        mean, per_class = miou_parts(
            [group_part_map(p) for p in part_pred],
            [group_part_map(g) for g in part_gt],
            part_classes=GROUPED_PART_CLASSES,
        )
        fine, per_class_fine = miou_parts(part_pred, part_gt, part_classes=PART_CLASSES)
        out["parts"] = {
            "miou_parts": mean,
            "per_class": per_class,
            "miou_fine": fine,
            "per_class_fine": per_class_fine,
        }
    return out
