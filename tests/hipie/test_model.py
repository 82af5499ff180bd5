"""HipieModel: shapes, training outputs, deformable attention, fusion, checkpoints, big presets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hipie.build import (
    WEIGHTS_DIR,
    build_hipie,
    parameter_counts,
    r50_config,
    random_bert_base_text_config,
    save_checkpoint,
    tiny_config,
    vit_h_config,
)
from hipie.config import HipieConfig
from hipie.modeling.deform_attn import MSDeformAttn, ms_deform_attn
from hipie.modeling.fusion import BiCrossAttentionFusion
from hipie.modeling.thing_decoder import ThingDecoder

VOCAB = ["dog", "cat", "grass"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_hipie("tiny")


def _images(B: int = 2, size: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, size, size, generator=g)


def test_forward_shapes(tiny):
    cfg = tiny.config
    with torch.no_grad():
        out = tiny(_images(), [(128, 128), (96, 128)], VOCAB)
    K = len(VOCAB) + 1  # + "other"
    for dec, dcfg in ((out.things, cfg.thing_decoder), (out.stuff, cfg.stuff_decoder)):
        Q = dcfg.num_queries
        assert dec.logits.shape == (2, Q, K)
        assert dec.masks.shape == (2, Q, 32, 32)  # 1/4 of the padded input
        assert dec.boxes.shape == (2, Q, 4)
        assert dec.embeddings.shape == (2, Q, cfg.pixel_decoder.hidden_dim)
        assert ((dec.boxes >= 0) & (dec.boxes <= 1)).all()
        assert dec.aux == [] and dec.dn is None and dec.enc is None  # inference: last layer only


def test_encode_once_decode_many(tiny):
    """decode() on shared image features equals the full forward for every text pass."""
    images = _images(1)
    with torch.no_grad():
        feats = tiny.encode_image(images)
        for vocab in (VOCAB, ["person head", "person arm"]):
            split = tiny.decode(feats, tiny.encode_text(vocab))
            full = tiny(images, [(128, 128)], vocab)
            assert torch.allclose(split.things.logits, full.things.logits, atol=1e-5)
            assert torch.allclose(split.stuff.masks, full.stuff.masks, atol=1e-4)


def test_stuff_decoder_ignores_fusion(tiny):
    """Fig. 4c: the stuff branch reads unfused features, so the fusion weights cannot move it."""
    images = _images(1)
    with torch.no_grad():
        before = tiny(images, [(128, 128)], VOCAB)
        saved = {k: v.clone() for k, v in tiny.fusion.state_dict().items()}
        for p in tiny.fusion.parameters():
            p.add_(0.5)
        after = tiny(images, [(128, 128)], VOCAB)
        tiny.fusion.load_state_dict(saved)
    assert torch.equal(before.stuff.logits, after.stuff.logits)
    assert not torch.allclose(before.things.logits, after.things.logits)


def test_training_outputs_with_denoising(tiny):
    tiny.train()
    try:
        targets = [
            {
                "labels": torch.tensor([0, 2]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
            },
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])},
        ]
        out = tiny(_images(), [(128, 128), (128, 128)], VOCAB, targets=targets)
    finally:
        tiny.eval()
    cfg = tiny.config
    t = out.things
    assert len(t.aux) == cfg.thing_decoder.num_layers - 1
    assert len(out.stuff.aux) == cfg.stuff_decoder.num_layers - 1
    assert t.enc is not None and t.enc.masks.shape == t.masks.shape
    meta = t.dn_meta
    # max 2 targets -> groups of 4 (2 positive, 2 negative); 3 groups fit max_dn_queries=90
    assert (meta.num_groups, meta.max_targets) == (3, 2)
    assert meta.targets[0].tolist() == [0, 1, 0, 1] * 3
    assert meta.targets[1].tolist() == [0, -1, 0, -1] * 3
    assert meta.positive[0].tolist() == [True, True, False, False] * 3
    assert meta.positive[1].tolist() == [True, False, False, False] * 3
    assert t.dn.logits.shape == (2, 12, len(VOCAB) + 1)
    assert len(t.dn.aux) == cfg.thing_decoder.num_layers - 1
    assert t.logits.shape[1] == cfg.thing_decoder.num_queries  # dn queries split off
    loss = t.logits.sigmoid().mean() + t.masks.mean() + t.dn.boxes.sum() + out.stuff.masks.mean()
    loss.backward()
    assert tiny.thing_decoder.dn_content.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_denoising_attention_mask():
    m = ThingDecoder.attention_mask(n_dn=4, n_match=2, group_size=2, device=torch.device("cpu"))
    x, o = True, False  # x = blocked
    expected = [
        [o, o, x, x, o, o],
        [o, o, x, x, o, o],
        [x, x, o, o, o, o],
        [x, x, o, o, o, o],
        [x, x, x, x, o, o],
        [x, x, x, x, o, o],
    ]
    assert m.tolist() == expected


def _brute_force_deform(value, shapes, loc, weights):
    """Loops over every sample: bilinear interpolation, zero outside, align_corners=False."""
    B, S, M, Dh = value.shape
    _, Q, _, L, P, _ = loc.shape
    out = torch.zeros(B, Q, M, Dh, dtype=torch.float64)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for lvl, (h, w) in enumerate(shapes):
                    grid = value[b, starts[lvl] : starts[lvl] + h * w, m].view(h, w, Dh).double()
                    for p in range(P):
                        x = loc[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = loc[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = (
                            int(torch.floor(torch.tensor(x))),
                            int(torch.floor(torch.tensor(y))),
                        )
                        sample = torch.zeros(Dh, dtype=torch.float64)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                            if 0 <= xx < w and 0 <= yy < h:
                                sample += wgt * grid[yy, xx]
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * sample
    return out.view(B, Q, M * Dh)


def test_deformable_attention_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    B, M, Dh, Q, P = 2, 2, 3, 3, 2
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, Dh, generator=g)
    loc = torch.rand(B, Q, M, len(shapes), P, 2, generator=g) * 1.4 - 0.2  # some outside
    weights = torch.rand(B, Q, M, len(shapes), P, generator=g)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    got = ms_deform_attn(value, torch.tensor(shapes), loc, weights)
    want = _brute_force_deform(value, shapes, loc, weights)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_deformable_module_masks_padding_and_box_references():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=8, num_heads=2, num_levels=1, num_points=2)
    shapes = torch.tensor([[4, 4]])
    value = torch.randn(1, 16, 8)
    query = torch.randn(1, 3, 8)
    ref = torch.rand(1, 3, 1, 4) * 0.5 + 0.25
    pad = torch.zeros(1, 16, dtype=torch.bool)
    pad[0, 8:] = True  # bottom half padded
    out = attn(query, ref, value, shapes, pad)
    changed = value.clone()
    changed[0, 8:] += 100.0  # padded values must not matter
    assert torch.allclose(out, attn(query, ref, changed, shapes, pad), atol=1e-5)
    assert not torch.allclose(out, attn(query, ref, changed, shapes, None), atol=1e-3)


def test_fusion_residuals_and_text_padding():
    torch.manual_seed(0)
    fusion = BiCrossAttentionFusion(dim=16, num_heads=4, layer_scale_init=0.5)
    image, text = torch.randn(2, 20, 16), torch.randn(2, 5, 16)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    v, t = fusion(image, text, text_mask=text_mask)
    assert v.shape == image.shape and t.shape == text.shape
    assert not torch.allclose(v, image)  # text reached the image branch
    poked = text.clone()
    poked[1, 3:] = 50.0  # padded text tokens are ignored by the image branch
    v2, _ = fusion(image, poked, text_mask=text_mask)
    assert torch.allclose(v[1], v2[1], atol=1e-5)
    with torch.no_grad():
        fusion.gamma_v.zero_()
        fusion.gamma_t.zero_()
    v0, t0 = fusion(image, text, text_mask=text_mask)
    assert torch.equal(v0, image) and torch.equal(t0, text)  # pure residual when gated off


def test_config_json_round_trip():
    for cfg in (tiny_config(), r50_config(), vit_h_config()):
        back = HipieConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg


def test_checkpoint_round_trip(tmp_path, tiny):
    images = _images(1)
    with torch.no_grad():
        want = tiny(images, [(128, 128)], VOCAB)
    path = save_checkpoint(tiny, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]
    torch.manual_seed(123)
    other = build_hipie("tiny")  # a different random init
    loaded = build_hipie(checkpoint=str(path))
    assert loaded.config == dataclasses.replace(
        tiny.config, text_encoder=loaded.config.text_encoder
    )
    assert not loaded.training
    with torch.no_grad():
        got = loaded(images, [(128, 128)], VOCAB)
        different = other(images, [(128, 128)], VOCAB)
    assert torch.equal(got.things.logits, want.things.logits)
    assert torch.equal(got.stuff.masks, want.stuff.masks)
    assert torch.equal(got.things.boxes, want.things.boxes)
    assert not torch.allclose(different.things.logits, want.things.logits)


def test_checkpoint_without_text_encoder_weights(tmp_path, tiny):
    """A frozen pretrained text encoder is not copied into the checkpoint but reloaded."""
    images = _images(1)
    with torch.no_grad():
        want = tiny(images, [(128, 128)], VOCAB)
    full = save_checkpoint(tiny, tmp_path / "full")
    slim = save_checkpoint(tiny, tmp_path / "slim", include_text_encoder=False)
    full_size = (full / "model.safetensors").stat().st_size
    slim_size = (slim / "model.safetensors").stat().st_size
    bert_params = sum(p.numel() for p in tiny.text_encoder.bert.parameters())
    assert full_size - slim_size >= 4 * bert_params  # float32 BERT weights left out
    loaded = build_hipie(checkpoint=str(slim))
    with torch.no_grad():
        got = loaded(images, [(128, 128)], VOCAB)
    assert torch.equal(got.things.logits, want.things.logits)
    assert torch.equal(got.stuff.masks, want.stuff.masks)


def test_shipped_tiny_checkpoint_or_clear_error():
    if (WEIGHTS_DIR / "tiny" / "model.safetensors").is_file():
        assert build_hipie(checkpoint="tiny").config.name == "tiny"
    else:
        with pytest.raises(FileNotFoundError, match="no HIPIE checkpoint"):
            build_hipie(checkpoint="tiny")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        build_hipie("r101")


def test_padding_is_ignored_by_the_encoder(tiny):
    """The image padding mask reaches the encoder tokens at the right places (the deformable
    attention zeroes padded values; convolutions still see across the border)."""
    with torch.no_grad():
        feats = tiny.encode_image(
            _images(1),
            torch.zeros(1, 128, 128, dtype=torch.bool).index_fill_(2, torch.arange(64, 128), True),
        )
    h, w = feats.spatial_shapes[0].tolist()
    level0 = feats.padding_mask[0, : h * w].view(h, w)
    assert level0[:, : w // 2].logical_not().all() and level0[:, w // 2 :].all()


@pytest.mark.slow
def test_big_presets_forward_at_1024():
    """r50 and vit_h with random weights (random BERT-base text encoder), one 1024 forward."""
    for make in (r50_config, vit_h_config):
        cfg = dataclasses.replace(make(), text_encoder=random_bert_base_text_config())
        model = build_hipie(cfg)
        counts = parameter_counts(model)
        print(cfg.name, {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
        assert model.text_encoder.bert.config.hidden_size == 768
        with torch.no_grad():
            out = model(torch.randn(1, 3, 1024, 1024), [(1024, 1024)], ["dog", "cat"])
        assert out.things.logits.shape == (1, 900, 3)
        assert out.stuff.logits.shape == (1, 300, 3)
        assert out.things.masks.shape == (1, 900, 256, 256)
        del model, out
