"""Segments.filter and Segments.cat keep every field aligned and shift parent links."""

from __future__ import annotations

import pytest
import torch

from hipie.segments import Segments


def make(labels, parents, vocab=("cat", "cat head"), rles=True):
    n = len(labels)
    return Segments(
        masks=torch.zeros(n, 4, 5, dtype=torch.bool),
        boxes=torch.arange(n * 4, dtype=torch.float32).view(n, 4),
        labels=list(labels),
        label_ids=torch.tensor([list(vocab).index(x) for x in labels]),
        scores=torch.linspace(0.5, 0.9, n),
        probs=torch.eye(len(vocab))[[list(vocab).index(x) for x in labels]],
        is_thing=torch.ones(n, dtype=torch.bool),
        parents=torch.tensor(parents, dtype=torch.long),
        level=["instance" if p < 0 else "part" for p in parents],
        vocabulary=list(vocab),
        rles=[{"size": [4, 5], "counts": str(i)} for i in range(n)] if rles else None,
    )


def test_filter_keeps_fields_aligned():
    seg = make(["cat", "cat head", "cat"], [-1, 0, -1])
    out = seg.filter(torch.tensor([False, True, True]))
    assert out.labels == ["cat head", "cat"] and out.level == ["part", "instance"]
    assert out.parents.tolist() == [0, -1]  # not remapped, as documented
    assert torch.equal(out.boxes, seg.boxes[1:]) and [r["counts"] for r in out.rles] == ["1", "2"]


def test_cat_shifts_parents_and_joins_rles():
    a, b = make(["cat", "cat head"], [-1, 0]), make(["cat", "cat head", "cat head"], [-1, 0, 0])
    out = Segments.cat([a, b])
    assert len(out) == 5 and out.parents.tolist() == [-1, 0, -1, 2, 2]
    assert out.labels == ["cat", "cat head", "cat", "cat head", "cat head"]
    assert len(out.rles) == 5 and out.probs.shape == (5, 2)
    assert Segments.cat([a, make(["cat"], [-1], rles=False)]).rles is None
    with pytest.raises(ValueError, match="one vocabulary"):
        Segments.cat([a, make(["dog"], [-1], vocab=("dog",))])
