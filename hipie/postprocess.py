"""Post-processing of one image's decoder outputs into segments (Sec. 3.6).

All functions take ONE image's predictions (no batch dimension) at the model's resolution
(masks at 1/4 of the padded input, boxes normalized to the padded input); `HipiePredictor`
maps the selected segments back to the original image. Class scores are sigmoid scores
(the model is trained with focal loss); a segment's `probs` are its sigmoid scores over the
requested classes divided by their sum (a distribution, as Eq. 4 and Eq. 5 expect).

- things (instance / detection / parts): top-k over (query, class) pairs, score = class score x
  mask score (mean foreground probability, Mask2Former), class-aware box-IoU NMS (Sec. 3.5);
- stuff: each query's best stuff class;
- panoptic: things and stuff candidates above a score threshold compete per pixel
  (argmax of score x mask probability); a candidate keeps its segment only if it keeps
  `overlap_threshold` of its own mask; stuff segments of one class are merged (MaskDINO);
- semantic: per class sum over all queries of class score x mask probability, argmax;
- referring: the query with the best score for the [CLS] embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from hipie.box_ops import box_cxcywh_to_xyxy
from hipie.config import PostprocessConfig


@dataclass(frozen=True)
class Candidates:
    """Selected predictions of one image, still at model resolution.

    mask_logits: (N, h, w) at 1/4 of the padded input.
    boxes: (N, 4) normalized xyxy (relative to the padded input).
    label_ids: (N,) long, into the requested class list.
    scores: (N,) float.
    probs: (N, C) class distribution over the requested classes.
    is_thing: (N,) bool.
    """

    mask_logits: torch.Tensor
    boxes: torch.Tensor
    label_ids: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    is_thing: torch.Tensor

    def __len__(self) -> int:
        return int(self.label_ids.shape[0])

    def index(self, idx: torch.Tensor) -> Candidates:
        return Candidates(
            self.mask_logits[idx],
            self.boxes[idx],
            self.label_ids[idx],
            self.scores[idx],
            self.probs[idx],
            self.is_thing[idx],
        )

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        return Candidates(
            *(
                torch.cat([getattr(p, f) for p in parts])
                for f in ("mask_logits", "boxes", "label_ids", "scores", "probs", "is_thing")
            )
        )


def class_scores(logits: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Sigmoid scores (Q, K) -> (Q, C) of the requested label columns."""
    return logits[:, columns].float().sigmoid()


def _distribution(scores: torch.Tensor, num_classes: int, columns: torch.Tensor) -> torch.Tensor:
    """Scatter (N, c) scores into (N, num_classes) columns and normalize rows."""
    probs = scores.new_zeros(scores.shape[0], num_classes)
    probs[:, columns] = scores
    return probs / probs.sum(1, keepdim=True).clamp(min=1e-12)


def mask_quality(mask_logits: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean foreground probability inside each (N, h, w) mask, over the valid (h, w) region."""
    prob = mask_logits.float().sigmoid() * valid
    fg = (prob > threshold).float()
    return (prob * fg).flatten(1).sum(1) / fg.flatten(1).sum(1).clamp(min=1)


def thing_candidates(
    logits: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    columns: torch.Tensor,
    num_classes: int,
    valid: torch.Tensor,
    config: PostprocessConfig,
) -> Candidates:
    """Instance-style selection.

    Args:
        logits: (Q, K) class logits; masks: (Q, h, w) logits; boxes: (Q, 4) normalized cxcywh.
        columns: (c,) long, the label columns competing here; they are also the class ids.
        num_classes: C, the size of the requested class list (probs are (N, C)).
        valid: (h, w) bool, the non-padded region at mask resolution.
    """
    scores = class_scores(logits, columns)  # Q x c
    Q, c = scores.shape
    k = min(config.max_detections, Q * c)
    top, flat = scores.flatten().topk(k)
    query, cls = flat // c, flat % c
    xyxy = box_cxcywh_to_xyxy(boxes[query].float()).clamp(0, 1)
    mscore = mask_quality(masks[query], valid, config.mask_threshold)
    final = top * mscore
    keep = batched_nms(xyxy, final, cls, config.nms_iou)
    keep = keep[final[keep] >= config.detection_min_score]
    query, cls = query[keep], cls[keep]
    return Candidates(
        mask_logits=masks[query],
        boxes=xyxy[keep],
        label_ids=columns[cls],
        scores=final[keep],
        probs=_distribution(scores[query], num_classes, columns),
        is_thing=torch.ones(len(keep), dtype=torch.bool, device=logits.device),
    )


def stuff_candidates(
    logits: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    columns: torch.Tensor,
    num_classes: int,
    valid: torch.Tensor,
    config: PostprocessConfig,
) -> Candidates:
    """Every stuff query with its best class among `columns`; score = class x mask score."""
    scores = class_scores(logits, columns)  # Q x c
    top, cls = scores.max(1)
    final = top * mask_quality(masks, valid, config.mask_threshold)
    return Candidates(
        mask_logits=masks,
        boxes=box_cxcywh_to_xyxy(boxes.float()).clamp(0, 1),
        label_ids=columns[cls],
        scores=final,
        probs=_distribution(scores, num_classes, columns),
        is_thing=torch.zeros(len(final), dtype=torch.bool, device=logits.device),
    )


@dataclass(frozen=True)
class PanopticSegments:
    """Result of `panoptic_merge`: which candidates survive and their final masks."""

    keep: torch.Tensor  # (N,) long indices into the candidates (first member for merged stuff)
    masks: torch.Tensor  # (N, H, W) bool, disjoint


def panoptic_merge(
    cands: Candidates, mask_probs: torch.Tensor, config: PostprocessConfig
) -> PanopticSegments:
    """Resolve overlaps between thing and stuff candidates (Mask2Former / MaskDINO).

    Args:
        cands: candidates of one image (things after NMS, and stuff).
        mask_probs: (N, H, W) mask probabilities of the candidates at the output resolution.
    Returns:
        Disjoint segments; stuff candidates of one class become one segment.
    """
    H, W = mask_probs.shape[-2:]
    device = mask_probs.device
    order = torch.nonzero(cands.scores >= config.score_threshold).flatten()
    if order.numel() == 0:
        return PanopticSegments(
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, H, W, dtype=torch.bool, device=device),
        )
    probs = mask_probs[order]
    ids = (cands.scores[order, None, None] * probs).argmax(0)  # H x W
    keep, masks, stuff_of_class = [], [], {}
    for j, n in enumerate(order.tolist()):
        own = probs[j] >= config.mask_threshold
        original = int(own.sum())
        seg = (ids == j) & own
        area = int(seg.sum())
        if original == 0 or area == 0 or area / original < config.overlap_threshold:
            continue
        if not bool(cands.is_thing[n]):
            label = int(cands.label_ids[n])
            if label in stuff_of_class:
                masks[stuff_of_class[label]] |= seg
                continue
            stuff_of_class[label] = len(masks)
        keep.append(n)
        masks.append(seg)
    if not keep:
        return PanopticSegments(
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, H, W, dtype=torch.bool, device=device),
        )
    return PanopticSegments(torch.tensor(keep, device=device), torch.stack(masks))


def semantic_scores(
    logits: torch.Tensor, masks: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """Per-class pixel scores: sum over queries of class score x mask probability.

    Args:
        logits: (Q, K); masks: (Q, h, w) logits; columns: (C,) label columns.
    Returns:
        (C, h, w).
    """
    return torch.einsum("qc,qhw->chw", class_scores(logits, columns), masks.float().sigmoid())


def referring_candidate(
    logits: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor,
    config: PostprocessConfig,
) -> Candidates:
    """The single best query for a referring expression (K = 1, the [CLS] embedding)."""
    score = logits[:, 0].float().sigmoid()
    best = int(score.argmax())
    q = torch.tensor([best], device=logits.device)
    final = score[q] * mask_quality(masks[q], valid, config.mask_threshold)
    return Candidates(
        mask_logits=masks[q],
        boxes=box_cxcywh_to_xyxy(boxes[q].float()).clamp(0, 1),
        label_ids=torch.zeros(1, dtype=torch.long, device=logits.device),
        scores=final,
        probs=torch.ones(1, 1, device=logits.device),
        is_thing=torch.ones(1, dtype=torch.bool, device=logits.device),
    )
