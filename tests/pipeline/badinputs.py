"""Builders of real bad (and awkward but valid) input files, and a whole bad-input corpus.

Everything is generated with numpy, PIL, pycocotools and tarfile into a folder the caller gives
(``tmp_path``); nothing is downloaded or mocked. ``build_bad_corpus`` writes an image folder, an
SA-1B-style tar with bad members and a truncated tar, and returns, for every record the sources
must yield, the expected outcome: tests of the sources, the decoder and the Ray labeler check
row counts, ids and statuses against it.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# ---------------------------------------------------------------------------------------------
# Single files


def gradient_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth (H, W, 3) uint8 test picture with some noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], 2)
    noise = rng.integers(0, 16, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str, **params) -> bytes:
    """Encode with PIL into ``fmt`` (JPEG, PNG, WEBP, BMP, TIFF)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def exif_rotated_jpeg(height: int = 10, width: int = 20, orientation: int = 6) -> bytes:
    """A (H, W) JPEG, left half red and right half blue, with an EXIF orientation tag.

    Orientation 6 means "rotate 90 degrees clockwise to display": decoded, it is (W, H) with the
    red half on top.
    """
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pixels, "JPEG", quality=95, exif=exif.tobytes())


def two_frame_gif(height: int = 24, width: int = 32) -> bytes:
    """An animated GIF: a red first frame, then a blue one (sources label the first frame)."""
    frames = [Image.new("RGB", (width, height), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB but holds no pixel data (a bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write these) from (H, W, 3) uint16."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").reshape(height, width * 3).view(np.uint8).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def rect_rle(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> dict:
    """COCO RLE (text counts) of the rectangle rows y0:y1, columns x0:x1."""
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def sam_json(
    image_id: int, height: int, width: int, rects: list[tuple[int, int, int, int]], **image
) -> bytes:
    """An SA-1B style json whose masks are the rectangles (y0, y1, x0, x1)."""
    annotations = []
    for k, (y0, y1, x0, x1) in enumerate(rects):
        annotations.append(
            {
                "id": k,
                "segmentation": rect_rle(height, width, y0, y1, x0, x1),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (y1 - y0) * (x1 - x0),
                "predicted_iou": 0.9 - 0.01 * k,
                "stability_score": 0.95,
                "point_coords": [[(x0 + x1) / 2, (y0 + y1) / 2]],
                "crop_box": [0, 0, width, height],
            }
        )
    info = {
        "image_id": image_id,
        "width": width,
        "height": height,
        "file_name": f"sa_{image_id}.jpg",
    }
    return json.dumps({"image": {**info, **image}, "annotations": annotations}).encode()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file member with exactly this name (no path cleaning)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    """Add a symbolic link member."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Expected:
    """What the pipeline must make of one record."""

    source: str  # "folder" | "tar" | "truncated_tar"
    image_id: str  # the id the source gives it
    status: str  # "ok" | "error"
    stage: str  # where an error arises: "source", "decode" (image), "masks" (json); "" if ok
    reason: str  # lower-case text the error message must contain ("" if ok)
    size: tuple[int, int] | None = None  # (height, width) after decoding, for ok images
    sam_masks: int | None = None  # masks in its SA-1B json (tar images with a valid json)


@dataclass(frozen=True)
class BadCorpus:
    """Paths of the corpus and the expected outcome of each of its records."""

    folder: Path  # image folder input
    # files of the folder that are no images: skipped by the sources and counted by reason
    skipped: dict[str, int]
    tar: Path  # SA-1B-style tar with bad members
    truncated_tar: Path  # a tar cut inside a member's data
    outside: Path  # where escaping members would land if extracted: must never exist
    expected: tuple[Expected, ...]

    @property
    def inputs(self) -> list[str]:
        """The three inputs, as ``--input`` values."""
        return [str(self.folder), str(self.tar), str(self.truncated_tar)]

    def of(self, source: str) -> list[Expected]:
        """The expected records of one source."""
        return [e for e in self.expected if e.source == source]


def build_bad_corpus(root: Path) -> BadCorpus:
    """Write the corpus under ``root`` (folder ``images/``, tars ``sa_000000.tar`` and
    ``sa_000001.tar``) and return what every record must become."""
    root = Path(root)
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    rgb = gradient_rgb(24, 32)
    expected: list[Expected] = []

    def ok(source: str, image_id: str, size: tuple[int, int], sam_masks: int | None = None):
        expected.append(Expected(source, image_id, "ok", "", "", size, sam_masks))

    def bad(source: str, image_id: str, stage: str, reason: str):
        expected.append(Expected(source, image_id, "error", stage, reason))

    files: dict[str, bytes] = {
        "rgb.jpg": encode(rgb, "JPEG", quality=90),
        "gray.png": encode(rgb[:, :, 0], "PNG"),
        "rgba.png": encode(np.dstack([rgb, np.full((24, 32), 128, np.uint8)]), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG"),
        "gray16.png": encode(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257), "PNG"),
        "rgb16.png": png16_rgb(rgb.astype(np.uint16) * 257),
        "palette.png": encode(Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE), "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(10, 20, 6),
        "sub/nested.webp": encode(rgb, "WEBP", lossless=True),
        "sub/picture.bmp": encode(rgb, "BMP"),
        "sub/scan.tiff": encode(rgb, "TIFF"),
        "anim.gif": two_frame_gif(24, 32),
        "corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8)),
        "truncated.jpg": encode(gradient_rgb(64, 64), "JPEG")[:700],
        "empty.png": b"",
        "text.jpg": b"this is a text file, not a JPEG\n",
        "bomb.png": png_header_only(40_000, 40_000),
        "notes.txt": b"not an image: sources skip it (and count it)\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for image_id in (
        "rgb.jpg",
        "gray.png",
        "rgba.png",
        "cmyk.jpg",
        "gray16.png",
        "rgb16.png",
        "palette.png",
        "sub/nested.webp",
        "sub/picture.bmp",
        "sub/scan.tiff",
        "anim.gif",
    ):
        ok("folder", image_id, (24, 32))
    ok("folder", "exif_rotated.jpg", (20, 10))
    bad("folder", "corrupt.jpg", "decode", "not an image")
    bad("folder", "truncated.jpg", "decode", "truncated")
    bad("folder", "empty.png", "decode", "empty")
    bad("folder", "text.jpg", "decode", "not an image")
    bad("folder", "bomb.png", "decode", "decompression bomb")

    outside = root / "outside"
    tar_path = root / "sa_000000.tar"
    h, w = 24, 32
    jpg = encode(rgb, "JPEG", quality=90)
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        add_member(tar, "sa_1.jpg", jpg)
        add_member(tar, "sa_1.json", sam_json(1, h, w, [(0, 12, 0, 16), (12, 24, 16, 32)]))
        ok("tar", "sa_1", (h, w), 2)
        add_member(tar, "sa_2.json", b'{"image": {"image_id": 2, "annotations": [')  # json first
        add_member(tar, "sa_2.jpg", jpg)
        bad("tar", "sa_2", "masks", "invalid mask json")
        add_member(tar, "sa_3.jpg", jpg)
        add_member(tar, "sa_3.json", sam_json(3, 48, 64, [(0, 10, 0, 10)]))
        bad("tar", "sa_3", "masks", "image is 32x24")
        add_member(tar, "sa_4.jpg", jpg)  # no json: labeled without SAM masks
        ok("tar", "sa_4", (h, w), None)
        add_member(tar, "sa_5.json", sam_json(5, h, w, [(0, 5, 0, 5)]))  # no image
        bad("tar", "sa_5", "source", "no image")
        add_member(tar, "../outside/escape.jpg", jpg)
        bad("tar", "../outside/escape.jpg", "source", "escapes the archive")
        add_member(tar, f"{outside}/absolute.jpg", jpg)
        bad("tar", f"{outside}/absolute.jpg", "source", "escapes the archive")
        add_member(tar, "sa_6.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        add_member(tar, "sa_6.json", sam_json(6, h, w, [(0, 5, 0, 5)]))
        bad("tar", "sa_6", "decode", "image header")
        add_symlink(tar, "sa_7.jpg", "/etc/passwd")
        bad("tar", "sa_7", "source", "not a regular file")
        add_member(tar, "sa_8.jpg", b"")
        bad("tar", "sa_8", "decode", "empty")
        add_member(tar, "README.txt", b"members that are neither images nor json are skipped\n")

    truncated_path = root / "sa_000001.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for k in (10, 11):
            add_member(tar, f"sa_{k}.jpg", jpg)
            add_member(tar, f"sa_{k}.json", sam_json(k, h, w, [(0, 12, 0, 16)]))
        big = encode(gradient_rgb(128, 128, seed=3), "PNG")
        cut = tar.offset + tarfile.BLOCKSIZE + len(big) // 2  # inside sa_12.jpg's data
        add_member(tar, "sa_12.jpg", big)
    truncated_path.write_bytes(buf.getvalue()[:cut])
    ok("truncated_tar", "sa_10", (h, w), 1)
    ok("truncated_tar", "sa_11", (h, w), 1)
    bad("truncated_tar", "sa_12", "source", "truncated tar")
    skipped = {"not an image": 1}  # notes.txt
    return BadCorpus(folder, skipped, tar_path, truncated_path, outside, tuple(expected))
