"""Class-aware labels for class-agnostic (SAM) masks by area-weighted voting (Sec. 3.8, Eq. 5).

For a SAM mask ``S_i`` and class ``j``, with HIPIE masks ``M_k`` and their class probabilities
``P(M_k, j)``:

    P(S_i, j)  ∝  Σ_k P(M_k, j) · |M_k ∩ S_i|                                          (Eq. 5)

The work is in the pairwise intersection areas ``|M_k ∩ S_i|``. They are computed without ever
decoding masks to dense arrays on the CPU, and without a dense ``(S, K, H, W)`` tensor:

- dense masks ``(N, H, W) bool`` (on the GPU when there): flattened to ``(N, H*W)`` and multiplied
  as int8 matrices with int32 accumulation (``torch._int_mm``), in chunks of pixels, so the counts
  are exact integers; a float32 matmul (exact for per-chunk counts below 2^24) is the fallback where
  the int8 kernel is missing. Optionally the masks are first area-downsampled by an integer factor
  ``f`` so that the longer side is <= ``max_side``: every ``f x f`` cell holds the count of mask
  pixels in it (0..f²), and ``|A ∩ B| ≈ Σ_cells c_A · c_B / f²`` in full-resolution pixel units.
  This is exact in every cell that one of the two masks fills or misses entirely; only cells on
  both masks' boundaries contribute error.
- COCO RLEs (``{"size": [h, w], "counts": str}``): exact, from pycocotools' RLE IoU and the RLE
  areas: ``|A ∩ B| = iou · (|A| + |B|) / (1 + iou)``, rounded to the integer it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from hipie import rle_torch
from schemas import rle as rle_utils

__all__ = [
    "MaskSet",
    "VoteResult",
    "intersection_areas",
    "mask_areas",
    "vote",
    "vote_from_intersections",
]

# A set of N masks: dense `(N, H, W) bool`, or a list of N COCO RLE dicts.
MaskSet = torch.Tensor | Sequence[dict]

# Pixels (columns of the flattened masks) per matmul chunk: bounds the temporary memory of the
# padded/converted chunks, and keeps float32 fallback counts below 2^24 (exact integers).
_CHUNK_PIXELS = 1 << 22
# Largest per-cell count that fits int8 (a 11 x 11 cell holds at most 121 pixels).
_INT8_MAX = 127
# Largest per-chunk sum that int32 accumulation holds exactly.
_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class VoteResult:
    """Eq. 5 applied to S SAM masks over C classes."""

    probs: torch.Tensor  # (S, C) float32 class distribution per SAM mask; all-zero rows: no overlap
    labels: torch.Tensor  # (S,) long argmax class per SAM mask, -1 where the row is all zero
    scores: torch.Tensor  # (S,) float32 probability of the argmax class, 0 where no overlap
    coverage: torch.Tensor  # (S,) float32 fraction of each SAM mask covered by any HIPIE mask


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def intersection_areas(a: MaskSet, b: MaskSet, *, max_side: int | None = None) -> torch.Tensor:
    """Pairwise intersection areas ``|a_i ∩ b_j|`` in full-resolution pixels.

    Args:
        a: A masks, dense ``(A, H, W) bool`` or a list of A COCO RLEs.
        b: B masks of the same image size, dense ``(B, H, W) bool`` or a list of B COCO RLEs.
            When one set is dense and the other RLE, the dense one is encoded to RLE (cheap)
            rather than decoding the RLEs (expensive).
        max_side: dense inputs only: if set and the longer image side exceeds it, area-downsample
            both sets by the smallest integer factor that brings the longer side to <= max_side
            (approximate, see the module docstring). Ignored for RLEs, which are always exact.

    Returns:
        ``(A, B)`` float32 intersection areas, on the dense tensors' device (CPU for RLEs).
        Exact integers unless downsampled (and below 2^24, float32's integer range).
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _dense_intersections(a, b, max_side=max_side)
    a_rle, b_rle = _as_rles(a), _as_rles(b)
    return torch.from_numpy(_rle_intersections(a_rle, b_rle)).to(torch.float32)


def mask_areas(masks: MaskSet) -> torch.Tensor:
    """Pixel areas of a mask set.

    Args:
        masks: dense ``(N, H, W) bool`` or a list of N COCO RLEs.

    Returns:
        ``(N,)`` float32 areas, on the dense tensor's device (CPU for RLEs).
    """
    if isinstance(masks, torch.Tensor):
        return _dense_areas(_dense_matrix(masks, 1)[0], max_value=1)
    rles = _as_rles(masks)
    if not rles:
        return torch.zeros(0, dtype=torch.float32)
    return torch.from_numpy(_rle_areas(rles).astype(np.float32))


def vote(
    sam_masks: MaskSet,
    hipie_masks: MaskSet,
    hipie_probs: torch.Tensor,
    *,
    max_side: int | None = None,
) -> VoteResult:
    """Label class-agnostic SAM masks with HIPIE's class probabilities (Eq. 5).

    Args:
        sam_masks: S SAM masks, dense ``(S, H, W) bool`` or a list of S COCO RLEs.
        hipie_masks: K HIPIE masks of the same image, dense ``(K, H, W) bool`` or K COCO RLEs.
        hipie_probs: ``(K, C)`` class probabilities of the HIPIE masks.
        max_side: see `intersection_areas` (dense masks only).

    Returns:
        `VoteResult` with tensors on ``hipie_probs``' device.
    """
    num_hipie = hipie_probs.shape[0]
    if len(hipie_masks) != num_hipie:
        raise ValueError(f"{len(hipie_masks)} HIPIE masks but {num_hipie} probability rows")
    device = hipie_probs.device
    probs_k = hipie_probs.to(torch.float32)

    if isinstance(sam_masks, torch.Tensor) and isinstance(hipie_masks, torch.Tensor):
        inter, covered, areas = _dense_vote_areas(sam_masks, hipie_masks, max_side=max_side)
    else:
        inter, covered, areas = _rle_vote_areas(_as_rles(sam_masks), _as_rles(hipie_masks))
    inter, covered, areas = inter.to(device), covered.to(device), areas.to(device)
    return vote_from_intersections(inter, probs_k, areas, covered=covered)


def vote_from_intersections(
    inter: torch.Tensor,
    hipie_probs: torch.Tensor,
    sam_areas: torch.Tensor,
    *,
    covered: torch.Tensor | None = None,
) -> VoteResult:
    """Eq. 5 from intersection areas that are already computed.

    Args:
        inter: ``(S, K)`` areas ``|S_i ∩ M_k|``.
        hipie_probs: ``(K, C)`` class probabilities of the HIPIE masks.
        sam_areas: ``(S,)`` SAM mask areas.
        covered: ``(S,)`` ``|S_i ∩ ∪_k M_k|``; default ``Σ_k |S_i ∩ M_k|``, which is exact for
            disjoint HIPIE masks (panoptic segments) and an upper bound otherwise.

    Returns:
        `VoteResult` on ``inter``'s device.
    """
    device = inter.device
    num_sam, num_classes = inter.shape[0], hipie_probs.shape[1]
    probs_k = hipie_probs.to(device, torch.float32)
    weighted = inter @ probs_k  # (S, C) = Σ_k |M_k ∩ S_i| · P(M_k, ·)
    total = weighted.sum(dim=1, keepdim=True)  # (S, 1)
    has_vote = total[:, 0] > 0
    probs = torch.where(has_vote[:, None], weighted / total.clamp_min(1e-12), 0.0)
    scores, labels = probs.max(dim=1) if num_classes else _empty_max(num_sam, device)
    labels = torch.where(has_vote, labels, torch.full_like(labels, -1))
    scores = torch.where(has_vote, scores, 0.0)

    if covered is None:
        covered = inter.sum(dim=1)
    # The downsampled estimate of `covered` never exceeds the area (c_union <= f² in every cell).
    areas = sam_areas.to(device)
    coverage = torch.where(areas > 0, covered / areas.clamp_min(1.0), 0.0).clamp(0.0, 1.0)
    return VoteResult(probs=probs, labels=labels, scores=scores, coverage=coverage)


# --------------------------------------------------------------------------------------------
# What the vote needs: intersections, coverage by the union of the HIPIE masks, SAM areas
# --------------------------------------------------------------------------------------------


def _dense_vote_areas(
    sam: torch.Tensor, hipie: torch.Tensor, *, max_side: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``inter (S, K)``, ``covered (S,)`` = |S_i ∩ ∪_k M_k|, exact ``areas (S,)``; float32.

    The SAM masks are flattened or pooled once and reused for all three.
    """
    _check_dense(sam, hipie)
    hipie = hipie.to(sam.device)
    factor = _downsample_factor(sam.shape[1:], max_side)
    sam_mat, max_value = _dense_matrix(sam, factor)  # (S, L)
    hipie_mat, _ = _dense_matrix(hipie, factor)  # (K, L)
    if hipie.shape[0]:
        union = _as_uint8(hipie).amax(dim=0, keepdim=True).view(torch.bool)  # (1, H, W)
    else:
        union = torch.zeros(1, *sam.shape[1:], dtype=torch.bool, device=sam.device)
    union_mat, _ = _dense_matrix(union, factor)  # (1, L)
    inter = _scaled_products(sam_mat, hipie_mat, max_value=max_value, factor=factor)
    covered = _scaled_products(sam_mat, union_mat, max_value=max_value, factor=factor)[:, 0]
    # Cell counts sum to the exact area, so the areas are exact on either grid.
    return inter, covered, _dense_areas(sam_mat, max_value=max_value)


def _rle_vote_areas(
    sam: list[dict], hipie: list[dict]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `_dense_vote_areas`, exactly from RLEs (the union is an RLE merge)."""
    inter = torch.from_numpy(_rle_intersections(sam, hipie)).to(torch.float32)
    if hipie:
        union = [mask_utils.merge(hipie, intersect=0)]
        covered = torch.from_numpy(_rle_intersections(sam, union)[:, 0]).to(torch.float32)
    else:
        covered = torch.zeros(len(sam), dtype=torch.float32)
    return inter, covered, mask_areas(sam)


# --------------------------------------------------------------------------------------------
# Dense path
# --------------------------------------------------------------------------------------------


def _dense_intersections(a: torch.Tensor, b: torch.Tensor, *, max_side: int | None) -> torch.Tensor:
    """``(A, B)`` float32 intersections of dense ``(A, H, W)`` and ``(B, H, W)`` bool masks."""
    _check_dense(a, b)
    b = b.to(a.device)
    factor = _downsample_factor(a.shape[1:], max_side)
    a_mat, max_value = _dense_matrix(a, factor)  # (A, L)
    b_mat, _ = _dense_matrix(b, factor)  # (B, L)
    return _scaled_products(a_mat, b_mat, max_value=max_value, factor=factor)


def _check_dense(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"dense masks must be (N, H, W) of one size, got {a.shape}, {b.shape}")


def _downsample_factor(size: Sequence[int], max_side: int | None) -> int:
    """The smallest integer factor f with ceil(longer side / f) <= max_side (1: full res)."""
    longer = max(size)
    if max_side is None or longer <= max_side:
        return 1
    return -(-longer // max_side)


def _dense_matrix(masks: torch.Tensor, factor: int) -> tuple[torch.Tensor, int]:
    """Masks as rows of small counts, and the largest possible count.

    Returns:
        ``(N, H*W)`` bool (a view, factor 1) and 1, or ``(N, h*w)`` cell counts and f².
    """
    if factor == 1:
        return masks.bool().reshape(masks.shape[0], masks.shape[1] * masks.shape[2]), 1
    return _cell_counts(masks, factor), factor * factor


def _scaled_products(
    a_mat: torch.Tensor, b_mat: torch.Tensor, *, max_value: int, factor: int
) -> torch.Tensor:
    """``(A, B)`` float32 intersection areas in full-resolution pixels from count matrices."""
    products = _count_products(a_mat, b_mat, max_value=max_value)  # Σ c_a c_b, exact
    if factor == 1:
        return products.to(torch.float32)
    return (products.to(torch.float64) / (factor * factor)).to(torch.float32)


def _dense_areas(mat: torch.Tensor, *, max_value: int) -> torch.Tensor:
    """``(N,)`` float32 row sums of a count matrix, as a product with a row of ones.

    The int8 product is several times faster on the CPU than a bool/uint8 row reduction.
    """
    ones = torch.ones(1, mat.shape[1], dtype=torch.bool, device=mat.device)  # (1, L)
    return _count_products(mat, ones, max_value=max_value)[:, 0].to(torch.float32)


def _cell_counts(masks: torch.Tensor, factor: int, *, chunk: int = 32) -> torch.Tensor:
    """Per-cell pixel counts of ``(N, H, W)`` bool masks on an ``f x f`` grid.

    The image is zero-padded to a multiple of ``factor``; padded pixels count as outside.

    Returns:
        ``(N, ceil(H/f) * ceil(W/f))`` uint8 counts when f² <= 255, else int16.
    """
    num, height, width = masks.shape
    cells_h, cells_w = -(-height // factor), -(-width // factor)
    pad_h, pad_w = cells_h * factor - height, cells_w * factor - width
    small = factor * factor <= 255
    out_dtype = torch.uint8 if small else torch.int16
    out = torch.empty(num, cells_h * cells_w, dtype=out_dtype, device=masks.device)
    # Chunks over masks keep the temporaries (one padded uint8 copy at most) small.
    for start in range(0, num, chunk):
        part = _as_uint8(masks[start : start + chunk])  # (n, H, W) view of the bool masks
        if pad_h or pad_w:
            part = F.pad(part, (0, pad_w, 0, pad_h))  # (n, f*h, f*w)
        n = part.shape[0]
        # Rows first (contiguous vector adds over the whole data), then the inner axis on 1/f of
        # it; uint8 holds the partial sums (<= f) and the cell counts (<= f² <= 255) exactly.
        rows = part.view(n, cells_h, factor, cells_w * factor).sum(dim=2, dtype=out_dtype)
        cells = rows.view(n, cells_h, cells_w, factor).sum(dim=3, dtype=out_dtype)  # (n, h, w)
        out[start : start + n] = cells.reshape(n, cells_h * cells_w)
    return out


def _count_products(a: torch.Tensor, b: torch.Tensor, *, max_value: int) -> torch.Tensor:
    """Exact ``a @ b.T`` for small non-negative integer matrices, chunked over columns.

    Args:
        a: ``(A, L)`` bool/uint8/int16 values in [0, max_value].
        b: ``(B, L)`` same.
        max_value: the largest value in either matrix.

    Returns:
        ``(A, B)`` int64 on the inputs' device.
    """
    num_a, length = a.shape
    num_b = b.shape[0]
    if num_a == 0 or num_b == 0 or length == 0:
        return torch.zeros(num_a, num_b, dtype=torch.int64, device=a.device)
    if max_value <= _INT8_MAX and _int8_mm_available(a.device):
        try:
            return _count_products_int8(a, b, max_value=max_value)
        except RuntimeError:  # a shape the int8 kernel refuses: fall back for good
            _INT8_MM_OK[a.device.type] = False
    return _count_products_float(a, b, max_value=max_value)


def _count_products_int8(a: torch.Tensor, b: torch.Tensor, *, max_value: int) -> torch.Tensor:
    """`_count_products` as int8 matmuls with int32 accumulation (exact)."""
    num_a, length = a.shape
    num_b = b.shape[0]
    chunk = min(_CHUNK_PIXELS, _INT32_MAX // (max_value * max_value))
    if a.device.type != "cpu":
        # The GPU path copies (pads) each chunk: keep those copies under ~512 MB.
        chunk = min(chunk, max(1 << 16, (1 << 29) // (num_a + num_b)))
    chunk = max(8, chunk // 8 * 8)
    a, b = _as_int8(a), _as_int8(b)  # views, no copies, for bool/uint8 inputs
    out = torch.zeros(num_a, num_b, dtype=torch.int64, device=a.device)
    for start in range(0, length, chunk):
        a_part = a[:, start : start + chunk]  # (A, chunk) strided view
        b_part = b[:, start : start + chunk]  # (B, chunk)
        out += _int8_mm(a_part, b_part).to(torch.int64)
    return out


def _count_products_float(a: torch.Tensor, b: torch.Tensor, *, max_value: int) -> torch.Tensor:
    """`_count_products` as float32 matmuls, exact while each chunk's sums stay below 2^24.

    Only for very coarse grids (f > 16, cell counts above 256) does the floor of 256 columns
    per chunk relax this to float32 accuracy.
    """
    num_a, length = a.shape
    num_b = b.shape[0]
    chunk = min(_CHUNK_PIXELS, (1 << 24) // (max_value * max_value))
    chunk = max(256, min(chunk, (1 << 28) // (4 * (num_a + num_b))))  # ~256 MB of float copies
    out = torch.zeros(num_a, num_b, dtype=torch.int64, device=a.device)
    for start in range(0, length, chunk):
        a_part = a[:, start : start + chunk].to(torch.float32)  # (A, chunk)
        b_part = b[:, start : start + chunk].to(torch.float32)  # (B, chunk)
        out += (a_part @ b_part.T).round().to(torch.int64)
    return out


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret (no copy when contiguous) a bool tensor as uint8."""
    if x.dtype == torch.bool:
        return x.contiguous().view(torch.uint8)
    return x.to(torch.uint8)


def _as_int8(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret (no copy when contiguous) bool/uint8 values <= 127 as int8."""
    if x.dtype in (torch.bool, torch.uint8):
        return x.contiguous().view(torch.int8)
    return x.to(torch.int8)


def _int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(A, L) int8 @ (B, L).T int8 -> (A, B) int32`` with exact integer accumulation.

    CUDA's kernel wants more than 16 rows, multiples of 8 elsewhere and contiguous operands,
    so the chunks are padded with zeros and copied there.
    """
    num_a, length = a.shape
    num_b = b.shape[0]
    if a.device.type == "cuda":
        a, b = a.contiguous(), b.contiguous()
        pad_a = max(24, _round_up(num_a, 8)) - num_a
        pad_b = _round_up(num_b, 8) - num_b
        pad_l = _round_up(length, 8) - length
        if pad_a or pad_l:
            a = F.pad(a, (0, pad_l, 0, pad_a))
        if pad_b or pad_l:
            b = F.pad(b, (0, pad_l, 0, pad_b))
    return torch._int_mm(a, b.T)[:num_a, :num_b]


_INT8_MM_OK: dict[str, bool] = {}


def _int8_mm_available(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs and is exact on this device type (checked once)."""
    key = device.type
    if key not in _INT8_MM_OK:
        try:
            gen = torch.Generator().manual_seed(0)
            a = torch.randint(0, 2, (20, 37), generator=gen, dtype=torch.int8)
            b = torch.randint(0, 2, (9, 37), generator=gen, dtype=torch.int8)
            got = _int8_mm(a.to(device), b.to(device)).cpu().to(torch.int64)
            _INT8_MM_OK[key] = bool(torch.equal(got, a.long() @ b.long().T))
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT8_MM_OK[key] = False
    return _INT8_MM_OK[key]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _empty_max(num: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``max(dim=1)`` of an ``(num, 0)`` tensor, which torch refuses."""
    return (
        torch.zeros(num, dtype=torch.float32, device=device),
        torch.full((num,), -1, dtype=torch.long, device=device),
    )


# --------------------------------------------------------------------------------------------
# RLE path
# --------------------------------------------------------------------------------------------


def _as_rles(masks: MaskSet) -> list[dict]:
    """COCO RLEs that pycocotools accepts (compressed counts), encoding dense masks if given."""
    if isinstance(masks, torch.Tensor):
        if masks.shape[0] == 0:
            return []
        encoded = rle_torch.encode(masks.detach().bool())  # no column-major copy
        return [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in encoded.rles]
    return [rle_utils.to_coco(rle) for rle in masks]


def _rle_intersections(a: list[dict], b: list[dict]) -> np.ndarray:
    """``(A, B)`` int64 exact intersections from RLE IoUs and areas (no dense decoding)."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.int64)
    sizes = {tuple(r["size"]) for r in a} | {tuple(r["size"]) for r in b}
    if len(sizes) != 1:
        raise ValueError(f"RLE masks of different image sizes: {sorted(sizes)}")
    iou = np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))
    area_a = _rle_areas(a).astype(np.float64)[:, None]  # (A, 1)
    area_b = _rle_areas(b).astype(np.float64)[None, :]  # (1, B)
    # iou = i / (|a| + |b| - i)  =>  i = iou (|a| + |b|) / (1 + iou); i is an integer, and the
    # double-precision error is far below 0.5 for any image size that fits in memory.
    inter = np.rint(iou * (area_a + area_b) / (1.0 + iou)).astype(np.int64)
    return np.minimum(inter, np.minimum(area_a, area_b).astype(np.int64))


def _rle_areas(rles: list[dict]) -> np.ndarray:
    """``(N,)`` int64 RLE areas.

    pycocotools' ``area`` builds an array from the list length as uint8, which numpy 2 refuses
    for more than 255 masks, so the list goes in chunks.
    """
    if not rles:
        return np.zeros(0, dtype=np.int64)
    chunks = [mask_utils.area(rles[i : i + 128]) for i in range(0, len(rles), 128)]
    return np.concatenate(chunks).astype(np.int64)
