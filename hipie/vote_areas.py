"""The areas that the SAM vote (Eq. 5) needs, for SAM masks given as COCO RLEs at the image's size
and HIPIE masks at the model's resolution.

HIPIE's masks stay at the resolution the model made them (``(K, h, w)``); the image-size mask of
each is its nearest-neighbour upsampling (what `hipie.rle_torch.encode` writes to the rows). The
intersections ``|S_i ∩ up(M_k)|`` are exact on both paths:

- ``"rle"`` (the CPU path): each HIPIE mask is RLE-encoded once at the image size (straight from
  the model-resolution mask, see `rle_torch.encode`; the same RLEs go into the output rows) and the
  intersections come from pycocotools' RLE IoUs and the RLE areas.
- ``"grid"`` (the device path): the SAM RLEs are decoded on the masks' device into per-cell pixel
  counts of the model grid (`rle_torch.decode_cells`), and the intersections are one integer
  matmul ``cells @ masks.T``: a HIPIE pixel stands for its whole cell of image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hipie import rle_torch
from hipie.vote import _as_rles, _count_products, _rle_areas, _rle_intersections

__all__ = ["VoteAreas", "sam_hipie_areas"]


@dataclass(frozen=True)
class VoteAreas:
    """Pairwise intersections and areas in image pixels (float32, exact integers)."""

    inter: torch.Tensor  # (S, K) |S_i ∩ up(M_k)|
    sam: torch.Tensor  # (S,) |S_i|
    hipie: torch.Tensor  # (K,) |up(M_k)|


def sam_hipie_areas(
    sam_rles: Sequence[dict],
    hipie_masks: torch.Tensor,
    *,
    hipie_rles: Sequence[dict] | None = None,
    method: str = "auto",
) -> VoteAreas:
    """Intersections of S SAM RLEs (all of one image size) with K HIPIE masks.

    Args:
        sam_rles: S COCO RLEs (compressed or uncompressed counts) of the image's size (H, W).
        hipie_masks: ``(K, h, w)`` bool masks; (h, w) may be smaller than (H, W) (their
            nearest-neighbour upsampling is meant) or equal.
        hipie_rles: the K masks' image-size RLEs when the caller has them (``"rle"`` path).
        method: ``"rle"``, ``"grid"``, or ``"auto"`` (grid on a non-CPU device, else rle).

    Returns:
        `VoteAreas` on ``hipie_masks``' device.
    """
    dev = hipie_masks.device
    num_k = hipie_masks.shape[0]
    if method == "auto":
        method = "rle" if dev.type == "cpu" else "grid"
    if method not in ("rle", "grid"):
        raise ValueError(f"method must be 'rle', 'grid' or 'auto', got {method!r}")
    if not sam_rles:
        zeros = torch.zeros(0, num_k, dtype=torch.float32, device=dev)
        hipie = _upsampled_areas(hipie_masks, None) if num_k else torch.zeros(0, device=dev)
        return VoteAreas(inter=zeros, sam=torch.zeros(0, device=dev), hipie=hipie)
    height, width = (int(v) for v in sam_rles[0]["size"])
    if method == "rle":
        sam = _as_rles(sam_rles)
        if hipie_rles is None:
            hipie_rles = rle_torch.encode(hipie_masks, (height, width)).rles
        hipie = _as_rles([_bytes_counts(r) for r in hipie_rles])
        inter = torch.from_numpy(_rle_intersections(sam, hipie)).to(torch.float32)
        sam_areas = torch.from_numpy(_rle_areas(sam)).to(torch.float32)
        hipie_areas = torch.from_numpy(_rle_areas(hipie)).to(torch.float32)
        return VoteAreas(inter=inter.to(dev), sam=sam_areas.to(dev), hipie=hipie_areas.to(dev))
    runs = rle_torch.parse_counts(sam_rles, dev)
    grid = tuple(hipie_masks.shape[1:])
    cells = rle_torch.decode_cells(runs, grid, dev)  # (S, h*w) pixel counts
    flat = hipie_masks.reshape(num_k, grid[0] * grid[1])
    max_count = int(cells.max()) if cells.numel() else 1
    inter = _count_products(cells, flat, max_value=max(max_count, 1)).to(torch.float32)
    return VoteAreas(
        inter=inter,
        sam=runs.areas().to(torch.float32),
        hipie=_upsampled_areas(hipie_masks, (height, width)),
    )


def _upsampled_areas(masks: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """``(K,)`` float32 areas of the masks' nearest-neighbour upsampling to ``size``."""
    k, h, w = masks.shape
    if size is None or (h, w) == tuple(size):
        return masks.reshape(k, h * w).sum(1).to(torch.float32)
    rows = rle_torch.nearest_index(size[0], h, masks.device)
    cols = rle_torch.nearest_index(size[1], w, masks.device)
    cell_h = torch.bincount(rows, minlength=h).to(torch.float64)
    cell_w = torch.bincount(cols, minlength=w).to(torch.float64)
    per_row = masks.to(torch.float64) @ cell_w  # (K, h)
    return (per_row @ cell_h).to(torch.float32)


def _bytes_counts(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": rle["size"], "counts": counts.encode("ascii")}
    return rle
