"""Decoding untrusted image bytes: image modes, EXIF, bombs, corrupt data, sizes for the model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.decode import (
    ImageDecodeError,
    decode_image,
    decode_image_for_model,
    model_input_size,
)
from tests.pipeline.badinputs import (
    encode,
    exif_rotated_jpeg,
    gradient_rgb,
    png16_rgb,
    png_header_only,
)

RGB = gradient_rgb(24, 32)


# ---------------------------------------------------------------------------------------------
# Images: modes


@pytest.mark.parametrize(
    ("fmt", "params"), [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})]
)
def test_lossless_rgb_roundtrip(fmt, params):
    out = decode_image(encode(RGB, fmt, **params))
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, RGB)


def test_jpeg_close_to_original():
    out = decode_image(encode(RGB, "JPEG", quality=95))
    assert out.shape == (24, 32, 3)
    assert np.abs(out.astype(int) - RGB).mean() < 4


def test_grayscale_and_bilevel_replicated():
    gray = RGB[:, :, 0]
    out = decode_image(encode(gray, "PNG"))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    bits = np.zeros((4, 8), bool)
    bits[:, :3] = True
    out = decode_image(encode(Image.fromarray(bits), "PNG"))  # mode "1"
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 5].tolist() == [0, 0, 0]


def test_16bit_grayscale_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 300, 128, 129]], np.uint16)
    image = Image.fromarray(values)
    data = encode(image, "PNG")
    assert Image.open(__import__("io").BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    # round(v / 257): PIL's own convert("RGB") would clip 300 to 255 instead.
    assert out[0, :, 0].tolist() == [0, 100, 255, 1, 0, 1]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_rgb_png():
    values = RGB.astype(np.uint16) * 257
    out = decode_image(png16_rgb(values))
    np.testing.assert_array_equal(out, RGB)


def test_rgba_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 0)  # fully transparent: white
    rgba[0, 1] = (200, 100, 50, 255)  # opaque: itself
    rgba[0, 2] = (200, 100, 50, 128)  # half: (c * 128 + 255 * 127 + 127) // 255
    out = decode_image(encode(rgba, "PNG"))
    assert out[0].tolist() == [[255, 255, 255], [200, 100, 50], [227, 177, 152]]


def test_transparent_color_key_in_rgb_and_gray_png():
    rgb = np.array([[[10, 20, 30], [1, 2, 3]]], np.uint8)
    out = decode_image(encode(rgb, "PNG", transparency=(10, 20, 30)))
    assert out[0].tolist() == [[255, 255, 255], [1, 2, 3]]
    gray = np.array([[7, 9]], np.uint8)
    out = decode_image(encode(gray, "PNG", transparency=7))
    assert out[0].tolist() == [[255, 255, 255], [9, 9, 9]]


def test_32bit_integer_and_float_tiff():
    ints = Image.fromarray(np.array([[0, 257 * 3, 70000, -5]], np.int32), mode="I")
    assert decode_image(encode(ints, "TIFF"))[0, :, 0].tolist() == [0, 3, 255, 0]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert decode_image(encode(unit, "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0.0, 100.4, 300.0]], np.float32), mode="F")
    assert decode_image(encode(wide, "TIFF"))[0, :, 0].tolist() == [0, 100, 255]


def test_palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    out = decode_image(encode(image, "PNG", transparency=1))
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255]]
    out = decode_image(encode(image, "PNG"))  # no transparency: plain palette lookup
    assert out[0].tolist() == [[255, 0, 0], [0, 255, 0]]


def test_cmyk():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # red
    cmyk.putpixel((1, 0), (0, 0, 0, 0))  # white
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # black
    cmyk.putpixel((0, 1), (100, 0, 0, 50))  # R = (255 - C) * (255 - K) / 255, rounded
    out = decode_image(encode(cmyk, "TIFF"))  # lossless
    assert out[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 0]]
    assert out[1, 0].tolist() == [125, 205, 205]
    jpeg = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert np.abs(jpeg.astype(int) - [255, 0, 0]).max() < 8


def test_exif_orientation_applied():
    out = decode_image(exif_rotated_jpeg(10, 20, orientation=6))
    assert out.shape == (20, 10, 3)  # rotated 90 degrees
    top, bottom = out[:8].reshape(-1, 3).mean(0), out[12:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    out = decode_image(exif_rotated_jpeg(10, 20, orientation=8))  # 90 degrees the other way
    assert out.shape == (20, 10, 3)
    assert out[12:].reshape(-1, 3).mean(0)[0] > 200  # red at the bottom
    plain = decode_image(exif_rotated_jpeg(10, 20, orientation=1))
    assert plain.shape == (10, 20, 3)


# ---------------------------------------------------------------------------------------------
# Images: refused


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am text\n", "not an image in a supported format"),
        (bytes(range(256)) * 3, "not an image in a supported format"),
        (encode(gradient_rgb(64, 64), "JPEG")[:700], "truncated jpeg data"),
        (encode(gradient_rgb(64, 64), "PNG")[:3000], "truncated png data"),
        (b"\xff\xd8\xff\xe0 not really a jpeg", "image header"),
        # EPS would run Ghostscript: the format is not accepted at all.
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    ],
)
def test_bad_data_raises_with_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert reason in info.value.reason.lower()
    assert info.value.reason == str(info.value)


def test_max_pixels_checked_from_the_header():
    data = png_header_only(2000, 1000)  # no pixel data at all: refused before decoding
    with pytest.raises(ImageDecodeError, match=r"2000x1000 = 2000000 pixels exceeds max_pixels"):
        decode_image(data, max_pixels=1_000_000)
    small = encode(RGB, "PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(small, max_pixels=24 * 32 - 1)
    assert decode_image(small, max_pixels=24 * 32).shape == (24, 32, 3)


def test_pil_bomb_warning_and_error_become_errors():
    limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    # Between PIL's limit and twice it PIL only warns: refused anyway.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_header_only(10_000, 10_000), max_pixels=10**12)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_header_only(40_000, 40_000), max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == limit  # no global state changed
    assert list(warnings.filters) == filters


# ---------------------------------------------------------------------------------------------
# Images resized for the model in the decode task


def _photo(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_for_model_resizes_and_keeps_the_images_size(fmt):
    pixels = _photo(1500, 2250)
    data = encode(pixels, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    small, size = decode_image_for_model(data, max_side=320)
    assert size == (1500, 2250)
    assert small.shape == (213, 320, 3) and small.dtype == np.uint8
    expected = np.asarray(Image.fromarray(pixels).resize((320, 213), Image.BILINEAR), np.int32)
    assert np.abs(small.astype(np.int32) - expected).mean() < 2.0  # DCT-scaled for JPEG
    full, size = decode_image_for_model(data, max_side=4000)  # already small enough
    assert size == (1500, 2250) and full.shape == (1500, 2250, 3)
    assert model_input_size(1500, 2250, 320) == (213, 320)
    assert model_input_size(100, 50, 320) == (100, 50)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_decode_for_model_turns_the_size_with_exif_orientation(orientation):
    data = exif_rotated_jpeg(400, 800, orientation=orientation)
    full = decode_image(data)
    small, size = decode_image_for_model(data, max_side=100)
    assert size == full.shape[:2]
    assert small.shape[:2] == model_input_size(*size, 100)
    red_first = small[: small.shape[0] // 4, : small.shape[1] // 4].reshape(-1, 3).mean(0)
    red_full = full[: full.shape[0] // 4, : full.shape[1] // 4].reshape(-1, 3).mean(0)
    assert np.abs(red_first - red_full).max() < 20  # same content, same orientation
