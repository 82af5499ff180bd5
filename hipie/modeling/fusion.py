"""Early text-image fusion (Sec. 3.4, Eq. 2), used by the thing decoder only (Fig. 4c).

    F_t2v, F_v2t = Bi-Xattn(F_v, F_t)
    (F'_v, F'_t) = (F_v + F_t2v, F_t + F_v2t)

Deviation: the residual branches are gated by learnable per-channel scales initialized small
(GLIP's bi-attention does the same) so that an untrained fusion starts close to identity.
Fusion runs on the flattened multi-scale output of the pixel decoder (not on raw backbone
features) so that the image encoding is text-independent and shared by every text pass.
"""

from __future__ import annotations

import torch
from torch import nn


class BiCrossAttentionFusion(nn.Module):
    """Bi-directional cross-attention between image tokens and text tokens, with residuals."""

    def __init__(
        self, *, dim: int, num_heads: int, layer_scale_init: float = 1e-4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm_v = nn.LayerNorm(dim)
        self.norm_t = nn.LayerNorm(dim)
        self.text_to_image = nn.MultiheadAttention(
            dim, num_heads, dropout=dropout, batch_first=True
        )
        self.image_to_text = nn.MultiheadAttention(
            dim, num_heads, dropout=dropout, batch_first=True
        )
        self.gamma_v = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma_t = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        *,
        image_padding_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse.

        Args:
            image: (B, S, D) image tokens F_v.
            text: (B, T, D) text tokens F_t.
            image_padding_mask: (B, S) bool, True at padded image tokens.
            text_mask: (B, T) bool, True at real text tokens.
        Returns:
            F'_v (B, S, D) and F'_t (B, T, D).
        """
        v, t = self.norm_v(image), self.norm_t(text)
        text_pad = None if text_mask is None else ~text_mask
        # F_t2v: image queries read the text (text-guided visual features)
        t2v, _ = self.text_to_image(v, t, t, key_padding_mask=text_pad, need_weights=False)
        # F_v2t: text queries read the image (image-guided text features)
        v2t, _ = self.image_to_text(
            t, v, v, key_padding_mask=image_padding_mask, need_weights=False
        )
        return image + self.gamma_v * t2v, text + self.gamma_t * v2t
