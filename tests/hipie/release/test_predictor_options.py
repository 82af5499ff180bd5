"""The release predictor's options: the CLIP ensemble wired into a pass, and bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hipie.clip_release import MaskClip
from hipie.modeling.image_input import resize_shortest_edge
from hipie.release_build import release_model
from hipie.release_hierarchy import ReleaseHierarchyPredictor
from hipie.release_predictor import ReleasePredictor
from tests.hipie.release.test_clip_release import register_tiny_clip

open_clip = pytest.importorskip("open_clip")
NAMES = ["robot", "car", "sky", "grass"]
FAVOURITE = 1  # the class the recording CLIP below always answers


class RecordingClip(MaskClip):
    """A real MaskClip whose class scores are replaced by a certain answer (class FAVOURITE), and
    which records what the predictor hands it."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def class_probs(self, image, mask_logits, class_names):
        self.calls.append((image.clone(), tuple(mask_logits.shape), list(class_names)))
        probs = torch.full((*mask_logits.shape[:-2], len(class_names)), 1e-6)
        probs[..., FAVOURITE] = 1.0
        return probs / probs.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return release_model("tiny")


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    name = register_tiny_clip(tmp_path_factory.mktemp("clip_cfg"))
    torch.manual_seed(0)
    return RecordingClip(open_clip.create_model(name, pretrained=None).eval())


def test_clip_ensemble_reaches_the_detection_passes_and_not_grounding(model, photo, clip):
    plain = ReleasePredictor(model, min_size=96)
    with_clip = ReleasePredictor(model, min_size=96, clip=clip)
    is_thing = dict(things=NAMES[:2], stuff=NAMES[2:])
    base = plain.universal(photo, **is_thing)
    res = with_clip.universal(photo, **is_thing)
    # CLIP sees the resized, unpadded image in [0, 1] and the pass's class names
    resized = resize_shortest_edge(photo, 96, plain.max_size).float() / 255.0
    assert len(clip.calls) == 2  # instance probs (thing queries) and panoptic probs
    for image, _, names in clip.calls:
        assert torch.equal(image, resized) and names == NAMES
    # a CLIP that is certain of "car" pulls every thing and every pixel to it
    inst = res.instances
    favourite = inst.classes == FAVOURITE
    assert bool(favourite.any()) and bool((~favourite).any())  # top-k holds (query, class) pairs
    assert float(inst.scores[~favourite].max()) < float(inst.scores[favourite].min())
    base_favourite = base.instances.classes == FAVOURITE
    assert float(base.instances.scores[~base_favourite].max()) > float(
        base.instances.scores[base_favourite].min()
    )
    assert bool((res.sem_seg.argmax(0) == FAVOURITE).all())
    assert not bool((base.sem_seg.argmax(0) == FAVOURITE).all())
    clip.calls.clear()
    ref = with_clip.refer(photo, "the car on the left")
    assert clip.calls == [] and len(ref.instances) == 1
    assert torch.equal(
        ref.instances.masks, plain.refer(photo, "the car on the left").instances.masks
    )


def test_hierarchy_predictor_takes_a_mask_clip_only(model, clip):
    predictor = ReleaseHierarchyPredictor(model, clip=clip, min_size=96)
    assert predictor.release.clip is clip
    with pytest.raises(TypeError, match="MaskClip"):
        ReleaseHierarchyPredictor(model, clip=object())


def test_bf16_autocast_keeps_weights_and_outputs_close(model, photo):
    fp32 = ReleasePredictor(model, min_size=96).universal(photo, NAMES[:2], NAMES[2:])
    bf16 = ReleasePredictor(model, min_size=96, precision="bf16")
    res = bf16.universal(photo, NAMES[:2], NAMES[2:])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert res.sem_seg.dtype == torch.float32 and bool(torch.isfinite(res.sem_seg).all())
    scale = float(fp32.sem_seg.abs().max())
    assert float((res.sem_seg - fp32.sem_seg).abs().max()) <= 0.1 * scale
    assert float((res.sem_seg - fp32.sem_seg).abs().max()) > 0  # it did run in bf16
    with pytest.raises(ValueError, match="precision"):
        ReleasePredictor(model, precision="fp16")
