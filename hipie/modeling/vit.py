"""The release's plain ViT backbone (ViTDet-style) and the pyramid it makes from its last block.

HIPIE's ViT-H (`vit_h_cloud.pth`, backbone `D2ViT`, `MODEL.VIT.NAME "ViT-huge"`): 16x16 patches,
an absolute position table pretrained at 224 px (14 x 14 + a class slot, resized bicubically to
the token grid), blocks with decomposed relative positions, some of them attending inside 14 x 14
windows. The pyramid is made from the last block alone: res3 = a stride-2 transposed conv
(`fpn1.0`, half the width), res4 = the tokens, res5 = 2x2 max pooling.

Release quirk kept: the windowed blocks are the ones ViT-Base would use (0, 1, 3, 4, 6, 7, 9, 10)
whatever the depth, so in ViT-H blocks 2, 5, 8 and 11-31 attend globally.

Names equal the release's suffixes after `detr.detr.backbone.0.backbone.`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_WINDOW_BLOCKS = (0, 1, 3, 4, 6, 7, 9, 10)


@dataclass(frozen=True)
class ViTSpec:
    """Shape of the ViT; the defaults are the release's ViT-H (`ViTSpec.preset("huge")`)."""

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 1024  # sets the relative-position tables of the global blocks
    pretrain_img_size: int = 224  # sets the absolute position table
    pretrain_use_cls_token: bool = True
    window_size: int = 14
    window_block_indexes: tuple[int, ...] = RELEASE_WINDOW_BLOCKS
    in_channels: int = 3
    norm_eps: float = 1e-6

    @classmethod
    def preset(cls, name: str, **kw) -> ViTSpec:
        """The release's sizes: "base" (768, 12, 12), "large" (1024, 24, 16), "huge" (1280, 32, 16)."""
        sizes = {"base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}
        dim, depth, heads = sizes[name]
        return cls(embed_dim=dim, depth=depth, num_heads=heads, **kw)


def _pad_to_windows(x: torch.Tensor, w: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """B x H x W x C -> (B * nWin) x w x w x C, zero-padding H, W up to multiples of w."""
    b, h, wd, c = x.shape
    ph, pw = (-h) % w, (-wd) % w
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, wd + pw
    x = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, c), (hp, wp)


def _merge_windows(x: torch.Tensor, w: int, padded: tuple[int, int], hw: tuple[int, int]):
    hp, wp = padded
    b = x.shape[0] // ((hp // w) * (wp // w))
    x = x.view(b, hp // w, wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


def _relative_table(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """q_size x k_size x C embeddings of the offsets q - k, the table linearly resized if needed."""
    n = int(2 * max(q_size, k_size) - 1)
    if table.shape[0] != n:
        table = F.interpolate(table.t()[None], size=n, mode="linear")[0].t()
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


class Attention(nn.Module):
    """Multi-head self-attention with decomposed (height + width) relative position terms."""

    def __init__(self, dim: int, num_heads: int, rel_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size[1] - 1, head_dim))

    # Attention maps are computed for at most this many (batch x head) x query x key entries at a
    # time (1 GiB in fp32): a global block at 1024 x 2048 px has 8192 tokens, i.e. 4 GiB per map
    # stack. Chunking the batch-head axis changes no value.
    max_attn_elements = 1 << 28

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, nh, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * nh, h * w, -1).unbind(0)
        rh = _relative_table(h, h, self.rel_pos_h)
        rw = _relative_table(w, w, self.rel_pos_w)
        step = max(1, self.max_attn_elements // (h * w) ** 2)
        outs = [
            self._attend(q[i : i + step], k[i : i + step], v[i : i + step], rh, rw, h, w)
            for i in range(0, b * nh, step)
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        out = out.view(b, nh, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)

    def _attend(self, q, k, v, rh, rw, h: int, w: int) -> torch.Tensor:
        n = q.shape[0]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rq = q.reshape(n, h, w, -1)
        bias_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
        bias_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
        attn = attn.view(n, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]
        attn = attn.view(n, h * w, h * w).softmax(dim=-1)
        return attn @ v


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's `Mlp`, without dropout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; window_size > 0 attends inside non-overlapping windows."""

    def __init__(self, spec: ViTSpec, window_size: int):
        super().__init__()
        dim = spec.embed_dim
        grid = spec.img_size // spec.patch_size
        rel = (window_size, window_size) if window_size else (grid, grid)
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.attn = Attention(dim, spec.num_heads, rel)
        self.norm2 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size:
            hw = (y.shape[1], y.shape[2])
            y, padded = _pad_to_windows(y, self.window_size)
            y = _merge_windows(self.attn(y), self.window_size, padded, hw)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B x h x w x C


def resize_abs_pos(table: torch.Tensor, has_cls: bool, hw: tuple[int, int]) -> torch.Tensor:
    """1 x N x C pretrained table -> 1 x h x w x C (class slot dropped, bicubic if sizes differ)."""
    if has_cls:
        table = table[:, 1:]
    side = int(math.sqrt(table.shape[1]))
    if side * side != table.shape[1]:
        raise ValueError(f"absolute position table of {table.shape[1]} entries is not square")
    if (side, side) == tuple(hw):
        return table.reshape(1, hw[0], hw[1], -1)
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


class ViT(nn.Module):
    """forward(images: B x 3 x H x W normalized, H and W multiples of 32) ->
    {"res3": B x C/2 x H/8 x W/8, "res4": B x C x H/16 x W/16, "res5": B x C x H/32 x W/32}."""

    # The release's D2ViT asks for inputs padded to multiples of 32 (the thing branch pads).
    size_divisibility = 32

    def __init__(self, spec: ViTSpec | None = None):
        super().__init__()
        spec = spec or ViTSpec()
        self.spec = spec
        dim = spec.embed_dim
        self.patch_embed = PatchEmbed(spec.in_channels, dim, spec.patch_size)
        n = (spec.pretrain_img_size // spec.patch_size) ** 2 + int(spec.pretrain_use_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim))
        wins = set(spec.window_block_indexes)
        self.blocks = nn.ModuleList(
            Block(spec, spec.window_size if i in wins else 0) for i in range(spec.depth)
        )
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        self.out_channels = {"res3": dim // 2, "res4": dim, "res5": dim}
        self.strides = {"res3": 8, "res4": 16, "res5": 32}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(images)
        x = x + resize_abs_pos(
            self.pos_embed, self.spec.pretrain_use_cls_token, (x.shape[1], x.shape[2])
        )
        for blk in self.blocks:
            x = blk(x)
        last = x.permute(0, 3, 1, 2)
        return {
            "res3": self.fpn1(last),
            "res4": last,
            "res5": F.max_pool2d(last, kernel_size=2, stride=2),
        }
