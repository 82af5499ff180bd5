"""Levels and parents that the SAM vote gives class-agnostic masks, on a constructed hierarchy."""

from __future__ import annotations

import pytest
import torch

from hipie import HipiePredictor, build_hipie
from hipie.predictor import Segments
from schemas import rle

H, W = 40, 60
VOCAB = ["robot", "sky", "robot head", "robot eye", "car wheel"]


def _box(y0, y1, x0, x1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


ROBOT = _box(10, 40, 10, 30)
HEAD = _box(10, 20, 12, 28)
EYE = _box(12, 16, 14, 18)
SKY = ~ROBOT


@pytest.fixture(scope="module")
def predictor():
    return HipiePredictor(build_hipie("tiny"))


def _hierarchy() -> Segments:
    """What `hierarchy` would return: robot + sky, then the disjoint fine parts head and eye."""
    masks = torch.stack([ROBOT, SKY, HEAD & ~EYE, EYE])
    probs = torch.tensor(
        [
            [0.9, 0.1, 0, 0, 0],
            [0.2, 0.8, 0, 0, 0],
            [0, 0, 0.3, 0.1, 0.6],  # the head part leans to "car wheel", not a part of a robot
            [0, 0, 0.4, 0.6, 0],
        ]
    )
    return Segments(
        masks=masks,
        boxes=torch.zeros(4, 4),
        labels=["robot", "sky", "robot head", "robot eye"],
        label_ids=torch.tensor([0, 1, 2, 3]),
        scores=torch.tensor([0.9, 0.8, 0.7, 0.6]),
        probs=probs,
        is_thing=torch.tensor([True, False, True, True]),
        parents=torch.tensor([-1, -1, 0, 0]),
        level=["instance", "stuff", "part", "part"],
        vocabulary=VOCAB,
    )


@pytest.mark.parametrize("as_rle", [False, True])
def test_sam_masks_get_instance_part_subpart_and_stuff(predictor, as_rle):
    sam = torch.stack([SKY, ROBOT, HEAD, EYE])
    given = rle.encode_many(sam.numpy()) if as_rle else sam
    out = predictor.vote_from_hierarchy(_hierarchy(), given, things=["robot"])
    assert out.level == ["stuff", "instance", "part", "subpart"]
    assert out.parents.tolist() == [-1, -1, 1, 2]
    assert out.labels == ["sky", "robot", "robot head", "robot eye"]
    # Eq. 5 by hand for the SAM head mask: the fine parts head (144 px, probs .3/.1/.6) and eye
    # (16 px, .4/.6/0) lie inside it; "car wheel" would win (86.4) but the mask lies in a robot,
    # so only robot parts remain: head 0.3*144 + 0.4*16, eye 0.1*144 + 0.6*16.
    head = torch.tensor([0.3 * 144 + 0.4 * 16, 0.1 * 144 + 0.6 * 16])
    expected = head / head.sum()
    assert out.probs[2, 2:4].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert out.probs[2, 4].item() == 0.0
    # the score: the share of the whole vote that "robot head" got (the one rule for parts under
    # an instance, hipie.hierarchy.restrict_to_parent_parts: the old score scaled by p_new / p_old)
    whole = head.sum() + 0.6 * 144
    assert out.scores[2].item() == pytest.approx((head[0] / whole).item(), abs=1e-6)


def test_hierarchy_parts_take_their_instances_thing():
    """`_follow_parents` (Sec. 3.7 pairing): a part in a robot labeled "car wheel" becomes the best
    robot part of its distribution, score scaled; one with no robot mass loses its parent."""
    pan = Segments(
        masks=torch.stack([ROBOT, SKY]),
        boxes=torch.zeros(2, 4),
        labels=["robot", "sky"],
        label_ids=torch.tensor([0, 1]),
        scores=torch.tensor([0.9, 0.8]),
        probs=torch.tensor([[0.9, 0.1], [0.2, 0.8]]),
        is_thing=torch.tensor([True, False]),
        parents=torch.tensor([-1, -1]),
        level=["instance", "stuff"],
        vocabulary=["robot", "sky"],
    )
    part_vocab = ["robot head", "robot eye", "car wheel"]
    parts = Segments(
        masks=torch.stack([HEAD, EYE, HEAD]),
        boxes=torch.zeros(3, 4),
        labels=["car wheel", "robot eye", "car wheel"],
        label_ids=torch.tensor([2, 1, 2]),
        scores=torch.tensor([0.6, 0.5, 0.4]),
        probs=torch.tensor([[0.3, 0.1, 0.6], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]]),
        is_thing=torch.ones(3, dtype=torch.bool),
        parents=torch.full((3,), -1),
        level=["part"] * 3,
        vocabulary=part_vocab,
    )
    out, parents = HipiePredictor._follow_parents(parts, torch.tensor([0, 0, 0]), pan, ["robot"])
    assert out.labels == ["robot head", "robot eye", "car wheel"]
    assert out.label_ids.tolist() == [0, 1, 2]
    assert out.scores.tolist() == pytest.approx([0.6 * 0.3 / 0.6, 0.5, 0.4])
    assert out.probs[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert parents.tolist() == [0, 0, -1]  # no robot mass: no longer under the robot
    assert parts.labels[0] == "car wheel"  # the input is left as it was


def test_vote_part_without_mass_on_its_instances_parts_loses_the_parent(predictor):
    h = _hierarchy()
    h = Segments(**{**h.__dict__, "probs": h.probs.clone()})
    h.probs[2] = torch.tensor([0, 0, 0, 0, 1.0])  # the head part is all "car wheel"
    h.probs[3] = torch.tensor([0, 0, 0, 0, 1.0])  # so is the eye
    sam = torch.stack([ROBOT, HEAD])
    seg = predictor.vote_from_hierarchy(h, sam, ["robot"])
    assert seg.level == ["instance", "part"]
    assert seg.labels == ["robot", "car wheel"]
    assert seg.parents.tolist() == [-1, -1]
