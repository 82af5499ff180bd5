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
    assert out.scores[2].item() == pytest.approx(expected[0].item(), abs=1e-6)
