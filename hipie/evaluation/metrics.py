"""Segmentation metrics on in-memory data (no file I/O here; see `hipie.evaluate` for files).

- `panoptic_quality`: PQ / SQ / RQ for all, thing and stuff classes, with COCO-panoptic rules
  (Kirillov et al. 2019, as the reference panopticapi implements them): a predicted and a
  ground-truth segment of the same category match when IoU > 0.5; pixels of id 0 (VOID) are
  not counted against predictions; crowd ground-truth regions are neither matched nor counted as
  false negatives, and a prediction lying mostly (> 50 %) in VOID or in a crowd region of its own
  category is not a false positive.
- `miou`: semantic segmentation mIoU from a confusion matrix, with an ignore index.
- `coco_ap`: box / mask AP through pycocotools' COCOeval on COCO-style dicts.
- `oiou`: referring segmentation overall IoU (sum of intersections / sum of unions).
- `miou_parts`: Pascal-Panoptic-Parts style mIoU over "object-part" classes.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.panoptic import id_to_rgb, rgb_to_id

__all__ = [
    "APResult",
    "MIoUResult",
    "PQSummary",
    "PanopticImage",
    "PanopticResult",
    "coco_ap",
    "id_to_rgb",
    "miou",
    "miou_parts",
    "oiou",
    "panoptic_quality",
    "part_label_map",
    "rgb_to_id",
]

VOID = 0  # panoptic id of unlabeled pixels
_OFFSET = 1 << 32  # pairs (gt id, pred id) packed into one int64: gt * OFFSET + pred


# panoptic format: segment ids <-> PNG colours live in the label contract (schemas.panoptic)


# --------------------------------------------------------------------------- panoptic quality
@dataclass(frozen=True)
class PanopticImage:
    """One image of a panoptic annotation or prediction.

    id_map: (H, W) integer segment ids, 0 = VOID.
    segments: COCO `segments_info` entries, each a mapping with at least `id` and `category_id`
        (and `iscrowd`, default 0). Ids in `id_map` that are not listed are an error (except 0).
    """

    id_map: np.ndarray
    segments: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class PQSummary:
    """PQ, SQ, RQ (fractions in [0, 1]) averaged over the `n` categories that occur."""

    pq: float
    sq: float
    rq: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"pq": self.pq, "sq": self.sq, "rq": self.rq, "n": self.n}


@dataclass(frozen=True)
class PanopticResult:
    """PQ summaries for all, thing and stuff categories, and per category.

    per_class maps a category id to {"pq", "sq", "rq", "tp", "fp", "fn", "iou_sum"}.
    """

    all: PQSummary
    things: PQSummary
    stuff: PQSummary
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, float | int]]:
        """The JSON layout of the CLI: {"All": {...}, "Things": {...}, "Stuff": {...}}."""
        return {
            "All": self.all.to_dict(),
            "Things": self.things.to_dict(),
            "Stuff": self.stuff.to_dict(),
        }


class _PQStat:
    """Per-category accumulators: true positives, false positives, false negatives, IoU sum."""

    def __init__(self) -> None:
        self.tp: dict[int, int] = {}
        self.fp: dict[int, int] = {}
        self.fn: dict[int, int] = {}
        self.iou: dict[int, float] = {}

    def add(self, name: str, category: int, value: float = 1) -> None:
        table = getattr(self, name)
        table[category] = table.get(category, 0) + value


def _categories_isthing(categories: Iterable[Any] | Mapping[int, bool]) -> dict[int, bool]:
    """Normalise categories to {category_id: isthing}."""
    if isinstance(categories, Mapping):
        return {int(k): bool(v) for k, v in categories.items()}
    return {int(c["id"]): bool(c["isthing"]) for c in categories}


def _segment_table(image: PanopticImage, categories: Mapping[int, bool], what: str) -> dict:
    table = {}
    for seg in image.segments:
        seg_id = int(seg["id"])
        category = int(seg["category_id"])
        if category not in categories:
            raise ValueError(f"{what} segment {seg_id} has unknown category {category}")
        if seg_id in table:
            raise ValueError(f"{what} segment id {seg_id} appears twice")
        if seg_id == VOID:
            raise ValueError(f"{what} segment id 0 is reserved for VOID")
        table[seg_id] = {"category": category, "iscrowd": int(seg.get("iscrowd", 0)), "area": 0}
    return table


def _accumulate_image(
    gt: PanopticImage, pred: PanopticImage, categories: Mapping[int, bool], stat: _PQStat
) -> None:
    gt_ids = np.asarray(gt.id_map).astype(np.int64)
    pred_ids = np.asarray(pred.id_map).astype(np.int64)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(
            f"shape mismatch: ground truth {gt_ids.shape}, prediction {pred_ids.shape}"
        )
    gt_segs = _segment_table(gt, categories, "ground-truth")
    pred_segs = _segment_table(pred, categories, "predicted")

    # Areas come from the maps, not from the JSON (as panopticapi does).
    for ids, segs, what in ((gt_ids, gt_segs, "ground-truth"), (pred_ids, pred_segs, "predicted")):
        labels, counts = np.unique(ids, return_counts=True)
        for label, count in zip(labels.tolist(), counts.tolist()):
            if label == VOID:
                continue
            if label not in segs:
                raise ValueError(f"{what} map has id {label} missing from its segments list")
            segs[label]["area"] = count
        missing = [i for i, s in segs.items() if s["area"] == 0]
        if missing and what == "predicted":
            raise ValueError(f"predicted segments {missing} are listed but absent from the map")

    pairs, counts = np.unique(gt_ids * _OFFSET + pred_ids, return_counts=True)
    intersections = {
        (int(p // _OFFSET), int(p % _OFFSET)): int(c)
        for p, c in zip(pairs.tolist(), counts.tolist())
    }

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_id, pred_id), inter in intersections.items():
        if gt_id not in gt_segs or pred_id not in pred_segs:
            continue
        g, p = gt_segs[gt_id], pred_segs[pred_id]
        if g["iscrowd"] or g["category"] != p["category"]:
            continue
        # VOID pixels of the prediction do not count in the union.
        union = p["area"] + g["area"] - inter - intersections.get((VOID, pred_id), 0)
        iou = inter / union
        if iou > 0.5:
            stat.add("tp", g["category"])
            stat.add("iou", g["category"], iou)
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    crowd_by_category: dict[int, int] = {}
    for gt_id, g in gt_segs.items():
        if g["iscrowd"]:
            crowd_by_category[g["category"]] = gt_id
            continue
        if gt_id not in gt_matched:
            stat.add("fn", g["category"])

    for pred_id, p in pred_segs.items():
        if pred_id in pred_matched:
            continue
        ignored = intersections.get((VOID, pred_id), 0)
        crowd_id = crowd_by_category.get(p["category"])
        if crowd_id is not None:
            ignored += intersections.get((crowd_id, pred_id), 0)
        if ignored / p["area"] > 0.5:
            continue
        stat.add("fp", p["category"])


def _summarise(stat: _PQStat, categories: Mapping[int, bool], isthing: bool | None) -> PQSummary:
    pq = sq = rq = 0.0
    n = 0
    for category, thing in categories.items():
        if isthing is not None and thing != isthing:
            continue
        tp, fp, fn = stat.tp.get(category, 0), stat.fp.get(category, 0), stat.fn.get(category, 0)
        if tp + fp + fn == 0:
            continue
        n += 1
        denominator = tp + 0.5 * fp + 0.5 * fn
        iou = stat.iou.get(category, 0.0)
        pq += iou / denominator
        sq += iou / tp if tp else 0.0
        rq += tp / denominator
    if n == 0:
        return PQSummary(pq=0.0, sq=0.0, rq=0.0, n=0)
    return PQSummary(pq=pq / n, sq=sq / n, rq=rq / n, n=n)


def panoptic_quality(
    gt: Sequence[PanopticImage],
    pred: Sequence[PanopticImage],
    categories: Iterable[Mapping[str, Any]] | Mapping[int, bool],
) -> PanopticResult:
    """Panoptic quality over a dataset.

    Args:
        gt: ground-truth images.
        pred: predictions, same length and order as `gt` (same map shapes).
        categories: COCO category dicts with `id` and `isthing`, or {category_id: isthing}.

    Returns:
        PanopticResult; a summary over no occurring category has n = 0 and zeros.
    """
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} ground-truth images but {len(pred)} predictions")
    isthing = _categories_isthing(categories)
    stat = _PQStat()
    for g, p in zip(gt, pred):
        _accumulate_image(g, p, isthing, stat)
    per_class = {}
    for category in isthing:
        tp, fp, fn = stat.tp.get(category, 0), stat.fp.get(category, 0), stat.fn.get(category, 0)
        if tp + fp + fn == 0:
            continue
        iou = stat.iou.get(category, 0.0)
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[category] = {
            "pq": iou / denominator,
            "sq": iou / tp if tp else 0.0,
            "rq": tp / denominator,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "iou_sum": iou,
        }
    return PanopticResult(
        all=_summarise(stat, isthing, None),
        things=_summarise(stat, isthing, True),
        stuff=_summarise(stat, isthing, False),
        per_class=per_class,
    )


# --------------------------------------------------------------------------- semantic mIoU
@dataclass(frozen=True)
class MIoUResult:
    """Mean IoU and per-class IoU (NaN for classes absent from both ground truth and prediction).

    miou: mean over the classes with a non-empty union (0.0 when there are none).
    per_class: (C,) float64 IoU per class.
    pixel_accuracy: correct / evaluated pixels (ignored pixels excluded).
    confusion: (C, C + 1) int64, rows = ground truth, columns = prediction; the last column counts
        pixels predicted as "no class" (a label outside [0, C)).
    """

    miou: float
    per_class: np.ndarray
    pixel_accuracy: float
    confusion: np.ndarray


def _confusion(
    preds: Iterable[np.ndarray], gts: Iterable[np.ndarray], num_classes: int, ignore_index: int
) -> np.ndarray:
    """Accumulate a `(C, C + 1)` confusion matrix over image pairs."""
    size = num_classes + 1
    confusion = np.zeros((num_classes, size), dtype=np.int64)
    for pred, gt in zip(preds, gts, strict=True):
        pred = np.asarray(pred).astype(np.int64)
        gt = np.asarray(gt).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"shape mismatch: prediction {pred.shape}, ground truth {gt.shape}")
        valid = gt != ignore_index
        g, p = gt[valid], pred[valid]
        if g.size and (g.min() < 0 or g.max() >= num_classes):
            raise ValueError(f"ground-truth labels outside [0, {num_classes}) and not ignored")
        p = np.where((p < 0) | (p >= num_classes), num_classes, p)  # "no class" column
        counts = np.bincount(g * size + p, minlength=num_classes * size)
        confusion += counts.reshape(num_classes, size)
    return confusion


def _miou_from_confusion(confusion: np.ndarray) -> MIoUResult:
    num_classes = confusion.shape[0]
    tp = np.diag(confusion[:, :num_classes]).astype(np.float64)
    gt_count = confusion.sum(axis=1)
    pred_count = confusion[:, :num_classes].sum(axis=0)
    union = gt_count + pred_count - tp
    per_class = np.full(num_classes, np.nan)
    valid = union > 0
    per_class[valid] = tp[valid] / union[valid]
    labeled = gt_count.sum()
    return MIoUResult(
        miou=float(per_class[valid].mean()) if valid.any() else 0.0,
        per_class=per_class,
        pixel_accuracy=float(tp.sum() / labeled) if labeled else 0.0,
        confusion=confusion,
    )


def miou(
    preds: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    *,
    num_classes: int,
    ignore_index: int = 255,
) -> MIoUResult:
    """Semantic segmentation mIoU over a dataset.

    Args:
        preds: (H, W) integer label maps; labels outside [0, num_classes) mean "no class" (wrong).
        gts: (H, W) integer label maps in [0, num_classes) or `ignore_index`.
        num_classes: C.
        ignore_index: ground-truth label whose pixels are not evaluated.

    IoU_c = TP_c / (TP_c + FP_c + FN_c), accumulated over all images, averaged over the classes
    with TP + FP + FN > 0.
    """
    return _miou_from_confusion(_confusion(preds, gts, num_classes, ignore_index))


# --------------------------------------------------------------------------- part mIoU
def part_label_map(
    part_masks: np.ndarray,
    part_classes: Sequence[int],
    *,
    shape: tuple[int, int] | None = None,
    background: int = 255,
) -> np.ndarray:
    """Rasterise part masks into an "object-part" class map.

    Args:
        part_masks: (P, H, W) bool, in drawing order (later masks win, so put subparts after
            their parts).
        part_classes: P class indices into the part-class list (e.g. "robot head" -> 3).
        shape: (H, W) when P == 0.
        background: label of pixels covered by no part.

    Returns:
        (H, W) int64 label map.
    """
    part_masks = np.asarray(part_masks, dtype=bool)
    if part_masks.ndim != 3:
        if shape is None:
            raise ValueError("shape is needed when there are no part masks")
        part_masks = np.zeros((0, *shape), dtype=bool)
    if len(part_classes) != part_masks.shape[0]:
        raise ValueError(f"{part_masks.shape[0]} masks but {len(part_classes)} classes")
    out = np.full(part_masks.shape[1:] if shape is None else shape, background, dtype=np.int64)
    for mask, cls in zip(part_masks, part_classes):
        out[mask] = int(cls)
    return out


def miou_parts(
    preds: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    *,
    part_classes: Sequence[str],
    ignore_index: int = 255,
    background_index: int | None = None,
) -> tuple[float, dict[str, float]]:
    """mIoU_PartS (Pascal-Panoptic-Parts style): IoU per "object-part" class, averaged.

    A part class is an object class joined with a part name ("car wheel", "person head"), so a
    wheel labeled on the wrong object class is wrong. Maps are built e.g. with `part_label_map`.

    Args:
        preds / gts: (H, W) integer maps of indices into `part_classes`; ground-truth pixels equal
            to `ignore_index` are not evaluated (pixels outside any object usually are).
        part_classes: the C "object-part" class names.
        ignore_index: ignored ground-truth label.
        background_index: a class index (e.g. "background") counted in the confusion matrix but
            left out of the average, or None.

    Returns:
        (mIoU over the part classes that occur, {class name: IoU} for those classes).
    """
    result = miou(preds, gts, num_classes=len(part_classes), ignore_index=ignore_index)
    per_class = {
        name: float(iou)
        for index, (name, iou) in enumerate(zip(part_classes, result.per_class))
        if not np.isnan(iou) and index != background_index
    }
    mean = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return mean, per_class


# --------------------------------------------------------------------------- referring oIoU
def oiou(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> float:
    """Referring segmentation overall IoU: sum of intersections / sum of unions over the dataset.

    Args:
        preds / gts: one (H, W) bool mask per referring expression (pairs of the same shape).

    Returns:
        oIoU in [0, 1]; 0.0 when every union is empty.
    """
    inter = union = 0
    for pred, gt in zip(preds, gts, strict=True):
        pred = np.asarray(pred, dtype=bool)
        gt = np.asarray(gt, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"shape mismatch: prediction {pred.shape}, ground truth {gt.shape}")
        inter += int(np.logical_and(pred, gt).sum())
        union += int(np.logical_or(pred, gt).sum())
    return inter / union if union else 0.0


# --------------------------------------------------------------------------- COCO AP
@dataclass(frozen=True)
class APResult:
    """COCO AP summary (fractions in [0, 1]; -1 where COCOeval has nothing to average).

    stats: the 12 numbers of `COCOeval.stats` (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100,
    ARs, ARm, ARl).
    """

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    stats: tuple[float, ...]


def _coco_from_dict(dataset: Mapping[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    data = copy.deepcopy(dict(dataset))
    for index, ann in enumerate(data.get("annotations", []), start=1):
        # COCOeval stores the matched ground-truth id and reads 0 as "unmatched", so an
        # annotation with id 0 (as in panopticapi's converted files) could never be a true
        # positive; ids are internal here, so renumber them from 1.
        ann["id"] = index
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    data.setdefault("categories", [])
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(
    gt: Mapping[str, Any],
    predictions: Sequence[Mapping[str, Any]],
    *,
    iou_type: str = "bbox",
    image_ids: Sequence[int] | None = None,
) -> APResult:
    """COCO AP through pycocotools' COCOeval.

    Args:
        gt: a COCO detection-format dataset dict (`images`, `annotations` with `bbox` XYWH and, for
            masks, `segmentation` as RLE or polygons, `categories`).
        predictions: COCO result dicts {image_id, category_id, score, bbox} ("bbox") or
            {image_id, category_id, score, segmentation (RLE)} ("segm").
        iou_type: "bbox" (AP box) or "segm" (AP mask).
        image_ids: restrict to these images (default: all images of `gt`).

    Returns:
        APResult; with no predictions every number is 0.0.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    if not predictions:
        return APResult(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, tuple([0.0] * 12))
    coco_gt = _coco_from_dict(gt)
    results = [dict(p) for p in predictions]
    if iou_type == "bbox":
        # loadRes derives boxes from segmentations when both are present; keep the given boxes.
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = tuple(float(x) for x in evaluator.stats)
    return APResult(
        ap=stats[0],
        ap50=stats[1],
        ap75=stats[2],
        ap_small=stats[3],
        ap_medium=stats[4],
        ap_large=stats[5],
        stats=stats,
    )
