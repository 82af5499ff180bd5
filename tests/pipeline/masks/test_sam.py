"""The batched automatic mask generator against segment-anything's own, on a small random SAM.

Random weights give low predicted IoUs and stability scores: the comparisons lower the score
thresholds so that masks survive (and, once, turn box NMS off so that all 48 masks of 16 points
are compared pixel by pixel).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from pipeline.masks.amg import encode_rles
from pipeline.masks.build import build_sam
from pipeline.masks.sam import BatchedMaskGenerator
from pipeline.masks.sam_json import SamMask


def textured_patches(h: int, w: int, seed: int, n: int = 4) -> np.ndarray:
    """A gray (H, W, 3) uint8 image with ``n`` rectangles of random-noise texture."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 128, np.uint8)
    for _ in range(n):
        ph, pw = rng.integers(h // 6, h // 3), rng.integers(w // 6, w // 3)
        y, x = rng.integers(0, h - ph), rng.integers(0, w - pw)
        img[y : y + ph, x : x + pw] = rng.integers(0, 256, (ph, pw, 3))
    return img


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("tiny", None, "cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    # Different sizes and aspect ratios (landscape, portrait) exercise the padding crop.
    return [textured_patches(64, 96, seed=0), textured_patches(90, 60, seed=1)]


def assert_same_masks(stock: list[dict], ours: list[SamMask], *, min_count: int = 1) -> None:
    """Equal counts, a one-to-one match at mask IoU >= 0.99, equal scores (1e-3), boxes and
    areas; ``stock`` are ``SamAutomaticMaskGenerator`` records in ``coco_rle`` mode."""
    assert len(ours) == len(stock)
    assert len(stock) >= min_count
    if not stock:
        return
    iou = mask_utils.iou(
        [m.rle for m in ours], [m["segmentation"] for m in stock], [0] * len(stock)
    )
    iou = np.asarray(iou).reshape(len(ours), len(stock))
    empty_ours = np.array([m.area == 0 for m in ours])
    empty_stock = np.array([m["area"] == 0 for m in stock])
    iou[empty_ours[:, None] & empty_stock[None, :]] = 1.0  # pycocotools says 0 for two empties
    # Scores break ties between identical masks (the 3 outputs of one point can coincide).
    score_diff = np.abs(
        np.array([m.predicted_iou for m in ours])[:, None]
        - np.array([m["predicted_iou"] for m in stock])[None, :]
    )
    cost = np.where(iou >= 0.99, score_diff, np.inf)
    matched = set()
    for i, m in enumerate(ours):
        j = int(np.argmin(np.where([k in matched for k in range(len(stock))], np.inf, cost[i])))
        assert np.isfinite(cost[i, j]), f"our mask {i} has no stock mask with IoU >= 0.99"
        matched.add(j)
        s = stock[j]
        assert m.predicted_iou == pytest.approx(s["predicted_iou"], abs=1e-3)
        assert m.stability_score == pytest.approx(s["stability_score"], abs=1e-3)
        assert m.rle["size"] == s["segmentation"]["size"]
        assert isinstance(m.rle["counts"], str)
        assert m.area == pytest.approx(s["area"], rel=0.01)
        assert np.allclose(m.bbox, s["bbox"], atol=1)
    assert len(matched) == len(stock)


CONFIGS = {
    # Every mask of every point survives: 16 points x 3 masks, pixel-level comparison of all.
    "all": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
    # Score filters remove some, box NMS most of the rest.
    "filters": dict(pred_iou_thresh=0.1, stability_score_thresh=0.05, box_nms_thresh=0.9),
    # Hole filling / island removal, then the second NMS.
    "small_regions": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=40),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_masks_as_stock(sam, images, name):
    params = CONFIGS[name]
    stock = SamAutomaticMaskGenerator(sam, points_per_side=4, output_mode="coco_rle", **params)
    # points_per_batch=7: the 16 points go in 3 decoder batches (the stock decodes them in 1).
    ours = BatchedMaskGenerator(sam, points_per_side=4, points_per_batch=7, **params)
    expected = stock.generate(images[0])
    got = ours.generate(images[0])
    assert_same_masks(expected, got, min_count={"all": 48}.get(name, 2))
    if name == "filters":
        assert all(m.predicted_iou > 0.1 and m.stability_score >= 0.05 for m in got)


def test_same_masks_as_stock_with_crops(sam):
    params = dict(
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=0.9,
        crop_n_layers=1,
        crop_nms_thresh=0.9,
        crop_n_points_downscale_factor=2,
    )
    image = textured_patches(160, 240, seed=5, n=12)
    stock = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params).generate(image)
    # image_batch_size=3: the 5 crops go through the encoder in batches of 3 and 2.
    ours = BatchedMaskGenerator(sam, image_batch_size=3, **params).generate(image)
    # Not only whole-image masks: one survives from a layer-1 crop (edge filter, crop NMS).
    assert any(m["crop_box"] != [0, 0, 240, 160] for m in stock)
    assert_same_masks(stock, ours, min_count=3)


def test_batch_equals_per_image(sam, images):
    gen = BatchedMaskGenerator(sam, points_per_side=3, **CONFIGS["all"])
    batched = gen.generate_batch(images)
    assert len(batched) == 2
    for image, got in zip(images, batched):
        single = gen.generate(image)
        assert len(got) == len(single) == 27
        assert [m.rle["size"] for m in got] == [list(image.shape[:2])] * 27
        for a, b in zip(got, single):  # same order: same scores, same NMS
            if a.area or b.area:  # (pycocotools gives IoU 0 for two empty masks)
                assert mask_utils.iou([a.rle], [b.rle], [0])[0, 0] >= 0.99
            assert a.area == pytest.approx(b.area, rel=0.01)
            assert a.predicted_iou == pytest.approx(b.predicted_iou, abs=1e-4)
            assert a.stability_score == pytest.approx(b.stability_score, abs=1e-3)


def test_empty_results(sam, images):
    # Stability scores are <= 1: nothing passes 1.01.
    gen = BatchedMaskGenerator(sam, points_per_side=2, stability_score_thresh=1.01)
    assert gen.generate_batch(images) == [[], []]
    assert gen.generate_batch([]) == []


def test_encode_rles_matches_pycocotools():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 7, 9)) > 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2, 0, 0], masks[3, 0, 0] = True, False  # first pixel set / unset
    got = encode_rles(torch.from_numpy(masks))
    expected = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r, _ in got] == [e["counts"].decode() for e in expected]
    assert [r["size"] for r, _ in got] == [[7, 9]] * 5
    assert [a for _, a in got] == masks.sum((1, 2)).tolist()


def test_build_sam_and_bad_input(sam):
    assert sam.image_encoder.img_size == 1024 and not sam.training
    with pytest.raises(ValueError, match="unknown SAM model type"):
        build_sam("vit_x", None, "cpu")
    gen = BatchedMaskGenerator(sam, points_per_side=2)
    with pytest.raises(ValueError, match="uint8"):
        gen.generate(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        gen.generate(np.zeros((8, 8), np.uint8))


def test_bf16_autocast_agrees_approximately(sam, images):
    # bf16 is not the stock's arithmetic (meant for CUDA; CPU autocast runs the same code path):
    # the masks of the 4 points still agree closely with the float32 ones.
    exact = BatchedMaskGenerator(sam, points_per_side=2, **CONFIGS["all"]).generate(images[1])
    bf16 = BatchedMaskGenerator(
        sam, points_per_side=2, autocast_dtype="bfloat16", **CONFIGS["all"]
    ).generate(images[1])
    assert len(bf16) == len(exact) == 12
    iou = np.asarray(mask_utils.iou([m.rle for m in bf16], [m.rle for m in exact], [0] * 12))
    nonempty = np.array([m.area > 0 for m in exact])
    assert iou.max(axis=0)[nonempty].mean() >= 0.9
    scores = sorted(m.predicted_iou for m in bf16), sorted(m.predicted_iou for m in exact)
    assert np.allclose(*scores, atol=0.01)
