"""Losses of hipie.training.criterion against hand-computed values and constructed predictions."""

from __future__ import annotations

import math

import pytest
import torch

from hipie.modeling.outputs import DecoderOutput, HipieOutput
from hipie.training.criterion import (
    CriterionConfig,
    SegmentTargets,
    box_l1_loss,
    build_criterion,
    dice_loss,
    giou_loss,
    mask_bce_loss,
    sigmoid_focal_loss,
)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------- loss terms
def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)

    def fl(x: float, t: float) -> float:
        p = _sigmoid(x)
        ce = -math.log(p) if t == 1 else -math.log(1 - p)
        p_t = p if t == 1 else 1 - p
        a_t = 0.25 if t == 1 else 0.75
        return a_t * (1 - p_t) ** 2 * ce

    expected = torch.tensor([[fl(0.0, 1), fl(2.0, 0)], [fl(-1.0, 0), fl(3.0, 1)]])
    assert torch.allclose(got, expected, atol=1e-6)
    # x = 0, t = 1: 0.25 * 0.5^2 * ln 2
    assert got[0, 0].item() == pytest.approx(0.0625 * math.log(2), abs=1e-7)


def test_dice_and_bce_match_hand_computation():
    logits = torch.zeros(1, 4)  # p = 0.5 everywhere
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # 1 - (2 * (0.5 + 0.5) + 1) / (2 + 2 + 1) = 1 - 3 / 5
    assert dice_loss(logits, target).item() == pytest.approx(0.4, abs=1e-6)
    assert mask_bce_loss(logits, target).item() == pytest.approx(math.log(2), abs=1e-6)
    logits = torch.tensor([[1.0, -1.0]])
    target = torch.tensor([[1.0, 1.0]])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert mask_bce_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    p = _sigmoid(1.0), _sigmoid(-1.0)
    expected_dice = 1 - (2 * (p[0] + p[1]) + 1) / (p[0] + p[1] + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expected_dice, abs=1e-6)


def test_box_l1_and_giou_match_hand_computation():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0]])
    tgt = torch.tensor([[0.6, 0.5, 0.2, 0.4], [0.7, 0.7, 0.2, 0.2], [0.75, 0.5, 0.5, 1.0]])
    assert box_l1_loss(pred, tgt)[0].item() == pytest.approx(0.1 + 0.2, abs=1e-6)
    got = giou_loss(pred, tgt)
    # row 0: xyxy (0.4,0.4,0.6,0.6) vs (0.5,0.3,0.7,0.7): inter 0.1*0.2, union 0.04+0.08-0.02,
    # enclosing (0.4..0.7) x (0.3..0.7)
    inter, union, encl = 0.02, 0.10, 0.3 * 0.4
    assert got[0].item() == pytest.approx(1 - (inter / union - (encl - union) / encl), abs=1e-6)
    # row 1: disjoint, union 0.08, enclosing 0.7 x 0.7
    assert got[1].item() == pytest.approx(1 + (0.49 - 0.08) / 0.49, abs=1e-6)
    # row 2: touching halves of the image: IoU 0, enclosing = union = 1 -> GIoU 0
    assert got[2].item() == pytest.approx(1.0, abs=1e-6)
    assert giou_loss(tgt, tgt).abs().max().item() < 1e-6


# --------------------------------------------------------------------------- whole criterion
H = W = 32  # padded input; predictions at 1/4: 8 x 8
BIG = 12.0


def _block_mask(y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    """A (H, W) bool mask aligned to the 4 x 4 blocks of the prediction grid."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _box(m: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(m, as_tuple=True)
    x0, y0, x1, y1 = xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1
    return torch.tensor([(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H])


def _mask_logits(m: torch.Tensor) -> torch.Tensor:
    small = m.float().view(8, 4, 8, 4).mean((1, 3))
    return (small * 2 - 1) * BIG


def _output(logits, masks, boxes) -> DecoderOutput:
    return DecoderOutput(
        logits=logits, masks=masks, boxes=boxes, embeddings=torch.zeros(*logits.shape[:2], 4)
    )


def _things_case(perfect: bool):
    """Two things (labels 0 and 1 of K = 3) and four queries: 0 and 1 predict them (perfectly or
    with swapped masks and shifted boxes), 2 and 3 sit in a corner predicting nothing."""
    m0, m1 = _block_mask(0, 0, 12, 12), _block_mask(16, 16, 32, 28)
    targets = [
        SegmentTargets(
            labels=torch.tensor([0, 1]),
            masks=torch.stack([m0, m1]),
            boxes=torch.stack([_box(m0), _box(m1)]),
        )
    ]
    logits = torch.full((1, 4, 3), -BIG)
    logits[0, 0, 0] = logits[0, 1, 1] = BIG
    masks = torch.full((1, 4, 8, 8), -BIG)
    boxes = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], [0.97, 0.03, 0.02, 0.02], [0.97, 0.05, 0.02, 0.02]]
    )[None].clone()
    if perfect:
        masks[0, 0], masks[0, 1] = _mask_logits(m0), _mask_logits(m1)
        boxes[0, 0], boxes[0, 1] = _box(m0), _box(m1)
    else:
        masks[0, 0], masks[0, 1] = _mask_logits(m1), _mask_logits(m0)
        boxes[0, 0] = _box(m0) + torch.tensor([0.05, 0.05, 0.1, 0.0])
        boxes[0, 1] = _box(m1) - torch.tensor([0.05, 0.05, 0.1, 0.0])
    return targets, _output(logits, masks, boxes)


def test_perfect_prediction_has_near_zero_loss_and_wrong_one_does_not():
    criterion = build_criterion()
    targets, out = _things_case(perfect=True)
    good = criterion(HipieOutput(things=out, stuff=None), things=targets)
    assert good.num_matched["things"] == 2
    assert good.total.item() < 1e-2, good.terms
    targets, out = _things_case(perfect=False)
    bad = criterion(HipieOutput(things=out, stuff=None), things=targets)
    assert bad.total.item() > 5.0
    for key in ("things/mask_bce", "things/mask_dice", "things/box_l1", "things/box_giou"):
        assert bad.terms[key].item() > 100 * good.terms[key].item() + 1e-3, key
    # the weighted terms add up to the total
    summed = sum(v for k, v in bad.terms.items() if not k.endswith(("cls_part", "cls_thing")))
    assert summed.item() == pytest.approx(bad.total.item(), rel=1e-5)


def test_weights_follow_the_paper():
    criterion = build_criterion()
    targets, out = _things_case(perfect=False)
    res = criterion(HipieOutput(things=out, stuff=None), things=targets)
    # both queries matched one-to-one here: weighted terms = weight x mean over the pairs
    pred_boxes, tgt_boxes = out.boxes[0, :2], targets[0].boxes
    l1 = box_l1_loss(pred_boxes, tgt_boxes).mean().item()
    giou = giou_loss(pred_boxes, tgt_boxes).mean().item()
    assert res.terms["things/box_l1"].item() == pytest.approx(5.0 * 1.0 * l1, rel=1e-5)
    assert res.terms["things/box_giou"].item() == pytest.approx(5.0 * 0.2 * giou, rel=1e-5)
    cls = (
        sigmoid_focal_loss(
            out.logits, torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]])
        )
        .sum()
        .item()
        / 2
    )
    assert res.terms["things/cls"].item() == pytest.approx(2.0 * cls, rel=1e-5)


def _stuff_case(with_thing: bool):
    """Stuff decoder, two queries: query 0 predicts the stuff region, query 1 the thing (a box
    slightly off). Targets: one stuff region, plus one thing when `with_thing`."""
    sky, robot = _block_mask(0, 0, 16, 32), _block_mask(20, 8, 32, 20)
    stuff = [SegmentTargets(labels=torch.tensor([1]), masks=sky[None], boxes=_box(sky)[None])]
    things = [SegmentTargets(labels=torch.tensor([0]), masks=robot[None], boxes=_box(robot)[None])]
    if not with_thing:
        things = [
            SegmentTargets(
                labels=torch.zeros(0, dtype=torch.long),
                masks=torch.zeros(0, H, W, dtype=torch.bool),
                boxes=torch.zeros(0, 4),
            )
        ]
    logits = torch.tensor([[[-BIG, BIG, -BIG], [BIG, -BIG, -BIG]]])
    masks = torch.stack([_mask_logits(sky), _mask_logits(robot)])[None].clone()
    masks[0, 0, 0, 0] = 0.0  # an imperfect stuff mask so that it has a gradient
    masks[0, 1, 0, 0] = 0.0
    boxes = torch.stack([_box(sky) + 0.05, _box(robot) + 0.03])[None].clone()
    masks.requires_grad_(True)
    boxes.requires_grad_(True)
    return things, stuff, _output(logits, masks, boxes)


def test_no_box_loss_for_stuff_and_stuff_decoder_matched_with_things():
    criterion = build_criterion()
    things, stuff, out = _stuff_case(with_thing=False)
    res = criterion(HipieOutput(things=None, stuff=out), things=things, stuff=stuff)
    res.total.backward()
    assert res.terms["stuff/box_l1"].item() == 0.0
    assert out.boxes.grad is None or out.boxes.grad.abs().sum().item() == 0.0
    assert out.masks.grad[0, 0].abs().sum().item() > 0  # the stuff mask is supervised

    things, stuff, out = _stuff_case(with_thing=True)
    res = criterion(HipieOutput(things=None, stuff=out), things=things, stuff=stuff)
    res.total.backward()
    assert res.num_matched["stuff"] == 2
    assert res.terms["stuff/box_l1"].item() > 0  # Sec. 3.5: class + box against things
    assert out.boxes.grad[0, 0].abs().sum().item() == 0.0  # stuff query: no box loss
    assert out.boxes.grad[0, 1].abs().sum().item() > 0  # thing-matched query: box loss
    assert out.masks.grad[0, 1].abs().sum().item() == 0.0  # thing-matched: no mask loss
    assert out.masks.grad[0, 0].abs().sum().item() > 0

    off = build_criterion(CriterionConfig(stuff_matches_things=False))
    things, stuff, out = _stuff_case(with_thing=True)
    res = off(HipieOutput(things=None, stuff=out), things=things, stuff=stuff)
    assert res.terms["stuff/box_l1"].item() == 0.0


def test_part_and_instance_classification():
    """A part query is supervised by its part label AND its instance label (Sec. 3.7)."""
    criterion = build_criterion()
    head = _block_mask(0, 8, 8, 16)
    # prompt: "robot head", "robot arm", "robot" (+ "other")
    targets = [
        SegmentTargets(
            labels=torch.tensor([0]),
            masks=head[None],
            boxes=_box(head)[None],
            instance_labels=torch.tensor([2]),
        )
    ]
    inst_cols = torch.tensor([False, False, True, False])

    def run(instance_logit: float):
        logits = torch.tensor([[[BIG, -BIG, instance_logit, -BIG], [-BIG] * 4]])
        masks = torch.stack([_mask_logits(head), torch.full((8, 8), -BIG)])[None]
        boxes = torch.stack([_box(head), torch.tensor([0.95, 0.95, 0.02, 0.02])])[None]
        return criterion(
            HipieOutput(things=_output(logits, masks, boxes), stuff=None),
            things=targets,
            instance_columns=inst_cols,
        )

    both, part_only = run(BIG), run(-BIG)
    for res in (both, part_only):
        assert {"things/cls_part", "things/cls_thing"} <= set(res.terms)
        total_cls = res.terms["things/cls_part"] + res.terms["things/cls_thing"]
        assert total_cls.item() == pytest.approx(res.terms["things/cls"].item(), rel=1e-6)
    assert both.terms["things/cls_thing"].item() < 1e-3
    # the instance label is positive: predicting it negative costs 2 x 0.25 x ~1 x BIG
    assert part_only.terms["things/cls_thing"].item() > 5.0
    assert part_only.terms["things/cls_part"].item() < 1e-3
    # without instance labels the instance column is a negative, and the split is not reported
    plain = [SegmentTargets(labels=torch.tensor([0]), masks=head[None], boxes=_box(head)[None])]
    logits = torch.tensor([[[BIG, -BIG, BIG, -BIG], [-BIG] * 4]])
    masks = torch.stack([_mask_logits(head), torch.full((8, 8), -BIG)])[None]
    boxes = torch.stack([_box(head), torch.tensor([0.95, 0.95, 0.02, 0.02])])[None]
    res = criterion(HipieOutput(things=_output(logits, masks, boxes), stuff=None), things=plain)
    assert "things/cls_thing" not in res.terms
    assert res.terms["things/cls"].item() > 5.0


def test_aux_layers_are_supervised():
    targets, out = _things_case(perfect=False)
    _, good = _things_case(perfect=True)
    layered = DecoderOutput(
        logits=good.logits,
        masks=good.masks,
        boxes=good.boxes,
        embeddings=good.embeddings,
        aux=[out],
    )
    with_aux = build_criterion()(HipieOutput(things=layered, stuff=None), things=targets)
    without = build_criterion(CriterionConfig(aux_layers=False))(
        HipieOutput(things=layered, stuff=None), things=targets
    )
    alone = build_criterion()(HipieOutput(things=out, stuff=None), things=targets)
    assert without.total.item() < 1e-2
    assert with_aux.total.item() == pytest.approx(
        without.total.item() + alone.total.item(), rel=1e-5
    )


def test_empty_targets_give_pure_negative_class_loss():
    criterion = build_criterion()
    _, out = _things_case(perfect=True)  # two confident queries, nothing to find
    empty = [
        SegmentTargets(
            labels=torch.zeros(0, dtype=torch.long),
            masks=torch.zeros(0, H, W, dtype=torch.bool),
            boxes=torch.zeros(0, 4),
        )
    ]
    res = criterion(HipieOutput(things=out, stuff=None), things=empty)
    assert res.num_matched["things"] == 0
    expected = 2.0 * sigmoid_focal_loss(out.logits, torch.zeros_like(out.logits)).sum().item()
    assert res.total.item() == pytest.approx(expected, rel=1e-5)  # normalizer clamps to 1
