"""Early vision-language fusion of the release: one bi-directional cross-attention block (GLIP).

Where the release applies it: once, before the first layer of the thing branch's deformable
encoder (`MODEL.DDETRS.NUM_VL_LAYERS` 1; the other five `vl_layers` are identities, and
`MODEL.USE_ADDITIONAL_BERT` is off, so no BERT layer follows). Image tokens (B, S, 256) and text
tokens (B, T, 768) are both layer-normed first; the residual is added to the *normalized* streams
(the release overwrites its inputs with their pre-norms), scaled per channel by `gamma_v` /
`gamma_l`. Attention runs in a 2048-wide space with 8 heads. Text -> image attention masks padded
tokens; image -> text attention does not mask padded pixels (the release passes no image mask).

Parameter names follow the release (`b_attn.attn.v_proj`, `b_attn.gamma_v`, ...), so the keys
`...encoder.vl_layers.0.b_attn.*` map by prefix.
"""

from __future__ import annotations

import torch
from torch import nn

# The release clamps the attention logits to the fp16-safe range (CLAMP_MIN_FOR_UNDERFLOW and
# CLAMP_MAX_FOR_OVERFLOW are on in the released configs).
_CLAMP = 50000.0


class BiMultiHeadAttention(nn.Module):
    """Image <-> text multi-head attention sharing one logit matrix per head.

    Logits q(v) . k(l) / sqrt(d_head) give, softmaxed over tokens, image updates from text values,
    and, transposed and softmaxed over pixels, text updates from image values.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x N x Dh

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.embed_dim)

    def forward(
        self, v: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v: (B, S, v_dim); lang: (B, T, l_dim); lang_mask: (B, T), nonzero at real tokens.

        Returns the updates (delta_v (B, S, v_dim), delta_l (B, T, l_dim)).
        """
        q = self._heads(self.v_proj(v) * self.scale)
        k = self._heads(self.l_proj(lang))
        val_v = self._heads(self.values_v_proj(v))
        val_l = self._heads(self.values_l_proj(lang))
        logits = (q @ k.transpose(-1, -2)).clamp(-_CLAMP, _CLAMP)  # B x H x S x T

        # text queries over image keys: shifted by the per-token max, then clamped, as released
        logits_l = logits.transpose(-1, -2)
        logits_l = logits_l - logits_l.amax(-1, keepdim=True)
        attn_l = logits_l.clamp(-_CLAMP, _CLAMP).softmax(-1)  # B x H x T x S

        # image queries over text keys: padded tokens get -9e15 (exp underflows to exactly 0)
        if lang_mask is not None:
            pad = (lang_mask == 0)[:, None, None, :]
            logits = logits.masked_fill(pad, -9e15)
        attn_v = logits.softmax(-1)  # B x H x S x T

        delta_v = self.out_v_proj(self._merge(attn_v @ val_l))
        delta_l = self.out_l_proj(self._merge(attn_l @ val_v))
        return delta_v, delta_l


class BiAttentionBlock(nn.Module):
    """Pre-norm bi-directional attention with layer scale (release: BiAttentionBlockForCheckpoint).

    The release initialises `gamma_v`/`gamma_l` to 1 / ENC_LAYERS; a checkpoint overrides them.
    """

    def __init__(
        self, v_dim: int = 256, l_dim: int = 768, embed_dim: int = 2048, num_heads: int = 8
    ):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), 1.0 / 6))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), 1.0 / 6))

    def forward(
        self, v: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.layer_norm_v(v)
        lang = self.layer_norm_l(lang)
        delta_v, delta_l = self.attn(v, lang, lang_mask)
        return v + self.gamma_v * delta_v, lang + self.gamma_l * delta_l


class VLFuse(nn.Module):
    """The release's wrapper (`VLFuse`): holds the block as `b_attn`; (visual, text) -> fused."""

    def __init__(
        self, v_dim: int = 256, l_dim: int = 768, embed_dim: int = 2048, num_heads: int = 8
    ):
        super().__init__()
        self.b_attn = BiAttentionBlock(v_dim, l_dim, embed_dim, num_heads)

    def forward(
        self, v: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b_attn(v, lang, lang_mask)
