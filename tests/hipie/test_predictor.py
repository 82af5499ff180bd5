"""HipiePredictor on the tiny preset (random weights): every task's output, batching, errors, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from hipie.build import build_hipie, tiny_config
from hipie.config import PostprocessConfig
from hipie.predict import main as predict_main
from hipie.predictor import HipiePredictor, Segments

THINGS = ["dog", "person"]
STUFF = ["grass", "sky"]
PARTS = ["head", "ear", "eye", "leg"]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    model = build_hipie(dataclasses.replace(tiny_config(), test_size=160))  # small = fast tests
    # random weights give low scores: keep every candidate so the outputs are non-trivial
    post = PostprocessConfig(score_threshold=0.0, overlap_threshold=0.0, max_detections=20)
    return HipiePredictor(model, postprocess=post)


@pytest.fixture(scope="module")
def photo(coco_sample) -> np.ndarray:
    """A real COCO photo, downscaled (the predictor resizes to 320 anyway)."""
    image = Image.open(sorted((coco_sample / "input_images").glob("*.jpg"))[0]).convert("RGB")
    image.thumbnail((200, 200))
    return np.asarray(image)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, (90, 170, 3), dtype=np.uint8)


def _check_segments(seg: Segments, image: np.ndarray, vocabulary: list[str]) -> None:
    H, W = image.shape[:2]
    N = len(seg)
    assert seg.masks.shape == (N, H, W) and seg.masks.dtype == torch.bool
    assert seg.boxes.shape == (N, 4)
    assert (seg.boxes[:, 0] >= 0).all() and (seg.boxes[:, 2] <= W).all()
    assert (seg.boxes[:, 1] >= 0).all() and (seg.boxes[:, 3] <= H).all()
    assert (seg.boxes[:, :2] <= seg.boxes[:, 2:]).all()
    assert seg.vocabulary == vocabulary
    assert seg.labels == [vocabulary[i] for i in seg.label_ids.tolist()]
    assert seg.probs.shape == (N, len(vocabulary))
    if N:
        assert torch.allclose(seg.probs.sum(1), torch.ones(N), atol=1e-5)
    assert seg.scores.shape == seg.is_thing.shape == seg.parents.shape == (N,)
    assert len(seg.level) == N


def test_panoptic(predictor, photo):
    seg = predictor.panoptic(photo, THINGS, STUFF)
    _check_segments(seg, photo, THINGS + STUFF)
    assert len(seg) > 0
    assert seg.masks.sum(0).max() <= 1  # panoptic segments are disjoint
    for label, thing, level in zip(seg.labels, seg.is_thing.tolist(), seg.level):
        assert thing == (label in THINGS)
        assert level == ("instance" if thing else "stuff")
    stuff_labels = [lb for lb, t in zip(seg.labels, seg.is_thing.tolist()) if not t]
    assert len(stuff_labels) == len(set(stuff_labels))  # one segment per stuff class
    # thing segments only put probability on thing classes, stuff only on stuff classes
    assert (seg.probs[seg.is_thing][:, len(THINGS) :] == 0).all()
    assert (seg.probs[~seg.is_thing][:, : len(THINGS)] == 0).all()


def test_instance_detect_parts(predictor, photo):
    for task, vocab, level in (
        ("instance", THINGS, "instance"),
        ("detect", THINGS, "instance"),
        ("parts", PARTS, "part"),
    ):
        seg = getattr(predictor, task)(photo, vocab)
        _check_segments(seg, photo, vocab)
        assert 0 < len(seg) <= 20
        assert set(seg.level) == {level}
        assert bool(seg.is_thing.all())
        assert (seg.scores[:-1] >= seg.scores[1:]).all()  # sorted by score after NMS


def test_semantic(predictor, photo):
    vocab = THINGS + STUFF
    sem = predictor.semantic(photo, vocab)
    assert sem.label_map.shape == photo.shape[:2] and sem.label_map.dtype == torch.long
    assert sem.labels == vocab
    assert 0 <= int(sem.label_map.min()) and int(sem.label_map.max()) < len(vocab)


def test_refer(predictor, photo):
    seg = predictor.refer(photo, "the dog on the left")
    _check_segments(seg, photo, ["the dog on the left"])
    assert len(seg) == 1 and seg.labels == ["the dog on the left"]


def test_batched_equals_per_image(predictor, photo, noise):
    batch = predictor.panoptic_batch([photo, noise], THINGS, STUFF)
    for image, got in zip([photo, noise], batch):
        want = predictor.panoptic(image, THINGS, STUFF)
        assert got.labels == want.labels
        assert torch.equal(got.masks, want.masks)
        assert torch.allclose(got.scores, want.scores, atol=1e-5)
        assert torch.allclose(got.boxes, want.boxes, atol=1e-3)
    inst = predictor.instance_batch([photo, noise], THINGS)
    assert inst[1].labels == predictor.instance(noise, THINGS).labels
    sem = predictor.semantic_batch([photo, noise], THINGS)
    assert torch.equal(sem[1].label_map, predictor.semantic(noise, THINGS).label_map)
    refs = predictor.refer_batch([photo, noise], ["a dog", "the sky"])
    assert torch.equal(refs[1].masks, predictor.refer(noise, "the sky").masks)


def test_vocabulary_over_512_tokens(predictor, noise):
    vocab = [f"object number {i}" for i in range(300)]
    sem = predictor.semantic(noise, vocab)
    assert int(sem.label_map.max()) < 300
    seg = predictor.instance(noise, vocab)
    _check_segments(seg, noise, vocab)


def test_text_features_are_cached(predictor):
    a = predictor.text_features(THINGS + STUFF)
    b = predictor.text_features(THINGS + STUFF)
    assert a is b
    assert predictor.text_features(THINGS) is not a


def test_errors(predictor, photo):
    with pytest.raises(ValueError, match="empty vocabulary"):
        predictor.instance(photo, [])
    with pytest.raises(ValueError, match="empty vocabulary"):
        predictor.panoptic(photo, [], [])
    with pytest.raises(ValueError, match="empty image"):
        predictor.panoptic(np.zeros((0, 10, 3), dtype=np.uint8), THINGS, STUFF)
    with pytest.raises(ValueError, match="RGB image"):
        predictor.semantic(np.zeros((10, 10), dtype=np.uint8), THINGS)


def test_hierarchy_structure(predictor, photo):
    seg = predictor.hierarchy(photo, THINGS, STUFF, PARTS)
    composed = [f"{t} {p}" for t in THINGS for p in PARTS]
    assert seg.vocabulary[: len(THINGS + STUFF) + len(composed)] == THINGS + STUFF + composed
    H, W = photo.shape[:2]
    assert seg.masks.shape == (len(seg), H, W)
    levels = seg.level
    for i, (level, parent) in enumerate(zip(levels, seg.parents.tolist())):
        if level in ("instance", "stuff"):
            assert parent == -1
        elif level == "subpart":  # fine part of a coarse group, e.g. "dog ear" in "dog head"
            assert levels[parent] == "part"
            assert bool((seg.masks[i] & ~seg.masks[parent]).sum() == 0)  # inside its group
        elif parent >= 0:  # a part or a coarse group hangs from an instance
            assert levels[parent] == "instance" and bool(seg.is_thing[parent])
    groups = {p for p, lv in zip(seg.parents.tolist(), levels) if lv == "subpart"}
    for g in groups:
        children = [
            i for i, p in enumerate(seg.parents.tolist()) if p == g and levels[i] == "subpart"
        ]
        assert torch.equal(seg.masks[children].any(0), seg.masks[g])  # group = union of children
        assert seg.labels[g].endswith("head") or seg.labels[g].endswith("leg")


def test_hierarchy_asks_only_for_each_things_parts(predictor, photo):
    thing_parts = {THINGS[0]: PARTS[:1]}  # the first thing has one part, the others none
    seg = predictor.hierarchy(photo, THINGS, STUFF, PARTS, thing_parts=thing_parts)
    part_vocabulary = seg.vocabulary[len(THINGS + STUFF) :]
    assert part_vocabulary[:1] == [f"{THINGS[0]} {PARTS[0]}"]
    assert all(label.startswith(f"{THINGS[0]} ") for label in part_vocabulary)  # + its groups
    assert all(label in seg.vocabulary[: len(THINGS + STUFF) + 1] for label in seg.labels)
    with pytest.raises(ValueError, match="none of these things"):
        predictor.hierarchy(photo, THINGS, STUFF, PARTS, thing_parts={})


def test_hierarchy_uses_the_given_part_groups():
    """The shipped tiny model on synthetic scenes: the coarse level comes from `part_groups`."""
    from hipie.synthetic.generator import SceneGenerator
    from pipeline.vocabulary import load_vocabulary

    vocab = load_vocabulary("synthetic")
    shipped = HipiePredictor(build_hipie("tiny", "tiny"))
    args = (vocab.things, vocab.stuff, vocab.parts)
    groups = {"head": ["eye"], "wheel": ["hubcap"]}
    coarse = set()
    for scene in SceneGenerator(seed=5).scenes(0, 4):
        none = shipped.hierarchy(scene.image, *args, part_groups={})
        assert "subpart" not in none.level
        seg = shipped.hierarchy(scene.image, *args, part_groups=groups)
        for i, (level, parent) in enumerate(zip(seg.level, seg.parents.tolist())):
            if level == "subpart":
                assert seg.labels[i].rsplit(" ", 1)[1] in ("eye", "hubcap")
                coarse.add(seg.labels[parent].rsplit(" ", 1)[1])
    assert coarse and coarse <= {"head", "wheel"}


def test_vote_dense_and_rle_agree(predictor, photo):
    H, W = photo.shape[:2]
    pan = predictor.panoptic(photo, THINGS, STUFF)
    sam = torch.zeros(3, H, W, dtype=torch.bool)
    sam[0] = pan.masks[0]  # exactly a HIPIE segment: its vote is that segment's distribution
    sam[1, : H // 2, : W // 2] = True
    sam[2] = True
    dense = predictor.vote(photo, sam, THINGS, STUFF, PARTS)
    assert dense.masks.shape == (3, H, W) and len(dense) == 3
    C = len(THINGS + STUFF)
    if dense.level[0] != "part":
        assert torch.allclose(dense.probs[0, :C], pan.probs[0], atol=1e-5)
        assert dense.labels[0] == pan.labels[0]
    assert torch.allclose(dense.boxes[2], torch.tensor([0.0, 0.0, W, H]))
    rles = [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in sam]
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    rle = predictor.vote(photo, rles, THINGS, STUFF, PARTS)
    assert rle.labels == dense.labels and rle.level == dense.level
    assert torch.allclose(rle.probs, dense.probs, atol=1e-5)
    assert rle.rles is not None and rle.masks.shape == (3, 0, 0)
    assert torch.allclose(rle.boxes, dense.boxes)


def test_predict_cli(tmp_path, coco_sample):
    image = sorted((coco_sample / "input_images").glob("*.jpg"))[0]
    out = tmp_path / "result.json"
    code = predict_main(
        [
            "--task",
            "panoptic",
            "--image",
            str(image),
            "--things",
            "dog,person",
            "--stuff",
            "grass,sky",
            "--preset",
            "tiny",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    h, w = result["image"]["height"], result["image"]["width"]
    assert (h, w) == Image.open(image).size[::-1]
    assert result["vocabulary"] == ["dog", "person", "grass", "sky"]
    for seg in result["segments"]:
        rle = dict(seg["mask"], counts=seg["mask"]["counts"].encode("ascii"))
        assert mask_utils.decode(rle).shape == (h, w)
    code = predict_main(
        ["--task", "instance", "--image", str(image), "--vocabulary", "", "--out", str(out)]
    )
    assert code == 2  # clear error for an empty vocabulary


def test_bf16_precision_runs(predictor, noise):
    bf16 = HipiePredictor(
        predictor.model, postprocess=predictor.config.postprocess, precision="bf16"
    )
    seg = bf16.instance(noise, THINGS)
    _check_segments(seg, noise, THINGS)
    with pytest.raises(ValueError, match="precision"):
        HipiePredictor(predictor.model, precision="fp16")


def test_clip_ensemble_relabels(predictor, photo):
    """With a (random-weight) CLIP classifier, probs follow Eq. 4 per segment."""
    from hipie.clip_ensemble import ClipMaskClassifier, class_lambdas, ensemble

    clip = ClipMaskClassifier(model_name="ViT-S-32", pretrained=None)
    with_clip = HipiePredictor(
        predictor.model, postprocess=predictor.config.postprocess, clip=clip, seen_classes=["dog"]
    )
    plain = predictor.instance(photo, THINGS)
    seg = with_clip.instance(photo, THINGS)
    assert torch.equal(seg.masks, plain.masks)
    want = ensemble(
        plain.probs, clip.probs(photo, plain.masks, THINGS), class_lambdas(THINGS, {"dog"})
    )
    assert torch.allclose(seg.probs, want, atol=1e-5)
    assert seg.label_ids.tolist() == want.argmax(1).tolist()


def test_one_sided_vocabularies_and_empty_sam(predictor, noise):
    only_stuff = predictor.panoptic(noise, [], STUFF)
    assert set(only_stuff.level) <= {"stuff"} and not bool(only_stuff.is_thing.any())
    only_things = predictor.panoptic(noise, THINGS, [])
    assert set(only_things.level) <= {"instance"} and bool(only_things.is_thing.all())
    plain_parts = predictor.hierarchy(noise, [], STUFF, PARTS)  # no things: plain part prompts
    assert plain_parts.vocabulary[: len(STUFF) + len(PARTS)] == STUFF + PARTS
    empty = predictor.vote(
        noise, torch.zeros(0, *noise.shape[:2], dtype=torch.bool), THINGS, STUFF, PARTS
    )
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
