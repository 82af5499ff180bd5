"""The vote with HIPIE's masks at the model's resolution and SAM's RLEs at the image's: the RLE
(CPU) and grid (device) paths are exact, and equal the vote on full-resolution dense masks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench.cpu_side import scene
from hipie import HipiePredictor, build_hipie, rle_torch
from hipie.predictor import _resize_nearest
from hipie.vote_areas import sam_hipie_areas

HEIGHT, WIDTH = 150, 225  # the image
GRID = (43, 64)  # the model's resolution (a non-integer factor, 3.49 x 3.52)


@pytest.fixture(scope="module")
def data():
    d = scene(HEIGHT, WIDTH, *GRID, seed=2)
    d["sam"] = [a["segmentation"] for a in json.loads(d["sam_json"])["annotations"]]
    return d


@pytest.fixture(scope="module")
def predictor():
    return HipiePredictor(build_hipie("tiny"))


def _exact(sam_rles, hipie_small):
    """Brute force: dense SAM masks and upsampled HIPIE masks, integer products."""
    sam = rle_torch.decode(sam_rles).reshape(len(sam_rles), -1).long()
    full = _resize_nearest(hipie_small, (HEIGHT, WIDTH)).reshape(len(hipie_small), -1).long()
    return (sam @ full.T).float(), sam.sum(1).float(), full.sum(1).float()


@pytest.mark.parametrize("method", ["rle", "grid"])
def test_intersections_are_exact(data, method):
    masks = data["hier"].masks
    areas = sam_hipie_areas(data["sam"], masks, method=method)
    inter, sam_area, hipie_area = _exact(data["sam"], masks)
    assert areas.inter.shape == (100, 150)
    assert torch.equal(areas.inter, inter)
    assert torch.equal(areas.sam, sam_area)
    assert torch.equal(areas.hipie, hipie_area)


def test_empty_inputs(data):
    masks = data["hier"].masks
    for method in ("rle", "grid"):
        assert sam_hipie_areas([], masks, method=method).inter.shape == (0, 150)
        none = sam_hipie_areas(data["sam"], masks[:0], method=method)
        assert none.inter.shape == (100, 0)


def test_vote_at_model_resolution_equals_the_full_resolution_vote(data, predictor):
    """The labeler's vote (HIPIE at the model's resolution, SAM RLEs at the image's) gives the same
    labels, levels, parents and probabilities as the dense vote on full-resolution masks."""
    small = data["hier"]
    full = dataclasses.replace(small, masks=_resize_nearest(small.masks, (HEIGHT, WIDTH)))
    dense_sam = rle_torch.decode(data["sam"]).contiguous()
    reference = predictor.vote_from_hierarchy(full, dense_sam, data["things"])
    encoded = rle_torch.encode(small.masks, (HEIGHT, WIDTH))
    for method, hipie_rles in (("rle", encoded.rles), ("rle", None), ("grid", None)):
        got = predictor.vote_from_hierarchy(
            small, data["sam"], data["things"], hipie_rles=hipie_rles, method=method
        )
        assert got.level == reference.level
        assert got.labels == reference.labels
        assert torch.equal(got.parents, reference.parents)
        torch.testing.assert_close(got.probs, reference.probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.scores, reference.scores, rtol=0, atol=1e-6)
        assert torch.equal(got.boxes, reference.boxes)
    assert {"instance", "part", "stuff"} <= set(reference.level)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grid_vote_on_cuda_equals_cpu(data, predictor):
    small = data["hier"]
    on_cpu = predictor.vote_from_hierarchy(small, data["sam"], data["things"], method="rle")
    cuda = {f.name: getattr(small, f.name) for f in dataclasses.fields(small)}
    cuda = dataclasses.replace(
        small, **{k: v.cuda() for k, v in cuda.items() if isinstance(v, torch.Tensor)}
    )
    on_gpu = predictor.vote_from_hierarchy(cuda, data["sam"], data["things"])  # auto: grid
    assert on_gpu.level == on_cpu.level and on_gpu.labels == on_cpu.labels
    assert torch.equal(on_gpu.parents.cpu(), on_cpu.parents)
    torch.testing.assert_close(on_gpu.probs.cpu(), on_cpu.probs, rtol=0, atol=1e-6)
