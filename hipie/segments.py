"""Typed per-image results: `Segments` (masks with labels, scores, class distributions, levels and
parent links) and `SemanticMap`, in original image coordinates. Produced by the predictors, read
by the vote, the hierarchy and the labeler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Segments", "SemanticMap"]


@dataclass(frozen=True)
class Segments:
    """N segments of one image, in original image coordinates.

    masks: (N, H, W) bool (for `vote` with RLE input: an empty (N, 0, 0) tensor, see `rles`).
    boxes: (N, 4) float XYXY pixels (box head for things/parts, mask bbox for stuff/SAM masks).
    labels: N label strings; label_ids: (N,) long into `vocabulary`.
    scores: (N,) float confidence.
    probs: (N, C) class distribution over `vocabulary` (rows sum to 1, or 0 without evidence).
    is_thing: (N,) bool; parents: (N,) long index of the parent segment, -1 for none.
    level: N of "stuff" | "instance" | "part" | "subpart".
    vocabulary: the C class names that label_ids / probs refer to.
    rles: COCO RLEs of the masks when the caller gave RLEs (`vote`), else None.
    """

    masks: torch.Tensor
    boxes: torch.Tensor
    labels: list[str]
    label_ids: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    is_thing: torch.Tensor
    parents: torch.Tensor
    level: list[str]
    vocabulary: list[str]
    rles: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def filter(self, keep: torch.Tensor) -> Segments:
        """The segments where `keep` (N,) bool is True, in order (parents are not remapped)."""
        idx = torch.nonzero(keep).flatten()
        pick = idx.tolist()
        return Segments(
            masks=self.masks[idx],
            boxes=self.boxes[idx],
            labels=[self.labels[i] for i in pick],
            label_ids=self.label_ids[idx],
            scores=self.scores[idx],
            probs=self.probs[idx],
            is_thing=self.is_thing[idx],
            parents=self.parents[idx],
            level=[self.level[i] for i in pick],
            vocabulary=self.vocabulary,
            rles=None if self.rles is None else [self.rles[i] for i in pick],
        )

    @staticmethod
    def cat(parts: Sequence[Segments]) -> Segments:
        """Segments of one image over one vocabulary, one after the other; each part's parent
        indices are shifted by the segments before it (-1 stays -1)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        vocab = parts[0].vocabulary
        if any(p.vocabulary != vocab for p in parts):
            raise ValueError("Segments.cat needs one vocabulary for every part")
        with_rles = all(p.rles is not None for p in parts)
        parents, offset = [], 0
        for p in parts:
            parents.append(torch.where(p.parents >= 0, p.parents + offset, p.parents))
            offset += len(p)
        return Segments(
            masks=torch.cat([p.masks for p in parts]),
            boxes=torch.cat([p.boxes for p in parts]),
            labels=[x for p in parts for x in p.labels],
            label_ids=torch.cat([p.label_ids for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            probs=torch.cat([p.probs for p in parts]),
            is_thing=torch.cat([p.is_thing for p in parts]),
            parents=torch.cat(parents),
            level=[x for p in parts for x in p.level],
            vocabulary=list(vocab),
            rles=[r for p in parts for r in p.rles] if with_rles else None,
        )


@dataclass(frozen=True)
class SemanticMap:
    """label_map: (H, W) long index into `labels` for every pixel of the original image."""

    label_map: torch.Tensor
    labels: list[str]
