"""Matchers and box utilities against brute force and independent references (torchvision)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import generalized_box_iou as tv_giou

from hipie.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    masks_to_boxes,
)
from hipie.training.matcher import HungarianMatcher, MatchTarget, SimOTAMatcher


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 4) normalized cxcywh boxes inside the image."""
    wh = torch.rand(n, 2, generator=gen) * 0.4 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=gen) * (1 - wh)
    return torch.cat([c, wh], dim=1)


# --------------------------------------------------------------------------- box ops
def test_box_conversions_roundtrip_and_values():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert box_xyxy_to_cxcywh(xyxy).tolist() == [[20.0, 40.0, 20.0, 40.0]]
    assert box_xyxy_to_xywh(xyxy).tolist() == [[10.0, 20.0, 20.0, 40.0]]
    assert box_xywh_to_xyxy(box_xyxy_to_xywh(xyxy)).tolist() == xyxy.tolist()
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    assert box_area(xyxy).tolist() == [800.0]


def test_box_iou_and_giou_match_torchvision():
    gen = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(_random_boxes(7, gen))
    b = box_cxcywh_to_xyxy(_random_boxes(5, gen))
    assert torch.allclose(box_iou(a, b), tv_box_iou(a, b), atol=1e-6)
    assert torch.allclose(generalized_box_iou(a, b), tv_giou(a, b), atol=1e-6)
    # Hand value: unit squares shifted by half: IoU 1/3, enclosing 1.5 -> GIoU 1/3 - 0 = 1/3.
    s = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    t = torch.tensor([[0.5, 0.0, 1.5, 1.0]])
    assert box_iou(s, t).item() == pytest.approx(1 / 3)
    far = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert generalized_box_iou(s, far).item() == pytest.approx(-1 / 3)  # 0 - (3 - 2) / 3


def test_masks_to_boxes():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]]
    assert masks_to_boxes(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)


# --------------------------------------------------------------------------- Hungarian
def _random_case(gen: torch.Generator, q: int, t: int, k: int = 4, hw: int = 8):
    logits = torch.randn(q, k, generator=gen)
    masks = torch.randn(q, hw, hw, generator=gen)
    boxes = _random_boxes(q, gen)
    target = MatchTarget(
        labels=torch.randint(0, k, (t,), generator=gen),
        masks=torch.rand(t, 2 * hw, 2 * hw, generator=gen) > 0.5,  # resized to (hw, hw)
        boxes=_random_boxes(t, gen),
    )
    return logits, masks, boxes, target


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_equals_brute_force(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, t = 5, 3 if seed % 2 else 5
    logits, masks, boxes, target = _random_case(gen, q, t)
    matcher = HungarianMatcher()
    (rows, cols), = matcher(logits=logits[None], masks=masks[None], boxes=boxes[None],
                            targets=[target])  # fmt: skip
    cost = matcher.cost_matrix(logits=logits, masks=masks, boxes=boxes, target=target)
    assert cost.shape == (q, t)
    assert sorted(cols.tolist()) == list(range(t)) and len(set(rows.tolist())) == t
    got = cost[rows, cols].sum().item()
    best = min(
        sum(cost[p, j].item() for j, p in enumerate(perm))
        for perm in itertools.permutations(range(q), t)
    )
    assert got == pytest.approx(best, abs=1e-5)


def test_hungarian_recovers_a_permutation_of_perfect_predictions():
    gen = torch.Generator().manual_seed(3)
    t, k = 4, 6
    tgt_masks = torch.zeros(t, 8, 8, dtype=torch.bool)
    for j in range(t):
        tgt_masks[j, 2 * j : 2 * j + 2] = True
    target = MatchTarget(
        labels=torch.tensor([0, 2, 4, 5]), masks=tgt_masks, boxes=_random_boxes(t, gen)
    )
    perm = torch.tensor([3, 0, 5, 1])  # prediction perm[j] is a copy of target j; 2, 4 are junk
    logits = torch.full((6, k), -6.0)
    masks = torch.full((6, 8, 8), -8.0)
    boxes = _random_boxes(6, gen)
    for j in range(t):
        logits[perm[j], target.labels[j]] = 6.0
        masks[perm[j]][tgt_masks[j]] = 8.0
        boxes[perm[j]] = target.boxes[j]
    torch.manual_seed(0)  # for the random points
    for kwargs in ({}, {"cost_box": 0.0, "cost_giou": 0.0}, {"num_points": 64, "cost_box": 0.0}):
        (rows, cols), = HungarianMatcher(**kwargs)(logits=logits[None], masks=masks[None],
                                                   boxes=boxes[None], targets=[target])  # fmt: skip
        assert dict(zip(cols.tolist(), rows.tolist())) == {j: int(perm[j]) for j in range(t)}
    # Stuff decoder: no boxes at all.
    (rows, cols), = HungarianMatcher()(logits=logits[None], masks=masks[None],
                                       targets=[MatchTarget(labels=target.labels,
                                                            masks=tgt_masks)])  # fmt: skip
    assert dict(zip(cols.tolist(), rows.tolist())) == {j: int(perm[j]) for j in range(t)}


def test_hungarian_batched_equals_per_image_and_empty_targets():
    gen = torch.Generator().manual_seed(7)
    q = 6
    cases = [_random_case(gen, q, t) for t in (3, 0, 6)]
    logits = torch.stack([c[0] for c in cases])
    masks = torch.stack([c[1] for c in cases])
    boxes = torch.stack([c[2] for c in cases])
    targets = [c[3] for c in cases]
    matcher = HungarianMatcher()
    batched = matcher(logits=logits, masks=masks, boxes=boxes, targets=targets)
    assert len(batched) == 3
    for b, (rows, cols) in enumerate(batched):
        (r1, c1), = matcher(logits=logits[b : b + 1], masks=masks[b : b + 1],
                            boxes=boxes[b : b + 1], targets=[targets[b]])  # fmt: skip
        assert torch.equal(rows, r1) and torch.equal(cols, c1)
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    assert len(batched[2][0]) == 6
    # Dict targets (DETR style) work the same.
    as_dicts = [{"labels": t.labels, "masks": t.masks, "boxes": t.boxes} for t in targets]
    again = matcher(logits=logits, masks=masks, boxes=boxes, targets=as_dicts)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batched))


def test_multi_hot_class_cost_is_mean_of_positive_labels():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=gen)
    single = HungarianMatcher().cost_matrix(logits=logits, target=MatchTarget(torch.tensor([1, 3])))
    multi_hot = torch.zeros(1, 5)
    multi_hot[0, [1, 3]] = 1.0  # a part: positive for "robot head" (1) and "robot" (3)
    multi = HungarianMatcher().cost_matrix(logits=logits, target=MatchTarget(multi_hot))
    assert torch.allclose(multi[:, 0], single.mean(dim=1))


def test_cost_terms_by_hand():
    """Logits 0 (p = 0.5) on a 4 x 4 mask; the target covers m = 4 pixels."""
    import math

    tgt_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    tgt_mask[0, 0] = True
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    target = MatchTarget(labels=torch.tensor([2]), masks=tgt_mask, boxes=box)
    pred_box = torch.tensor([[0.6, 0.5, 0.2, 0.2]])  # shifted by half a width: IoU 1/3
    for weights, expected in (
        ({"cost_class": 1.0, "cost_mask": 0, "cost_dice": 0, "cost_box": 0, "cost_giou": 0},
         0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)),  # focal pos - neg at p = 0.5
        ({"cost_class": 0, "cost_mask": 1.0, "cost_dice": 0, "cost_box": 0, "cost_giou": 0},
         math.log(2)),  # BCE of p = 0.5 whatever the target
        ({"cost_class": 0, "cost_mask": 0, "cost_dice": 1.0, "cost_box": 0, "cost_giou": 0},
         1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1)),
        ({"cost_class": 0, "cost_mask": 0, "cost_dice": 0, "cost_box": 1.0, "cost_giou": 0}, 0.1),
        ({"cost_class": 0, "cost_mask": 0, "cost_dice": 0, "cost_box": 0, "cost_giou": 1.0},
         -1 / 3),
    ):  # fmt: skip
        cost = HungarianMatcher(**weights).cost_matrix(
            logits=torch.zeros(1, 3), masks=torch.zeros(1, 4, 4), boxes=pred_box, target=target
        )
        assert cost.item() == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- simOTA
def test_simota_assigns_dynamic_k_predictions_to_one_target():
    gen = torch.Generator().manual_seed(0)
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    jitter = (torch.rand(12, 4, generator=gen) - 0.5) * torch.tensor([0.06, 0.06, 0.08, 0.08])
    preds = gt + jitter  # twelve good boxes around the one object
    logits = torch.zeros(1, 12, 3)
    matcher = SimOTAMatcher()
    (rows, cols), = matcher(logits=logits, boxes=preds[None],
                            targets=[MatchTarget(labels=torch.tensor([1]), boxes=gt)])  # fmt: skip
    ious = tv_box_iou(box_cxcywh_to_xyxy(preds), box_cxcywh_to_xyxy(gt))[:, 0]
    k = int(ious.topk(10).values.sum())
    assert k >= 5 and len(rows) == k  # many-to-one
    assert set(cols.tolist()) == {0}
    # With equal class scores the cost ranks by IoU: the k best-IoU predictions are chosen.
    assert set(rows.tolist()) == set(ious.topk(k).indices.tolist())


def test_simota_candidate_rule_and_one_target_per_prediction():
    gts = torch.tensor(
        [[0.30, 0.30, 0.20, 0.20], [0.36, 0.30, 0.20, 0.20], [0.80, 0.80, 0.02, 0.02]]
    )
    preds = torch.tensor([
        [0.30, 0.30, 0.20, 0.20],  # 0: on gt 0
        [0.36, 0.30, 0.20, 0.20],  # 1: on gt 1
        [0.33, 0.30, 0.20, 0.20],  # 2: between gt 0 and gt 1
        [0.85, 0.85, 0.30, 0.30],  # 3: centre outside gt 2's box, inside its centre region
        [0.12, 0.30, 0.30, 0.30],  # 4: overlaps gt 0 (IoU ~0.12), centre outside everything
        [0.95, 0.05, 0.10, 0.10],  # 5: far away
    ])  # fmt: skip
    matcher = SimOTAMatcher()
    candidate, core = matcher.candidates(preds, gts)
    assert candidate[3, 2] and not core[3, 2]
    assert not candidate[4].any() and not candidate[5].any()
    logits = torch.zeros(1, 6, 2)
    logits[0, 4:, 0] = 10.0  # confident, but must never be assigned
    targets = [MatchTarget(labels=torch.zeros(3, dtype=torch.long), boxes=gts)]
    (rows, cols), = matcher(logits=logits, boxes=preds[None], targets=targets)  # fmt: skip
    assert 4 not in rows.tolist() and 5 not in rows.tolist()
    assert len(set(rows.tolist())) == len(rows)  # each prediction to at most one target
    got = dict(zip(rows.tolist(), cols.tolist()))
    assert got[0] == 0 and got[1] == 1 and got[3] == 2  # k >= 1 even with a low IoU


def test_simota_empty_and_batched():
    gen = torch.Generator().manual_seed(5)
    matcher = SimOTAMatcher(cost_mask=1.0, cost_dice=1.0)
    logits = torch.randn(2, 8, 3, generator=gen)
    boxes = torch.stack([_random_boxes(8, gen), _random_boxes(8, gen)])
    masks = torch.randn(2, 8, 6, 6, generator=gen)
    tgt = MatchTarget(labels=torch.tensor([0, 2]), boxes=boxes[1, :2].clone(),
                      masks=torch.rand(2, 12, 12, generator=gen) > 0.5)  # fmt: skip
    empty = MatchTarget(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4),
                        masks=torch.zeros(0, 12, 12, dtype=torch.bool))  # fmt: skip
    out = matcher(logits=logits, boxes=boxes, masks=masks, targets=[empty, tgt])
    assert out[0][0].numel() == 0 and out[0][0].dtype == torch.int64
    one = matcher(logits=logits[1:], boxes=boxes[1:], masks=masks[1:], targets=[tgt])[0]
    assert torch.equal(out[1][0], one[0]) and torch.equal(out[1][1], one[1])
    assert {0, 1} <= set(out[1][0].tolist())  # exact copies of the targets' boxes are taken
    with pytest.raises(ValueError):
        matcher(logits=logits, boxes=boxes, targets=[MatchTarget(torch.tensor([0]))] * 2)
