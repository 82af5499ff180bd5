"""The parts of the batched automatic mask generator (``pipeline.masks.sam``): its parameters
(``AmgConfig``), the masks of one crop that passed the score filters (``Candidates``), the
crops (``Crop``), and the tensor operations on them: stability counts, boxes from row and column
profiles, the crop-edge test, and COCO RLEs encoded with the run boundaries found on the device
(``encode_rles``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

# Elements (bool) of full-size masks materialized at once while run-length encoding.
_MAX_RLE_ELEMENTS = 2**28


@dataclass(frozen=True, kw_only=True)
class AmgConfig:
    """Parameters of the automatic mask generator (as in ``SamAutomaticMaskGenerator``)."""

    points_per_side: int = 32  # grid points along each side of the image (crop layer 0)
    points_per_batch: int = 256  # point prompts decoded at once (stock: 64)
    pred_iou_thresh: float = 0.88  # keep masks with predicted IoU > this (0 disables)
    stability_score_thresh: float = 0.95  # keep masks with stability >= this (0 disables)
    stability_score_offset: float = 1.0  # logit offset of the stability score's two cut-offs
    box_nms_thresh: float = 0.7  # box IoU above which NMS drops duplicates within a crop
    crop_n_layers: int = 0  # extra crop layers; layer i has (2**i)**2 crops
    crop_nms_thresh: float = 0.7  # box IoU for NMS between crops (smaller crops preferred)
    crop_overlap_ratio: float = 512 / 1500  # overlap of layer-1 crops, fraction of short side
    crop_n_points_downscale_factor: int = 1  # points per side in layer i: n / factor**i
    min_mask_region_area: int = 0  # remove holes/islands below this area (pixels); 0 disables
    image_batch_size: int = 8  # images (or crops) per image-encoder forward
    autocast_dtype: str | None = None  # "bfloat16": encoder/decoder autocast (not stock-exact)


@dataclass
class Candidates:
    """Masks of one crop that passed the score filters, as low-res logits (M masks)."""

    logits: torch.Tensor  # (M, 256, 256) float32 low-res mask logits
    iou_preds: torch.Tensor  # (M,) float32 predicted IoU
    stability: torch.Tensor  # (M,) float32 stability score
    boxes: torch.Tensor  # (M, 4) long XYXY (inclusive) in crop coordinates

    @staticmethod
    def cat(parts: list[Candidates], device: torch.device) -> Candidates:
        if not parts:
            return Candidates(
                logits=torch.zeros(0, 256, 256, device=device),
                iou_preds=torch.zeros(0, device=device),
                stability=torch.zeros(0, device=device),
                boxes=torch.zeros(0, 4, dtype=torch.long, device=device),
            )
        return Candidates(
            logits=torch.cat([p.logits for p in parts]),
            iou_preds=torch.cat([p.iou_preds for p in parts]),
            stability=torch.cat([p.stability for p in parts]),
            boxes=torch.cat([p.boxes for p in parts]),
        )

    def filter(self, keep: torch.Tensor) -> Candidates:
        """Rows selected by ``keep`` ((M,) bool or (K,) long indices)."""
        return Candidates(
            logits=self.logits[keep],
            iou_preds=self.iou_preds[keep],
            stability=self.stability[keep],
            boxes=self.boxes[keep],
        )


@dataclass(frozen=True)
class Crop:
    """One image-encoder input: a crop of one image (the whole image is crop 0)."""

    image_index: int  # index of the image in the batch
    box: tuple[int, int, int, int]  # XYXY in image pixels
    layer: int  # crop layer (0 = whole image)


def encode_rles(masks: torch.Tensor) -> list[tuple[dict, int]]:
    """COCO RLEs (str counts) and areas of binary masks, run boundaries found on the device.

    Args:
        masks: (K, H, W) bool.
    Returns:
        K pairs (``{"size": [H, W], "counts": str}``, area), identical to pycocotools' ``encode``.
    """
    k_total, h, w = masks.shape
    n = h * w
    out: list[tuple[dict, int]] = []
    chunk = max(1, _MAX_RLE_ELEMENTS // max(1, n))
    for start in range(0, k_total, chunk):
        flat = masks[start : start + chunk].transpose(1, 2).reshape(-1, n)  # column-major
        k = len(flat)
        mask_idx, pos = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
        first = flat[:, 0].cpu().numpy()
        mask_idx, pos = mask_idx.cpu().numpy(), pos.cpu().numpy() + 1
        bounds = np.searchsorted(mask_idx, np.arange(k + 1))
        for j in range(k):
            edges = np.concatenate(([0], pos[bounds[j] : bounds[j + 1]], [n]))
            counts = np.diff(edges)
            if first[j]:
                counts = np.concatenate(([0], counts))  # RLEs start with a run of zeros
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
            rle["counts"] = rle["counts"].decode("utf-8")
            out.append((rle, int(counts[1::2].sum())))
    return out


def count_above(x: torch.Tensor, value: float) -> torch.Tensor:
    """(M,) int32 number of elements of x (M, H, W) above value (row sums in int16 first, as the
    stock does: faster on CPU than one int32 reduction; exact while W < 2**15)."""
    above = x > value
    if x.shape[-1] < 2**15:
        return above.sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return above.sum((-2, -1), dtype=torch.int32)


def box_from_profiles(
    in_rows: torch.Tensor, in_cols: torch.Tensor, rows_idx: torch.Tensor, cols_idx: torch.Tensor
) -> torch.Tensor:
    """XYXY boxes (M, 4) long, inclusive, from which rows (M, H) and columns (M, W) hold mask
    pixels; [0, 0, 0, 0] for empty masks."""
    h, w = in_rows.shape[-1], in_cols.shape[-1]
    bottom = torch.where(in_rows, rows_idx, -1).amax(dim=-1)
    top = torch.where(in_rows, rows_idx, h).amin(dim=-1)
    right = torch.where(in_cols, cols_idx, -1).amax(dim=-1)
    left = torch.where(in_cols, cols_idx, w).amin(dim=-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~in_rows.any(dim=-1)
    return boxes.masked_fill(empty[:, None], 0)


def near_crop_edge(
    boxes: torch.Tensor,
    crop_box: tuple[int, int, int, int],
    orig_box: tuple[int, int, int, int],
    atol: float = 20.0,
) -> torch.Tensor:
    """(M,) bool: the box (crop coordinates) lies within ``atol`` of a crop edge that is not an
    image edge (such masks are likely cut by the crop)."""
    crop_t = torch.tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.tensor(orig_box, dtype=torch.float, device=boxes.device)
    offset = torch.tensor([crop_box[0], crop_box[1]] * 2, device=boxes.device)
    b = (boxes + offset).float()
    near_crop = torch.isclose(b, crop_t[None], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig_t[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)
