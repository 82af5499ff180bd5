"""Matchers between decoder predictions and ground truth (Sec. 3.5 of the paper).

- `HungarianMatcher`: one-to-one (stuff decoder, and any DETR-style head). Each ground-truth
  segment gets exactly one prediction (if there are enough predictions), chosen to minimise the
  total cost with `scipy.optimize.linear_sum_assignment`.
- `SimOTAMatcher`: many-to-one (thing decoder, YOLOX's simOTA as used by UNINEXT). Each ground
  truth gets a dynamic number `k` of predictions; every prediction goes to at most one ground truth.

Contract shared by both (like DETR's matcher)::

    indices = matcher(logits=..., targets=..., masks=..., boxes=...)

    logits:  (B, Q, K) classification logits (sigmoid / focal style, one column per label)
    masks:   (B, Q, h, w) mask logits, or None (no mask cost)
    boxes:   (B, Q, 4) normalized cxcywh boxes in [0, 1], or None (no box cost)
    targets: B entries, each a `MatchTarget` (or a mapping with the same keys) with
             labels (T,) long class indices in [0, K), or (T, K) multi-hot float (a part is
             positive for both its part label and its instance label, Sec. 3.7),
             masks (T, H, W) bool/float (any size: resized to (h, w)), or None,
             boxes (T, 4) normalized cxcywh, or None.

    returns: B tuples (pred_idx (M,) long, target_idx (M,) long) on the CPU. For Hungarian,
             M = min(Q, T) and both index tensors are unique; for simOTA, pred_idx is unique and
             target_idx may repeat. Empty targets give two empty tensors.

Costs are computed without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hipie.box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou

__all__ = ["HungarianMatcher", "MatchTarget", "SimOTAMatcher", "pairwise_costs"]

MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MatchTarget:
    """Ground truth of one image for matching.

    labels: (T,) long class indices, or (T, K) multi-hot float.
    masks: (T, H, W) bool or float in [0, 1]; None when there are no masks.
    boxes: (T, 4) normalized cxcywh; None when there are no boxes.
    """

    labels: torch.Tensor
    masks: torch.Tensor | None = None
    boxes: torch.Tensor | None = None


def _field(target: Any, name: str) -> torch.Tensor | None:
    """Read `name` from a MatchTarget or a mapping (DETR-style target dicts)."""
    if isinstance(target, Mapping):
        return target.get(name)
    return getattr(target, name)


def _focal_class_cost(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Focal-style classification cost (Deformable DETR): `(Q, K)` logits, labels -> `(Q, T)`.

    For multi-hot labels `(T, K)` the cost is the mean over each target's positive classes.
    """
    prob = logits.float().sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()  # Q x K
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()  # Q x K
    diff = pos - neg  # Q x K
    labels = labels.to(logits.device)
    if labels.dim() == 1:
        return diff[:, labels.long()]  # Q x T
    multi_hot = labels.float()  # T x K
    return diff @ multi_hot.T / multi_hot.sum(dim=1).clamp(min=1)[None, :]


def _mask_costs(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid BCE cost and dice cost between `(Q, P)` mask logits and `(T, P)` targets in [0, 1].

    Both are averaged / normalized over the P pixels; returns two `(Q, T)` tensors.
    """
    pred = pred.float()
    target = target.float()
    num_pixels = max(pred.shape[1], 1)
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    bce = (pos @ target.T + neg @ (1 - target).T) / num_pixels  # Q x T
    prob = pred.sigmoid()
    numerator = 2 * prob @ target.T  # Q x T
    denominator = prob.sum(-1)[:, None] + target.sum(-1)[None, :]
    dice = 1 - (numerator + 1) / (denominator + 1)
    return bce, dice


def _resize_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(T, H, W)` target masks -> `(T, h*w)` float at the prediction resolution."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return masks.flatten(1)


def _sample_points(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of `(N, H, W)` masks at `(P, 2)` points (x, y in [0, 1]) -> `(N, P)`."""
    grid = (points * 2 - 1)[None, None].expand(masks.shape[0], 1, -1, -1)  # N x 1 x P x 2
    sampled = F.grid_sample(masks[:, None].float(), grid, align_corners=False)  # N x 1 x 1 x P
    return sampled[:, 0, 0]


def pairwise_costs(
    *,
    logits: torch.Tensor,
    target: Any,
    masks: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    num_points: int | None = None,
) -> dict[str, torch.Tensor]:
    """All pairwise cost terms of one image, unweighted.

    Args:
        logits: (Q, K) classification logits.
        target: a `MatchTarget` (or mapping) with T ground-truth segments.
        masks: (Q, h, w) mask logits or None.
        boxes: (Q, 4) normalized cxcywh or None.
        num_points: compare masks at this many random points (uniform, shared by predictions
            and targets, as Mask2Former does; uses the global torch RNG) instead of on the whole
            prediction grid with targets resized to it. None = whole grid.

    Returns:
        dict of `(Q, T)` tensors: "class" always; "mask" (BCE) and "dice" when both prediction and
        target masks exist; "box" (L1 in cxcywh), "giou" (negative GIoU) and "iou" (plain box IoU,
        not a cost) when both prediction and target boxes exist.
    """
    labels = _field(target, "labels")
    costs = {"class": _focal_class_cost(logits, labels, focal_alpha, focal_gamma)}
    tgt_masks = _field(target, "masks")
    if masks is not None and tgt_masks is not None:
        tgt_masks = tgt_masks.to(masks.device)
        if num_points:
            points = torch.rand(num_points, 2, device=masks.device)  # P x 2
            pred, tgt = _sample_points(masks, points), _sample_points(tgt_masks, points)
        else:
            size = (masks.shape[-2], masks.shape[-1])
            pred, tgt = masks.flatten(1), _resize_targets(tgt_masks, size)  # Q x hw, T x hw
        costs["mask"], costs["dice"] = _mask_costs(pred, tgt)
    tgt_boxes = _field(target, "boxes")
    if boxes is not None and tgt_boxes is not None:
        pred_boxes = boxes.float()
        tgt_boxes = tgt_boxes.float().to(pred_boxes.device)
        costs["box"] = torch.cdist(pred_boxes, tgt_boxes, p=1)  # Q x T
        pred_xyxy = box_cxcywh_to_xyxy(pred_boxes)
        tgt_xyxy = box_cxcywh_to_xyxy(tgt_boxes)
        costs["giou"] = -generalized_box_iou(pred_xyxy, tgt_xyxy)
        costs["iou"] = box_iou(pred_xyxy, tgt_xyxy)
    return costs


def _empty() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)


def _num_targets(target: Any) -> int:
    return int(_field(target, "labels").shape[0])


class HungarianMatcher:
    """One-to-one matching minimising `sum of weighted costs` (DETR, Mask2Former, MaskDINO).

    cost = w_class * focal class cost + w_mask * mask BCE + w_dice * dice
           + w_box * L1(cxcywh) + w_giou * (-GIoU)

    Box terms are used only when `w_box`/`w_giou` are non-zero and both sides have boxes (the
    stuff decoder passes `boxes=None`: the paper disables its box loss). Defaults follow the
    paper's loss weights (Eq. 3, App. A.3.2: cls 2, mask 5 x (BCE 1 + dice 1), box 5 x (L1 1 +
    GIoU 0.2)). `num_points` (e.g. 112 * 112) compares masks at random points instead of on the
    whole prediction grid (see `pairwise_costs`).
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        cost_box: float = 5.0,
        cost_giou: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int | None = None,
    ) -> None:
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_box = cost_box
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points

    def cost_matrix(
        self,
        *,
        logits: torch.Tensor,
        target: Any,
        masks: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted `(Q, T)` cost of one image (`logits (Q, K)`, `masks (Q, h, w)`, `boxes (Q, 4)`)."""
        terms = pairwise_costs(
            logits=logits,
            target=target,
            masks=masks,
            boxes=boxes,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            num_points=self.num_points,
        )
        cost = self.cost_class * terms["class"]
        if "mask" in terms:
            cost = cost + self.cost_mask * terms["mask"] + self.cost_dice * terms["dice"]
        if "box" in terms:
            cost = cost + self.cost_box * terms["box"] + self.cost_giou * terms["giou"]
        return cost

    @torch.no_grad()
    def __call__(
        self,
        *,
        logits: torch.Tensor,
        targets: Sequence[Any],
        masks: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> MatchIndices:
        """Match a batch; see the module docstring for shapes. Returns B (pred_idx, target_idx)."""
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
        indices: MatchIndices = []
        for b, target in enumerate(targets):
            if _num_targets(target) == 0 or logits.shape[1] == 0:
                indices.append(_empty())
                continue
            cost = self.cost_matrix(
                logits=logits[b],
                target=target,
                masks=None if masks is None else masks[b],
                boxes=None if boxes is None else boxes[b],
            )
            cost = torch.nan_to_num(cost.cpu(), nan=1e8, posinf=1e8, neginf=-1e8)
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


class SimOTAMatcher:
    """Many-to-one matching with YOLOX's simOTA (Ge et al. 2021), as the paper's thing decoder.

    For each image:
    1. Candidates: a prediction is a candidate for a ground truth when the centre of its box lies
       inside the ground-truth box OR inside the ground truth's centre region (a square of
       half-side `center_radius * center_stride`, in normalized units, around the ground truth's
       centre). Predictions that are candidates of no ground truth are never assigned.
    2. Cost = w_class * focal class cost + w_iou * (-log box IoU) [+ w_mask * BCE + w_dice * dice]
       + `outside_cost` when the prediction is not in BOTH the box and the centre region
       (YOLOX's preference for the core of the object); non-candidates get an infinite cost.
    3. Dynamic k: for each ground truth, k = max(1, int(sum of its `topk` largest IoUs with the
       candidates)); it takes its k cheapest candidates.
    4. A prediction chosen by several ground truths keeps only the cheapest one.

    Boxes are required (simOTA is defined on box IoU). Deviation from YOLOX: predictions are
    queries, not anchor points, so the "anchor centre" is the centre of the predicted box and the
    stride is a fixed `center_stride` of the normalized image (default 1/32).
    """

    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_iou: float = 3.0,
        cost_mask: float = 0.0,
        cost_dice: float = 0.0,
        center_radius: float = 2.5,
        center_stride: float = 1.0 / 32.0,
        topk: int = 10,
        outside_cost: float = 1e5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int | None = None,
    ) -> None:
        self.cost_class = cost_class
        self.cost_iou = cost_iou
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.center_radius = center_radius
        self.center_stride = center_stride
        self.topk = topk
        self.outside_cost = outside_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points

    def candidates(
        self, pred_boxes: torch.Tensor, tgt_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate rule of one image.

        Args:
            pred_boxes: (Q, 4) normalized cxcywh predictions.
            tgt_boxes: (T, 4) normalized cxcywh ground truth.

        Returns:
            in_box_or_center: (Q, T) bool, the prediction's centre is in the ground-truth box or
                its centre region (candidates);
            in_box_and_center: (Q, T) bool, in both.
        """
        centers = pred_boxes[:, None, :2]  # Q x 1 x 2
        tgt_xyxy = box_cxcywh_to_xyxy(tgt_boxes)  # T x 4
        after_top_left = (centers > tgt_xyxy[None, :, :2]).all(-1)  # Q x T
        before_bottom_right = (centers < tgt_xyxy[None, :, 2:]).all(-1)  # Q x T
        in_box = after_top_left & before_bottom_right
        radius = self.center_radius * self.center_stride
        in_center = ((centers - tgt_boxes[None, :, :2]).abs() < radius).all(-1)  # Q x T
        return in_box | in_center, in_box & in_center

    @torch.no_grad()
    def match_one(
        self,
        *,
        logits: torch.Tensor,
        target: Any,
        boxes: torch.Tensor,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """simOTA for one image: `logits (Q, K)`, `boxes (Q, 4)`, `masks (Q, h, w)` or None."""
        num_queries = logits.shape[0]
        tgt_boxes = _field(target, "boxes")
        if tgt_boxes is None:
            raise ValueError("SimOTAMatcher needs target boxes")
        if _num_targets(target) == 0 or num_queries == 0:
            return _empty()
        use_masks = masks is not None and (self.cost_mask != 0 or self.cost_dice != 0)
        terms = pairwise_costs(
            logits=logits,
            target=target,
            masks=masks if use_masks else None,
            boxes=boxes,
            focal_alpha=self.focal_alpha,
            focal_gamma=self.focal_gamma,
            num_points=self.num_points,
        )
        ious = terms["iou"].cpu()  # Q x T
        candidate, core = self.candidates(boxes.float().cpu(), tgt_boxes.float().cpu())
        cost = self.cost_class * terms["class"] + self.cost_iou * -(terms["iou"] + 1e-8).log()
        if "mask" in terms:
            cost = cost + self.cost_mask * terms["mask"] + self.cost_dice * terms["dice"]
        cost = cost.cpu().float() + self.outside_cost * (~core).float()
        cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8)
        cost[~candidate] = float("inf")

        num_targets = cost.shape[1]
        assigned_cost = torch.full((num_queries,), float("inf"))
        assigned_target = torch.full((num_queries,), -1, dtype=torch.int64)
        for t in range(num_targets):
            cand = candidate[:, t].nonzero(as_tuple=True)[0]
            if cand.numel() == 0:
                continue
            top = ious[cand, t].topk(min(self.topk, cand.numel())).values
            k = max(1, int(top.sum().item()))
            k = min(k, cand.numel())
            chosen = cand[cost[cand, t].topk(k, largest=False).indices]
            # A prediction claimed by several ground truths keeps the cheapest one.
            better = cost[chosen, t] < assigned_cost[chosen]
            chosen = chosen[better]
            assigned_cost[chosen] = cost[chosen, t]
            assigned_target[chosen] = t
        pred_idx = (assigned_target >= 0).nonzero(as_tuple=True)[0]
        return pred_idx, assigned_target[pred_idx]

    def __call__(
        self,
        *,
        logits: torch.Tensor,
        targets: Sequence[Any],
        boxes: torch.Tensor,
        masks: torch.Tensor | None = None,
    ) -> MatchIndices:
        """Match a batch; see the module docstring for shapes. Returns B (pred_idx, target_idx)."""
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]}")
        return [
            self.match_one(
                logits=logits[b],
                target=target,
                boxes=boxes[b],
                masks=None if masks is None else masks[b],
            )
            for b, target in enumerate(targets)
        ]
