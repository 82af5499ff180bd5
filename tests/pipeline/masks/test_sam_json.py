"""Decoding untrusted SA-1B mask json (valid, malformed, other sizes, corrupt RLE counts), and
SAM masks packed for the labeler."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.masks.sam_json import (
    MaskDecodeError,
    SamMask,
    _validate_counts,
    decode_sam_json,
    pack_sam_masks,
    unpack_sam_masks,
)
from tests.pipeline.badinputs import rect_rle, sam_json

# ---------------------------------------------------------------------------------------------
# SA-1B json


def test_sam_json_valid():
    data = sam_json(7, 24, 32, [(0, 12, 0, 16), (12, 24, 16, 32), (5, 6, 3, 4)])
    masks = decode_sam_json(data, 32, 24)
    assert [m.area for m in masks] == [192, 192, 1]
    assert masks[0] == SamMask(
        rle=rect_rle(24, 32, 0, 12, 0, 16),
        bbox=(0.0, 0.0, 16.0, 12.0),
        area=192,
        predicted_iou=0.9,
        stability_score=0.95,
    )
    assert masks[2].bbox == (3.0, 5.0, 1.0, 1.0)
    assert [m.predicted_iou for m in masks] == pytest.approx([0.9, 0.89, 0.88])
    assert decode_sam_json(json.loads(data), 32, 24) == masks  # parsed input accepted
    assert decode_sam_json(b'{"annotations": []}', 32, 24) == []


def test_sam_json_bbox_computed_when_missing_and_optional_scores():
    doc = {"annotations": [{"segmentation": rect_rle(24, 32, 2, 5, 7, 10)}]}
    (mask,) = decode_sam_json(json.dumps(doc), 32, 24)
    assert mask.bbox == (7.0, 2.0, 3.0, 3.0) and mask.area == 9
    assert mask.predicted_iou is None and mask.stability_score is None


def test_sam_json_uncompressed_rle_and_polygons():
    dense = np.zeros((4, 5), np.uint8)
    dense[1:3, 2:4] = 1
    counts = [9, 2, 2, 2, 5]  # column-major runs of the mask above
    doc = {
        "annotations": [
            {"segmentation": {"size": [4, 5], "counts": counts}},
            {"segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
        ]
    }
    rle_mask, poly_mask = decode_sam_json(json.dumps(doc), 5, 4)
    coco = {"size": [4, 5], "counts": rle_mask.rle["counts"].encode()}
    np.testing.assert_array_equal(mask_utils.decode(coco), dense)
    assert rle_mask.area == 4
    poly = mask_utils.merge(mask_utils.frPyObjects([[1, 1, 4, 1, 4, 3, 1, 3]], 4, 5))
    assert poly_mask.area == int(mask_utils.area(poly)) and isinstance(poly_mask.rle["counts"], str)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (b"", "empty mask json"),
        (b"{not json", "invalid mask json"),
        (b"\xff\xfe", "invalid mask json"),
        (b"[1, 2]", "must be an object"),
        (b'{"image": {}}', "no 'annotations' list"),
        (b'{"annotations": [5]}', "annotation 0: expected an object"),
        (b'{"annotations": [{"segmentation": "x"}]}', "annotation 0: segmentation is not"),
        (b'{"annotations": [{"segmentation": {"size": [24], "counts": "a"}}]}', "invalid rle size"),
        (b'{"annotations": [{"segmentation": [[1, 2, 3]]}]}', "malformed polygon"),
    ],
)
def test_sam_json_malformed(doc, reason):
    with pytest.raises(MaskDecodeError) as info:
        decode_sam_json(doc, 32, 24)
    assert reason in info.value.reason.lower()


def test_sam_json_wrong_size():
    ok = json.loads(sam_json(1, 24, 32, [(0, 4, 0, 4)]))
    other = json.loads(sam_json(1, 48, 64, [(0, 4, 0, 4)]))
    with pytest.raises(
        MaskDecodeError, match="mask json is for a 64x48 image but the image is 32x24"
    ):
        decode_sam_json(json.dumps(other), 32, 24)
    del other["image"]  # no image block: the first annotation's size is caught
    doc = {"annotations": ok["annotations"] + other["annotations"]}
    with pytest.raises(MaskDecodeError, match=r"annotation 1: mask size 48x64 \(h x w\)"):
        decode_sam_json(json.dumps(doc), 32, 24)
    transposed = json.loads(sam_json(1, 32, 24, [(0, 4, 0, 4)]))
    with pytest.raises(MaskDecodeError, match="swapped: was it made before applying EXIF"):
        decode_sam_json(json.dumps(transposed), 32, 24)


def _doc_with_counts(counts: list[str], size=(24, 32)) -> str:
    anns = [{"segmentation": {"size": list(size), "counts": c}} for c in counts]
    return json.dumps({"annotations": anns})


def test_sam_json_malformed_counts_name_the_annotation():
    good = rect_rle(24, 32, 0, 12, 0, 16)["counts"]
    smaller = rect_rle(24, 31, 0, 12, 0, 16)["counts"]  # covers 24 * 31 pixels
    cases = [
        (good[:-1] + chr(48 + 0x20), "end inside a number"),
        (good + "~", "invalid character"),
        (smaller, "runs cover 744 pixels, the image has 768"),
        ("", "empty rle counts"),
        ("é", "not ascii"),
        (chr(48 + 0x10), "negative run length"),  # a single run of -16
        ("0" + "o" * 7 + "0", "out of range"),
    ]
    for bad, reason in cases:
        with pytest.raises(MaskDecodeError) as info:
            decode_sam_json(_doc_with_counts([good, good, bad]), 32, 24)
        message = info.value.reason.lower()
        assert message.startswith("annotation 2: ") and reason in message, (bad, message)


def test_counts_parser_matches_dense_masks():
    """Brute force: the vectorized parser's areas equal dense pixel sums, for many shapes."""
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (7, 5), (40, 33), (128, 96)]:
        masks = [np.zeros((height, width), np.uint8), np.ones((height, width), np.uint8)]
        for density in (0.02, 0.5, 0.97):
            masks.append((rng.random((height, width)) < density).astype(np.uint8))
        block = np.zeros((height, width), np.uint8)
        block[height // 3 :, width // 4 : width // 2 + 1] = 1
        masks.append(block)
        rles = mask_utils.encode(np.asfortranarray(np.stack(masks, axis=2)))
        areas = _validate_counts([r["counts"].decode() for r in rles], height * width)
        assert areas.tolist() == [int(m.sum()) for m in masks]


# ---------------------------------------------------------------------------------------------
# SAM masks packed for the labeler


def test_sam_masks_pack_and_unpack():
    masks = decode_sam_json(sam_json(1, 24, 32, [(2, 5, 3, 9), (0, 24, 0, 1)]), 32, 24)
    masks = [masks[0], SamMask(**{**masks[1].__dict__, "predicted_iou": None})]
    counts, meta = pack_sam_masks(masks)
    records = unpack_sam_masks(counts, meta, 24, 32)
    assert [r["rle"] for r in records] == [m.rle for m in masks]
    assert [r["bbox"] for r in records] == [list(m.bbox) for m in masks]
    assert [r["area"] for r in records] == [m.area for m in masks]
    assert records[1]["predicted_iou"] is None
    assert records[0]["stability_score"] == masks[0].stability_score
    assert unpack_sam_masks(*pack_sam_masks([]), 24, 32) is None
    zero_last = [SamMask(**{**masks[0].__dict__, "stability_score": 0.0})]
    counts, meta = pack_sam_masks(zero_last)
    stripped = np.array([meta], dtype=object).astype(bytes)[0]  # numpy "S" drops the zeros
    assert len(stripped) < len(meta)
    assert unpack_sam_masks(counts, stripped, 24, 32)[0]["stability_score"] == 0.0
