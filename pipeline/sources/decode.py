"""Decoding of untrusted bytes: images to RGB arrays, SA-1B mask json to validated COCO RLEs.

Both functions are pure (bytes in, values out), so they run in Ray tasks as they are. Every
failure is one exception type with a human-readable reason, which the labeler turns into an
``error`` row:

- ``decode_image`` raises ``ImageDecodeError`` for empty, non-image, corrupt or truncated data
  and for images whose declared size exceeds ``max_pixels`` (checked from the header, before any
  pixel is decoded, so a decompression bomb never allocates its pixels).
- ``decode_sam_json`` raises ``MaskDecodeError`` for invalid json, a json of another image size,
  and malformed RLEs. The RLE counts are checked without decoding masks to dense arrays: the
  compressed counts string is parsed into its runs with numpy, for all masks of an image at
  once, and the runs must cover exactly ``height * width`` pixels. (A malformed counts string
  passed to pycocotools' dense decoder would write past its buffer.)

EXIF orientation: ``decode_image`` applies it, so pixels are as a viewer shows them, and masks
are expected in that orientation. SA-1B images carry no EXIF orientation, so their masks match
the decoded image; a mask json made for the raw (unrotated) raster of an EXIF-rotated photo has
its height and width swapped and is refused with a reason that says so.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps
from pycocotools import mask as mask_utils

from schemas import rle as rle_utils

# Refuse images with more pixels than this (width * height as declared in the header). PIL's own
# limit (Image.MAX_IMAGE_PIXELS, ~89.5 M) applies as well: its warning is raised as an error here,
# so the effective limit is the smaller of the two. SA-1B images are ~3.4 M pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# Formats accepted (those whose PIL plugin is available); others (EPS, which would run
# Ghostscript; PDF; ...) are refused.
Image.init()  # registers every plugin, so that Image.open(formats=...) knows the names
FORMATS = tuple(
    f for f in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF") if f in Image.OPEN
)
# Background that transparent pixels are composited onto (RGB).
ALPHA_BACKGROUND = (255, 255, 255)
_SRGB = ImageCms.createProfile("sRGB")


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
# Images


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file's bytes to RGB at its full size (see `decode_image_for_model`)."""
    return decode_image_for_model(data, max_pixels=max_pixels)[0]


def model_input_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """The size an image is resized to when its longer side exceeds ``max_side`` (the model's
    test size), rounded as `hipie.HipiePredictor` does; its own size otherwise."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_to_model(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 resized (bilinear, antialiased) so that its longer side is at most
    ``max_side``; the array itself when it already is."""
    return _resize(rgb, model_input_size(rgb.shape[0], rgb.shape[1], max_side))


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == tuple(size):
        return rgb
    resized = Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def decode_image_for_model(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file's bytes to RGB, at most ``max_side`` pixels on its longer side.

    The labeler's model runs at its test size: resizing here, in the decode task, keeps
    full-resolution arrays off the wire. JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or
    1/8, never below the target size) and then resized, which is several times faster than a full
    decode.

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, TIFF, GIF; first frame of multi-frame ones).
        max_pixels: refuse images whose declared width * height exceeds this.
        max_side: resize so that the longer side is at most this (None: full size).
    Returns:
        ``(rgb, (height, width))``: (h, w, 3) uint8 RGB and the image's own size (after EXIF
        orientation), which the labels refer to.

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, TIFF, GIF; first frame of multi-frame ones).
        max_pixels: refuse images whose declared width * height exceeds this.
    Returns:
        (H, W, 3) uint8 RGB, EXIF orientation applied. Grayscale is replicated to 3 channels;
        alpha (RGBA, LA, palette transparency) is composited onto ``ALPHA_BACKGROUND``; CMYK is
        converted through its embedded ICC profile when it has one (else PIL's naive formula);
        16-bit samples are scaled to 8 bits (round(v / 257)), 32-bit integer ones clipped to
        [0, 65535] first, float ones taken as [0, 1] when their maximum is <= 1 (else [0, 255]).
    Raises:
        ImageDecodeError: with the reason (empty, not an image, too large, truncated, corrupt).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # PIL warns between MAX_IMAGE_PIXELS and twice that, and raises above: refuse both.
        # Other warnings of corrupt files (EXIF, TIFF tags) are silenced: errors carry the reason.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(f"decompression bomb refused: {e}") from None
        except Image.UnidentifiedImageError:
            raise ImageDecodeError(
                f"not an image in a supported format ({', '.join(FORMATS)}); "
                f"file starts with {bytes(data[:8])!r}"
            ) from None
        except Exception as e:  # corrupt headers raise many types (SyntaxError, struct.error...)
            raise ImageDecodeError(_failure_reason("image header", e)) from None
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"image too large: {width}x{height} = {width * height} pixels exceeds "
                f"max_pixels={max_pixels} (possible decompression bomb)"
            )
        if max_side is not None and max(width, height) > max_side and im.format in ("JPEG", "MPO"):
            scale = max_side / max(width, height)
            im.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))
        try:
            im.load()
        except Exception as e:
            raise ImageDecodeError(_failure_reason(f"{im.format} data", e)) from None
        drafted, drafted_swaps = None, False
        if im.size != (width, height):
            drafted, drafted_swaps = im.size, _swaps_sides(im)
        im = _apply_orientation(im)
        if drafted is not None:  # the full size, turned as the pixels were
            turned = im.size != drafted or (drafted[0] == drafted[1] and drafted_swaps)
            width, height = (height, width) if turned else (width, height)
        else:
            width, height = im.size
        try:
            rgb = _to_rgb(im)
        except Exception as e:
            raise ImageDecodeError(f"cannot convert {im.mode} image to RGB: {e}") from None
    if rgb.shape != (im.height, im.width, 3) or rgb.dtype != np.uint8:
        raise ImageDecodeError(f"unexpected decoded shape {rgb.shape} {rgb.dtype}")
    return _resize(rgb, model_input_size(height, width, max_side)), (height, width)


def array_for_model(
    pixels, *, max_pixels: int, max_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """An already decoded image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as (h, w, 3) uint8 RGB
    resized for the model like ``decode_image_for_model``, and its own (height, width).
    An alpha channel is dropped; values of other dtypes are clipped to 0..255."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(f"not an image array: shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    if h * w > max_pixels:
        raise ImageDecodeError(f"{w}x{h} pixels, more than max_pixels={max_pixels}")
    if h == 0 or w == 0:
        raise ImageDecodeError("empty image array")
    return resize_to_model(np.ascontiguousarray(arr), max_side), (h, w)


def _failure_reason(what: str, e: Exception) -> str:
    text = str(e)
    if "truncat" in text.lower() or isinstance(e, EOFError) or "end of" in text.lower():
        return f"truncated {what}: {text}"
    return f"corrupt {what}: {type(e).__name__}: {text}"


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; an unreadable EXIF block is ignored."""
    try:
        rotated = ImageOps.exif_transpose(im)
    except Exception:  # a corrupt EXIF block: viewers cannot rotate it either
        return im
    return rotated if rotated is not None else im


def _swaps_sides(im: Image.Image) -> bool:
    """Whether the image's EXIF orientation (read before it is applied) swaps width and height."""
    try:
        return im.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # a corrupt EXIF block is not applied either
        return False


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any PIL mode to (H, W, 3) uint8 RGB (see ``decode_image`` for the rules)."""
    mode = im.mode
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.int32)
        alpha = rgba[:, :, 3:4]
        background = np.asarray(ALPHA_BACKGROUND, dtype=np.int32)
        out = (rgba[:, :, :3] * alpha + background * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.int64)
        values = np.clip(values, 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, source, _SRGB, outputMode="RGB")
        except Exception:  # a broken profile: fall back to the naive conversion
            pass
    return im.convert("RGB")  # PIL: R = (255 - C) * (255 - K) / 255, likewise G, B


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
