"""Query-to-target matching of the released HIPIE training, on token logits and positive maps.

Targets are scored by *token* logits: a target's class cost is the focal cost averaged over the
prompt tokens of its label (its positive map), as the release's `HungarianMatcherVL` and MaskDINO
matcher do. The cost terms come from `hipie.training.matcher.pairwise_costs`.

- `release_simota` (thing branch, `MODEL.OTA` on): the release's simOTA (UNINEXT's
  `HungarianMatcherVL.forward_ota`), many queries per target.
- `release_hungarian`: one-to-one matching with weighted class / mask / box costs: the thing
  branch's two-stage encoder proposals (class 2, L1 5, GIoU 2: `MODEL.DDETRS.SET_COST_*`) and the
  MaskDINO stuff branch (class 4, mask 5, dice 5, L1 5, GIoU 2: `MaskDINO.COST_*_WEIGHT`).

Both return (pred_idx, target_idx) long tensors on the CPU for one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from hipie.training.matcher import MatchTarget, SimOTAMatcher, pairwise_costs

__all__ = ["HungarianCosts", "release_hungarian", "release_simota"]

Pair = tuple[torch.Tensor, torch.Tensor]

# simOTA constants the release hard-codes in `compute_cost` / `get_in_boxes_info`
SIMOTA_GIOU = 3.0  # weight of -GIoU
SIMOTA_NOT_CORE = 100.0  # added where the query centre is not in both the box and its centre area
SIMOTA_NOT_CANDIDATE = 10000.0  # added to the whole row of a query near no target at all
SIMOTA_RADIUS = 2.5  # centre area: 2.5 strides of 1/32 of the image around the box centre
SIMOTA_STRIDE = 1.0 / 32.0
SIMOTA_TOPK = 10  # dynamic k = int(sum of the 10 best IoUs), at least 1
_TAKEN = 100000.0  # added to already matched queries while unmatched targets pick one


def _empty() -> Pair:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


def _keep_cheapest(matching: torch.Tensor, cost: torch.Tensor) -> None:
    """A query claimed by several targets keeps only its cheapest one (in place)."""
    multi = matching.sum(1) > 1
    if multi.any():
        best = cost[multi].argmin(1)
        rows = multi.nonzero()[:, 0]
        matching[rows] = False
        matching[rows, best] = True


@torch.no_grad()
def release_simota(
    token_logits: torch.Tensor,
    boxes: torch.Tensor,
    positive_map: torch.Tensor,
    target_boxes: torch.Tensor,
) -> Pair:
    """simOTA of the release's thing branch for one image.

    Args:
        token_logits: (Q, T) token logits of the two-stage queries.
        boxes: (Q, 4) predicted cxcywh boxes.
        positive_map: (N, T) bool/0-1, the prompt tokens of each target's label.
        target_boxes: (N, 4) cxcywh, same frame as `boxes`.

    Cost = class (mean focal cost over the label's tokens) + 3 (-GIoU) + 100 where the query's
    box centre is not inside both the target box and its centre area, + 10000 on the rows of
    queries that are inside no target box and no centre area. Each target takes its k cheapest
    queries, k = max(1, int(sum of its 10 largest IoUs over all queries)); a query taken by several
    targets keeps the cheapest; targets left without a query then take, one round at a time, their
    cheapest query among those not yet taken.

    Deviation: when two targets left without a query pick the same one in a round, the release
    resolves the clash with a stale mask (one of the two can end up unmatched); here the cheaper
    keeps it and the other picks again.
    """
    num_queries, num_targets = token_logits.shape[0], target_boxes.shape[0]
    if num_targets == 0 or num_queries == 0:
        return _empty()
    target_boxes = target_boxes.to(boxes.device)
    target = MatchTarget(labels=positive_map.float(), boxes=target_boxes.float())
    terms = pairwise_costs(logits=token_logits, target=target, boxes=boxes.float())
    geometry = SimOTAMatcher(center_radius=SIMOTA_RADIUS, center_stride=SIMOTA_STRIDE)
    near, core = geometry.candidates(boxes.float(), target_boxes.float())
    cost = terms["class"] + SIMOTA_GIOU * terms["giou"] + SIMOTA_NOT_CORE * (~core).float()
    cost = cost + SIMOTA_NOT_CANDIDATE * (~near.any(1, keepdim=True)).float()
    cost = torch.nan_to_num(cost.float().cpu(), nan=1e8, posinf=1e8, neginf=-1e8)
    ious = terms["iou"].float().cpu()

    top = ious.topk(min(num_queries, SIMOTA_TOPK), dim=0).values
    ks = top.sum(0).int().clamp(min=1)
    matching = torch.zeros(num_queries, num_targets, dtype=torch.bool)
    for t in range(num_targets):
        matching[cost[:, t].topk(int(ks[t]), largest=False).indices, t] = True
    _keep_cheapest(matching, cost)
    while not matching.any(0).all():
        taken = matching.any(1)
        if taken.all():  # fewer queries than targets
            break
        cost[taken] += _TAKEN
        for t in (~matching.any(0)).nonzero()[:, 0]:
            matching[cost[:, t].argmin(), t] = True
        _keep_cheapest(matching, cost)
    pred = matching.any(1).nonzero()[:, 0]
    return pred, matching[pred].float().argmax(1)


@dataclass(frozen=True)
class HungarianCosts:
    """Weights of the one-to-one matching cost (0 switches a term off)."""

    cls: float
    box_l1: float
    giou: float
    mask_bce: float = 0.0
    dice: float = 0.0


@torch.no_grad()
def release_hungarian(
    costs: HungarianCosts,
    token_logits: torch.Tensor,
    positive_map: torch.Tensor,
    *,
    boxes: torch.Tensor | None = None,
    target_boxes: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    target_masks: torch.Tensor | None = None,
) -> Pair:
    """One-to-one matching of one image minimising the weighted cost.

    Args:
        token_logits: (Q, T); positive_map: (N, T).
        boxes / target_boxes: (Q, 4) / (N, 4) cxcywh, or None (no box cost).
        masks / target_masks: (Q, h, w) logits / (N, h, w) in [0, 1] on the same grid, or None.
            Deviation: the release compares masks at 12544 random points; we use the whole grid.
    """
    if positive_map.shape[0] == 0 or token_logits.shape[0] == 0:
        return _empty()
    use_mask = masks is not None and (costs.mask_bce or costs.dice)
    target = MatchTarget(
        labels=positive_map.float(),
        masks=target_masks if use_mask else None,
        boxes=None if target_boxes is None else target_boxes.float(),
    )
    terms = pairwise_costs(
        logits=token_logits,
        target=target,
        masks=masks if use_mask else None,
        boxes=None if boxes is None else boxes.float(),
    )
    cost = costs.cls * terms["class"]
    if "box" in terms:
        cost = cost + costs.box_l1 * terms["box"] + costs.giou * terms["giou"]
    if "mask" in terms:
        cost = cost + costs.mask_bce * terms["mask"] + costs.dice * terms["dice"]
    cost = torch.nan_to_num(cost.float().cpu(), nan=1e8, posinf=1e8, neginf=-1e8)
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
