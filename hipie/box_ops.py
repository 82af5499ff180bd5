"""Box utilities shared by the matchers, the losses and the model's NMS.

Boxes are `(..., 4)` float tensors, either `cxcywh` (centre x, centre y, width, height) or `xyxy`
(left, top, right, bottom); both may be normalized to [0, 1] or in pixels, the functions do not
care as long as the two arguments of a pairwise function use the same units.
"""

from __future__ import annotations

import torch

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xyxy_to_xywh",
    "generalized_box_iou",
    "masks_to_boxes",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` cxcywh -> `(..., 4)` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` xyxy -> `(..., 4)` cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` COCO xywh (left, top, width, height) -> `(..., 4)` xyxy."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` xyxy -> `(..., 4)` COCO xywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of `(..., 4)` xyxy boxes -> `(...)`; degenerate boxes have area 0."""
    width = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    height = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return width * height


def _inter_union(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersection and union areas of `(N, 4)` and `(M, 4)` xyxy boxes -> `(N, M)` each."""
    area1 = box_area(boxes1)  # N
    area2 = box_area(boxes2)  # M
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # N x M x 2
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # N x M x 2
    wh = (rb - lt).clamp(min=0)  # N x M x 2
    inter = wh[..., 0] * wh[..., 1]  # N x M
    union = area1[:, None] + area2[None, :] - inter
    return inter, union


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU of `(N, 4)` and `(M, 4)` xyxy boxes -> `(N, M)` in [0, 1].

    Two empty boxes have IoU 0 (the union is clamped to `eps`).
    """
    inter, union = _inter_union(boxes1, boxes2)
    return inter / union.clamp(min=eps)


def generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of `(N, 4)` and `(M, 4)` xyxy boxes.

    `GIoU = IoU - |C \\ (A u B)| / |C|` with `C` the smallest box enclosing both; in [-1, 1].
    Returns `(N, M)`.
    """
    inter, union = _inter_union(boxes1, boxes2)
    iou = inter / union.clamp(min=eps)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])  # N x M x 2
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])  # N x M x 2
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]  # N x M
    return iou - (enclosing - union) / enclosing.clamp(min=eps)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes in pixels of `(N, H, W)` bool masks -> `(N, 4)` float.

    The box of a pixel at column `x` spans `[x, x + 1)`, so a single pixel gives a 1 x 1 box
    (COCO convention). Empty masks give `(0, 0, 0, 0)`.
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    masks = masks.bool()
    rows = masks.any(dim=2)  # N x H
    cols = masks.any(dim=1)  # N x W
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ys, big).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x0 = torch.where(cols, xs, big).min(dim=1).values
    x1 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0.0
    return boxes
