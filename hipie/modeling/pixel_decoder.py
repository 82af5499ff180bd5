"""Pixel decoder: the deformable transformer encoder over multi-scale features + mask features.

Input: the backbone's maps at strides 4, 8, 16, 32. The strides 8/16/32 maps plus one extra
strided level (stride 64) are projected to D channels and refined by deformable self-attention
layers (Deformable DETR encoder). The 1/4-resolution per-pixel mask features are the stride-8
level of the encoder output, upsampled and added to the projected stride-4 backbone map (as in
MaskDINO). Nothing here depends on the text, so it runs once per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hipie.modeling.common import feature_map_pos, feed_forward
from hipie.modeling.deform_attn import MSDeformAttn


@dataclass(frozen=True)
class ImageFeatures:
    """Text-independent image features, shared by the things, stuff and part passes.

    memory: (B, S, D) flattened multi-scale encoder output, S = sum_l H_l * W_l.
    pos: (B, S, D) position + level embeddings of the memory tokens.
    padding_mask: (B, S) bool, True at tokens inside the padding.
    spatial_shapes: (L, 2) long, (H_l, W_l) per level (strides 8, 16, 32, 64).
    level_start: (L,) long, first token index of each level.
    mask_features: (B, D, H/4, W/4) per-pixel embeddings for the mask heads.
    mask_padding: (B, H/4, W/4) bool, True inside the padding.
    """

    memory: torch.Tensor
    pos: torch.Tensor
    padding_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start: torch.Tensor
    mask_features: torch.Tensor
    mask_padding: torch.Tensor

    def select(self, index: torch.Tensor | list[int]) -> ImageFeatures:
        """The features of a subset of the batch."""
        return ImageFeatures(
            memory=self.memory[index],
            pos=self.pos[index],
            padding_mask=self.padding_mask[index],
            spatial_shapes=self.spatial_shapes,
            level_start=self.level_start,
            mask_features=self.mask_features[index],
            mask_padding=self.mask_padding[index],
        )


def _gn(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, dim), dim)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, post-norm."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_levels: int,
        num_points: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.attn = MSDeformAttn(
            dim=dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference: torch.Tensor,
        spatial_shapes: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, S, D) -> (B, S, D); reference (B, S, L, 2)."""
        x = self.norm1(
            x + self.dropout(self.attn(x + pos, reference, x, spatial_shapes, padding_mask))
        )
        return self.norm2(x + self.dropout(self.ffn(x)))


class PixelDecoder(nn.Module):
    """Input projections, deformable encoder, and the 1/4 mask-feature branch."""

    def __init__(
        self,
        *,
        in_channels: tuple[int, ...],
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        num_levels: int,
        num_points: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_levels != 4 or len(in_channels) != 4:
            raise ValueError("expects 4 backbone maps (strides 4-32) and 4 levels (8-64)")
        self.dim = dim
        c4, c8, c16, c32 = in_channels
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, dim, 1), _gn(dim)) for c in (c8, c16, c32)]
            + [nn.Sequential(nn.Conv2d(c32, dim, 3, stride=2, padding=1), _gn(dim))]
        )
        self.level_embed = nn.Parameter(torch.zeros(num_levels, dim))
        nn.init.normal_(self.level_embed)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                dim=dim,
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                num_levels=num_levels,
                num_points=num_points,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.lateral = nn.Sequential(nn.Conv2d(c4, dim, 1, bias=False), _gn(dim))
        self.mask_out = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            _gn(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, feats: list[torch.Tensor], padding_mask: torch.Tensor) -> ImageFeatures:
        """Encode.

        Args:
            feats: backbone maps [(B, C_i, H / s, W / s) for s in 4, 8, 16, 32].
            padding_mask: (B, H, W) bool, True in the padding of the input images.
        """
        f4, f8, f16, f32 = feats
        maps = [proj(f) for proj, f in zip(self.input_proj[:3], (f8, f16, f32))]
        maps.append(self.input_proj[3](f32))  # extra level, stride 64
        B = f4.shape[0]
        tokens, pos, masks, shapes = [], [], [], []
        for lvl, m in enumerate(maps):
            _, D, h, w = m.shape
            shapes.append((h, w))
            tokens.append(m.flatten(2).transpose(1, 2))  # B x hw x D
            p = feature_map_pos(h, w, D, m.device).to(m.dtype) + self.level_embed[lvl].to(m.dtype)
            pos.append(p[None].expand(B, -1, -1))
            pm = F.interpolate(padding_mask[:, None].float(), size=(h, w), mode="nearest")
            masks.append(pm[:, 0].bool().flatten(1))  # B x hw
        memory = torch.cat(tokens, 1)  # B x S x D
        pos_t = torch.cat(pos, 1)
        pad = torch.cat(masks, 1)
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=memory.device)
        level_start = torch.cat(
            [spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]]
        )
        reference = self._reference_points(shapes, memory)  # 1 x S x L x 2
        reference = reference.expand(B, -1, len(shapes), -1)
        for layer in self.layers:
            memory = layer(memory, pos_t, reference, spatial_shapes, pad)
        h8, w8 = shapes[0]
        m8 = memory[:, : h8 * w8].transpose(1, 2).reshape(B, self.dim, h8, w8)
        lat = self.lateral(f4)
        mask_features = self.mask_out(
            lat + F.interpolate(m8, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        )  # B x D x H/4 x W/4
        mpad = F.interpolate(padding_mask[:, None].float(), size=lat.shape[-2:], mode="nearest")
        return ImageFeatures(
            memory=memory,
            pos=pos_t,
            padding_mask=pad,
            spatial_shapes=spatial_shapes,
            level_start=level_start,
            mask_features=mask_features,
            mask_padding=mpad[:, 0].bool(),
        )

    @staticmethod
    def _reference_points(shapes: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalized -> (1, S, 1, 2) (x, y)."""
        refs = []
        for h, w in shapes:
            ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
            xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack([gx.flatten(), gy.flatten()], -1))
        return torch.cat(refs, 0)[None, :, None, :]
