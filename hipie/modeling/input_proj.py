"""The thing branch's multi-scale input: per-level projections to the model width + padding masks.

As the release's `DeformableDETRDINO.input_proj` and `coco_inference` build them: one 1x1 conv +
GroupNorm(32) per backbone level (res3, res4, res5), then extra levels made by a stride-2 3x3 conv
+ GroupNorm, the first one on the raw res5 features and any further one on the previous projected
level. Names equal the release's suffixes after `detr.detr.` (`input_proj.L.0` conv,
`input_proj.L.1` norm).

Padding masks (True = padding): a backbone level's mask is the image mask resized (nearest) to the
level; an extra level's mask is the *first level's* mask resized to it (release behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """B x H x W bool -> B x h x w bool by nearest interpolation (the release's rule)."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class InputProjection(nn.Module):
    """forward(features: [B x C_l x H_l x W_l] backbone levels, fine to coarse, image_mask: B x H x W
    bool, True at padding) -> (srcs: [B x hidden x H_l x W_l] * num_levels, masks: [B x H_l x W_l]).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hidden_dim: int = 256,
        num_levels: int = 4,
        num_groups: int = 32,
    ):
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError("num_levels must cover every backbone level")
        layers = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(num_groups, hidden_dim))
            for c in in_channels
        ]
        cin = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            layers.append(
                nn.Sequential(
                    nn.Conv2d(cin, hidden_dim, 3, stride=2, padding=1),
                    nn.GroupNorm(num_groups, hidden_dim),
                )
            )
            cin = hidden_dim
        self.input_proj = nn.ModuleList(layers)
        self.num_backbone_levels = len(in_channels)

    def forward(
        self, features: Sequence[torch.Tensor], image_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(features) != self.num_backbone_levels:
            raise ValueError(f"expected {self.num_backbone_levels} levels, got {len(features)}")
        srcs, masks = [], []
        for proj, feat in zip(self.input_proj, features):
            srcs.append(proj(feat))
            masks.append(resize_mask(image_mask, feat.shape[-2:]))
        for i in range(self.num_backbone_levels, len(self.input_proj)):
            src = self.input_proj[i](features[-1] if i == self.num_backbone_levels else srcs[-1])
            srcs.append(src)
            masks.append(resize_mask(masks[0], src.shape[-2:]))
        return srcs, masks
