"""Inference post-processing of the released HIPIE (`HIPIE_IMG.inference` + the demo), as tensors.

Inputs are ONE image's head outputs, without a batch dimension:

- thing branch (the two-stage queries, the background queries already dropped):
  `class_logits` (Q, C) class logits after token -> class pooling (`MASKED_LOGIT` = -9999 for a
  class the pass masks), `boxes` (Q, 4) cxcywh normalized to the *resized* image, `iou_logits`
  (Q,) or (Q, 1), `mask_logits` (Q, h, w) at `1 / MASK_STRIDE` of the padded input;
- stuff branch (MaskDINO): `class_logits` (S, C), `mask_logits` (S, h, w), same grid;
- sizes: `image_size` = (h, w) of the resized image before padding, `output_size` = (H, W) of the
  original image; classes are 0-based, `is_thing` maps the 1-based class id to a bool (the
  release's `test_is_thing`, a missing id counts as a thing).

What comes out is what the release returns: top-k instances (boxes in original pixels, scores,
0-based classes, boolean masks at the original size), the semantic map (C, H, W) and the panoptic
segmentation (H, W) int32 with its `segments_info`, plus the demo's part masks. The CLIP ensemble
of the ViT-H eval config lives in `hipie.clip_release`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hipie.box_ops import box_cxcywh_to_xyxy
from hipie.nms import batched_nms

__all__ = [
    "DETECTION_TOP_K",
    "GROUNDING_TOP_K",
    "MASKED_LOGIT",
    "NMS_IOU_THRESHOLD",
    "InstanceSelection",
    "PartMask",
    "ReleaseInstances",
    "ReleaseResult",
    "class_logit_modes",
    "crop_mask_logits",
    "instance_boxes",
    "instance_masks",
    "instance_probs",
    "keep_above",
    "panoptic_class_probs",
    "panoptic_merge",
    "part_instance_masks",
    "postprocess_instances",
    "postprocess_release",
    "select_instances",
    "semantic_map",
    "upsample_mask_logits",
]

# Class logit the release writes for a class a query must not predict.
MASKED_LOGIT = -9999.0
# Pre-top-k duplicate removal: class-aware NMS on (max prob, argmax class), IoU threshold.
NMS_IOU_THRESHOLD = 0.7
# Instances kept per image: top-k over (NMS-kept query x class), no score threshold.
DETECTION_TOP_K = 100
GROUNDING_TOP_K = 1
# `MODEL.DDETRS.MASK_STRIDE`: mask logits are at 1/4 of the padded input.
MASK_STRIDE = 4
# `MODEL.DDETRS.MASK_THRES`: instance masks are sigmoid > 0.5.
MASK_THRESHOLD = 0.5
# `MODEL.PANO_TEMPERATURE` with `PANO_TRANSFORM_EVAL`: semantic / panoptic class probabilities
# are softmax(sigmoid(logits) / T) over the classes.
PANO_TEMPERATURE = 0.06
# `MODEL.OBJECT_MASK_THRESHOLD`: a query joins the panoptic merge when its max prob is above it.
OBJECT_MASK_THRESHOLD = 0.25
# `MODEL.OVERLAP_THRESHOLD`: a query keeps its segment when it wins this share of its own mask.
OVERLAP_THRESHOLD = 0.8
# A panoptic pixel belongs to a query's own mask when sigmoid(mask) >= 0.5.
PANOPTIC_MASK_THRESHOLD = 0.5
# The demo (`PartSegmDemo.foward_panoptic(instance_thres=0.5)`) shows instances above 0.5.
DEMO_INSTANCE_THRESHOLD = 0.5
# `sem_to_instance_map_by_instances`: a part mask inside an instance is kept above 100 pixels.
PART_MIN_AREA = 100


# ------------------------------------------------------------------------------------------------
# Instances


@dataclass(frozen=True)
class InstanceSelection:
    """Which (query, class) pairs the release keeps, with its intermediates.

    nms_scores / nms_classes: (Q,) max prob and argmax class per query (the NMS inputs);
    nms_keep: (K',) kept query indices, by decreasing score; topk_indexes: (k,) into the flattened
    (K' x C) probs; scores, classes, query_index: (k,) the selected pairs (query_index into Q).
    """

    nms_scores: torch.Tensor
    nms_classes: torch.Tensor
    nms_keep: torch.Tensor
    topk_indexes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    query_index: torch.Tensor


@dataclass(frozen=True)
class ReleaseInstances:
    """Final instances at the original image size (after `segmentation_postprocess`).

    boxes: (N, 4) xyxy pixels, clipped; scores: (N,); classes: (N,) int64 0-based;
    masks: (N, H, W) bool; query_index: (N,) thing-query index of each instance.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    masks: torch.Tensor
    query_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def index(self, idx: torch.Tensor) -> ReleaseInstances:
        return ReleaseInstances(
            self.boxes[idx], self.scores[idx], self.classes[idx], self.masks[idx],
            self.query_index[idx],
        )  # fmt: skip


def instance_probs(class_logits: torch.Tensor, iou_logits: torch.Tensor | None) -> torch.Tensor:
    """(Q, C) instance probabilities: sqrt(sigmoid(class) * sigmoid(iou)); masked classes -> 0.

    Without an IoU head (`MODEL.USE_IOU_BRANCH` off; on in every released config): sigmoid(class).
    """
    if iou_logits is None:
        return class_logits.sigmoid()
    return torch.sqrt(class_logits.sigmoid() * iou_logits.reshape(-1, 1).sigmoid())


def select_instances(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    top_k: int = DETECTION_TOP_K,
    *,
    nms_iou: float = NMS_IOU_THRESHOLD,
    nms_backend: str = "auto",
) -> InstanceSelection:
    """NMS on each query's best class, then top-k over the kept (query, class) pairs.

    `probs` (Q, C) from `instance_probs` (or the CLIP-ensemble probs), `boxes` (Q, 4) cxcywh.
    """
    nms_scores, nms_classes = probs.max(1)
    keep = batched_nms(box_cxcywh_to_xyxy(boxes), nms_scores, nms_classes, nms_iou,
                       backend=nms_backend)  # fmt: skip
    kept = probs[keep]
    k = min(top_k, kept.numel())
    scores, topk = torch.topk(kept.reshape(-1), k, dim=0)
    num_classes = probs.shape[1]
    rows = torch.div(topk, num_classes, rounding_mode="floor")
    return InstanceSelection(
        nms_scores=nms_scores,
        nms_classes=nms_classes,
        nms_keep=keep,
        topk_indexes=topk,
        scores=scores,
        classes=topk % num_classes,
        query_index=keep[rows],
    )


def instance_boxes(
    boxes: torch.Tensor, image_size: Sequence[int], output_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) cxcywh normalized -> xyxy pixels of the original image, clipped; and `nonempty`.

    As the release: scale by the resized image's (w, h), then by output / resized, clip to the
    output size; `nonempty` (N,) is width > 0 and height > 0 (empty boxes are dropped).
    """
    h, w = int(image_size[0]), int(image_size[1])
    out_h, out_w = int(output_size[0]), int(output_size[1])
    xyxy = box_cxcywh_to_xyxy(boxes).clone()
    xyxy[:, 0::2] *= w
    xyxy[:, 1::2] *= h
    xyxy[:, 0::2] *= out_w / w
    xyxy[:, 1::2] *= out_h / h
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(min=0, max=out_w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(min=0, max=out_h)
    nonempty = (xyxy[:, 2] - xyxy[:, 0] > 0) & (xyxy[:, 3] - xyxy[:, 1] > 0)
    return xyxy, nonempty


def instance_masks(
    mask_logits: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    *,
    stride: int = MASK_STRIDE,
    threshold: float = MASK_THRESHOLD,
) -> torch.Tensor:
    """(N, h, w) mask logits -> (N, H, W) bool masks at the original size.

    Bilinear x`stride` (align_corners False), crop to the resized image, sigmoid > threshold, then
    nearest resize to the original size (the release binarizes before resizing).
    """
    n, mh, mw = mask_logits.shape
    if n == 0:
        return torch.zeros(0, *output_size, dtype=torch.bool, device=mask_logits.device)
    up = F.interpolate(mask_logits[:, None], size=(mh * stride, mw * stride), mode="bilinear",
                       align_corners=False)  # fmt: skip
    binary = up.sigmoid() > threshold
    binary = binary[:, :, : int(image_size[0]), : int(image_size[1])]
    out = F.interpolate(binary.float(), size=tuple(int(s) for s in output_size), mode="nearest")
    return out[:, 0] > 0.5


def postprocess_instances(
    class_logits: torch.Tensor,
    boxes: torch.Tensor,
    iou_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    *,
    task: str = "detection",
    probs: torch.Tensor | None = None,
    nms_backend: str = "auto",
) -> tuple[ReleaseInstances, InstanceSelection]:
    """The release's instances of one image (task "detection": top 100, "grounding": top 1).

    `probs` replaces `instance_probs(class_logits, iou_logits)` (the CLIP ensemble's instance
    probs). Returns the instances after `segmentation_postprocess` and the selection trace.
    """
    top_k = {"detection": DETECTION_TOP_K, "grounding": GROUNDING_TOP_K}.get(task)
    if top_k is None:
        raise ValueError(f"task must be 'detection' or 'grounding', not {task!r}")
    if probs is None:
        probs = instance_probs(class_logits, iou_logits)
    sel = select_instances(probs, boxes, top_k, nms_backend=nms_backend)
    xyxy, nonempty = instance_boxes(boxes[sel.query_index], image_size, output_size)
    q = sel.query_index[nonempty]
    inst = ReleaseInstances(
        boxes=xyxy[nonempty],
        scores=sel.scores[nonempty],
        classes=sel.classes[nonempty],
        masks=instance_masks(mask_logits[q], image_size, output_size),
        query_index=q,
    )
    return inst, sel


def keep_above(instances: ReleaseInstances, threshold: float = DEMO_INSTANCE_THRESHOLD):
    """The demo's display filter: instances with score > threshold, order kept."""
    return instances.index(instances.scores > threshold)


# ------------------------------------------------------------------------------------------------
# Semantic and panoptic


def class_logit_modes(
    is_thing: Mapping[int, bool], *, bg_cls_agnostic: bool = False
) -> tuple[str | None, str | None]:
    """The token -> class masking modes the release uses: (thing queries, stuff queries).

    Thing queries mask stuff classes ("FG") when the pass has any thing class, else nothing; stuff
    queries mask thing classes ("BG") unless `TEST.BG_CLS_AGNOSTIC` (on in the ViT-H eval config).
    Feed them to `hipie.modeling.vl_align.token_to_class_logits(..., mode=...)`.
    """
    thing_mode = "FG" if any(bool(v) for v in is_thing.values()) else None
    return thing_mode, (None if bg_cls_agnostic else "BG")


def panoptic_class_probs(
    thing_class_logits: torch.Tensor,
    stuff_class_logits: torch.Tensor,
    *,
    temperature: float = PANO_TEMPERATURE,
) -> torch.Tensor:
    """(K' + S, C) probs = softmax(sigmoid(logits) / T) of [NMS-kept thing queries; stuff queries].

    A masked class (-9999) enters as sigmoid 0, i.e. weight exp(0), not zero (as the release).
    """
    logits = torch.cat([thing_class_logits, stuff_class_logits], dim=0)
    return F.softmax(logits.sigmoid() / temperature, dim=-1)


def crop_mask_logits(
    mask_logits: torch.Tensor, image_size: Sequence[int], *, stride: int = MASK_STRIDE
) -> torch.Tensor:
    """(Q, h, w) logits -> (Q, h_img, w_img): bilinear x`stride` (align_corners False), cropped to
    the resized image (what the release's CLIP ensemble classifies on the panoptic path)."""
    q, mh, mw = mask_logits.shape
    x = F.interpolate(mask_logits[:, None], size=(mh * stride, mw * stride), mode="bilinear",
                      align_corners=False)  # fmt: skip
    return x[:, 0, : int(image_size[0]), : int(image_size[1])]


def upsample_mask_logits(
    mask_logits: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    *,
    stride: int = MASK_STRIDE,
) -> torch.Tensor:
    """(Q, h, w) logits -> (Q, H, W) logits at the original size: bilinear x`stride`, crop to the
    resized image, bilinear to the original size (align_corners False both times)."""
    x = crop_mask_logits(mask_logits, image_size, stride=stride)[:, None]
    x = F.interpolate(x, size=tuple(int(s) for s in output_size), mode="bilinear",
                      align_corners=False)  # fmt: skip
    return x[:, 0]


def semantic_map(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    *,
    chunk: int | None = 128,
) -> torch.Tensor:
    """(C, H, W) = einsum("qc,qhw->chw", probs, sigmoid(upsampled masks)).

    `mask_logits` (Q, h, w) at mask resolution; queries are upsampled `chunk` at a time (None: all
    at once, as the release, whose (Q, H, W) float tensor is ~1 GB at 1126 queries x 427 x 640);
    chunking only changes the float summation order.
    """
    n = mask_logits.shape[0]
    step = n if chunk is None else max(1, chunk)
    out = None
    for s in range(0, max(n, 1), step):
        m = upsample_mask_logits(mask_logits[s : s + step], image_size, output_size).sigmoid()
        part = torch.einsum("qc,qhw->chw", class_probs[s : s + step], m)
        out = part if out is None else out + part
    return out


def panoptic_merge(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    image_size: Sequence[int],
    output_size: Sequence[int],
    is_thing: Mapping[int, bool],
    *,
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
    chunk: int | None = 128,
) -> tuple[torch.Tensor, list[dict]]:
    """The release's `panoptic_inference`: (H, W) int32 segment ids (0 = void) + segments_info.

    Queries with max prob > `object_mask_threshold` compete per pixel by prob x sigmoid(mask)
    (argmax, first query on ties); in query order, a query keeps `argmax == q & sigmoid >= 0.5`
    if that is non-empty and its argmax area is at least `overlap_threshold` of its own mask
    area; stuff classes reuse their first segment id. segments_info: [{"id", "isthing",
    "category_id" (0-based)}] in segment order. `chunk`: queries upsampled at a time (None: all
    at once, as the release); the result is the same, only the peak memory differs.
    """
    scores, labels = class_probs.max(-1)
    kept = torch.where(scores > object_mask_threshold)[0]
    out_h, out_w = int(output_size[0]), int(output_size[1])
    panoptic = torch.zeros((out_h, out_w), dtype=torch.int32, device=class_probs.device)
    segments: list[dict] = []
    if kept.numel() == 0:
        return panoptic, segments
    cur_scores, cur_classes = scores[kept], labels[kept].tolist()
    step = kept.numel() if chunk is None else max(1, chunk)
    spans = [(s, min(s + step, kept.numel())) for s in range(0, kept.numel(), step)]

    def probs_of(s: int, e: int) -> torch.Tensor:
        return upsample_mask_logits(mask_logits[kept[s:e]], image_size, output_size).sigmoid()

    # pass 1: the winning query of every pixel (strict > keeps the earlier query on ties)
    cache = probs_of(*spans[0]) if len(spans) == 1 else None
    best = winner = None
    for s, e in spans:
        masks = cache if cache is not None else probs_of(s, e)
        top, arg = (cur_scores[s:e].view(-1, 1, 1) * masks).max(0)
        if best is None:
            best, winner = top, arg
        else:
            better = top > best
            best, winner = torch.where(better, top, best), torch.where(better, arg + s, winner)
    # pass 2: each query in order keeps or loses its segment
    stuff_ids: dict[int, int] = {}
    next_id = 0
    for s, e in spans:
        masks = cache if cache is not None else probs_of(s, e)
        for k in range(s, e):
            cls = cur_classes[k]
            thing = bool(is_thing.get(cls + 1, True))
            own = masks[k - s] >= PANOPTIC_MASK_THRESHOLD
            won = winner == k
            segment = won & own
            won_area, own_area = int(won.sum()), int(own.sum())
            if won_area == 0 or own_area == 0 or not bool(segment.any()):
                continue
            if won_area / own_area < overlap_threshold:
                continue
            if not thing and cls in stuff_ids:
                panoptic[segment] = stuff_ids[cls]
                continue
            next_id += 1
            if not thing:
                stuff_ids[cls] = next_id
            panoptic[segment] = next_id
            segments.append({"id": next_id, "isthing": thing, "category_id": cls})
    return panoptic, segments


# ------------------------------------------------------------------------------------------------
# The whole `HIPIE_IMG.inference` of one image


@dataclass(frozen=True)
class ReleaseResult:
    """What one pass of the release returns (`sem_seg`, `panoptic_seg` None for grounding)."""

    instances: ReleaseInstances
    selection: InstanceSelection
    sem_seg: torch.Tensor | None = None
    panoptic_seg: torch.Tensor | None = None
    segments_info: list[dict] | None = None
    panoptic_probs: torch.Tensor | None = None


def postprocess_release(
    thing_class_logits: torch.Tensor,
    thing_boxes: torch.Tensor,
    thing_iou_logits: torch.Tensor,
    thing_mask_logits: torch.Tensor,
    stuff_class_logits: torch.Tensor | None,
    stuff_mask_logits: torch.Tensor | None,
    image_size: Sequence[int],
    output_size: Sequence[int],
    is_thing: Mapping[int, bool],
    *,
    task: str = "detection",
    clip=None,
    nms_backend: str = "auto",
    semantic_chunk: int | None = 128,
) -> ReleaseResult:
    """Instances, semantic map and panoptic merge of one image, as `HIPIE_IMG.inference` does.

    Thing inputs are the 900 two-stage queries (drop the background queries first); class logits
    are pooled with the modes of `class_logit_modes`. The semantic / panoptic inputs are the
    NMS-kept thing queries (all of them, not only the top-k) followed by the stuff queries.
    `clip`: the CLIP ensemble (`hipie.clip_release.ClipEnsemble`, the ViT-H eval config), which
    replaces the instance probs (`clip.instance_probs(class_logits, iou_logits, mask_logits)`,
    before NMS) and the panoptic probs (`clip.panoptic_probs(class_logits, cropped masks)`).
    """
    probs = None
    if clip is not None:
        probs = clip.instance_probs(thing_class_logits, thing_iou_logits, thing_mask_logits)
    instances, sel = postprocess_instances(
        thing_class_logits, thing_boxes, thing_iou_logits, thing_mask_logits, image_size,
        output_size, task=task, probs=probs, nms_backend=nms_backend,
    )  # fmt: skip
    if task != "detection" or stuff_class_logits is None:
        return ReleaseResult(instances, sel)
    keep = sel.nms_keep
    masks = torch.cat([thing_mask_logits[keep], stuff_mask_logits], dim=0)
    if clip is None:
        probs = panoptic_class_probs(thing_class_logits[keep], stuff_class_logits)
    else:
        logits = torch.cat([thing_class_logits[keep], stuff_class_logits], dim=0)
        probs = clip.panoptic_probs(logits, crop_mask_logits(masks, image_size))
    sem = semantic_map(probs, masks, image_size, output_size, chunk=semantic_chunk)
    pano, segments = panoptic_merge(
        probs, masks, image_size, output_size, is_thing, chunk=semantic_chunk
    )
    return ReleaseResult(instances, sel, sem, pano, segments, probs)


# ------------------------------------------------------------------------------------------------
# Parts (the demo)


@dataclass(frozen=True)
class PartMask:
    """A part of a kept instance: `mask` (H, W) bool, `instance` index, `part_class` (0-based
    index into the part vocabulary), `label` (the part word; 'body' is named after its object)."""

    mask: torch.Tensor
    instance: int
    part_class: int
    label: str


def part_instance_masks(
    parts_seg: torch.Tensor,
    instance_masks: torch.Tensor,
    instance_class_names: Sequence[str | None],
    part_class_names: Sequence[str],
    *,
    min_area: int = PART_MIN_AREA,
    skip_class: int | None = None,
) -> list[PartMask]:
    """The demo's `sem_to_instance_map_by_instances` for a vocabulary of "OBJECT PART" names.

    `parts_seg` (H, W) = argmax of the part pass's semantic map; `instance_masks` (N, H, W) the
    kept instances (score > 0.5) of the things pass with their class names. For each part class
    present (ascending) and each instance (in order): `(parts_seg == v) & mask`, kept when larger
    than `min_area` pixels and the part's object word equals the instance's class name. A name
    without a part word is skipped; `skip_class` is the background id the demo skips.
    """
    out: list[PartMask] = []
    inst = instance_masks.bool()
    for v in parts_seg.unique().tolist():
        if skip_class is not None and v == skip_class:
            continue
        obj, _, part = part_class_names[v].partition(" ")
        if not part:
            continue
        region = parts_seg == v
        for idx in range(inst.shape[0]):
            m = region & inst[idx]
            if int(m.sum()) > min_area and obj == instance_class_names[idx]:
                label = obj if part == "body" else part
                out.append(PartMask(mask=m, instance=idx, part_class=int(v), label=label))
    return out
