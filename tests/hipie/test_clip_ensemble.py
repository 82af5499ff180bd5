"""Tests for hipie.clip_ensemble: Eq. 4 and mask-pooled CLIP probabilities (random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hipie.clip_ensemble import ClipMaskClassifier, class_lambdas, ensemble

# Tiny open_clip architectures (random weights, nothing downloaded), built from local folders.
TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RN = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
LABELS = ["cat", "dog", "tree", "sky"]


def _local_model(tmp_path_factory: pytest.TempPathFactory, name: str, cfg: dict) -> str:
    folder = tmp_path_factory.mktemp(name)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def vit_classifier(tmp_path_factory: pytest.TempPathFactory) -> ClipMaskClassifier:
    torch.manual_seed(0)
    name = _local_model(tmp_path_factory, "tiny_vit", TINY_VIT)
    return ClipMaskClassifier(model_name=name, pretrained=None)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)


def test_ensemble_hand_computed_with_per_class_lambda() -> None:
    p_model = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.4, 0.6]])
    p_clip = torch.tensor([[0.2, 0.2, 0.6], [0.7, 0.3, 0.0]])
    lam = torch.tensor([0.2, 0.45, 1.0])
    row0 = [0.5**0.2 * 0.2**0.8, 0.3**0.45 * 0.2**0.55, 0.2**1.0 * 0.6**0.0]
    # row 1: class 0 has p_model = 0 with weight 0.2 > 0 -> 0; class 2 has p_clip = 0 with
    # weight 1 - λ = 0 -> 0^0 = 1, so only the model's 0.6 counts.
    row1 = [0.0, 0.4**0.45 * 0.3**0.55, 0.6]
    expected = torch.tensor([[v / sum(row0) for v in row0], [v / sum(row1) for v in row1]])
    got = ensemble(p_model, p_clip, lam)
    torch.testing.assert_close(got, expected)
    # by hand: 0.5^.2·0.2^.8 = 0.87055·0.27595 = 0.24023; 0.3^.45·0.2^.55 = 0.58172·0.41263
    # = 0.24004; 0.2; sum 0.68027 -> 0.35315, 0.35286, 0.29400
    torch.testing.assert_close(got[0], torch.tensor([0.35315, 0.35286, 0.29400]), atol=2e-4, rtol=0)


def test_ensemble_extremes_and_degenerate_rows() -> None:
    p_model = torch.tensor([[0.7, 0.3, 0.0]])
    p_clip = torch.tensor([[0.0, 0.1, 0.9]])
    torch.testing.assert_close(ensemble(p_model, p_clip, 1.0), p_model)  # λ = 1: model only
    torch.testing.assert_close(ensemble(p_model, p_clip, 0.0), p_clip)  # λ = 0: CLIP only
    # both sources put zero on different classes everywhere -> no class survives -> zero row
    zero = ensemble(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5)
    assert torch.equal(zero, torch.zeros(1, 2))
    mixed = ensemble(torch.rand(6, 5).softmax(1), torch.rand(6, 5).softmax(1), 0.3)
    torch.testing.assert_close(mixed.sum(1), torch.ones(6))


def test_class_lambdas() -> None:
    lam = class_lambdas(["person", "zebra", "dog"], seen={"person", "dog"})
    assert lam.dtype == torch.float32
    torch.testing.assert_close(lam, torch.tensor([0.2, 0.45, 0.2]))
    lam2 = class_lambdas(["a", "b"], seen=["b"], lam_seen=1.0, lam_novel=0.5)
    torch.testing.assert_close(lam2, torch.tensor([0.5, 1.0]))


def test_probs_shapes_and_normalization(vit_classifier: ClipMaskClassifier, image) -> None:
    masks = torch.zeros(4, 40, 52, dtype=torch.bool)
    masks[0] = True
    masks[1, :20, :26] = True
    masks[2, 30:, 40:] = True
    # masks[3] is empty -> uniform
    probs = vit_classifier.probs(image, masks, LABELS)
    assert probs.shape == (4, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    torch.testing.assert_close(probs[3], torch.full((4,), 0.25))
    assert not torch.allclose(probs[1], probs[2])  # different regions, different features
    assert vit_classifier.probs(image, masks[:0], LABELS).shape == (0, 4)


def test_text_feature_cache_returns_same_tensor(vit_classifier: ClipMaskClassifier) -> None:
    first = vit_classifier.text_features(LABELS)
    second = vit_classifier.text_features(list(LABELS))
    assert second is first
    assert first.shape == (4, 16)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(4))
    other = vit_classifier.text_features(LABELS[:2])
    assert other is not first
    torch.testing.assert_close(other, first[:2])  # features do not depend on the list


def test_whole_image_mask_equals_pooling_all_patches(
    vit_classifier: ClipMaskClassifier, image
) -> None:
    """Independent path: open_clip's own token output (ln_post applied), mean, projection."""
    visual = vit_classifier.model.visual
    x = vit_classifier.preprocess(image)
    assert x.shape == (1, 3, 32, 32)
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(x)  # (1, 16, width): a 4 x 4 patch grid
    finally:
        visual.output_tokens = False
    assert tokens.shape[1] == 16
    pooled = F.normalize(tokens[0].mean(0) @ visual.proj, dim=-1)  # (D,)
    text = vit_classifier.text_features(LABELS)
    scale = vit_classifier.model.logit_scale.exp()
    expected = (scale * pooled @ text.T).softmax(-1)
    full = torch.ones(1, 40, 52, dtype=torch.bool)
    torch.testing.assert_close(vit_classifier.probs(image, full, LABELS)[0], expected)


def test_mask_pooling_weights_patches_by_area(vit_classifier: ClipMaskClassifier) -> None:
    """A mask exactly covering the top-left patch-grid cell pools that patch's feature alone."""
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    fmap = vit_classifier.dense_features(image)  # (4, 4, D)
    assert fmap.shape == (4, 4, 16)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :8, :8] = True  # patch (0, 0) of the 8-px patch grid
    text = vit_classifier.text_features(LABELS)
    scale = vit_classifier.model.logit_scale.exp()
    expected = (scale * F.normalize(fmap[0, 0], dim=-1) @ text.T).softmax(-1)
    torch.testing.assert_close(vit_classifier.probs(image, mask, LABELS)[0], expected)


def test_resnet_tower(tmp_path_factory: pytest.TempPathFactory, image) -> None:
    torch.manual_seed(0)
    name = _local_model(tmp_path_factory, "tiny_rn", TINY_RN)
    classifier = ClipMaskClassifier(model_name=name, pretrained=None)
    fmap = classifier.dense_features(image)
    assert fmap.shape == (2, 2, 16)  # 64 px input, stride 32
    masks = torch.zeros(2, 40, 52, dtype=torch.bool)
    masks[0] = True
    masks[1, :10, :10] = True
    probs = classifier.probs(image, masks, LABELS)
    assert probs.shape == (2, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_probs_rejects_masks_of_another_size(vit_classifier: ClipMaskClassifier, image) -> None:
    with pytest.raises(ValueError, match="do not match"):
        vit_classifier.probs(image, torch.ones(1, 39, 52, dtype=torch.bool), LABELS)
