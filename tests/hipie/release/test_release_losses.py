"""The release criterion against the official HIPIE matchers and losses (`data/release_losses.pt`,
made by `data/make_release_losses.py` with the official code; inputs are regenerated here from
the seeds): simOTA pairs, two-stage proposal pairs and MaskDINO pairs equal; every loss value to
1e-4 relative."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hipie.training.release_criterion import (
    ReleaseCriterion,
    ReleaseTargets,
    SetPrediction,
    masks_on_grid,
)
from hipie.training.release_matching import HungarianCosts, release_hungarian, release_simota
from tests.hipie.release.data.make_release_losses import GRID, SIZE, B, checksum, make_case
from tests.hipie.release.reference import assert_close

FIXTURE = Path(__file__).parent / "data" / "release_losses.pt"


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE, weights_only=True)


def _targets(case: dict[str, torch.Tensor]) -> list[ReleaseTargets]:
    return [
        ReleaseTargets(
            case[f"t{b}.positive_map"],
            case[f"t{b}.boxes"],
            case[f"t{b}.masks"],
            case[f"t{b}.is_thing"],
            (SIZE, SIZE),
        )
        for b in range(B)
    ]


def test_fixture_has_cases(ref):
    assert int(ref["num_cases"]) >= 6


@pytest.mark.parametrize("k", range(6))
def test_thing_branch_matching_and_losses_equal_the_release(ref, k):
    case = make_case(k)
    assert torch.allclose(checksum(case), ref[f"{k}/checksum"]), "inputs did not regenerate"
    targets = _targets(case)
    things = [t.subset(t.is_thing) for t in targets]
    crit = ReleaseCriterion()
    w = crit.thing

    pairs = [
        release_simota(case["logits"][b], case["boxes"][b], t.positive_map, t.boxes)
        for b, t in enumerate(things)
    ]
    for b in range(B):
        assert torch.equal(torch.stack(pairs[b]), ref[f"{k}/simota/{b}"]), (k, b)

    grids = [masks_on_grid(t.masks, (GRID, GRID)) for t in things]
    masks = [case["mask_noise"][b, p] for b, (p, _) in enumerate(pairs)]
    got = crit.matched_query_losses(
        case["logits"], case["boxes"], case["iou_logits"], masks, pairs, things, grids,
        case["token_mask"],
    )  # fmt: skip
    weights = {
        "loss_ce": w.cls,
        "loss_bbox": w.box_l1,
        "loss_giou": w.giou,
        "loss_boxiou": w.box_iou,
        "loss_mask": w.mask,
        "loss_dice": w.dice,
    }
    for name, weight in weights.items():
        assert_close(got[name] / weight, ref[f"{k}/thing/{name}"], f"{k}/{name}")


@pytest.mark.parametrize("k", range(6))
def test_proposal_matching_and_losses_equal_the_release(ref, k):
    case = make_case(k)
    targets = _targets(case)
    crit = ReleaseCriterion()
    w = crit.thing
    for b, t in enumerate(targets):
        pred, tgt = release_hungarian(
            w.proposal_costs,
            case["enc_class"][b, :, None],
            torch.ones(len(t), 1),
            boxes=case["enc_boxes"][b],
            target_boxes=t.boxes,
        )
        expected = ref[f"{k}/enc_pairs/{b}"]
        assert sorted(zip(pred.tolist(), tgt.tolist())) == sorted(zip(*expected.tolist()))
    got = crit.proposal_losses(case["enc_class"], case["enc_boxes"], targets)
    for name, weight in (("loss_ce", w.cls), ("loss_bbox", w.box_l1), ("loss_giou", w.giou)):
        assert_close(got[f"{name}_enc"] / weight, ref[f"{k}/enc/{name}"], f"{k}/{name}_enc")


@pytest.mark.parametrize("k", range(6))
def test_maskdino_matching_and_losses_equal_the_release(ref, k):
    """Class and box terms (the release's mask costs sample random points: off in the fixture)."""
    case = make_case(k)
    targets = _targets(case)
    base = ReleaseCriterion()
    costs = HungarianCosts(cls=base.stuff.costs.cls, box_l1=5.0, giou=2.0)
    crit = ReleaseCriterion(stuff=replace(base.stuff, costs=costs))
    for b, t in enumerate(targets):
        pred, tgt = release_hungarian(
            costs, case["logits"][b], t.positive_map, boxes=case["boxes"][b], target_boxes=t.boxes
        )
        assert torch.equal(torch.stack([pred, tgt]), ref[f"{k}/maskdino_pairs/{b}"]), (k, b)
    grids = [masks_on_grid(t.masks, (GRID, GRID)) for t in targets]
    prediction = SetPrediction(case["logits"], case["boxes"], case["stuff_masks"])
    got = crit.stuff_set(prediction, targets, grids, case["token_mask"])
    s = crit.stuff
    for name, weight in (("loss_ce", s.cls), ("loss_bbox", s.box_l1), ("loss_giou", s.giou)):
        assert_close(got[name] / weight, ref[f"{k}/maskdino/{name}"], f"{k}/maskdino/{name}")
