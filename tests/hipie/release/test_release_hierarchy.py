"""The release backend of the labeler's predictor API, on the released architecture.

The seeded rule's weights (meaningless but deterministic outputs) are saved as a release `.pth`,
loaded through `hipie.build_hipie(checkpoint=...)`, and one COCO photo (downscaled, so the
release's full-size post-processing stays cheap on CPU) runs at a short side of 256. The
hierarchy must be the release's own outputs put together: its instances above the display
threshold, its panoptic stuff, the demo's part masks, and consistent probabilities, parents,
levels, masks and boxes; the SAM vote and the schema rows must work on it unchanged.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import schemas
from hipie import build_hipie
from hipie.modeling.hipie_release import HipieRelease
from hipie.modeling.vl_align import token_to_class_logits
from hipie.postprocess_release import class_logit_modes, keep_above, postprocess_release
from hipie.release_hierarchy import ReleaseHierarchyPredictor, ReleaseThresholds, object_segments
from hipie.vote_policy import fine_parts
from pipeline.labeling.labeler import segments_to_masks
from schemas import rle
from schemas.part_names import split_part_label
from tests.hipie.release.reference import SHARED, fixture, require, write_release_checkpoint
from tests.hipie.release.synthetic_postproc import NUM_BG, synthetic_postproc_inputs

PHOTO = SHARED / "data" / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"
# Sixteen classes: with the rule's weights no query passes the panoptic merge's 0.25 (with five,
# ~950 do, and the release's per-query merge loop takes 15 s per pass on this machine).
THINGS = ["person", "dog", "ball", "car", "horse", "bird", "cat", "chair", "bicycle", "kite"]
STUFF = ["grass", "sky", "tree", "road", "wall", "sea"]
PARTS = ["head", "ear", "eye", "leg"]
THING_PARTS = {"person": ["head", "ear", "eye", "leg"], "dog": ["head", "ear", "leg"]}
GROUPS = {"head": ["ear", "eye"]}
MIN_SIZE = 256


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path = write_release_checkpoint("r50", tmp_path_factory.mktemp("release") / "rule_r50.pth")
    model = build_hipie(checkpoint=str(path))
    path.unlink()
    assert isinstance(model, HipieRelease)
    return ReleaseHierarchyPredictor(model, min_size=MIN_SIZE)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    image = Image.open(require(PHOTO)).convert("RGB")
    return np.asarray(image.resize((240, 160), Image.BILINEAR))


@pytest.fixture(scope="module")
def hierarchy(predictor, photo):
    return predictor.hierarchy(
        photo, THINGS, STUFF, PARTS, thing_parts=THING_PARTS, part_groups=GROUPS
    )


@pytest.fixture(scope="module")
def demo(predictor, photo):
    """The release predictor's own demo (things + stuff pass, part pass, part masks)."""
    prompts = [f"{t} {p}" for t in THINGS for p in PARTS if p in THING_PARTS.get(t, ())]
    return predictor.release.parts(
        photo, THINGS, STUFF, prompts, instance_threshold=ReleaseThresholds().score_threshold
    ), prompts


def test_instances_and_stuff_are_the_releases(hierarchy, demo):
    (det, _, _), _ = demo
    names = THINGS + STUFF
    kept = keep_above(det.instances, 0.5)
    assert len(kept) > 0  # the rule's weights give scores around 0.6
    idx = [i for i, lv in enumerate(hierarchy.level) if lv == "instance"]
    assert [hierarchy.labels[i] for i in idx] == [names[int(c)] for c in kept.classes]
    assert torch.equal(hierarchy.scores[idx], kept.scores.float())
    assert torch.equal(hierarchy.masks[idx], kept.masks)
    assert torch.equal(hierarchy.boxes[idx], kept.boxes.float())
    stuff = [i for i, lv in enumerate(hierarchy.level) if lv == "stuff"]
    expected = [s for s in det.segments_info if not s["isthing"]]
    assert [hierarchy.labels[i] for i in stuff] == [names[s["category_id"]] for s in expected]
    for i, s in zip(stuff, expected):
        assert torch.equal(hierarchy.masks[i], det.panoptic_seg == s["id"])


def test_parts_are_the_demos_part_masks(hierarchy, demo):
    (_, _, masks), prompts = demo
    fine = sorted(fine_parts(hierarchy))  # the parts the vote uses
    assert len(masks) > 0
    assert [hierarchy.labels[i] for i in fine] == [prompts[m.part_class] for m in masks]
    for i, m in zip(fine, masks):
        assert torch.equal(hierarchy.masks[i], m.mask)
        assert int(m.mask.sum()) > ReleaseThresholds().part_min_area


def test_structure_probs_parents_levels(hierarchy, photo):
    h = hierarchy
    n, (H, W) = len(h), photo.shape[:2]
    assert h.masks.shape == (n, H, W) and h.masks.dtype == torch.bool
    assert h.probs.shape == (n, len(h.vocabulary))
    assert set(h.level) <= set(schemas.LEVELS)
    assert {"instance", "part", "subpart"} <= set(h.level)
    sums = h.probs.sum(1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0)), sums
    assert torch.all(h.probs >= 0)
    assert torch.all(h.boxes[:, 0::2] >= 0) and torch.all(h.boxes[:, 0::2] <= W)
    assert torch.all(h.boxes[:, 1::2] >= 0) and torch.all(h.boxes[:, 1::2] <= H)
    assert [h.vocabulary[i] for i in h.label_ids.tolist()] == h.labels
    thing_cols = torch.tensor([v in THINGS for v in h.vocabulary])
    stuff_cols = torch.tensor([v in STUFF for v in h.vocabulary])
    for i, level in enumerate(h.level):
        parent = int(h.parents[i])
        if level in ("instance", "stuff"):
            assert parent == -1
            own = thing_cols if level == "instance" else stuff_cols
            assert float(h.probs[i][~own].sum()) == 0.0  # a thing query only predicts things
            assert bool(h.is_thing[i]) == (level == "instance")
            continue
        # parts hang under an instance of their thing, subparts under a coarse part of it
        assert parent >= 0 and not bool((h.masks[i] & ~h.masks[parent]).any())
        instance = parent if level == "part" else int(h.parents[parent])
        assert h.level[instance] == "instance"
        thing, _ = split_part_label(h.labels[i], THINGS)
        assert thing == h.labels[instance]
        allowed = torch.tensor([split_part_label(v, THINGS)[0] == thing for v in h.vocabulary])
        assert float(h.probs[i][~allowed].sum()) == 0.0  # among its thing's parts only
        if level == "subpart":
            assert h.level[parent] == "part" and h.labels[parent] == f"{thing} head"


def test_vote_and_schema_rows_work_unchanged(predictor, hierarchy, photo):
    H, W = photo.shape[:2]
    sam = []
    for y0, x0, y1, x1 in [(0, 0, H, W), (10, 20, 90, 140), (40, 60, 70, 100), (0, 0, 5, 5)]:
        m = np.zeros((H, W), bool)
        m[y0:y1, x0:x1] = True
        sam.append(rle.encode(m))
    voted = predictor.vote_from_hierarchy(hierarchy, sam, THINGS)
    assert len(voted) == len(sam) and voted.rles == sam
    sums = voted.probs.sum(1)
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
    for masks in (
        segments_to_masks(hierarchy, topk=3),
        segments_to_masks(voted, topk=3, sam_records=[{"rle": r} for r in sam]),
    ):
        row = schemas.make_ok_row(
            image_id="x", uri="x.jpg", shard="s", width=W, height=H, masks=masks,
            model="hipie:rule", vocabulary_hash="h",
        )  # fmt: skip
        table = pa.Table.from_pylist([row], schema=schemas.LABELS_V1)
        schemas.validate_table(table)


def test_panoptic_batch_without_parts(predictor, hierarchy, photo):
    (pan,) = predictor.panoptic_batch([photo], THINGS, STUFF)
    n = sum(lv in ("instance", "stuff") for lv in hierarchy.level)
    assert pan.labels == hierarchy.labels[:n] and torch.equal(pan.masks, hierarchy.masks[:n])
    assert torch.equal(pan.probs, hierarchy.probs[:n, : len(pan.vocabulary)])


def test_objects_from_the_release_postprocessing_of_synthetic_heads():
    """The fixture's synthetic heads (compact objects, stuff bands) through the release's
    post-processing: instances above 0.5 and the panoptic merge's stuff segments."""
    f = fixture("r50")
    meta = f.inputs["passes"]["postproc"]
    x = synthetic_postproc_inputs(f.inputs["seed"], NUM_BG, 900, 300)
    pmap = {int(k): v for k, v in meta["positive_map_label_to_token"].items()}
    is_thing = {int(k): v for k, v in meta["is_thing"].items()}
    thing_mode, stuff_mode = class_logit_modes(is_thing)
    things, stuff = ["t1", "t2", "t3"], ["s1", "s2"]  # classes 1-3 are things, 4-5 stuff
    assert [is_thing[c] for c in range(1, 6)] == [True] * 3 + [False] * 2
    logits = [
        token_to_class_logits(v, pmap, len(pmap), is_thing=is_thing, mode=mode)[0]
        for v, mode in ((x["box_cls"][:, NUM_BG:], thing_mode), (x["pred_logits_maskdino"], stuff_mode))
    ]  # fmt: skip
    res = postprocess_release(
        logits[0], x["box_pred"][0, NUM_BG:], x["iou_pred"][0, NUM_BG:],
        x["mask_pred"][0, NUM_BG:, 0], logits[1], x["pred_masks_maskdino"][0],
        meta["image_size"], meta["output_size"], is_thing,
    )  # fmt: skip
    seg = object_segments(res, things, stuff, 0.5)
    assert seg.level == ["instance"] * meta["instances_above_0.5"] + ["stuff"] * 2
    sums = seg.probs.sum(1)
    assert torch.allclose(sums, torch.ones_like(sums))
    # an instance's distribution: its query's panoptic probs over the thing classes
    for i in range(meta["instances_above_0.5"]):
        q = int(res.instances.query_index[i])
        row = res.panoptic_probs[res.selection.nms_keep.tolist().index(q), :3]
        assert torch.allclose(seg.probs[i, :3], row / row.sum()) and seg.probs[i, 3:].sum() == 0
    # stuff: the merge's segments, labeled by it, their pixels' distribution peaks at the label
    info = [s for s in meta["segments_info"] if not s["isthing"]]
    for i, s in zip(range(meta["instances_above_0.5"], len(seg)), info):
        assert seg.labels[i] == stuff[s["category_id"] - 3]
        assert torch.equal(seg.masks[i], res.panoptic_seg == s["id"])
        assert int(seg.probs[i].argmax()) == s["category_id"] and seg.probs[i, :3].sum() == 0
        assert float(seg.scores[i]) == float(seg.probs[i, s["category_id"]])
        box = seg.boxes[i].tolist()
        ys, xs = torch.nonzero(seg.masks[i], as_tuple=True)
        assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
