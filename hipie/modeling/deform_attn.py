"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

Sampling uses `torch.nn.functional.grid_sample` (bilinear, zero padding, align_corners=False),
so the same code runs on CPU and GPU; no custom CUDA kernel is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The deformable attention core.

    Args:
        value: (B, S, M, Dh) per-head values of all levels, S = sum of H_l * W_l.
        spatial_shapes: (L, 2) long, (H_l, W_l) per level, in the order of `value`.
        sampling_locations: (B, Q, M, L, P, 2) normalized (x, y) in [0, 1] per level.
        attention_weights: (B, Q, M, L, P), softmax-normalized over (L, P).
    Returns:
        (B, Q, M * Dh).
    """
    B, _, M, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    values = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = (
            values[lvl].flatten(2).transpose(1, 2).reshape(B * M, Dh, int(h), int(w))
        )  # BM x Dh x H x W
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # BM x Q x P x 2
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled.append(s)  # BM x Dh x Q x P
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # BM x Dh x Q x L*P
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P)  # BM x 1 x Q x LP
    out = (stacked * weights).sum(-1)  # BM x Dh x Q
    return out.view(B, M * Dh, Q).transpose(1, 2).contiguous()  # B x Q x M*Dh


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Zhu et al., Deformable DETR, Eq. 3)."""

    def __init__(self, *, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Initial offsets point in num_heads directions, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # M x 2
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from queries to sampled points around their references.

        Args:
            query: (B, Q, D) queries (with position embedding added).
            reference_points: (B, Q, L, 2) normalized points, or (B, Q, L, 4) cxcywh boxes
                (offsets are then scaled by half the box size).
            value: (B, S, D) flattened multi-scale features.
            spatial_shapes: (L, 2) long.
            value_padding_mask: (B, S) bool, True at padded pixels (their values are zeroed).
        Returns:
            (B, Q, D).
        """
        B, Q, _ = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(B, v.shape[1], M, self.dim // M)  # B x S x M x Dh
        offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1)
        weights = weights.view(B, Q, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalize by (W_l, H_l)
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(v.dtype)
            loc = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )  # B x Q x M x L x P x 2
        out = ms_deform_attn(v, spatial_shapes, loc.to(v.dtype), weights.to(v.dtype))
        return self.output_proj(out)
