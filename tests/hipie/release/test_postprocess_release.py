"""The release's inference post-processing against the official-HIPIE fixtures.

`postproc`: synthetic head outputs with compact objects (NMS of near-duplicates, nested objects,
stuff merging) through `postprocess_release`, compared with the official `HIPIE_IMG.inference` +
`segmentation_postprocess` outputs. The real passes (`det`, `part`, `ref`) start from the stored
head outputs of the random-weight runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hipie.modeling.vl_align import token_to_class_logits
from hipie.nms import batched_nms, nms_pure
from hipie.postprocess_release import (
    DEMO_INSTANCE_THRESHOLD,
    class_logit_modes,
    instance_boxes,
    instance_masks,
    instance_probs,
    panoptic_class_probs,
    panoptic_merge,
    part_instance_masks,
    postprocess_release,
    select_instances,
    semantic_map,
)
from tests.hipie.release.reference import assert_close, fixture
from tests.hipie.release.synthetic_postproc import NUM_BG, synthetic_postproc_inputs

# the shipped fixtures and one we generated with the oracle tool (seed 11, compact)
OWN = str(Path(__file__).parent / "data" / "own_r50_seed11")
FIXTURES = ["r50", "vit_h", OWN]


def _int_keys(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def _agnostic(config: str) -> bool:
    return bool(fixture(config).inputs["cfg"]["TEST.BG_CLS_AGNOSTIC"])


def _assert_instances(f, prefix: str, inst, width: int, n_masks: int | None = None):
    """classes/order equal, scores <= 1e-5, boxes <= 1e-2 px, masks IoU >= 0.999 (README gates)."""
    assert inst.classes.tolist() == f[f"{prefix}/classes"].tolist()
    assert_close(inst.scores, f[f"{prefix}/scores"], f"{prefix}/scores", rel=1e-5)
    boxes = f[f"{prefix}/boxes_xyxy"]
    assert float((inst.boxes - boxes).abs().max()) <= 1e-2
    if n_masks is not None or f"{prefix}/masks_packbits" in f:
        ref = torch.from_numpy(f.unpack_masks(f"{prefix}/masks_packbits", width))
        ours = inst.masks[: ref.shape[0]]
        inter = (ours & ref).flatten(1).sum(1).float()
        union = (ours | ref).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert float(iou.min()) >= 0.999, f"{prefix}: min mask IoU {float(iou.min())}"
        return int((ours != ref).sum())
    return 0


# ------------------------------------------------------------------------------------------------
# postproc: synthetic compact objects through the whole inference


@pytest.mark.parametrize("config", FIXTURES, ids=lambda c: Path(c).name)
def test_postproc_pass(config):
    f = fixture(config)
    meta = f.inputs["passes"]["postproc"]
    x = synthetic_postproc_inputs(f.inputs["seed"], NUM_BG, 900, 300)
    if "postproc/in/box_cls" in f:  # the full fixture stores the inputs: the generator is equal
        for k, v in x.items():
            assert torch.equal(v, f[f"postproc/in/{k}"]), k
    pmap = {int(k): v for k, v in meta["positive_map_label_to_token"].items()}
    is_thing = _int_keys(meta["is_thing"])
    thing_mode, stuff_mode = class_logit_modes(is_thing, bg_cls_agnostic=_agnostic(config))
    assert (thing_mode, stuff_mode) == ("FG", None if config == "vit_h" else "BG")
    thing_logits = token_to_class_logits(
        x["box_cls"][:, NUM_BG:], pmap, len(pmap), is_thing=is_thing, mode=thing_mode
    )[0]
    stuff_logits = token_to_class_logits(
        x["pred_logits_maskdino"], pmap, len(pmap), is_thing=is_thing, mode=stuff_mode
    )[0]
    res = postprocess_release(
        thing_logits,
        x["box_pred"][0, NUM_BG:],
        x["iou_pred"][0, NUM_BG:],
        x["mask_pred"][0, NUM_BG:, 0],
        stuff_logits,
        x["pred_masks_maskdino"][0],
        meta["image_size"],
        meta["output_size"],
        is_thing,
    )
    assert len(res.instances) == meta["num_instances"]
    _assert_instances(f, "postproc/out/instances", res.instances, meta["output_size"][1])
    assert int((res.instances.scores > 0.5).sum()) == meta["instances_above_0.5"]
    assert_close(res.sem_seg, f["postproc/out/sem_seg"], "postproc/out/sem_seg", rel=1e-5)
    # unchunked, the semantic map equals the reference to float rounding (bit-equal on the machine
    # that made the fixture; another CPU's SIMD kernels may round the einsum differently)
    masks = torch.cat(
        [x["mask_pred"][0, NUM_BG:, 0][res.selection.nms_keep], x["pred_masks_maskdino"][0]]
    )
    sem = semantic_map(
        res.panoptic_probs, masks, meta["image_size"], meta["output_size"], chunk=None
    )
    assert_close(sem, f["postproc/out/sem_seg"], "unchunked sem_seg", rel=1e-5)
    for chunk in (1, 5, None):  # chunked panoptic merge: same ids, same segments
        pano, info = panoptic_merge(
            res.panoptic_probs, masks, meta["image_size"], meta["output_size"], is_thing,
            chunk=chunk,
        )  # fmt: skip
        assert torch.equal(pano, res.panoptic_seg) and info == res.segments_info, chunk
    assert torch.equal(res.panoptic_seg, f["postproc/out/panoptic_seg"])
    assert res.segments_info == meta["segments_info"]


# ------------------------------------------------------------------------------------------------
# The real passes, from the stored head outputs


def _thing_selection(f, name: str, task: str):
    logits = f[f"{name}/thing/od_logits"]
    probs = instance_probs(logits, f[f"{name}/thing/pred_boxious"][NUM_BG:])
    boxes = f[f"{name}/thing/pred_boxes"][NUM_BG:]
    return logits, boxes, select_instances(probs, boxes, 100 if task == "detection" else 1)


@pytest.mark.parametrize("config", FIXTURES, ids=lambda c: Path(c).name)
@pytest.mark.parametrize("name", ["det", "part", "ref"])
def test_real_pass_selection(config, name):
    """Token pooling -> probs -> NMS -> top-k -> boxes/scores/classes (+ masks where stored)."""
    f = fixture(config)
    p = f.inputs["passes"][name]
    task = p["task"]
    pmap = {int(k): v for k, v in p["positive_map_label_to_token"].items()}
    is_thing = _int_keys(p.get("test_is_thing", p.get("is_thing", {})))
    thing_mode, stuff_mode = class_logit_modes(is_thing, bg_cls_agnostic=_agnostic(config))
    calls = {c["name"]: c["mode"] for c in p["od_logit_calls"]}
    assert calls["thing/od_logits"] == thing_mode
    pooled = token_to_class_logits(
        f[f"{name}/thing/pred_logits"][None, NUM_BG:], pmap, len(pmap), is_thing=is_thing,
        mode=thing_mode,
    )[0]  # fmt: skip
    assert torch.equal(pooled, f[f"{name}/thing/od_logits"])

    logits, boxes, sel = _thing_selection(f, name, task)
    assert_close(sel.nms_scores, f[f"{name}/thing/nms_scores"], f"{name}/nms_scores", rel=1e-6)
    assert torch.equal(sel.nms_keep, f[f"{name}/thing/nms_keep"])
    assert torch.equal(sel.topk_indexes, f[f"{name}/thing/topk_indexes"])
    assert torch.equal(sel.query_index, f[f"{name}/thing/final_query_index"])
    for backend in ("pure", "torchvision"):  # both NMS paths give the release's keep list
        keep = batched_nms(
            instance_boxes_xyxy_normalized(boxes), sel.nms_scores, sel.nms_classes, 0.7,
            backend=backend,
        )  # fmt: skip
        assert torch.equal(keep, sel.nms_keep), backend

    out_hw = f.inputs["original_hw"]
    xyxy, nonempty = instance_boxes(boxes[sel.query_index], f.inputs["resized_hw"], out_hw)
    assert bool(nonempty.all())
    prefix = f"{name}/out/instances"
    assert sel.classes.tolist() == f[f"{prefix}/classes"].tolist()
    assert_close(sel.scores, f[f"{prefix}/scores"], f"{prefix}/scores", rel=1e-5)
    assert float((xyxy - f[f"{prefix}/boxes_xyxy"]).abs().max()) <= 1e-2
    if f"{name}/thing/final_mask_logits" in f:
        masks = instance_masks(f[f"{name}/thing/final_mask_logits"], f.inputs["resized_hw"], out_hw)
        ref = torch.from_numpy(f.unpack_masks(f"{prefix}/masks_packbits", out_hw[1]))
        assert torch.equal(masks, ref)
        assert masks.flatten(1).sum(1).tolist() == f[f"{prefix}/mask_areas"].tolist()

    if task == "detection":
        calls_stuff = calls["stuff/od_logits"]
        assert calls_stuff == stuff_mode
        stuff = token_to_class_logits(
            f[f"{name}/stuff/pred_logits"][None], pmap, len(pmap), is_thing=is_thing,
            mode=stuff_mode,
        )[0]  # fmt: skip
        assert torch.equal(stuff, f[f"{name}/stuff/od_logits"])
        probs = panoptic_class_probs(logits[sel.nms_keep], stuff)
        assert_close(probs, f[f"{name}/pano/mask_cls"], f"{name}/pano/mask_cls", rel=1e-5)


def instance_boxes_xyxy_normalized(boxes: torch.Tensor) -> torch.Tensor:
    from hipie.box_ops import box_cxcywh_to_xyxy

    return box_cxcywh_to_xyxy(boxes)


def test_det_sem_seg_partial_r50():
    """`det/out/sem_seg` needs the mask logits of all 826 NMS-kept thing queries; the fixture holds
    those of the 100 final ones only (+ all 300 stuff queries). The known terms are a lower bound
    of every pixel (all terms >= 0) and must not exceed the reference anywhere."""
    f = fixture("r50")
    logits, _, sel = _thing_selection(f, "det", "detection")
    probs = panoptic_class_probs(logits[sel.nms_keep], f["det/stuff/od_logits"])
    n_keep = len(sel.nms_keep)
    rows = torch.tensor([int((sel.nms_keep == q).nonzero()) for q in sel.query_index.tolist()])
    rows = torch.unique(rows)  # a query can be in the top-k with two classes
    q_of_row = sel.nms_keep[rows]
    final_q = f["det/thing/final_query_index"].tolist()
    thing_masks = f["det/thing/final_mask_logits"][[final_q.index(q) for q in q_of_row.tolist()]]
    known = torch.cat([probs[rows], probs[n_keep:]])
    masks = torch.cat([thing_masks, f["det/stuff/pred_masks"]])
    partial = semantic_map(known, masks, f.inputs["resized_hw"], f.inputs["original_hw"])
    ref = f["det/out/sem_seg"]
    assert float((partial - ref).max()) <= 1e-3
    # the stuff queries' share dominates nothing here, but the partial map must be substantial
    assert float(partial.sum()) > 0.2 * float(ref.sum())


@pytest.mark.parametrize("config", ["r50", "vit_h"])
def test_part_masks_of_kept_instances(config):
    """The demo's part masks: argmax of the part pass's sem_seg inside the det instances > 0.5."""
    f = fixture(config)
    det, part = f.inputs["passes"]["det"], f.inputs["passes"]["part"]
    width = f.inputs["original_hw"][1]
    masks = torch.from_numpy(f.unpack_masks("det/out/instances/masks_packbits", width))
    keep = f["det/out/instances/scores"] > DEMO_INSTANCE_THRESHOLD
    names = [det["class_names"][c] for c in f["det/out/instances/classes"][keep].tolist()]
    if "part/out/sem_seg" in f:
        assert torch.equal(
            f["part/out/sem_seg"].argmax(0).to(torch.uint8), f["part/out/sem_seg_argmax"]
        )
    parts_seg = f["part/out/sem_seg_argmax"].long()
    got = part_instance_masks(parts_seg, masks[keep], names, part["class_names"])
    expected = part["part_instances_of_det_instances_above_0.5"]
    assert [(p.instance, p.part_class, p.label, int(p.mask.sum())) for p in got] == [
        (e["instance"], e["part_class"], e["label"], e["area"]) for e in expected
    ]
    ref = f.unpack_masks("part/out/part_instance_masks_packbits", width)
    assert np.array_equal(torch.stack([p.mask for p in got]).numpy(), ref)


# ------------------------------------------------------------------------------------------------
# Units


def test_pure_nms_matches_torchvision_on_random_boxes():
    from torchvision.ops import batched_nms as tv_batched_nms

    g = torch.Generator().manual_seed(0)
    for n, ncls in [(50, 1), (900, 3), (1200, 4)]:  # 1200 boxes: torchvision's per-class path
        xy = torch.rand(n, 2, generator=g)
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.3], 1)
        scores = torch.rand(n, generator=g).round(decimals=2)  # ties
        cls = torch.randint(0, ncls, (n,), generator=g)
        expected = tv_batched_nms(boxes, scores, cls, 0.5)
        assert torch.equal(batched_nms(boxes, scores, cls, 0.5, backend="pure"), expected)
    assert nms_pure(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_panoptic_rules_by_hand():
    """Overlap rule, stuff segments sharing an id, void where no query wins its own pixels."""
    big = torch.full((4, 4), -9.0)
    big[:2] = 9.0
    small = torch.full((4, 4), -9.0)
    small[0, 0] = 9.0  # nested in `big`, lower score: it wins nothing -> skipped
    stuff_a = torch.full((4, 4), -9.0)
    stuff_a[2, :2] = 9.0
    stuff_b = torch.full((4, 4), -9.0)
    stuff_b[2, 2:] = 9.0
    masks = torch.stack([big, small, stuff_a, stuff_b])
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    pano, info = panoptic_merge(probs, masks, (16, 16), (4, 4), {1: True, 2: False})
    assert info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 1},
    ]
    expected = torch.zeros(4, 4, dtype=torch.int32)
    expected[:2] = 1
    expected[2] = 2
    assert torch.equal(pano, expected)


def test_nms_falls_back_to_pure_when_torchvision_fails(monkeypatch):
    import torchvision.ops

    f = fixture("r50")
    _, boxes, sel = _thing_selection(f, "det", "detection")

    def broken(*args, **kwargs):
        raise RuntimeError("Couldn't load custom C++ ops")

    monkeypatch.setattr(torchvision.ops, "nms", broken)
    xyxy = instance_boxes_xyxy_normalized(boxes)
    keep = batched_nms(xyxy, sel.nms_scores, sel.nms_classes, 0.7)
    assert torch.equal(keep, f["det/thing/nms_keep"])
    with pytest.raises(RuntimeError):
        batched_nms(xyxy, sel.nms_scores, sel.nms_classes, 0.7, backend="torchvision")
