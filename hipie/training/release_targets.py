"""Ground truth as the release's training losses read it: positive maps over prompt tokens,
boxes in the unpadded image's frame, masks sampled on the 1/4 grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ReleaseTargets", "label_positive_map", "masks_on_grid"]


@dataclass(frozen=True)
class ReleaseTargets:
    """Ground truth of one image for one prompt.

    positive_map: (N, T) bool, the prompt tokens of each target's label (a part also marks its
        object's tokens, as the release's part mode does); grounding: (N, 1) ones.
    boxes: (N, 4) cxcywh normalized by `image_size` (the frame of the predicted boxes).
    masks: (N, H, W) bool at the padded input resolution (smaller maps are zero padded).
    is_thing: (N,) bool.
    image_size: (h, w) of the image before padding.
    """

    positive_map: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    is_thing: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def subset(self, keep: torch.Tensor) -> ReleaseTargets:
        return ReleaseTargets(
            self.positive_map[keep],
            self.boxes[keep],
            self.masks[keep],
            self.is_thing[keep],
            self.image_size,
        )


def label_positive_map(
    labels: torch.Tensor,
    class_tokens: Mapping[int, Sequence[int]],
    num_tokens: int,
    also: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T) bool positive map of targets from their prompt columns.

    Args:
        labels: (N,) long 0-based class columns of the prompt (class id - 1).
        class_tokens: the prompt's positive map, 1-based class id -> token positions (the text
            encoder's `class_prompt`).
        also: (N,) long extra column per target, -1 for none: a part's object label, whose
            tokens are positive too (the release's part mode spreads the object word's tokens
            over every occurrence of that word in the prompt; this marks the object's own label).
    """
    out = torch.zeros(len(labels), num_tokens, dtype=torch.bool)
    for i, col in enumerate(labels.tolist()):
        out[i, list(class_tokens[col + 1])] = True
        if also is not None and int(also[i]) >= 0:
            out[i, list(class_tokens[int(also[i]) + 1])] = True
    return out


def masks_on_grid(masks: torch.Tensor, grid: tuple[int, int], stride: int = 4) -> torch.Tensor:
    """(N, H, W) masks at input resolution -> (N, h, w) float, sampled at the grid's pixel centres.

    The masks are zero padded (or cropped) to (h * stride, w * stride) first, as the release pads
    them with the batch.
    """
    h, w = grid
    full = masks.new_zeros((masks.shape[0], h * stride, w * stride))
    hh, ww = min(masks.shape[-2], h * stride), min(masks.shape[-1], w * stride)
    full[:, :hh, :ww] = masks[:, :hh, :ww]
    return full[:, stride // 2 :: stride, stride // 2 :: stride].float()
