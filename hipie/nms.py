"""Class-aware NMS equal to `torchvision.ops.batched_nms`, with a pure-PyTorch fallback.

The release removes duplicate thing queries with `torchvision.ops.batched_nms`; our port must run
where torchvision's compiled op is missing, and give the same kept list there.
"""

from __future__ import annotations

import torch

__all__ = ["batched_nms", "nms_pure"]

# torchvision's batched NMS switches from one offset NMS to a per-class loop above these sizes
# (boxes.numel()); the pure version follows the same switch so that float rounding matches.
_NMS_OFFSET_LIMIT = {"cpu": 4000}
_NMS_OFFSET_LIMIT_OTHER = 100_000


def nms_pure(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on xyxy boxes in pure PyTorch, the arithmetic of torchvision's CPU kernel.

    Order: scores descending, stable; IoU = inter / (area_i + area_j - inter) with unclamped areas;
    a box is suppressed when IoU > threshold with an earlier kept box.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    x1, y1, x2, y2 = b.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp(
        min=0
    )
    h = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp(
        min=0
    )
    inter = w * h
    overlap = (inter / (areas[:, None] + areas[None, :] - inter)) > iou_threshold
    overlap = overlap.cpu().numpy()
    n = len(order)
    suppressed = [False] * n
    kept = []
    for i in range(n):
        if suppressed[i]:
            continue
        kept.append(i)
        row = overlap[i]
        for j in row[i + 1 :].nonzero()[0]:
            suppressed[i + 1 + j] = True
    return order[torch.as_tensor(kept, dtype=torch.int64, device=boxes.device)]


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, backend: str):
    if backend in ("auto", "torchvision"):
        try:
            from torchvision.ops import nms

            return nms(boxes, scores, iou_threshold)
        except (ImportError, RuntimeError, NotImplementedError):
            if backend == "torchvision":
                raise
    return nms_pure(boxes, scores, iou_threshold)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Class-aware NMS equal to `torchvision.ops.batched_nms`; kept indices by decreasing score.

    `backend`: "auto" (torchvision's compiled NMS when it runs, else pure PyTorch), "torchvision"
    or "pure". Like torchvision, small inputs shift each class's boxes by `class * (max + 1)` and
    run one NMS (this changes float rounding, so it is reproduced), large ones loop over classes.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    limit = _NMS_OFFSET_LIMIT.get(boxes.device.type, _NMS_OFFSET_LIMIT_OTHER)
    if boxes.numel() <= limit:
        offsets = classes.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return _nms(boxes + offsets[:, None], scores, iou_threshold, backend)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for cls in torch.unique(classes):
        idx = torch.where(classes == cls)[0]
        keep_mask[idx[_nms(boxes[idx], scores[idx], iou_threshold, backend)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True).indices]
