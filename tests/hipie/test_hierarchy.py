"""Tests for hipie.hierarchy: parts to instances, fine parts to coarse parts, part prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from hipie.hierarchy import (
    DEFAULT_PART_GROUPS,
    assign_parents,
    compose_part_prompts,
    group_parts,
)
from schemas.part_names import split_part_label


def _rles(masks: torch.Tensor) -> list[dict]:
    array = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
    return [
        {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}
        for r in mask_utils.encode(array)
    ]


def _instances_and_parts() -> tuple[torch.Tensor, torch.Tensor]:
    """A 6 x 8 image with two instances and five parts.

    instance 0: columns 0-3, all rows          instance 1: columns 4-7, rows 0-3
    part 0: rows 0-1 x cols 0-1      -> 4/4 in instance 0                        -> 0
    part 1: row 1, cols 2-6 (5 px)   -> 2/5 in instance 0, 3/5 in instance 1    -> 1 (0.6)
    part 2: row 5, cols 4-7          -> outside both instances                   -> -1
    part 3: empty                                                                -> -1
    part 4: rows 2-5, col 3 + (2, 4) -> 4/5 in instance 0, 1/5 in instance 1    -> 0 (0.8)
    """
    inst = torch.zeros(2, 6, 8, dtype=torch.bool)
    inst[0, :, 0:4] = True
    inst[1, 0:4, 4:8] = True
    parts = torch.zeros(5, 6, 8, dtype=torch.bool)
    parts[0, 0:2, 0:2] = True
    parts[1, 1, 2:7] = True
    parts[2, 5, 4:8] = True
    parts[4, 2:6, 3] = True
    parts[4, 2, 4] = True
    return inst, parts


def test_assign_parents_constructed_case() -> None:
    inst, parts = _instances_and_parts()
    assert assign_parents(parts, inst).tolist() == [0, 1, -1, -1, 0]
    # part 1 (0.6) falls below a stricter threshold, part 4 (0.8) does not
    assert assign_parents(parts, inst, min_fraction=0.7).tolist() == [0, -1, -1, -1, 0]
    # with no threshold the straddling part still goes to the larger share
    assert assign_parents(parts, inst, min_fraction=0.0).tolist() == [0, 1, -1, -1, 0]
    assert assign_parents(_rles(parts), _rles(inst)).tolist() == [0, 1, -1, -1, 0]
    no_instances = assign_parents(parts, torch.zeros(0, 6, 8, dtype=torch.bool))
    assert no_instances.tolist() == [-1] * 5


def test_group_parts_unions_per_instance_and_group() -> None:
    height, width = 5, 6
    parts = torch.zeros(7, height, width, dtype=torch.bool)
    for i in range(7):
        parts[i, i % height, i % width] = True  # part i is the single pixel (i mod 5, i mod 6)
    labels = ["dog ear", "dog eye", "dog tail", "person hand", "person upper arm", "dog ear", "eye"]
    parents = torch.tensor([0, 0, 0, 1, 1, 2, -1])
    grouped = group_parts(parts, labels, parents, DEFAULT_PART_GROUPS)
    assert grouped.labels == ["dog head", "person arm", "dog head"]
    assert grouped.parents.tolist() == [0, 1, 2]
    assert grouped.children == [[0, 1], [3, 4], [5]]
    assert grouped.masks.shape == (3, height, width)
    for g, members in enumerate(grouped.children):
        assert torch.equal(grouped.masks[g], parts[members].any(0))
    assert int(grouped.masks[0].sum()) == 2

    grouped_rle = group_parts(_rles(parts), labels, parents, DEFAULT_PART_GROUPS)
    assert grouped_rle.labels == grouped.labels and grouped_rle.children == grouped.children
    decoded = np.stack([mask_utils.decode(r) for r in grouped_rle.masks]).astype(bool)
    assert np.array_equal(decoded, grouped.masks.numpy())
    assert all(isinstance(r["counts"], str) for r in grouped_rle.masks)


def test_group_parts_custom_groups_and_bare_labels() -> None:
    parts = torch.zeros(3, 2, 2, dtype=torch.bool)
    parts[0, 0, 0] = parts[1, 1, 1] = parts[2, 0, 1] = True
    groups = {"wheel": ("tire", "rim"), "frame": ("handlebar",)}
    grouped = group_parts(
        parts, ["rim", "tire", "bicycle handlebar"], torch.tensor([0, 0, 0]), groups
    )
    assert grouped.labels == ["wheel", "bicycle frame"]
    assert grouped.children == [[0, 1], [2]]
    empty = group_parts(parts[:0], [], torch.zeros(0, dtype=torch.long), groups)
    assert empty.masks.shape == (0, 2, 2) and empty.labels == [] and empty.children == []


def test_default_groups_have_unique_fine_parts() -> None:
    fine = [f for fines in DEFAULT_PART_GROUPS.values() for f in fines]
    assert len(fine) == len(set(fine))
    assert {"ear", "eye", "nose", "mouth", "hair", "eyebrow"} <= set(DEFAULT_PART_GROUPS["head"])


def test_compose_part_prompts_and_split_them_back() -> None:
    prompts = compose_part_prompts(["dog", "potted plant"], ["head", "pot"])
    assert prompts == ["dog head", "dog pot", "potted plant head", "potted plant pot"]
    allowed = {"dog": ["head"], "potted plant": ["pot"]}
    assert compose_part_prompts(
        ["dog", "potted plant", "car"], ["head", "pot"], allowed=allowed
    ) == [
        "dog head",
        "potted plant pot",
    ]
    for label in prompts:
        thing, part = split_part_label(label, ["dog", "potted plant"])
        assert f"{thing} {part}" == label


def test_restrict_to_parent_parts_one_rule():
    """Relabel among the parent's parts with the score scaled by p_new / p_old; a label already
    allowed keeps its score; no mass on the parent's parts: everything kept, keep = False."""
    from hipie.hierarchy import restrict_to_parent_parts

    probs = torch.tensor([[0.3, 0.1, 0.6], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])
    scores = torch.tensor([0.6, 0.5, 0.4])
    labels = torch.tensor([2, 1, 2])
    allowed = torch.tensor([[True, True, False]] * 3)
    p, s, lab, keep = restrict_to_parent_parts(probs, scores, labels, allowed)
    assert keep.tolist() == [True, True, False]
    assert lab.tolist() == [0, 1, 2]
    assert s.tolist() == pytest.approx([0.6 * 0.3 / 0.6, 0.5, 0.4])
    assert p[0].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert p[1].tolist() == pytest.approx([0.4, 0.6, 0.0]) and p[2].tolist() == [0.0, 0.0, 1.0]
