"""The release's training losses (hipie.training.release_criterion) on hand-made cases, and a
small `ThingBranch` fitting two objects with them."""

from __future__ import annotations

import math

import pytest
import torch

from hipie.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, masks_to_boxes
from hipie.modeling.thing_branch import ThingBranch, grounding_token
from hipie.training.release_criterion import (
    ReleaseCriterion,
    ReleaseTargets,
    SetPrediction,
    StuffLossWeights,
    label_positive_map,
    masks_on_grid,
)
from hipie.training.release_matching import HungarianCosts, release_hungarian, release_simota

BIG = 20.0  # a confident logit


def _focal(x: float, t: float, alpha: float = 0.25) -> float:
    p = 1 / (1 + math.exp(-x))
    ce = math.log1p(math.exp(-x)) if t == 1 else math.log1p(math.exp(x))
    p_t = p if t == 1 else 1 - p
    return (alpha if t == 1 else 1 - alpha) * (1 - p_t) ** 2 * ce


def _box_mask(size: int, box_xyxy: tuple[int, int, int, int]) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    x0, y0, x1, y1 = box_xyxy
    m[y0:y1, x0:x1] = True
    return m


def _targets(masks: torch.Tensor, positive: torch.Tensor, is_thing: torch.Tensor) -> ReleaseTargets:
    size = masks.shape[-1]
    boxes = box_xyxy_to_cxcywh(masks_to_boxes(masks).float() / size)
    return ReleaseTargets(positive, boxes, masks, is_thing, (size, size))


# --------------------------------------------------------------------------- targets
def test_masks_on_grid_samples_pixel_centres_and_pads():
    m = torch.zeros(1, 6, 8, dtype=torch.bool)
    m[0, 2, 2] = True  # the centre pixel of grid cell (0, 0) at stride 4
    m[0, 1, 5] = True  # not a centre
    grid = masks_on_grid(m, (2, 2))
    assert grid.tolist() == [[[1.0, 0.0], [0.0, 0.0]]]  # rows 6..7 are zero padding


def test_label_positive_map_marks_label_and_object_tokens():
    class_tokens = {1: [1], 2: [3, 4], 3: [6, 7]}  # "robot. robot head. robot arm"
    got = label_positive_map(
        torch.tensor([1, 0, 2]), class_tokens, 9, also=torch.tensor([0, -1, 0])
    )
    assert got.nonzero().tolist() == [[0, 1], [0, 3], [0, 4], [1, 1], [2, 1], [2, 6], [2, 7]]


# --------------------------------------------------------------------------- matching
def test_simota_takes_dynamic_k_cheapest_candidates():
    t_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    positive = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    boxes = torch.tensor(
        [
            [0.3, 0.3, 0.2, 0.2],  # 0: target 0 exactly
            [0.31, 0.3, 0.2, 0.2],  # 1: close to target 0
            [0.7, 0.7, 0.2, 0.2],  # 2: target 1 exactly
            [0.05, 0.05, 0.05, 0.05],  # 3: near nothing
            [0.3, 0.3, 0.15, 0.15],  # 4: inside target 0, IoU 0.5625
            [0.7, 0.7, 0.2, 0.2],  # 5: target 1's box, wrong class
        ]
    )
    logits = torch.full((6, 3), -BIG)
    logits[[0, 1, 4], 0] = BIG
    logits[2, 1] = BIG
    pred, tgt = release_simota(logits, boxes, positive, t_boxes)
    # k(target 0) = int(1 + 0.905 + 0.5625) = 2: queries 0 and 1 (1 is cheaper than 4 by GIoU);
    # k(target 1) = int(1 + 1) = 2: queries 2 and 5; query 3 is never taken
    assert pred.tolist() == [0, 1, 2, 5]
    assert tgt.tolist() == [0, 0, 1, 1]


def test_simota_clash_keeps_the_cheaper_target_and_the_other_picks_again():
    t_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.32, 0.3, 0.2, 0.2]])
    positive = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.3, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05]])
    logits = torch.tensor([[BIG, BIG], [-BIG, -BIG], [-BIG, -BIG]])
    pred, tgt = release_simota(logits, boxes, positive, t_boxes)
    assert pred.tolist() == [0, 1] and tgt.tolist() == [0, 1]


def test_hungarian_pairs_by_class_mask_and_box():
    size = 32
    masks = torch.stack([_box_mask(size, (0, 0, 16, 16)), _box_mask(size, (16, 8, 32, 32))])
    t = _targets(masks, torch.tensor([[0, 1, 0], [0, 0, 1]], dtype=torch.bool), torch.ones(2))
    grid = masks_on_grid(t.masks, (8, 8))
    pred_masks = torch.full((4, 8, 8), -BIG)
    pred_masks[2][grid[0] > 0] = BIG
    pred_masks[0][grid[1] > 0] = BIG
    logits = torch.full((4, 3), -BIG)
    logits[2, 1] = logits[0, 2] = BIG
    boxes = torch.full((4, 4), 0.5)
    boxes[2], boxes[0] = t.boxes[0], t.boxes[1]
    costs = StuffLossWeights().costs
    pred, tgt = release_hungarian(
        costs, logits, t.positive_map, boxes=boxes, target_boxes=t.boxes,
        masks=pred_masks, target_masks=grid,
    )  # fmt: skip
    assert dict(zip(pred.tolist(), tgt.tolist())) == {0: 1, 2: 0}
    # class cost alone decides too
    pred, tgt = release_hungarian(HungarianCosts(1.0, 0.0, 0.0), logits, t.positive_map)
    assert dict(zip(pred.tolist(), tgt.tolist())) == {0: 1, 2: 0}


# --------------------------------------------------------------------------- stuff-branch losses
def _stuff_case():
    size = 32
    masks = torch.stack([_box_mask(size, (0, 0, 16, 16)), _box_mask(size, (8, 16, 32, 32))])
    positive = torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    t = _targets(masks, positive, torch.tensor([True, False]))  # a thing and a stuff
    grid = masks_on_grid(t.masks, (8, 8))
    logits = torch.full((1, 4, 5), -BIG)
    logits[0, 2, 1] = logits[0, 0, 3] = BIG
    pred_masks = torch.full((1, 4, 8, 8), -BIG)
    pred_masks[0, 2][grid[0] > 0] = BIG
    pred_masks[0, 0][grid[1] > 0] = BIG
    boxes = torch.full((1, 4, 4), 0.5)
    boxes[0, 2], boxes[0, 0] = t.boxes[0], t.boxes[1]
    return t, SetPrediction(logits, boxes, pred_masks)


def test_perfect_stuff_prediction_has_near_zero_losses():
    t, pred = _stuff_case()
    losses = ReleaseCriterion().stuff_losses([pred, pred], [t], proposals=pred)
    names = {"loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou"}
    assert set(losses) == {f"{n}{s}_maskdino" for n in names for s in ("", "_0", "_interm")}
    for name, value in losses.items():
        assert value.item() < 1e-5, name


def test_wrong_class_raises_the_focal_term_by_the_expected_amount():
    t, pred = _stuff_case()
    crit = ReleaseCriterion()
    before = crit.stuff_losses([pred], [t])
    wrong = pred.token_logits.clone()
    wrong[0, 2, 1], wrong[0, 2, 2] = -BIG, BIG  # query 2 (target 0) says token 2, not token 1
    after = crit.stuff_losses([SetPrediction(wrong, pred.boxes, pred.masks)], [t])
    # class weight 4, divided by the 2 targets; matching is unchanged (masks and boxes decide)
    expected = 4.0 * (_focal(-BIG, 1) + _focal(BIG, 0)) / 2
    rise = after["loss_ce_maskdino"] - before["loss_ce_maskdino"]
    assert rise.item() == pytest.approx(expected, rel=1e-5)
    for name in ("loss_mask", "loss_dice", "loss_bbox", "loss_giou"):
        assert after[f"{name}_maskdino"].item() < 1e-5


def test_stuff_box_loss_follows_the_release_or_the_paper():
    t, pred = _stuff_case()
    boxes = pred.boxes.clone()
    boxes[0, 0] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # the stuff target's box is off
    off = SetPrediction(pred.token_logits, boxes, pred.masks)
    release = ReleaseCriterion().stuff_losses([off], [t])
    paper = ReleaseCriterion(stuff=StuffLossWeights(box_on_stuff=False)).stuff_losses([off], [t])
    l1 = (boxes[0, 0] - t.boxes[1]).abs().sum().item()
    assert release["loss_bbox_maskdino"].item() == pytest.approx(5.0 * l1 / 2, rel=1e-5)
    assert paper["loss_bbox_maskdino"].item() < 1e-6


# --------------------------------------------------------------------------- thing branch
def _small_branch() -> ThingBranch:
    return ThingBranch(
        dim=64, text_dim=32, num_heads=4, ffn_dim=128, enc_layers=1, dec_layers=2,
        num_queries=20, num_background=2, vl_dim=64,
    )  # fmt: skip


def _scene(size: int = 128):
    """Random features of a `size` x `size` input and two objects (a box and an ellipse)."""
    srcs = [torch.randn(1, 64, size // 8 // 2**lvl, size // 8 // 2**lvl) for lvl in range(4)]
    pads = [torch.zeros(1, s.shape[2], s.shape[3], dtype=torch.bool) for s in srcs]
    tokens = torch.randn(1, 6, 32)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.stack(
        [
            _box_mask(size, (20, 16, 72, 56)),
            ((yy - 90) / 24.0) ** 2 + ((xx - 92) / 20.0) ** 2 <= 1,
        ]
    )
    positive = torch.zeros(2, 6, dtype=torch.bool)
    positive[0, 1] = positive[1, 3] = True
    return srcs, pads, tokens, _targets(masks, positive, torch.ones(2, dtype=torch.bool))


def test_thing_losses_cover_every_layer_and_the_proposals():
    torch.manual_seed(0)
    branch = _small_branch()
    srcs, pads, tokens, t = _scene(64)
    stuff = ReleaseTargets(
        torch.tensor([[0, 0, 0, 0, 1, 0]], dtype=torch.bool),
        torch.tensor([[0.5, 0.9, 1.0, 0.2]]),
        _box_mask(64, (0, 51, 64, 64))[None],
        torch.tensor([False]),
        (64, 64),
    )
    both = ReleaseTargets(
        torch.cat([t.positive_map, stuff.positive_map]),
        torch.cat([t.boxes, stuff.boxes]),
        torch.cat([t.masks, stuff.masks]),
        torch.cat([t.is_thing, stuff.is_thing]),
        t.image_size,
    )
    out = branch(srcs, pads, tokens)
    losses = ReleaseCriterion()(targets=[both], branch=branch, things=out)
    terms = ("loss_ce", "loss_bbox", "loss_giou", "loss_boxiou", "loss_mask", "loss_dice")
    expected = {n + s for n in terms for s in ("", "_0")}
    expected |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "total"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    total = sum(v for k, v in losses.items() if k != "total")
    assert losses["total"].item() == pytest.approx(total.item(), rel=1e-6)
    losses["total"].backward()
    heads = (
        "controller",
        "mask_head",
        "iou_head.0",
        "iou_head.1",
        "transformer.decoder.class_embed.0",
    )
    for name in heads:
        grads = [p.grad for n, p in branch.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
    proposal_head = branch.transformer.decoder.class_embed[2].body.weight
    assert proposal_head.grad is not None and proposal_head.grad.abs().sum() > 0

    # a batch without things: no matched-query loss, and the proposal group is switched off
    out = branch(srcs, pads, tokens)
    losses = ReleaseCriterion()(targets=[stuff], branch=branch, things=out)
    assert all(v.item() == 0.0 for k, v in losses.items())


def test_grounding_scores_queries_against_the_pooled_text():
    torch.manual_seed(0)
    branch = _small_branch()
    srcs, pads, tokens, t = _scene(64)
    ref = ReleaseTargets(torch.ones(1, 1), t.boxes[:1], t.masks[:1], t.is_thing[:1], t.image_size)
    pooled = grounding_token(tokens)
    out = branch(srcs, pads, tokens, class_tokens=pooled)
    losses = ReleaseCriterion()(targets=[ref], branch=branch, things=out, class_tokens=pooled)
    assert out.token_logits.shape[-1] == 1
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_ce"].item() > 0


def test_small_thing_branch_fits_two_objects():
    """100 AdamW steps on fixed random features: the loss falls 20x or more and the best-scoring
    query of each prompt token segments its object (mask IoU > 0.5) and boxes it (IoU > 0.7)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny model is faster on one thread than on two busy ones
    try:
        branch = _small_branch()
        srcs, pads, tokens, t = _scene(128)
        crit = ReleaseCriterion()
        opt = torch.optim.AdamW(branch.parameters(), lr=1e-3, weight_decay=1e-4)
        history = []
        for _ in range(100):
            losses = crit(targets=[t], branch=branch, things=branch(srcs, pads, tokens))
            opt.zero_grad()
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(branch.parameters(), 0.1)  # CLIP_VALUE of the release
            opt.step()
            history.append(losses["total"].item())
        assert history[-1] < history[0] / 20, (history[0], history[-1])
        with torch.no_grad():
            out = branch(srcs, pads, tokens)
            grid = masks_on_grid(t.masks, (32, 32)) > 0.5
            nb = out.num_background
            for i, token in enumerate((1, 3)):
                row = int(out.token_logits[0, nb:, token].argmax()) + nb
                mask = branch.mask_logits(out, torch.tensor([row]), t.image_size)[0] > 0
                iou = (mask & grid[i]).sum() / (mask | grid[i]).sum()
                assert iou.item() > 0.5, (i, iou.item())
                box = box_cxcywh_to_xyxy(out.boxes[0, row][None])
                assert box_iou(box, box_cxcywh_to_xyxy(t.boxes[i][None])).item() > 0.7
    finally:
        torch.set_num_threads(threads)
