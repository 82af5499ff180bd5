"""Training the released architecture at small size: one step's losses, gradients, learning."""

from __future__ import annotations

import random

import pytest
import torch

from hipie.modeling.maskdino_decoder import StuffPrediction
from hipie.release_build import release_model
from hipie.synthetic.generator import SceneConfig, SceneGenerator
from hipie.synthetic.scene import PART_CLASSES, STUFF_CLASSES, THING_CLASSES
from hipie.training.data import sample_from_scene
from hipie.training.release_criterion import ReleaseCriterion
from hipie.training.release_step import part_targets, train_losses, universal_targets

SIZE = 128


@pytest.fixture(scope="module")
def samples():
    gen = SceneGenerator(SceneConfig(width=SIZE, height=SIZE), seed=3)
    return [sample_from_scene(gen.scene(i)) for i in range(2)]


def _model():
    torch.manual_seed(0)
    return release_model("tiny").train()


def test_training_mode_decoder_returns_every_prediction_and_eval_is_unchanged(samples):
    model = _model()
    images = [s.image for s in samples]
    enc = model.encode_image(images)
    dec = enc.stuff
    layers = len(model.stuff.predictor.decoder.layers)
    assert len(dec.predictions) == layers + 1 and isinstance(dec.proposals, StuffPrediction)
    last = dec.predictions[-1]
    assert torch.equal(last.masks, dec.pred_masks) and torch.equal(last.boxes, dec.pred_boxes)
    for p in dec.predictions:
        assert p.masks.shape == dec.pred_masks.shape and p.boxes.shape == dec.pred_boxes.shape
    model.eval()
    with torch.no_grad():
        ev = model.encode_image(images).stuff
    assert ev.predictions is None and ev.proposals is None
    # dropout 0 in both modes: the final outputs are the same computation
    assert torch.allclose(ev.pred_masks, dec.pred_masks.detach(), atol=1e-5)


def test_targets_follow_the_prompt(samples):
    model = _model().eval()
    s = samples[0]
    names = list(THING_CLASSES) + list(STUFF_CLASSES)
    prompt = model.encode_classes(names, {i + 1: i < len(THING_CLASSES) for i in range(len(names))})
    t = universal_targets(s, prompt)
    assert len(t) == len(s.thing_classes) + len(s.stuff_classes)
    assert int(t.is_thing.sum()) == len(s.thing_classes)
    for k, name in enumerate(list(s.thing_classes) + list(s.stuff_classes)):
        tokens = prompt.positive_map[names.index(name) + 1]
        assert t.positive_map[k].nonzero().flatten().tolist() == list(tokens)
    assert bool(((t.boxes >= 0) & (t.boxes <= 1)).all())
    parts = [p for p in PART_CLASSES if p.split(" ")[0] in s.thing_classes]
    prompt = model.encode_classes(parts + list(THING_CLASSES))
    pt = part_targets(s, prompt)
    assert len(pt) and not bool(pt.is_thing.any())
    # each part's positive map covers its own label and its object's label
    assert bool((pt.positive_map.sum(1) > 1).all())


def test_a_few_steps_learn_and_reach_every_trainable_module(samples):
    model = _model()
    for p in model.text.parameters():
        p.requires_grad_(False)
    criterion = ReleaseCriterion()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    vocab = dict(things=THING_CLASSES, stuff=STUFF_CLASSES, parts=PART_CLASSES)
    history = []
    for step in range(6):
        opt.zero_grad()
        losses = train_losses(model, criterion, samples, rng=random.Random(step), **vocab)
        losses["total"].backward()
        if step == 0:
            assert {k.split("/")[0] for k in losses if "/" in k} == {
                "universal",
                "parts",
                "referring",
            }
            assert "universal/loss_ce_maskdino" in losses and "universal/loss_ce_enc" in losses
            assert "universal/loss_mask_interm_maskdino" in losses
            for root in ("backbone", "input_proj", "thing", "stuff"):
                grads = [p.grad for n, p in model.named_parameters() if n.startswith(root)]
                assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), root
        assert torch.isfinite(losses["total"])
        history.append(float(losses["total"].detach()))
        opt.step()
    assert min(history[-2:]) < 0.8 * history[0], history


def test_training_cli_writes_a_release_checkpoint_that_resumes_and_predicts(tmp_path, samples):
    """`python -m hipie.train` on a release config: checkpoint, resume, load, predict."""
    import json

    import numpy as np

    from hipie.release_build import is_release_folder, load_release_folder
    from hipie.release_predictor import ReleasePredictor
    from hipie.train import main

    cfg = {
        "architecture": "release",
        "scene": {"width": 96, "height": 96, "max_things": 2},
        "steps": 2,
        "batch_size": 1,
        "warmup_steps": 1,
        "progress": False,
        "log_every": 1,
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["--config", str(path), "--out", str(out), "--threads", "2"]) == 0
    ckpt = out / "checkpoint"
    assert is_release_folder(ckpt) and (ckpt / "trainer_state.pt").is_file()
    # the frozen MiniLM is not stored: the file holds the trained part only
    assert (ckpt / "model.safetensors").stat().st_size < 80e6
    assert json.loads((out / "history.json").read_text())["step"] == [1, 2]
    assert main(["--config", str(path), "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "history.json").read_text())["step"] == [1, 2, 3]
    model = load_release_folder(ckpt)
    trained = dict(model.named_parameters())
    fresh = _model()
    assert not torch.equal(trained["thing.transformer.tgt_embed.weight"],
                           fresh.state_dict()["thing.transformer.tgt_embed.weight"])  # fmt: skip
    for name, p in fresh.text.named_parameters():  # MiniLM as shipped
        assert torch.equal(p, trained[f"text.{name}"]), name
    predictor = ReleasePredictor(model, min_size=96)
    image = np.asarray(samples[0].image.permute(1, 2, 0))
    result = predictor.universal(image, things=list(THING_CLASSES), stuff=list(STUFF_CLASSES))
    assert result.panoptic_seg.shape == image.shape[:2]
    # `python -m hipie.evaluate synthetic --checkpoint <folder>` scores a release model
    from hipie.evaluate import RELEASE_TASKS, evaluate_synthetic

    scores = evaluate_synthetic(checkpoint=str(ckpt), num_images=2, width=96, height=96, seed=5)
    assert set(RELEASE_TASKS) <= set(scores) and scores["num_images"] == 2
    assert 0.0 <= scores["panoptic"]["All"]["pq"] <= 1.0
    assert 0.0 <= scores["parts"]["miou_parts"] <= 1.0 and 0.0 <= scores["referring"]["oiou"] <= 1.0
    assert scores["referring"]["n"] > 0


def test_random_tiny_still_names_the_older_family():
    """`random:tiny` (the demo's, the tests') is the older tiny until it is retired; the small
    release is `release_model("tiny")` and release folders."""
    from hipie import build_hipie
    from hipie.modeling.hipie_release import HipieRelease

    assert not isinstance(build_hipie(checkpoint="random:tiny"), HipieRelease)
    assert isinstance(build_hipie(checkpoint="random:r50"), HipieRelease)
