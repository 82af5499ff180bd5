"""Training data, the loop, checkpoint/resume and the CLI (tiny preset, CPU, small images)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from hipie.synthetic.generator import (
    STUFF_CLASSES,
    THING_CLASSES,
    SceneConfig,
    SceneGenerator,
    write_coco_panoptic,
)
from hipie.training.data import (
    CocoInstancesDataset,
    CocoPanopticDataset,
    collate,
    panoptic_targets,
    part_targets,
    referring_targets,
    sample_from_scene,
)
from hipie.training.train import STATE_FILE, TrainConfig, lr_factor, train

TINY_SCENE = SceneConfig(width=64, height=64, min_things=2, max_things=2)


def _cfg(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(
        scene=TINY_SCENE,
        batch_size=1,
        lr=1e-3,
        warmup_steps=0,
        lr_drops=(),
        eval_scenes=0,
        eval_every=0,
        checkpoint_every=0,
        progress=False,
        num_threads=1,
        out_dir=str(tmp_path / name),
    )
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- data
def test_synthetic_scene_to_targets():
    scene = SceneGenerator(SceneConfig(width=80, height=72), seed=3).scene(1)
    sample = sample_from_scene(scene)
    things = [s for s in scene.segments if s.isthing]
    assert sample.thing_classes == tuple(s.category for s in things)
    assert torch.equal(sample.thing_masks, torch.from_numpy(np.stack([s.mask for s in things])))
    # every part (and subpart) points to the thing that contains it
    for mask, parent in zip(sample.part_masks, sample.part_parents):
        assert (mask & ~sample.thing_masks[parent]).sum() == 0
    batch = collate([sample])
    assert batch.images.shape == (1, 3, 96, 96)  # padded to multiples of 32
    assert batch.image_sizes.tolist() == [[72, 80]]
    pan = panoptic_targets(batch, THING_CLASSES, STUFF_CLASSES, rng=None)
    assert pan.prompt == THING_CLASSES + STUFF_CLASSES
    assert [pan.prompt[i] for i in pan.stuff[0].labels] == list(sample.stuff_classes)
    shuffled = panoptic_targets(batch, THING_CLASSES, STUFF_CLASSES, rng=random.Random(1))
    assert sorted(shuffled.prompt) == sorted(pan.prompt)
    assert [shuffled.prompt[i] for i in shuffled.things[0].labels] == list(sample.thing_classes)
    t = pan.things[0]
    assert t.masks.shape == (len(things), 96, 96)
    # boxes are normalized cxcywh of the padded input
    x, y, w, h = things[0].bbox
    expected = torch.tensor([(x + w / 2) / 96, (y + h / 2) / 96, w / 96, h / 96])
    assert torch.allclose(t.boxes[0], expected, atol=1e-6)
    ds_parts = tuple(sorted(set(sample.part_classes)))
    pt = part_targets(batch, ds_parts, sample.thing_classes, rng=random.Random(0))
    col = {n: i for i, n in enumerate(pt.prompt)}
    got = pt.things[0]
    assert [pt.prompt[i] for i in got.labels] == list(sample.part_classes)
    assert got.instance_labels.tolist() == [
        col[sample.thing_classes[p]] for p in sample.part_parents
    ]
    assert pt.instance_columns.tolist() == [n in sample.thing_classes for n in pt.prompt] + [False]
    ref = referring_targets(batch, random.Random(0))
    text, idx = next((t_, i) for t_, i in sample.expressions if t_ == ref.prompt[0])
    assert torch.equal(ref.things[0].masks[0, :72, :80], sample.thing_masks[idx])


def test_coco_panoptic_round_trip_with_parts_and_referring(tmp_path):
    """Synthetic scenes written as COCO panoptic files load back as the same samples."""
    gen = SceneGenerator(SceneConfig(width=64, height=48), seed=7)
    scenes = [gen.scene(i) for i in range(2)]
    json_path, png_dir, images_dir = write_coco_panoptic(scenes, tmp_path / "coco")
    ds = CocoPanopticDataset(
        json_path=json_path,
        png_dir=png_dir,
        image_dir=images_dir,
        parts_json=tmp_path / "coco" / "parts.json",
        referring_json=tmp_path / "coco" / "referring.json",
    )
    assert len(ds) == 2
    for scene, loaded in zip(scenes, (ds[0], ds[1])):
        ref = sample_from_scene(scene)
        assert loaded.thing_classes == ref.thing_classes
        assert loaded.stuff_classes == ref.stuff_classes
        assert torch.equal(loaded.thing_masks, ref.thing_masks)
        assert torch.equal(loaded.stuff_masks, ref.stuff_masks)
        assert loaded.part_classes == ref.part_classes
        assert torch.equal(loaded.part_masks, ref.part_masks)
        assert loaded.part_parents.tolist() == ref.part_parents.tolist()
        assert loaded.expressions == ref.expressions
        # the same picture up to JPEG noise: per-channel means agree
        diff = loaded.image.float().mean((1, 2)) - ref.image.float().mean((1, 2))
        assert diff.abs().max() < 3


def test_coco_sample_files(coco_sample):
    """The real COCO sample: panoptic PNGs and the detection-format JSON (RLE) agree."""
    cats = json.loads((coco_sample / "panoptic_coco_categories.json").read_text())
    pan = CocoPanopticDataset(
        json_path=coco_sample / "panoptic_examples.json",
        png_dir=coco_sample / "panoptic_examples",
        image_dir=coco_sample / "input_images",
        categories=cats,
    )
    det = CocoInstancesDataset(
        json_path=coco_sample / "panoptic_coco_detection_format.json",
        image_dir=coco_sample / "input_images",
    )
    data = json.loads((coco_sample / "panoptic_examples.json").read_text())
    by_id = {c["id"]: c for c in cats}
    for i, ann in enumerate(data["annotations"]):
        s = pan[i]
        segs = [x for x in ann["segments_info"] if not x["iscrowd"]]
        assert len(s.thing_classes) == sum(by_id[x["category_id"]]["isthing"] for x in segs)
        assert len(s.stuff_classes) == len(segs) - len(s.thing_classes)
        areas = sorted(x["area"] for x in segs)
        got = sorted(s.thing_masks.sum((1, 2)).tolist() + s.stuff_masks.sum((1, 2)).tolist())
        assert got == areas
        d = next(det[j] for j in range(len(det)) if det.images[j]["id"] == ann["image_id"])
        # the detection JSON holds every segment (things and stuff) as an RLE "instance"
        assert sorted(d.thing_masks.sum((1, 2)).tolist()) == areas
    small = CocoPanopticDataset(
        json_path=coco_sample / "panoptic_examples.json",
        png_dir=coco_sample / "panoptic_examples",
        image_dir=coco_sample / "input_images",
        categories=cats,
        max_size=160,
    )[0]
    assert max(small.size) == 160 and small.thing_masks.shape[1:] == small.size


# --------------------------------------------------------------------------- schedule
def test_lr_schedule_warmup_and_drops():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_drops=(0.5, 0.8))
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(49, cfg) == 1.0
    assert lr_factor(50, cfg) == pytest.approx(0.1)
    assert lr_factor(80, cfg) == pytest.approx(0.01)


# --------------------------------------------------------------------------- the loop
def test_loss_falls_on_a_fixed_batch(tmp_path):
    cfg = _cfg(tmp_path, "overfit", steps=25, fixed_batch=True, log_every=1)
    result = train(cfg)
    losses = result.history["loss"]
    assert len(losses) == 25 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, (first, last)
    assert (result.checkpoint / "model.safetensors").is_file()
    assert (tmp_path / "overfit" / "training.png").stat().st_size > 1000


def test_resume_continues_where_it_stopped(tmp_path):
    """4 steps in one go == 2 steps, checkpoint, resume to 4: same step, optimizer and weights."""
    kw = dict(passes=("panoptic", "parts"), pass_weights=(1.0, 1.0))
    straight = train(_cfg(tmp_path, "straight", steps=4, **kw))
    half = train(_cfg(tmp_path, "split", steps=2, **kw))
    assert half.step == 2
    state = torch.load(half.checkpoint / STATE_FILE, weights_only=True)
    assert state["step"] == 2
    resumed = train(_cfg(tmp_path, "split", steps=4, resume=True, **kw))
    assert resumed.step == 4
    a = torch.load(straight.checkpoint / STATE_FILE, weights_only=True)
    b = torch.load(resumed.checkpoint / STATE_FILE, weights_only=True)
    assert a["step"] == b["step"] == 4
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    for key in list(a["optimizer"]["state"])[:50:7]:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                a["optimizer"]["state"][key][name],
                b["optimizer"]["state"][key][name],
                rtol=1e-4,
                atol=1e-7,
            )
    assert a["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0
    assert json.loads(b["history"])["step"][-1] == 4


def test_cli_runs_from_a_yaml_config(tmp_path):
    from hipie.train import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "scene: {width: 64, height: 64, max_things: 1}\nbatch_size: 1\n"
        "passes: [panoptic]\npass_weights: [1.0]\neval_scenes: 0\n"
    )
    assert (
        main(
            [
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "run"),
                "--steps",
                "1",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "run" / "checkpoint" / STATE_FILE, weights_only=True)
    assert state["step"] == 1
    assert json.loads(state["config"])["scene"]["width"] == 64


def test_training_evaluation_scores_like_the_evaluate_command():
    """The periodic evaluation and `python -m hipie.evaluate synthetic` share one scoring."""
    from hipie import HipiePredictor, build_hipie
    from hipie.evaluation.benchmark import evaluate_scenes
    from hipie.training.train import evaluate_synthetic

    model = build_hipie("tiny", "tiny").eval()
    scenes = list(SceneGenerator(SceneConfig(width=128, height=128), seed=9).scenes(0, 2))
    metrics = evaluate_synthetic(model, scenes)
    full = evaluate_scenes(HipiePredictor(model), scenes, tasks=("panoptic", "parts", "referring"))
    assert metrics == pytest.approx({
        "pq": full["panoptic"]["All"]["pq"],
        "part_miou": full["parts"]["miou_parts"],
        "oiou": full["referring"]["oiou"],
    })  # fmt: skip
    assert metrics["pq"] > 0.3 and metrics["oiou"] > 0.3 and metrics["part_miou"] > 0.05
    assert evaluate_synthetic(model, []) == {}
