"""RLE helpers against the COCO sample's real panoptic masks."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from schemas import rle


def _panoptic_segments(coco_sample):
    """Yield (segment info, (H, W) bool mask) for every segment of the sample's PNGs."""
    data = json.loads((coco_sample / "panoptic_examples.json").read_text())
    for ann in data["annotations"]:
        png = np.asarray(
            Image.open(coco_sample / "panoptic_examples" / ann["file_name"]), np.uint32
        )
        ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
        for seg in ann["segments_info"]:
            yield seg, ids == seg["id"]


def test_round_trip_on_real_masks_is_pixel_exact(coco_sample):
    n = 0
    for seg, mask in _panoptic_segments(coco_sample):
        encoded = rle.encode(mask)
        assert encoded["size"] == list(mask.shape)
        assert isinstance(encoded["counts"], str)
        np.testing.assert_array_equal(rle.decode(encoded), mask)
        assert rle.area(encoded) == int(mask.sum()) == seg["area"]
        ys, xs = np.nonzero(mask)
        x0, y0 = xs.min(), ys.min()
        assert rle.bbox(encoded) == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
        assert rle.bbox(encoded) == [float(v) for v in seg["bbox"]]
        assert rle.check(encoded, *mask.shape) is None
        n += 1
    assert n == 50  # segments_info entries of the two sample images


def test_encode_many_matches_encode_one_by_one(coco_sample):
    masks = np.stack([m for _, m in _panoptic_segments(coco_sample)][:5])
    assert rle.encode_many(masks) == [rle.encode(m) for m in masks]
    assert rle.encode_many(np.zeros((0, 4, 5), bool)) == []


def test_iou_matrix_matches_dense_iou():
    rng = np.random.default_rng(0)
    a = rng.random((4, 23, 31)) < 0.4
    b = rng.random((3, 23, 31)) < 0.6
    got = rle.iou_matrix(rle.encode_many(a), rle.encode_many(b))
    inter = np.einsum("ahw,bhw->ab", a.astype(int), b.astype(int))
    union = a.sum((1, 2))[:, None] + b.sum((1, 2))[None] - inter
    np.testing.assert_allclose(got, inter / union, rtol=1e-12)
    assert rle.iou_matrix([], rle.encode_many(b)).shape == (0, 3)


def test_run_lengths_parse_pycocotools_counts():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1] = True  # column-major: 5 outside, 2 inside, 13 outside
    assert rle.run_lengths(rle.encode(mask)) == [5, 2, 13]
    assert rle.run_lengths({"size": [4, 5], "counts": [3, 17]}) == [3, 17]


def test_check_reports_bad_rles():
    good = rle.encode(np.ones((6, 7), bool))
    assert rle.check(good, 6, 7) is None
    assert "differs from the image size" in rle.check(good, 7, 6)
    truncated = {"size": [6, 7], "counts": good["counts"][:-1]}
    assert rle.check(truncated, 6, 7) is not None
    assert "cannot be parsed" in rle.check({"size": [6, 7], "counts": "\x01"}, 6, 7)
    assert "dict" in rle.check("nope", 6, 7)


def test_from_segmentation_reads_every_coco_form():
    """Polygons, uncompressed (list) RLE and compressed RLE of one mask give one RLE."""
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:6] = True  # 3 x 4 = 12 pixels
    compressed = rle.encode(mask)
    runs = rle.run_lengths(compressed)
    assert rle.from_segmentation({"size": [6, 8], "counts": runs}, 6, 8) == compressed
    assert rle.from_segmentation(compressed, 6, 8) == compressed
    as_bytes = {"size": [6, 8], "counts": compressed["counts"].encode("ascii")}
    assert rle.from_segmentation(as_bytes, 6, 8) == compressed
    # a polygon around the pixel centres' outer edges: the same 12 pixels
    polygon = [[2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0]]
    assert rle.area(rle.from_segmentation(polygon, 6, 8)) == 12
    assert rle.iou_matrix([rle.from_segmentation(polygon, 6, 8)], [compressed])[0, 0] > 0.5
    assert rle.to_coco(compressed)["counts"] == compressed["counts"].encode("ascii")
