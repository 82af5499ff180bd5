"""Decoding of untrusted image bytes to RGB arrays, in the decode tasks of the labeling job.

The functions are pure (bytes in, values out), so they run in Ray tasks as they are. Every failure
is one exception type with a human-readable reason, which the labeler turns into an ``error`` row:
``decode_image`` raises ``ImageDecodeError`` for empty, non-image, corrupt or truncated data and
for images whose declared size exceeds ``max_pixels`` (checked from the header, before any pixel
is decoded, so a decompression bomb never allocates its pixels). The SA-1B mask json that comes
with an image is decoded by ``pipeline.masks.sam_json``.

EXIF orientation: ``decode_image`` applies it, so pixels are as a viewer shows them, and masks
are expected in that orientation.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps

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
