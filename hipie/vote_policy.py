"""How HIPIE's hierarchy labels class-agnostic masks (Sec. 3.8, Eq. 5; SA-1B's or SAM's).

Per image, each SAM mask gets two votes: one over the object vocabulary (things + stuff) from
the hierarchy's instance and stuff segments, one over the part prompts from its fine parts. A SAM
mask is an "instance" when it matches a thing segment (IoU >= `INSTANCE_IOU`); a "part" when it
lies inside an instance and got part votes (its label then restricted to that instance's parts,
`hipie.hierarchy.restrict_to_parent_parts`); a "subpart" when it lies (>= `SUBPART_FRACTION` of
its area) inside a larger part of the same instance; otherwise "instance" or "stuff" by its object
label. Both predictors (ours and the released architecture's) call `vote_onto_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pycocotools import mask as mask_utils

from hipie.box_ops import masks_to_boxes
from hipie.hierarchy import (
    assign_parents,
    parent_part_columns,
    parents_from_intersections,
    restrict_to_parent_parts,
)
from hipie.segments import Segments
from hipie.vote import intersection_areas, mask_areas, vote_from_intersections
from hipie.vote_areas import sam_hipie_areas

__all__ = ["INSTANCE_IOU", "SUBPART_FRACTION", "fine_parts", "vote_onto_masks"]

# A SAM mask matching a thing segment at this IoU is an instance.
INSTANCE_IOU = 0.5
# A SAM part mask this much inside a larger part mask of the same instance is its subpart.
SUBPART_FRACTION = 0.9


def _subset(masks, index: list[int]):
    """Rows of a dense (N, H, W) tensor or items of an RLE list."""
    if isinstance(masks, torch.Tensor):
        return masks[index]
    return [masks[i] for i in index]


def vote_onto_masks(
    h: Segments,
    sam,
    things: Sequence[str],
    *,
    hipie_rles: Sequence[dict] | None = None,
    method: str = "auto",
    vote_max_side: int | None = None,
) -> Segments:
    """Eq. 5 for one image whose hierarchy `h` is already computed (a predictor's
    `hierarchy`); `sam` is a dense (S, H, W) bool tensor or a list of S COCO RLEs. `vote_max_side`
    bounds the resolution of dense intersections (None = exact).

    With RLEs, `h`'s masks may be at a smaller resolution than the RLEs (the model's, for an
    image the caller resized): they stand for their nearest-neighbour upsampling, and the
    intersections are exact either way (`hipie.vote_areas`: ``method`` "rle" through
    pycocotools, with `hipie_rles` = `h`'s image-size RLEs when the caller has them, or
    "grid", one matmul on `h`'s device; "auto" takes grid off the CPU). All of Eq. 5, the
    instance match and the part containment come from one (S, K) intersection matrix.
    """
    is_rle = not isinstance(sam, torch.Tensor)
    S = len(sam)
    dev = h.scores.device
    if is_rle:
        sam = list(sam)
        areas = sam_hipie_areas(sam, h.masks, hipie_rles=hipie_rles, method=method)
        inter_all, sam_area, hipie_area = (t.to(dev) for t in (areas.inter, areas.sam, areas.hipie))
    else:
        sam = sam.to(h.masks.device).bool()
        inter_all = intersection_areas(sam, h.masks, max_side=vote_max_side).to(dev)
        sam_area, hipie_area = mask_areas(sam).to(dev), mask_areas(h.masks).to(dev)
    obj = [i for i, lv in enumerate(h.level) if lv in ("instance", "stuff")]
    fine = sorted(fine_parts(h))
    objt = torch.tensor(obj, dtype=torch.long, device=dev)
    finet = torch.tensor(fine, dtype=torch.long, device=dev)
    v_obj = vote_from_intersections(inter_all[:, objt], h.probs[objt], sam_area)
    v_part = vote_from_intersections(inter_all[:, finet], h.probs[finet], sam_area)
    inst = objt[h.is_thing[objt]]
    inter = inter_all[:, inst]
    union = sam_area[:, None] + hipie_area[inst][None] - inter
    best_iou = (
        (inter / union.clamp(min=1)).max(1).values if len(inst) else torch.zeros(S, device=dev)
    )
    inside = parents_from_intersections(inter, sam_area)
    # a part: no instance match, inside an instance, and some part votes (else its object
    # label decides: instance for things and for masks without votes, else stuff)
    is_part = (best_iou < INSTANCE_IOU) & (inside >= 0) & (v_part.labels >= 0)
    probs = torch.where(is_part[:, None], v_part.probs, v_obj.probs)
    label_ids = torch.where(is_part, v_part.labels, v_obj.labels).tolist()
    scores = torch.where(is_part, v_part.scores, v_obj.scores).tolist()
    levels = [
        "part" if part else "instance" if obj < len(things) else "stuff"
        for part, obj in zip(is_part.tolist(), v_obj.labels.tolist())
    ]
    parents = torch.full((S,), -1, dtype=torch.long, device=dev)
    part_i = [i for i, lv in enumerate(levels) if lv == "part"]
    inst_i = [i for i, lv in enumerate(levels) if lv == "instance" and label_ids[i] >= 0]
    if part_i and inst_i:
        local = assign_parents(_subset(sam, part_i), _subset(sam, inst_i)).tolist()
        for j, i in enumerate(part_i):
            if local[j] >= 0:
                parents[i] = inst_i[local[j]]
    restrict_parts_to_parent(h.vocabulary, things, part_i, parents, probs, label_ids, scores)
    nest_subparts(sam, part_i, levels, parents, vote_max_side=vote_max_side)
    label_ids_t = torch.tensor(label_ids, dtype=torch.long, device=dev)
    boxes = sam_boxes(sam, is_rle, dev)
    return Segments(
        masks=torch.zeros(S, 0, 0, dtype=torch.bool, device=dev) if is_rle else sam,
        boxes=boxes,
        labels=[h.vocabulary[k] if k >= 0 else "" for k in label_ids],
        label_ids=label_ids_t,
        scores=torch.tensor(scores, dtype=torch.float32, device=dev),
        probs=probs,
        is_thing=torch.tensor([lv != "stuff" for lv in levels], dtype=torch.bool, device=dev),
        parents=parents,
        level=levels,
        vocabulary=h.vocabulary,
        rles=list(sam) if is_rle else None,
    )


def restrict_parts_to_parent(
    vocabulary: list[str],
    things: Sequence[str],
    part_i: list[int],
    parents: torch.Tensor,
    probs: torch.Tensor,
    label_ids: list[int],
    scores: list[float],
) -> None:
    """SAM parts' Eq. 5 votes under their instances follow the same rule as HIPIE's parts,
    `hipie.hierarchy.restrict_to_parent_parts`. Updates `probs`, `label_ids`, `scores` and
    `parents` in place."""
    par = parents.tolist()  # all rows at once: one device sync, not one per part
    rows = [i for i in part_i if par[i] >= 0 and label_ids[par[i]] >= 0]
    if not rows:
        return
    parent_things = [vocabulary[label_ids[par[i]]] for i in rows]
    allowed = parent_part_columns(vocabulary, things, parent_things, probs.device)
    index = torch.tensor(rows, dtype=torch.long, device=probs.device)
    old_scores = torch.tensor([scores[i] for i in rows], dtype=probs.dtype, device=probs.device)
    old_labels = torch.tensor([label_ids[i] for i in rows], dtype=torch.long, device=probs.device)
    new_probs, new_scores, new_labels, keep = restrict_to_parent_parts(
        probs[index], old_scores, old_labels, allowed
    )
    probs[index] = new_probs
    for i, kept, label, score in zip(rows, keep.tolist(), new_labels.tolist(), new_scores.tolist()):
        if not kept:
            parents[i] = -1
            continue
        label_ids[i], scores[i] = label, score


def nest_subparts(
    sam,
    part_i: list[int],
    levels: list[str],
    parents: torch.Tensor,
    *,
    vote_max_side: int | None = None,
) -> None:
    """SAM part masks lying (>= SUBPART_FRACTION of their area) inside a larger SAM part mask
    of the same instance become that part's subparts (SA-1B nests whole, part and subpart
    masks). Updates `levels` and `parents` in place."""
    if len(part_i) < 2:
        return
    masks = _subset(sam, part_i)
    areas = mask_areas(masks).to(parents.device)
    inter = intersection_areas(masks, masks, max_side=vote_max_side).to(parents.device)
    frac = inter / areas.clamp(min=1)[:, None]  # (P, P) share of row mask inside column mask
    same_instance = parents[part_i][:, None] == parents[part_i][None, :]
    larger = areas[None, :] > areas[:, None]
    frac = torch.where(same_instance & larger, frac, torch.zeros_like(frac))
    best, idx = frac.max(1)
    for j, (fraction, k) in enumerate(zip(best.tolist(), idx.tolist())):
        if fraction >= SUBPART_FRACTION:
            levels[part_i[j]] = "subpart"
            parents[part_i[j]] = part_i[k]


def fine_parts(h: Segments) -> set[int]:
    """Indices of the fine (model-predicted) parts of a `hierarchy` result: the part-level
    segments that are not coarse groups (groups are the parents of subparts)."""
    group_ids = {int(p) for p, lv in zip(h.parents.tolist(), h.level) if lv == "subpart"}
    return {i for i, lv in enumerate(h.level) if lv in ("part", "subpart") and i not in group_ids}


def sam_boxes(sam, is_rle: bool, device) -> torch.Tensor:
    if not is_rle:
        return masks_to_boxes(sam).float() if len(sam) else torch.zeros(0, 4, device=device)
    if len(sam) == 0:
        return torch.zeros(0, 4, device=device)
    rles = [
        dict(r, counts=r["counts"].encode() if isinstance(r["counts"], str) else r["counts"])
        for r in sam
    ]
    xywh = torch.as_tensor(mask_utils.toBbox(rles), dtype=torch.float32, device=device)
    return torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
