"""Element-wise and per-pair loss terms shared by the training criteria.

Each returns unreduced values (per element, per mask or per box pair); the criteria sum and
normalize them as their recipe says (DETR style: by the number of matched pairs or targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hipie.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["box_l1_loss", "dice_loss", "giou_loss", "mask_bce_loss", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise focal loss (Lin et al. 2017) of (..., K) logits and (..., K) targets in [0, 1].

    `FL = α_t (1 - p_t)^γ BCE(x, t)` with `p_t = p t + (1 - p)(1 - t)`,
    `α_t = α t + (1 - α)(1 - t)`. Returns the same shape (the caller sums and normalizes).
    """
    logits, targets = logits.float(), targets.float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss per mask: (M, P) logits, (M, P) targets in [0, 1] -> (M,).

    `1 - (2 Σ p t + 1) / (Σ p + Σ t + 1)` with `p = sigmoid(logits)` (DETR's smoothing of 1).
    """
    prob = logits.float().sigmoid()
    targets = targets.float()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def mask_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pixel-wise sigmoid BCE per mask, averaged over the P pixels: (M, P), (M, P) -> (M,)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return bce.mean(-1)


def box_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance of (M, 4) normalized cxcywh boxes, summed over the 4 coordinates -> (M,)."""
    return (pred.float() - target.float()).abs().sum(-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`1 - GIoU` of paired (M, 4) normalized cxcywh boxes -> (M,)."""
    if pred.shape[0] == 0:
        return pred.new_zeros(0, dtype=torch.float32)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred.float()), box_cxcywh_to_xyxy(target.float()))
    return 1 - torch.diag(giou)
