"""Tests for hipie.vote: intersection areas (dense, downsampled, RLE) and the SAM vote (Eq. 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from hipie import vote as vote_module
from hipie.vote import intersection_areas, mask_areas, vote


def _rles(masks: torch.Tensor) -> list[dict]:
    """(N, H, W) bool -> COCO RLEs with str counts (the contract's form)."""
    array = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
    out = []
    for rle in mask_utils.encode(array):
        out.append({"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")})
    return out


def _brute(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A, B) intersections by explicit pairwise AND (fine for tiny test images)."""
    return (a[:, None] & b[None]).flatten(2).sum(-1).to(torch.float32)


def _random_blobs(num: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(num, H, W) bool: random ellipses, some with holes from random noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    masks = np.zeros((num, height, width), dtype=bool)
    for i in range(num):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(3, height / 2), rng.uniform(3, width / 2)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if i % 3 == 0:
            masks[i] &= rng.random((height, width)) > 0.2
    return torch.from_numpy(masks)


# --- a 4 x 4 example computed by hand -----------------------------------------------------------
#
#  HIPIE M0 = columns 0-1 (8 px), probs (0.8, 0.2, 0.0)
#  HIPIE M1 = row 0 (4 px),       probs (0.1, 0.3, 0.6)
#  SAM S0 = rows 0-1 x cols 0-1:  |M0∩S0| = 4, |M1∩S0| = 2
#           4·(.8,.2,0) + 2·(.1,.3,.6) = (3.4, 1.4, 1.2), sum 6; fully covered
#  SAM S1 = row 3 (4 px):         |M0∩S1| = 2, |M1∩S1| = 0 -> (.8,.2,0); coverage 2/4
#  SAM S2 = pixel (2, 3):         no overlap -> zeros, label -1, coverage 0
#  SAM S3 = row 0, cols 2-3:      |M0∩S3| = 0, |M1∩S3| = 2 -> (.1,.3,.6); coverage 1


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hipie = torch.zeros(2, 4, 4, dtype=torch.bool)
    hipie[0, :, 0:2] = True
    hipie[1, 0, :] = True
    sam = torch.zeros(4, 4, 4, dtype=torch.bool)
    sam[0, 0:2, 0:2] = True
    sam[1, 3, :] = True
    sam[2, 2, 3] = True
    sam[3, 0, 2:4] = True
    probs = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.3, 0.6]])
    return sam, hipie, probs


def test_hand_computed_intersections_and_vote() -> None:
    sam, hipie, probs = _hand_case()
    inter = intersection_areas(sam, hipie)
    assert inter.dtype == torch.float32
    assert torch.equal(inter, torch.tensor([[4.0, 2.0], [2.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))

    result = vote(sam, hipie, probs)
    expected = torch.tensor(
        [
            [3.4 / 6, 1.4 / 6, 1.2 / 6],
            [0.8, 0.2, 0.0],
            [0.0, 0.0, 0.0],
            [0.1, 0.3, 0.6],
        ]
    )
    torch.testing.assert_close(result.probs, expected)
    assert result.labels.tolist() == [0, 0, -1, 2]
    torch.testing.assert_close(result.scores, torch.tensor([3.4 / 6, 0.8, 0.0, 0.6]))
    torch.testing.assert_close(result.coverage, torch.tensor([1.0, 0.5, 0.0, 1.0]))


def test_vote_rle_equals_dense_on_hand_case() -> None:
    sam, hipie, probs = _hand_case()
    dense = vote(sam, hipie, probs)
    rle = vote(_rles(sam), _rles(hipie), probs)
    mixed = vote(_rles(sam), hipie, probs)
    for other in (rle, mixed):
        torch.testing.assert_close(other.probs, dense.probs)
        assert torch.equal(other.labels, dense.labels)
        torch.testing.assert_close(other.coverage, dense.coverage)


def test_rle_and_dense_paths_are_exact_on_random_masks() -> None:
    a = _random_blobs(20, 97, 131, seed=1)
    b = _random_blobs(30, 97, 131, seed=2)
    expected = _brute(a, b)
    assert expected.sum() > 0 and (expected == 0).any()  # both overlaps and disjoint pairs
    assert torch.equal(intersection_areas(a, b), expected)
    assert torch.equal(intersection_areas(_rles(a), _rles(b)), expected)
    assert torch.equal(intersection_areas(a, _rles(b)), expected)  # mixed: dense side encoded
    assert torch.equal(mask_areas(_rles(a)), a.flatten(1).sum(1).float())


def test_float_fallback_equals_int8_path(monkeypatch: pytest.MonkeyPatch) -> None:
    a = _random_blobs(7, 41, 53, seed=3)
    b = _random_blobs(5, 41, 53, seed=4)
    expected = _brute(a, b)
    monkeypatch.setitem(vote_module._INT8_MM_OK, "cpu", False)  # force the float32 matmul path
    assert torch.equal(intersection_areas(a, b), expected)
    assert torch.equal(intersection_areas(a, b, max_side=20), _downsampled_reference(a, b, 3))


def test_rle_path_exact_on_coco_masks(coco_sample) -> None:
    data = json.loads((coco_sample / "panoptic_coco_detection_format.json").read_text())
    image = next(im for im in data["images"] if im["id"] == 142238)
    rles = [a["segmentation"] for a in data["annotations"] if a["image_id"] == image["id"]]
    dense = torch.from_numpy(np.stack([mask_utils.decode(r) for r in rles]).astype(bool))
    assert dense.shape[1:] == (image["height"], image["width"]) and len(rles) == 18
    # Panoptic segments do not overlap, so intersect them with shifted copies of themselves too.
    shifted = torch.roll(dense, shifts=(7, -11), dims=(1, 2))
    expected = _brute(dense, torch.cat([dense, shifted]))
    assert (expected[:, 18:] > 0).sum() > 18  # real, non-trivial overlaps
    got_rle = intersection_areas(rles, rles + _rles(shifted))
    assert torch.equal(got_rle, expected)
    assert torch.equal(intersection_areas(dense, torch.cat([dense, shifted])), expected)
    areas = torch.tensor([a["area"] for a in data["annotations"] if a["image_id"] == image["id"]])
    assert torch.equal(mask_areas(rles), areas.float())


def _downsampled_reference(a: torch.Tensor, b: torch.Tensor, factor: int) -> torch.Tensor:
    """Σ_cells c_a c_b / f² with cell counts by numpy reshape-sum (independent of vote.py)."""
    return (_cells(a, factor) @ _cells(b, factor).T / factor**2).to(torch.float32)


def _cells(masks: torch.Tensor, factor: int) -> torch.Tensor:
    n, h, w = masks.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.zeros((n, hp, wp), dtype=np.int64)
    padded[:, :h, :w] = masks.numpy()
    counts = padded.reshape(n, hp // factor, factor, wp // factor, factor).sum(axis=(2, 4))
    return torch.from_numpy(counts.reshape(n, -1)).to(torch.float64)


def test_downsampled_path_within_boundary_tolerance() -> None:
    """Per pair, the error is at most f²/4 per cell where both masks are partial (0 < c < f²).

    In a cell with covered fractions x, y the estimate x·y lies, like the truth, in
    [max(0, x + y - 1), min(x, y)], an interval no wider than 1/4.
    """
    a = _random_blobs(12, 97, 131, seed=5)
    b = _random_blobs(9, 97, 131, seed=6)
    exact = _brute(a, b)
    approx = intersection_areas(a, b, max_side=32)  # factor ceil(131 / 32) = 5, grid 20 x 27
    factor = 5
    torch.testing.assert_close(approx, _downsampled_reference(a, b, factor))
    ca, cb = _cells(a, factor), _cells(b, factor)
    partial_a = ((ca > 0) & (ca < factor**2)).double()
    partial_b = ((cb > 0) & (cb < factor**2)).double()
    bound = (partial_a @ partial_b.T) * factor**2 / 4
    assert ((approx - exact).abs().double() <= bound + 1e-3).all()
    assert (approx - exact).abs().max() > 0  # the path really is approximate here
    # relative error of the big overlaps stays small
    big = exact > 500
    assert big.any() and ((approx - exact).abs()[big] / exact[big]).max() < 0.1


def test_downsampled_path_is_exact_for_grid_aligned_masks() -> None:
    torch.manual_seed(0)
    coarse = torch.rand(10, 8, 11) > 0.5  # 4 x 4 cells -> a 32 x 44 image
    masks = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    a, b = masks[:6], masks[6:]
    assert torch.equal(intersection_areas(a, b, max_side=11), _brute(a, b))
    assert torch.equal(intersection_areas(a, b, max_side=44), _brute(a, b))  # no downsampling


def test_vote_downsampled_close_to_exact() -> None:
    sam = _random_blobs(15, 97, 131, seed=7)
    hipie = _random_blobs(6, 97, 131, seed=8)
    probs = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    exact = vote(sam, hipie, probs)
    approx = vote(sam, hipie, probs, max_side=48)
    assert torch.equal(exact.labels == -1, approx.labels == -1)
    covered = exact.labels >= 0
    assert (exact.probs[covered] - approx.probs[covered]).abs().max() < 0.05
    assert (exact.coverage - approx.coverage).abs().max() < 0.05
    torch.testing.assert_close(exact.probs.sum(1)[covered], torch.ones(int(covered.sum())))


def test_vote_empty_inputs() -> None:
    no_sam = vote(
        torch.zeros(0, 5, 6, dtype=torch.bool),
        torch.ones(2, 5, 6, dtype=torch.bool),
        torch.full((2, 3), 1 / 3),
    )
    assert no_sam.probs.shape == (0, 3) and no_sam.labels.shape == (0,)
    no_hipie = vote(
        torch.ones(2, 5, 6, dtype=torch.bool),
        torch.zeros(0, 5, 6, dtype=torch.bool),
        torch.zeros(0, 3),
    )
    assert torch.equal(no_hipie.probs, torch.zeros(2, 3))
    assert no_hipie.labels.tolist() == [-1, -1] and no_hipie.coverage.tolist() == [0.0, 0.0]
    rle = vote([], [], torch.zeros(0, 3))
    assert rle.probs.shape == (0, 3)


def test_rle_path_with_more_than_255_masks() -> None:
    """pycocotools' `area` breaks past 255 masks under numpy 2; the RLE path must not."""
    torch.manual_seed(1)
    a = torch.rand(300, 8, 9) > 0.6
    b = torch.rand(260, 8, 9) > 0.6
    assert torch.equal(intersection_areas(_rles(a), _rles(b)), _brute(a, b))
    assert torch.equal(mask_areas(_rles(a)), a.flatten(1).sum(1).float())
    result = vote(_rles(a), _rles(b), torch.full((260, 2), 0.5))
    torch.testing.assert_close(result.coverage, vote(a, b, torch.full((260, 2), 0.5)).coverage)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dense_path_equals_cpu() -> None:
    a = _random_blobs(37, 97, 131, seed=9)  # row counts that need padding for the int8 kernel
    b = _random_blobs(21, 97, 131, seed=10)
    expected = _brute(a, b)
    got = intersection_areas(a.cuda(), b.cuda())
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), expected)
    down_cpu = intersection_areas(a, b, max_side=32)
    assert torch.equal(intersection_areas(a.cuda(), b.cuda(), max_side=32).cpu(), down_cpu)
    probs = torch.softmax(torch.randn(21, 5), dim=1)
    on_gpu = vote(a.cuda(), b.cuda(), probs.cuda())
    on_cpu = vote(a, b, probs)
    torch.testing.assert_close(on_gpu.probs.cpu(), on_cpu.probs)
    torch.testing.assert_close(on_gpu.coverage.cpu(), on_cpu.coverage)
