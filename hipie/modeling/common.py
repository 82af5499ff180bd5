"""Small layers shared by the HIPIE modules: MLP, position encodings, inverse sigmoid."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with clamping, for iterative box refinement in logit space."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_embed(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine embedding of normalized coordinates.

    Args:
        coords: (..., C) values in [0, 1] (x, y[, w, h]).
        num_feats: features per coordinate (even).
    Returns:
        (..., C * num_feats), each coordinate's block interleaving sin and cos.
    """
    dim_t = torch.arange(num_feats // 2, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * dim_t / num_feats)  # num_feats/2
    pos = coords.float()[..., None] * (2 * math.pi) / dim_t  # ... x C x num_feats/2
    pos = torch.stack([pos.sin(), pos.cos()], dim=-1).flatten(-2)  # ... x C x num_feats
    return pos.flatten(-2).to(coords.dtype)


def feature_map_pos(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """2D sine position encoding of a (height, width) grid -> (height * width, dim)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # H x W each
    coords = torch.stack([grid_y.flatten(), grid_x.flatten()], dim=-1)  # HW x 2
    return sine_embed(coords, dim // 2)  # HW x dim


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of `x` over `dim` counting only positions where `mask` (broadcastable) is True."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def feed_forward(dim: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    """The transformer FFN: Linear(dim, ffn_dim) -> ReLU -> Dropout -> Linear(ffn_dim, dim),
    on (..., dim) tensors."""
    return nn.Sequential(
        nn.Linear(dim, ffn_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(ffn_dim, dim),
    )
