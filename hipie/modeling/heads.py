"""Prediction heads shared by both decoders: contrastive classification and dot-product masks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Logit given to padded (non-existent) labels of a batch: sigmoid(-100) == 0, and it stays finite
# so that focal / BCE losses never see inf * 0.
INVALID_LOGIT = -100.0


class ContrastiveClassifier(nn.Module):
    """Class logits = scale * cos(W e_q, t_k) + bias (Sec. 3.5, normalized dot product).

    `scale` (log-parameterized) and `bias` are learnable; the bias starts at the focal-loss prior
    -log((1 - p) / p) with p = 0.01.
    """

    def __init__(self, *, dim: int, init_scale: float = 10.0, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))

    def forward(
        self, embeddings: torch.Tensor, label_emb: torch.Tensor, label_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, Q, D) query embeddings, (B, K, D) label embeddings, (B, K) bool -> (B, Q, K)."""
        q = F.normalize(self.proj(embeddings), dim=-1)
        t = F.normalize(label_emb, dim=-1)
        logits = torch.einsum("bqd,bkd->bqk", q, t) * self.log_scale.exp() + self.bias
        return logits.masked_fill(~label_mask[:, None, :], INVALID_LOGIT)


def mask_logits(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
    """Dot product of query mask embeddings (B, Q, D) with per-pixel features (B, D, h, w).

    Returns:
        (B, Q, h, w) mask logits.
    """
    return torch.einsum("bqd,bdhw->bqhw", mask_embed, mask_features)
