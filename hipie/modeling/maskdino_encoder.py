"""The stuff branch's pixel decoder: the release's MaskDINO encoder (`MaskDINOEncoder`).

From the backbone features res3, res4, res5 it builds four 256-d levels (three 1x1 projections and
one extra stride-2 3x3 level computed from res5), refines them with a six-layer deformable
encoder, adds one FPN level at stride 8 from res3 (`adapter_1` / `layer_1`) and upsamples that to
the stride-4 mask features. It has its own input projections: nothing is shared with the thing
branch. Parameter names are the release's (`detr.mask_dino.pixel_decoder.*` drops its prefix).

Quirks of the release kept here:
- `FEATURE_ORDER: low2high` is read backwards in practice: the encoder levels run res3, res4,
  res5, then the extra level (high resolution first), and the level embeddings follow that order.
- The extra level comes from the backbone feature with the most channels, the first one in the
  low->high-resolution order on a tie (res5 for R50 and for ViT-H's 640/1280/1280).
- The padding mask is never used: the release calls the branch with `mask=None`, so every pixel,
  padding included, counts as valid (valid ratios 1).
- The FPN level adds the *first* encoder level (`high_resolution_index` 0, which is already at
  stride 8) resized bilinearly to res3's size, a no-op resize.
- Position encodings (normalized sine) are computed from the *unprojected* feature shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hipie.modeling.common import sine_embed
from hipie.modeling.deformable_layers import DeformableEncoderLayer

FEATURE_NAMES = ("res3", "res4", "res5")


def normalized_sine_pos(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """The release's `PositionEmbeddingSine(dim // 2, normalize=True)` of an unpadded map.

    Row/column indices run 1..H / 1..W, are divided by (H + 1e-6) / (W + 1e-6) and scaled by 2*pi;
    channels are y's sin/cos block then x's. Returns (1, dim, H, W).
    """
    eps = 1e-6
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_y, grid_x], dim=-1)  # H x W x 2, (y, x)
    return sine_embed(coords, dim // 2).permute(2, 0, 1)[None]


class ConvNorm(nn.Conv2d):
    """detectron2's `Conv2d(..., norm=GroupNorm)`: conv, then `.norm`, then an optional ReLU.

    The release builds these without a bias (`bias = norm == ""`), hence keys `weight`,
    `norm.weight`, `norm.bias`.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, *, relu: bool) -> None:
        super().__init__(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_dim)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class _EncoderStack(nn.Module):
    """Holds `layers` so that keys read `transformer.encoder.layers.N.*` as in the release."""

    def __init__(self, layers: Sequence[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class DeformableEncoder(nn.Module):
    """`MSDeformAttnTransformerEncoderOnly` without padding: level embeddings + encoder layers."""

    def __init__(
        self, dim: int, ffn_dim: int, num_layers: int, num_heads: int, num_levels: int, points: int
    ):
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(num_levels, dim))
        self.encoder = _EncoderStack(
            [
                DeformableEncoderLayer(dim, ffn_dim, num_heads, num_levels, points)
                for _ in range(num_layers)
            ]
        )

    @staticmethod
    def reference_points(shapes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Pixel centres of every level, normalized to [0, 1]: (1, S, L, 2) as (x, y).

        Valid ratios are all 1 (no padding mask), so the same point serves every level.
        """
        points = []
        for h, w in shapes.tolist():
            ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device)
            xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device)
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([ref_x.reshape(-1) / w, ref_y.reshape(-1) / h], -1))
        ref = torch.cat(points, 0)[None]  # 1 x S x 2
        return ref[:, :, None].expand(-1, -1, len(shapes), -1)

    def forward(self, srcs: Sequence[torch.Tensor], pos: Sequence[torch.Tensor]):
        """Levels (B, D, H_l, W_l) and their position encodings -> ((B, S, D), shapes (L, 2))."""
        shapes = torch.as_tensor([s.shape[-2:] for s in srcs], dtype=torch.long)
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        p = torch.cat(
            [q.flatten(2).transpose(1, 2) + self.level_embed[i] for i, q in enumerate(pos)], 1
        )
        ref = self.reference_points(shapes, x.device).to(x.dtype)
        shapes = shapes.to(x.device)
        for layer in self.encoder.layers:
            x = layer(x, p, ref, shapes)
        return x, shapes


class MaskDINOEncoder(nn.Module):
    """The release's MaskDINO pixel decoder for the stuff branch.

    `forward(features)` takes {"res3", "res4", "res5"} (B, C_i, H_i, W_i) and returns
    `(mask_features (B, mask_dim, H3*2, W3*2), multi_scale [4 x (B, D, H, W)] (strides 8, 16, 32,
    64), memory (B, S, D))`.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024, 2048),
        *,
        dim: int = 256,
        mask_dim: int = 256,
        ffn_dim: int = 2048,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        num_levels: int = 4,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(FEATURE_NAMES):
            raise ValueError(f"in_channels needs one entry per {FEATURE_NAMES}")
        self.dim = dim
        self.num_levels = num_levels
        chans = list(in_channels)
        # The release picks the source of the extra levels by channels, low resolution first.
        low_to_high = chans[::-1]
        self.extra_source = FEATURE_NAMES[::-1][low_to_high.index(max(low_to_high))]
        projs = [nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(32, dim)) for c in chans]
        src_dim = max(chans)
        for _ in range(num_levels - len(chans)):
            projs.append(
                nn.Sequential(
                    nn.Conv2d(src_dim, dim, 3, stride=2, padding=1), nn.GroupNorm(32, dim)
                )
            )
            src_dim = dim
        self.input_proj = nn.ModuleList(projs)
        self.transformer = DeformableEncoder(
            dim, ffn_dim, num_layers, num_heads, num_levels, num_points
        )
        self.mask_features = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.GroupNorm(32, dim),
            nn.ReLU(),
            nn.Conv2d(dim, mask_dim, 1),
        )
        # One FPN level (log2(8) - log2(common stride 4) = 1), from res3.
        self.adapter_1 = ConvNorm(chans[0], dim, 1, relu=False)
        self.layer_1 = ConvNorm(dim, dim, 3, relu=True)

    def forward(self, features: Mapping[str, torch.Tensor]):
        # The release runs this module in float32 (autocast off, features `.float()`); here the
        # features take the weights' dtype, which is float32 unless the caller casts the model.
        dtype = self.input_proj[0][0].weight.dtype
        feats = {k: features[k].to(dtype) for k in FEATURE_NAMES}
        srcs, pos = [], []
        for i, name in enumerate(FEATURE_NAMES):
            x = feats[name]
            srcs.append(self.input_proj[i](x))
            pos.append(normalized_sine_pos(*x.shape[-2:], self.dim, x.device).to(dtype))
        x, extra = feats[self.extra_source], []
        for lvl in range(len(FEATURE_NAMES), self.num_levels):
            x = self.input_proj[lvl](x)
            extra.append(x)
            pos.append(normalized_sine_pos(*x.shape[-2:], self.dim, x.device).to(dtype))
        # The release reverses the extra levels but not their position encodings (moot with the
        # released configs' single extra level).
        srcs.extend(extra[::-1])
        memory, shapes = self.transformer(srcs, pos)
        sizes = [int(h) * int(w) for h, w in shapes.tolist()]
        levels = [
            m.transpose(1, 2).reshape(m.shape[0], self.dim, int(h), int(w))
            for m, (h, w) in zip(memory.split(sizes, 1), shapes.tolist())
        ]
        lateral = self.adapter_1(feats["res3"])
        top = F.interpolate(
            levels[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False
        )
        fpn = self.layer_1(lateral + top)
        return self.mask_features(fpn), levels, memory
