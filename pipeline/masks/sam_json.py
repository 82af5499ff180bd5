"""SA-1B mask json (the class-agnostic masks a source ships beside an image) decoded into
validated COCO RLEs (``SamMask`` records), and SAM masks packed for the trip from the decode task
to the labeler.

``decode_sam_json`` is pure (bytes in, values out), so it runs in Ray tasks as it is. It raises
``MaskDecodeError``, with a human-readable reason that the labeler writes into an ``error`` row,
for invalid json, a json of another image size, and malformed RLEs. The RLE counts are checked
without decoding masks to dense arrays: the compressed counts string is parsed into its runs with
numpy, for all masks of an image at once, and the runs must cover exactly ``height * width``
pixels. (A malformed counts string passed to pycocotools' dense decoder would write past its
buffer.)

EXIF orientation: masks are expected in the orientation ``pipeline.sources.decode.decode_image``
gives (EXIF applied). SA-1B images carry no EXIF orientation, so their masks match the decoded
image; a mask json made for the raw (unrotated) raster of an EXIF-rotated photo has its height
and width swapped and is refused with a reason that says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from schemas import rle as rle_utils


class MaskDecodeError(ValueError):
    """The mask json is unusable for its image; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class SamMask:
    """One class-agnostic mask of an SA-1B json (or any COCO-style annotation list)."""

    rle: dict  # COCO RLE {"size": [h, w], "counts": str}, validated against the image size
    bbox: tuple[float, float, float, float]  # XYWH in pixels
    area: int  # number of mask pixels, counted from the RLE
    predicted_iou: float | None  # SAM's predicted IoU, when the json has it
    stability_score: float | None  # SAM's stability score, when the json has it


# ---------------------------------------------------------------------------------------------
# SA-1B mask json


def decode_sam_json(
    data: bytes | str | Mapping[str, Any], width: int, height: int
) -> list[SamMask]:
    """Parse and validate an SA-1B style mask json for an image of ``width`` x ``height``.

    Args:
        data: the json (bytes, text or already parsed): ``{"image": {"image_id", "width",
            "height", "file_name"}, "annotations": [{"segmentation": RLE, "bbox", "area",
            "predicted_iou", "stability_score", ...}]}``; ``image`` is optional, and a
            segmentation may also be an uncompressed RLE (counts as a list) or COCO polygons.
        width, height: the decoded image's size (after EXIF orientation).
    Returns:
        One SamMask per annotation, in json order. ``area`` is counted from the RLE; ``bbox`` is
        the json's when it has a valid one, else computed from the RLE.
    Raises:
        MaskDecodeError: invalid json, another image's size, or a malformed segmentation (the
            reason names the annotation index).
    """
    doc = _parse_json(data)
    image = doc.get("image")
    if image is not None:
        if not isinstance(image, Mapping):
            raise MaskDecodeError(f"'image' must be an object, got {type(image).__name__}")
        json_w, json_h = image.get("width"), image.get("height")
        if (json_w, json_h) != (None, None) and (json_w, json_h) != (width, height):
            raise MaskDecodeError(
                f"mask json is for a {json_w}x{json_h} image but the image is {width}x{height}"
                + _transposed_hint(json_h, json_w, height, width)
            )
    annotations = doc.get("annotations")
    if not isinstance(annotations, list):
        raise MaskDecodeError("mask json has no 'annotations' list")
    rles = [_segmentation_rle(i, a, width, height) for i, a in enumerate(annotations)]
    areas = _validate_counts([r["counts"] for r in rles], width * height)
    boxes: list[tuple[float, float, float, float] | None] = [
        _given_bbox(a, width, height) for a in annotations
    ]
    missing = [i for i, b in enumerate(boxes) if b is None]
    if missing:
        computed = mask_utils.toBbox([rle_utils.to_coco(rles[i]) for i in missing])
        for i, box in zip(missing, computed):
            boxes[i] = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
    return [
        SamMask(
            rle=rle,
            bbox=box,
            area=int(area),
            predicted_iou=_optional_float(a, "predicted_iou", i),
            stability_score=_optional_float(a, "stability_score", i),
        )
        for i, (a, rle, box, area) in enumerate(zip(annotations, rles, boxes, areas))
    ]


def _parse_json(data: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    if data is None or len(data) == 0:
        raise MaskDecodeError("empty mask json")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaskDecodeError(f"invalid mask json: {e}") from None
    if not isinstance(doc, Mapping):
        raise MaskDecodeError(f"mask json must be an object, got {type(doc).__name__}")
    return doc


def _transposed_hint(h: object, w: object, height: int, width: int) -> str:
    if (h, w) == (width, height) and height != width:
        return " (height and width swapped: was it made before applying EXIF orientation?)"
    return ""


def _segmentation_rle(i: int, ann: object, width: int, height: int) -> dict:
    """The annotation's segmentation as a compressed RLE with text counts (size checked)."""
    if not isinstance(ann, Mapping):
        raise MaskDecodeError(f"annotation {i}: expected an object, got {type(ann).__name__}")
    seg = ann.get("segmentation")
    if isinstance(seg, list):  # COCO polygons: [[x0, y0, x1, y1, ...], ...]
        if not seg or not all(
            isinstance(p, list)
            and len(p) >= 6
            and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and np.isfinite(v) for v in p)
            for p in seg
        ):
            raise MaskDecodeError(f"annotation {i}: malformed polygon segmentation")
        return rle_utils.from_segmentation(seg, height, width)
    if not isinstance(seg, Mapping) or "size" not in seg or "counts" not in seg:
        raise MaskDecodeError(f"annotation {i}: segmentation is not a COCO RLE or polygon list")
    size = seg["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
    ):
        raise MaskDecodeError(f"annotation {i}: invalid RLE size {size!r}")
    h, w = size
    if (h, w) != (height, width):
        raise MaskDecodeError(
            f"annotation {i}: mask size {h}x{w} (h x w) does not match the image size "
            f"{height}x{width}" + _transposed_hint(h, w, height, width)
        )
    counts = seg["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise MaskDecodeError(f"annotation {i}: uncompressed RLE counts must be ints >= 0")
        if sum(counts) != h * w:
            raise MaskDecodeError(
                f"annotation {i}: RLE runs cover {sum(counts)} pixels, the image has {h * w}"
            )
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        return {"size": [h, w], "counts": compressed["counts"].decode("ascii")}
    if isinstance(counts, bytes):
        try:
            counts = counts.decode("ascii")
        except UnicodeDecodeError:
            raise MaskDecodeError(f"annotation {i}: RLE counts are not ASCII") from None
    if not isinstance(counts, str):
        raise MaskDecodeError(f"annotation {i}: RLE counts must be a string or a list")
    return {"size": [h, w], "counts": counts}


def _validate_counts(counts: list[str], n_pixels: int) -> np.ndarray:
    """Check compressed RLE counts strings and return each mask's area, shape (N,) int64.

    All strings are parsed together. COCO's compressed format: each run length is written in
    5-bit groups, least significant first, as characters ``48 + group`` with bit 0x20 meaning
    "more groups follow" and bit 0x10 of the last group the sign; from the fourth run on, the
    value stored is the difference to the run two places before. Runs must be >= 0 and add up
    to the image's pixel count; the area is the sum of the odd-indexed (foreground) runs.
    """
    n = len(counts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.array([len(c) for c in counts], dtype=np.int64)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise MaskDecodeError(f"annotation {int(empty[0])}: empty RLE counts")
    try:
        chars = np.frombuffer("".join(counts).encode("ascii"), dtype=np.uint8).astype(np.int64)
    except UnicodeEncodeError:
        bad = next(i for i, c in enumerate(counts) if not c.isascii())
        raise MaskDecodeError(f"annotation {bad}: RLE counts are not ASCII") from None
    mask_of_char = np.repeat(np.arange(n), lengths)  # (L,)
    out_of_range = (chars < 48) | (chars > 48 + 63)
    if out_of_range.any():
        bad = int(mask_of_char[np.argmax(out_of_range)])
        raise MaskDecodeError(f"annotation {bad}: invalid character in RLE counts")
    groups = chars - 48
    more = (groups & 0x20) != 0  # (L,)
    mask_end = np.cumsum(lengths) - 1  # (N,) index of each string's last character
    if more[mask_end].any():
        bad = int(np.argmax(more[mask_end]))
        raise MaskDecodeError(f"annotation {bad}: RLE counts end inside a number (truncated)")
    # Split characters into numbers: a number ends at a character without the 0x20 bit.
    ends = np.flatnonzero(~more)  # (R,) last character of each number
    starts = np.concatenate([[0], ends[:-1] + 1])  # (R,)
    n_groups = ends - starts + 1  # (R,)
    if n_groups.max() > 7:  # 35 bits: far beyond any real image, and safe in int64
        bad = int(mask_of_char[starts[np.argmax(n_groups > 7)]])
        raise MaskDecodeError(f"annotation {bad}: RLE run length out of range")
    number_of_char = np.repeat(np.arange(len(ends)), n_groups)  # (L,)
    shift = 5 * (np.arange(len(chars)) - starts[number_of_char])  # (L,)
    values = np.add.reduceat((groups & 0x1F) << shift, starts)  # (R,)
    negative = (groups[ends] & 0x10) != 0
    values = values - (negative.astype(np.int64) << (5 * n_groups))
    # Undo the delta coding per mask: run m (m >= 3) stores run[m] - run[m - 2].
    mask_of_run = mask_of_char[starts]  # (R,)
    first_run = np.searchsorted(mask_of_run, np.arange(n))  # (N,)
    index = np.arange(len(values)) - first_run[mask_of_run]  # (R,) run index within its mask
    # Cumulative sums over the odd runs and over the even runs from index 2, restarted per mask.
    odd = index % 2 == 1
    chains = np.cumsum(
        np.stack([np.where(odd, values, 0), np.where(odd | (index == 0), 0, values)]), axis=1
    )
    before = np.where(first_run > 0, chains[:, first_run - 1], 0)  # (2, N) sums of earlier masks
    chains -= before[:, mask_of_run]
    runs = np.where(index == 0, values, np.where(odd, chains[0], chains[1]))  # (R,)
    if (runs < 0).any():
        bad = int(mask_of_run[np.argmax(runs < 0)])
        raise MaskDecodeError(f"annotation {bad}: negative run length in RLE counts")
    totals = np.add.reduceat(runs, first_run)  # (N,)
    wrong = np.flatnonzero(totals != n_pixels)
    if wrong.size:
        bad = int(wrong[0])
        raise MaskDecodeError(
            f"annotation {bad}: RLE runs cover {int(totals[bad])} pixels, the image has {n_pixels}"
        )
    return np.add.reduceat(np.where(odd, runs, 0), first_run)


def _given_bbox(ann: Mapping[str, Any], width: int, height: int):
    box = ann.get("bbox")
    if (
        isinstance(box, Sequence)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        x, y, w, h = (float(v) for v in box)
        if (
            np.isfinite([x, y, w, h]).all()
            and x >= 0
            and y >= 0
            and w >= 0
            and h >= 0
            and x + w <= width + 1e-3
            and y + h <= height + 1e-3
        ):
            return (x, y, w, h)
    return None


def _optional_float(ann: Mapping[str, Any], key: str, i: int) -> float | None:
    value = ann.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MaskDecodeError(f"annotation {i}: {key} must be a number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# SAM masks between the decode task and the labeler

_SAM_META_COLUMNS = 7  # x, y, w, h, area, predicted_iou, stability_score


def pack_sam_masks(masks: Sequence[SamMask]) -> tuple[str, bytes]:
    """SAM masks as (their RLE counts strings, one per line; the bytes of an (N, 7) float64
    array of box, area, predicted IoU and stability score, NaN for a missing score)."""
    counts = "\n".join(m.rle["counts"] for m in masks)
    meta = np.array(
        [[*m.bbox, m.area, _nan(m.predicted_iou), _nan(m.stability_score)] for m in masks],
        dtype=np.float64,
    ).reshape(len(masks), _SAM_META_COLUMNS)
    return counts, meta.tobytes()


def unpack_sam_masks(counts: str, meta: bytes, height: int, width: int) -> list[dict] | None:
    """`pack_sam_masks`' output back as records (``rle``, ``bbox``, ``area``, ``predicted_iou``,
    ``stability_score``) of an image of ``height`` x ``width``; None when there are none."""
    if not counts:
        return None
    lines = str(counts).split("\n")
    # A fixed-width numpy bytes array (as a batch may hold them) drops trailing zero bytes.
    meta = bytes(meta).ljust(len(lines) * _SAM_META_COLUMNS * 8, b"\0")
    values = np.frombuffer(meta, dtype=np.float64).reshape(-1, _SAM_META_COLUMNS).tolist()
    if len(lines) != len(values):
        raise ValueError(f"{len(lines)} SAM RLEs but {len(values)} rows of SAM mask values")
    size = [int(height), int(width)]
    return [
        {
            "rle": {"size": size, "counts": c},
            "bbox": v[:4],
            "area": int(v[4]),
            "predicted_iou": None if v[5] != v[5] else v[5],
            "stability_score": None if v[6] != v[6] else v[6],
        }
        for c, v in zip(lines, values)
    ]


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
