"""The torch RLE codec against pycocotools: exact round trips, nearest upsampling straight to the
RLE, per-cell counts, on random and edge-case masks; the same results on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from hipie import rle_torch
from schemas.rle import run_lengths, strings_from_counts


def _coco(masks: np.ndarray) -> list[dict]:
    """pycocotools' RLEs (str counts) of (N, H, W) masks."""
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()} for r in rles]


def _bytes(rles: list[dict]) -> list[dict]:
    return [dict(r, counts=r["counts"].encode()) for r in rles]


def _masks(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """Random masks of every density plus the edge cases: empty, full, one pixel (centre, first,
    last), one full column, one full row."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, height, width)) < rng.random((n, 1, 1))
    edge = np.zeros((7, height, width), dtype=bool)
    edge[1] = True
    edge[2, height // 2, width // 2] = True
    edge[3, 0, 0] = True
    edge[4, -1, -1] = True
    edge[5, :, width // 2] = True
    edge[6, height // 2, :] = True
    return np.concatenate([edge, masks])


SIZES = [(1, 1), (1, 9), (9, 1), (5, 3), (37, 23), (64, 80), (127, 255)]


@pytest.mark.parametrize("height,width", SIZES)
def test_encode_and_decode_round_trip_exactly_as_pycocotools(height, width):
    masks = _masks(12, height, width, seed=height * 1000 + width)
    expected = _coco(masks)
    encoded = rle_torch.encode(torch.from_numpy(masks))
    assert encoded.rles == expected
    assert encoded.areas == mask_utils.area(_bytes(expected)).tolist()
    assert encoded.bboxes == mask_utils.toBbox(_bytes(expected)).tolist()
    decoded = rle_torch.decode(expected)
    assert decoded.dtype == torch.bool and torch.equal(decoded, torch.from_numpy(masks))
    runs = rle_torch.parse_counts(expected)
    assert runs.areas().tolist() == encoded.areas


def test_many_masks_and_uncompressed_counts():
    masks = _masks(400, 31, 45, seed=1)
    rles = _coco(masks)
    assert rle_torch.encode(torch.from_numpy(masks)).rles == rles
    assert torch.equal(rle_torch.decode(rles), torch.from_numpy(masks))
    lists = [{"size": r["size"], "counts": run_lengths(r)} for r in rles]
    assert torch.equal(rle_torch.decode(lists), torch.from_numpy(masks))
    mixed = [lists[i] if i % 3 else rles[i] for i in range(len(rles))]
    assert torch.equal(rle_torch.decode(mixed), torch.from_numpy(masks))


def test_counts_strings_of_large_and_extreme_values():
    counts = np.array(
        [0, 1, 31, 32, 1023, 1024, 2**20 + 7, 3, 2**30, 5, 0, 2**32 - 1], dtype=np.int64
    )
    for cut in range(1, len(counts) + 1):
        part = counts[:cut]
        rle = {"size": [1, int(part.sum())], "counts": part.tolist()}
        expected = mask_utils.frPyObjects(rle, 1, int(part.sum()))["counts"].decode()
        assert strings_from_counts(part, np.array([0, cut])) == [expected]
        assert run_lengths({"counts": expected}) == part.tolist()


@pytest.mark.parametrize(
    "small,size",
    [((5, 7), (16, 22)), ((37, 23), (120, 70)), ((64, 80), (33, 101)), ((1, 1), (9, 4))],
)
def test_encode_to_a_larger_size_is_the_nearest_upsampling(small, size):
    masks = torch.from_numpy(_masks(10, *small, seed=3))
    upsampled = F.interpolate(masks[None].float(), size=size, mode="nearest")[0].bool()
    expected = _coco(upsampled.numpy())
    encoded = rle_torch.encode(masks, size)
    assert encoded.rles == expected
    assert encoded.areas == mask_utils.area(_bytes(expected)).tolist()
    assert encoded.bboxes == mask_utils.toBbox(_bytes(expected)).tolist()


@pytest.mark.parametrize(
    "grid,size",
    [((5, 7), (16, 22)), ((37, 23), (120, 70)), ((64, 80), (33, 101)), ((6, 6), (6, 6))],
)
def test_decode_cells_counts_every_cells_pixels(grid, size):
    full = torch.from_numpy(_masks(9, *size, seed=4))
    rows = rle_torch.nearest_index(size[0], grid[0])
    cols = rle_torch.nearest_index(size[1], grid[1])
    expected = torch.zeros(len(full), grid[0], grid[1], dtype=torch.int64)
    index = (torch.arange(len(full))[:, None, None], rows[None, :, None], cols[None, None, :])
    expected.index_put_(index, full.long(), accumulate=True)
    cells = rle_torch.decode_cells(_coco(full.numpy()), grid, chunk=4)
    assert torch.equal(cells.long(), expected.flatten(1))
    # the nearest index maps are interpolate's own
    probe = torch.arange(grid[0] * grid[1], dtype=torch.float32).view(1, 1, *grid)
    up = F.interpolate(probe, size=size, mode="nearest")[0, 0].long()
    assert torch.equal(up, rows[:, None] * grid[1] + cols[None, :])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    masks = torch.from_numpy(_masks(50, 97, 131, seed=5))
    rles = _coco(masks.numpy())
    on_gpu = rle_torch.encode(masks.cuda(), (300, 400))
    assert on_gpu.rles == rle_torch.encode(masks, (300, 400)).rles
    assert torch.equal(rle_torch.decode(rles, "cuda").cpu(), masks)
    cells = rle_torch.decode_cells(on_gpu.rles, (97, 131), "cuda")
    assert cells.device.type == "cuda"
    assert torch.equal(cells.cpu(), rle_torch.decode_cells(on_gpu.rles, (97, 131)))
