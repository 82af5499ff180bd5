"""Image encoders Enc_v (Sec. 3.3): ResNet-50, ViT, and a small CNN for the `tiny` preset.

Every encoder maps normalized images (B, 3, H, W) to four feature maps at strides 4, 8, 16, 32.
The strides 8/16/32 maps are the paper's three multi-scale features F_v; the stride-4 map only
feeds the 1/4-resolution mask features (as in MaskDINO / UNINEXT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (4, 8, 16, 32)


class TinyConvEncoder(nn.Module):
    """A 4-stage CNN with GroupNorm (trainable on CPU with small batches)."""

    def __init__(self, *, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels = tuple(channels)

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(8, cout), cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, cout), cout),
                nn.ReLU(inplace=True),
            )

        stem = channels[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(min(8, stem), stem),
            nn.ReLU(inplace=True),
        )
        cins = (stem,) + tuple(channels[:-1])
        self.stages = nn.ModuleList(block(a, b, 2) for a, b in zip(cins, channels))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H / s_i, W / s_i) for s_i in 4, 8, 16, 32]."""
        x = self.stem(images)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ResNet50Encoder(nn.Module):
    """torchvision ResNet-50 (random init, frozen BatchNorm); res2..res5 at strides 4..32."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50
        from torchvision.ops.misc import FrozenBatchNorm2d

        net = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.out_channels = (256, 512, 1024, 2048)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H / s_i, W / s_i) for s_i in 4, 8, 16, 32]."""
        x = self.stem(images)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class _ViTBlock(nn.Module):
    """Pre-norm transformer block with global attention."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B x heads x N x Dh each
        attn = F.scaled_dot_product_attention(q, k, v)  # B x heads x N x Dh
        x = x + self.proj(attn.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ViTEncoder(nn.Module):
    """Plain ViT; the outputs of blocks 8, 16, 32 (ViT-H) become the multi-scale features.

    Deviation (the paper does not say how stride-16 ViT tokens become multi-scale maps): a
    ViTDet-style simple pyramid turns block 8 into strides 4 and 8 (transposed convs), keeps
    block 16 at stride 16 and pools block 32 to stride 32, each projected to `out_dim` channels.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        out_blocks: tuple[int, ...],
        pretrain_size: int,
        out_dim: int = 256,
    ) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError("the feature pyramid assumes patch size 16")
        if len(out_blocks) != 3 or max(out_blocks) > depth:
            raise ValueError(f"need three output blocks within depth {depth}, got {out_blocks}")
        self.out_blocks = tuple(out_blocks)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        grid = pretrain_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            _ViTBlock(dim=embed_dim, num_heads=num_heads) for _ in range(depth)
        )

        def proj(cin: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, out_dim, 1, bias=False),
                _LayerNorm2d(out_dim),
                nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
                _LayerNorm2d(out_dim),
            )

        half = embed_dim // 2
        self.to_s8 = nn.ConvTranspose2d(embed_dim, half, 2, stride=2)
        self.to_s4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, half, 2, stride=2),
            _LayerNorm2d(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, half // 2, 2, stride=2),
        )
        self.proj_s4, self.proj_s8 = proj(half // 2), proj(half)
        self.proj_s16, self.proj_s32 = proj(embed_dim), proj(embed_dim)
        self.out_channels = (out_dim,) * 4

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) with H, W multiples of 32 -> four maps at strides 4, 8, 16, 32."""
        x = self.patch_embed(images)  # B x D x H/16 x W/16
        B, D, h, w = x.shape
        pos = self.pos_embed
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # B x hw x D
        taps = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.out_blocks:
                taps.append(x.transpose(1, 2).reshape(B, D, h, w))
        f8, f16, f32 = taps
        return [
            self.proj_s4(self.to_s4(f8)),
            self.proj_s8(self.to_s8(f8)),
            self.proj_s16(f16),
            self.proj_s32(F.max_pool2d(f32, 2, ceil_mode=True)),
        ]
