"""The deformable transformer layers both branches of the release use, and its text resizer.

The thing branch (Deformable DETR / DINO) and the stuff branch (MaskDINO) build the same post-norm
layers with the same parameter names: an encoder layer (deformable self-attention, FFN) and a
decoder layer (self-attention, deformable cross-attention, FFN). Only the thing branch passes a
padding mask (MaskDINO ignores it, as released).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hipie.modeling.deform_attn import MSDeformAttn


class FeatureResizer(nn.Module):
    """Linear map + LayerNorm(eps 1e-12): the release's `FeatureResizer` (dropout 0 at test),
    its 768 -> 256 label encoder of denoising training; kept so checkpoints load, unused here."""

    def __init__(self, in_dim: int = 768, out_dim: int = 256):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.fc(x))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, each followed by residual and LayerNorm."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(
            dim=dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        ref: torch.Tensor,
        shapes: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes, padding_mask))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention (norm2), deformable cross-attention (norm1), FFN (norm3)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(
            dim=dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        ref: torch.Tensor,
        memory: torch.Tensor,
        shapes: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = tgt + query_pos
        # need_weights stays at its default, as in the release: that path computes the softmax
        # explicitly and reproduces the release bit for bit (the fused kernel is ~1e-6 off).
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt)[0])
        attn = self.cross_attn(tgt + query_pos, ref, memory, shapes, padding_mask)
        tgt = self.norm1(tgt + attn)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))
