"""The release's CLIP ensemble: formulas against hand-computed values, MaskCLIP on a small random
open_clip model, and the whole post-processing with CLIP plugged in."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hipie.clip_release import (
    CLIP_MODEL_NAME,
    CLIP_RANDOM_MODEL_NAME,
    DEMO_SETTINGS,
    EVAL_SETTINGS,
    ClipEnsemble,
    MaskClip,
    clip_instance_probs,
    clip_panoptic_probs,
    ensemble_log_probs,
    prompt_texts,
    seen_classes,
)
from hipie.clip_seen_labels import COCO_PANOPTIC_TRAIN_NAMES
from hipie.modeling.vl_align import token_to_class_logits
from hipie.postprocess_release import MASKED_LOGIT, crop_mask_logits, postprocess_release
from tests.hipie.release.synthetic_postproc import NUM_BG, synthetic_postproc_inputs

open_clip = pytest.importorskip("open_clip")

TINY = "hipie-test-tiny-vit"
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 128, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _sig(x: float) -> float:
    return 0.0 if x < -700 else 1.0 / (1.0 + math.exp(-x))


def test_settings_are_the_releases():
    assert (DEMO_SETTINGS.alpha, DEMO_SETTINGS.beta, DEMO_SETTINGS.fg_temperature) == (
        0.2,
        0.45,
        0.01,
    )
    assert (EVAL_SETTINGS.alpha, EVAL_SETTINGS.beta, EVAL_SETTINGS.fg_temperature) == (
        0.4,
        0.45,
        0.06,
    )
    for s in (DEMO_SETTINGS, EVAL_SETTINGS):
        assert (s.iou_a, s.iou_b, s.agg_mode, s.pano_temperature) == (0.3, 1.7, "MUL", 0.06)


def test_instance_probs_by_hand():
    logits = torch.tensor([[0.4, -0.3, MASKED_LOGIT], [1.2, 0.1, MASKED_LOGIT]])
    iou = torch.tensor([0.5, -1.0])
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    seen = torch.tensor([True, False, True])
    got = clip_instance_probs(logits, iou, q, seen, DEMO_SETTINGS)
    for r in range(2):
        e = [math.exp(_sig(float(v)) / 0.01) for v in logits[r]]
        p = [v / sum(e) for v in e]
        for c in range(3):
            a = 0.2 if bool(seen[c]) else 0.45
            p_clip = _sig(math.log(p[c] ** (1 - a) * float(q[r, c]) ** a))
            if c == 2:
                p_clip = 0.0  # masked class
            expected = math.sqrt(p_clip**0.3 * _sig(float(iou[r])) ** 1.7)
            assert abs(float(got[r, c]) - expected) < 1e-6, (r, c)


def test_single_class_uses_sigmoid():
    logits, iou, q = torch.tensor([[0.3]]), torch.tensor([0.2]), torch.tensor([[0.9]])
    got = float(clip_instance_probs(logits, iou, q, torch.tensor([False]), DEMO_SETTINGS))
    p_clip = _sig(math.log(_sig(0.3) ** 0.55 * 0.9**0.45))
    assert abs(got - math.sqrt(p_clip**0.3 * _sig(0.2) ** 1.7)) < 1e-6


def test_panoptic_probs_by_hand():
    logits = torch.tensor([[0.4, -0.3, 2.0], [MASKED_LOGIT, 0.1, -0.5]])
    q = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    seen = torch.tensor([True, False, False])
    got = clip_panoptic_probs(logits, q, seen, DEMO_SETTINGS)
    for r in range(2):
        e = [math.exp(_sig(float(v)) / 0.06) for v in logits[r]]
        p = [v / sum(e) for v in e]
        a = [0.2, 0.45, 0.45]
        prod = [p[c] ** (1 - a[c]) * float(q[r, c]) ** a[c] for c in range(3)]
        for c in range(3):
            assert abs(float(got[r, c]) - prod[c] / sum(prod)) < 1e-6


def test_add_mode():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    got = ensemble_log_probs(p, q, torch.tensor([True, False]), 0.4, 0.45, agg_mode="ADD")
    assert abs(float(got[0, 0]) - math.log(0.5 * 0.6 + 0.9 * 0.4 + 1e-9)) < 1e-6
    assert abs(float(got[0, 1]) - math.log(0.5 * 0.55 + 0.1 * 0.45 + 1e-9)) < 1e-6


def test_seen_classes_and_prompts():
    assert len(COCO_PANOPTIC_TRAIN_NAMES) == 133
    names = ["person", "dog", "horse head", "kid,boy", "grass", "sky", "tree"]
    seen = seen_classes(names, COCO_PANOPTIC_TRAIN_NAMES)
    assert seen.tolist() == [True, True, False, True, True, True, True]
    texts, counts = prompt_texts(["dog", "kid,boy"])
    assert texts == ["a photo of a dog.", "a photo of a kid.", "a photo of a boy."]
    assert counts == [1, 2]


def test_release_clip_model_name():
    cfg = open_clip.get_model_config(CLIP_MODEL_NAME)
    vis = cfg["vision_cfg"]
    assert (vis["image_size"], vis["patch_size"], vis["width"], vis["layers"]) == (
        336,
        14,
        1024,
        24,
    )
    assert open_clip.get_model_config(CLIP_RANDOM_MODEL_NAME)["quick_gelu"] is True


def register_tiny_clip(folder) -> str:
    """Register the small ViT config with open_clip (its json written to `folder`): its name."""
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return TINY


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    name = register_tiny_clip(tmp_path_factory.mktemp("clip_cfg"))
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval()


def _image(seed=0, h=40, w=52):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_full_mask_token_equals_image_embedding(tiny_clip):
    """A mask token that sees every patch follows the class token exactly (nothing attends to mask
    tokens), so its embedding is CLIP's image embedding."""
    mc = MaskClip(tiny_clip)
    image = _image()
    emb = mc.mask_embeddings(image, torch.full((1, 2, 10, 13), 5.0))
    x = torch.nn.functional.interpolate(image, size=(56, 56), mode="bilinear", align_corners=False)
    x = (x - mc.mean) / mc.std
    with torch.no_grad():
        ref = tiny_clip.encode_image(x)
    assert float((emb[0, 0] - ref[0]).abs().max()) < 1e-5
    assert float((emb[0, 1] - ref[0]).abs().max()) < 1e-5


def test_mask_tokens_against_open_clip_transformer(tiny_clip):
    """Our block loop with a boolean mask = open_clip's transformer with the additive -inf mask;
    and a mask token does not depend on the other masks."""
    mc = MaskClip(tiny_clip)
    image = _image(1)
    g = torch.Generator().manual_seed(2)
    masks = torch.randn(1, 3, 10, 13, generator=g) * 4
    emb = mc.mask_embeddings(image, masks)
    alone = mc.mask_embeddings(image, masks[:, 1:2])
    assert float((emb[0, 1] - alone[0, 0]).abs().max()) < 1e-5

    visual = tiny_clip.visual
    x = torch.nn.functional.interpolate(image, size=(56, 56), mode="bilinear", align_corners=False)
    x = (x - mc.mean) / mc.std
    m = torch.nn.functional.interpolate(masks, size=(56, 56), mode="bilinear", align_corners=False)
    hidden = torch.nn.functional.max_pool2d(m.sigmoid(), 14, 14).reshape(3, -1) < 0.5
    with torch.no_grad():
        tok = visual.ln_pre(
            torch.cat([visual.class_embedding.expand(1, 1, -1), visual.conv1(x).flatten(2).mT], 1)
            + visual.positional_embedding
        )
        n_img = tok.shape[1]
        tok = torch.cat([tok[:, :1].expand(-1, 3, -1), tok], 1)
        add = torch.zeros(3 + n_img, 3 + n_img)
        add[:, :3] = float("-inf")
        add[:3, 4:] = torch.where(hidden, float("-inf"), 0.0)
        assert visual.transformer.batch_first
        out = visual.transformer(tok, attn_mask=add)
        ref = visual.ln_post(out[:, :3]) @ visual.proj
    assert float((emb - ref).abs().max()) < 1e-5


def test_class_probs_and_ensemble_wiring(tiny_clip):
    """The whole post-processing with a random CLIP plugged in: q is a distribution, the CLIP
    probs reach NMS / top-k and the panoptic probs, masked classes score 0."""
    mc = MaskClip(tiny_clip)
    x = synthetic_postproc_inputs(1, NUM_BG, 900, 300)
    pmap = {1: [1], 2: [3, 4], 3: [6], 4: [8], 5: [10]}
    is_thing = {0: False, 1: True, 2: True, 3: True, 4: False, 5: False}
    names = ["person", "dog", "ball", "grass", "sky"]
    thing = token_to_class_logits(x["box_cls"][:, NUM_BG:], pmap, 5, is_thing=is_thing, mode="FG")
    stuff = token_to_class_logits(x["pred_logits_maskdino"], pmap, 5, is_thing=is_thing, mode="BG")
    image = _image(3, 96, 128)[0]
    masks = x["mask_pred"][0, NUM_BG:, 0]
    q = mc.class_probs(image, masks[:7], names)
    assert q.shape == (7, 5) and torch.allclose(q.sum(-1), torch.ones(7), atol=1e-5)

    ens = ClipEnsemble(mc, image, names)
    assert ens.seen.tolist() == [True, True, False, True, True]
    res = postprocess_release(
        thing[0], x["box_pred"][0, NUM_BG:], x["iou_pred"][0, NUM_BG:], masks, stuff[0],
        x["pred_masks_maskdino"][0], (96, 128), (120, 160), is_thing, clip=ens,
    )  # fmt: skip
    probs = ens.instance_probs(thing[0], x["iou_pred"][0, NUM_BG:], masks)
    assert float(probs[:, 3:].abs().max()) == 0.0  # stuff classes masked for thing queries
    assert torch.equal(res.selection.nms_scores, probs.max(1).values)
    assert res.instances.classes.max() <= 2
    keep = res.selection.nms_keep
    all_masks = torch.cat([masks[keep], x["pred_masks_maskdino"][0]])
    logits = torch.cat([thing[0][keep], stuff[0]])
    q_pano = mc.class_probs(image, crop_mask_logits(all_masks, (96, 128)), names)
    expected = clip_panoptic_probs(logits, q_pano, ens.seen, DEMO_SETTINGS)
    assert torch.allclose(res.panoptic_probs, expected, atol=1e-6)
    assert res.sem_seg.shape == (5, 120, 160) and res.panoptic_seg.shape == (120, 160)


@pytest.mark.slow
def test_release_architecture_with_random_weights():
    """The release's CLIP architecture (ViT-L-14-336, QuickGELU), random weights: 336 px input,
    577 image tokens + one token per mask; a full mask gives the image embedding."""
    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_RANDOM_MODEL_NAME, pretrained=None).eval()
    mc = MaskClip(model)
    assert (
        mc.image_size == (336, 336) and model.visual.transformer.resblocks[0].attn.num_heads == 16
    )
    image = _image(5, 304, 456)
    masks = torch.randn(1, 4, 76, 114, generator=torch.Generator().manual_seed(6)) * 4
    masks[0, 0] = 8.0
    emb = mc.mask_embeddings(image, masks)
    assert emb.shape == (1, 4, 768)
    x = torch.nn.functional.interpolate(
        image, size=(336, 336), mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        ref = model.encode_image((x - mc.mean) / mc.std)
    assert float((emb[0, 0] - ref[0]).abs().max()) < 1e-4 * float(ref.abs().max())
    q = mc.class_probs(image[0], masks[0], ["person", "dog", "horse head"])
    assert q.shape == (4, 3) and torch.allclose(q.sum(-1), torch.ones(4), atol=1e-5)
