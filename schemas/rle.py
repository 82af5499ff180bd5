"""COCO run-length encoding helpers built on pycocotools.

Masks are numpy arrays of shape (H, W) (bool or uint8); RLEs are dicts
``{"size": [h, w], "counts": str}`` with pycocotools' compressed counts decoded to text, so they
are JSON and Arrow friendly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def to_coco(rle: dict) -> dict:
    """``rle`` in the form pycocotools expects: compressed counts as bytes (text counts are
    encoded, uncompressed list counts compressed)."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as in iscrowd COCO annotations
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def from_segmentation(segmentation, height: int, width: int) -> dict:
    """A COCO annotation's segmentation (polygon list, uncompressed or compressed RLE) as our
    RLE with text counts."""
    if isinstance(segmentation, list):  # polygons: one RLE per polygon, merged
        polygons = mask_utils.frPyObjects(segmentation, height, width)
        return _from_coco(mask_utils.merge(polygons))
    return _from_coco(to_coco(segmentation))


def _from_coco(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode(mask: np.ndarray) -> dict:
    """Encode one mask.

    Args:
        mask: (H, W) array, nonzero = inside.
    Returns:
        COCO RLE with text counts.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    fortran = np.asfortranarray(mask.astype(np.uint8, copy=False))
    return _from_coco(mask_utils.encode(fortran))


def encode_many(masks: np.ndarray) -> list[dict]:
    """Encode a stack of masks of shape (N, H, W) in one pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.astype(np.uint8, copy=False).transpose(1, 2, 0))
    return [_from_coco(r) for r in mask_utils.encode(fortran)]


def decode(rle: dict) -> np.ndarray:
    """Decode one RLE to a (H, W) bool array."""
    return mask_utils.decode(to_coco(rle)).astype(bool)


def area(rle: dict) -> int:
    """Number of pixels inside the mask, computed on the RLE."""
    return int(mask_utils.area(to_coco(rle)))


def bbox(rle: dict) -> list[float]:
    """Tight box [x, y, w, h] of the mask in pixels ([0, 0, 0, 0] for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(to_coco(rle))]


def iou_matrix(a: Sequence[dict], b: Sequence[dict]) -> np.ndarray:
    """Pairwise IoU (A, B) computed on the RLEs without decoding them."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    ca = [to_coco(r) for r in a]
    cb = [to_coco(r) for r in b]
    return np.asarray(mask_utils.iou(ca, cb, [0] * len(cb)), dtype=np.float64).reshape(
        len(a), len(b)
    )


def run_lengths(rle: dict) -> list[int]:
    """The run lengths of a compressed RLE (alternating background/foreground, background first).

    Parses pycocotools' text format: 5 bits per character offset by 48, bit 0x20 continues a value,
    bit 0x10 of the last character is the sign, and from the third value on each value is stored as
    a difference to the value two places before it.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return [int(v) for v in counts]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("RLE counts end in the middle of a value")
            c = ord(counts[pos]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"invalid character {counts[pos]!r} in RLE counts")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check(rle: dict, height: int, width: int) -> str | None:
    """Why ``rle`` is not a valid mask of an image of (height, width), or None when it is."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return "RLE must be a dict with 'size' and 'counts'"
    try:
        size = [int(v) for v in rle["size"]]
    except (TypeError, ValueError):
        return f"RLE size {rle['size']!r} is not two integers"
    if size != [int(height), int(width)]:
        return f"RLE size {size} differs from the image size [{height}, {width}]"
    try:
        runs = run_lengths(rle)
    except (ValueError, TypeError, AttributeError) as exc:
        return f"RLE counts cannot be parsed: {exc}"
    if any(r < 0 for r in runs):
        return "RLE counts hold a negative run length"
    if sum(runs) != height * width:
        return f"RLE counts cover {sum(runs)} pixels, the image has {height * width}"
    return None


def strings_from_counts(counts: np.ndarray, bounds: np.ndarray) -> list[str]:
    """Compressed COCO counts strings of many masks at once (pycocotools' format, see
    `run_lengths`), from the run lengths ``counts[bounds[i]:bounds[i + 1]]`` of mask ``i``.

    Vectorised over all values: each value (from the fourth on, minus the value two before it)
    is cut into 5-bit groups, as few as keep its sign, least significant first.
    """
    counts = np.asarray(counts, dtype=np.int64)
    bounds = np.asarray(bounds, dtype=np.int64)
    n = len(bounds) - 1
    if counts.size == 0:
        return [""] * n
    index = np.arange(counts.size) - np.repeat(bounds[:-1], np.diff(bounds))
    values = counts.copy()
    delta = index > 2
    values[delta] -= counts[np.flatnonzero(delta) - 2]
    # Groups per value: enough 5-bit groups for the value's bits and its sign bit.
    magnitude = np.where(values < 0, ~values, values)
    bits = np.zeros(values.shape, dtype=np.int64)
    nonzero = magnitude > 0
    bits[nonzero] = np.floor(np.log2(magnitude[nonzero].astype(np.float64))).astype(np.int64) + 1
    # float64 rounding can only matter near powers of two beyond 2^52: check the bit length
    bits += (magnitude >> np.minimum(bits, 63)) > 0
    per_value = (bits + 1 + 4) // 5  # ceil((bits + sign) / 5)
    value_of_char = np.repeat(np.arange(values.size), per_value)
    digit = np.arange(value_of_char.size) - np.repeat(np.cumsum(per_value) - per_value, per_value)
    groups = (values[value_of_char] >> (5 * digit)) & 0x1F
    groups |= np.where(digit < per_value[value_of_char] - 1, 0x20, 0)
    chars = (groups + 48).astype(np.uint8).tobytes()
    char_bounds = np.concatenate([[0], np.cumsum(per_value)])[bounds]
    text = chars.decode("ascii")
    return [text[char_bounds[i] : char_bounds[i + 1]] for i in range(n)]
