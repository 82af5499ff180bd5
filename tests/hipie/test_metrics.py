"""Metrics against hand-computed values and the real COCO panoptic sample."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hipie.evaluate import main as evaluate_main
from hipie.evaluation.metrics import (
    PanopticImage,
    coco_ap,
    id_to_rgb,
    miou,
    miou_parts,
    oiou,
    panoptic_quality,
    part_label_map,
    rgb_to_id,
)


def _run_cli(capsys, gt_json, gt_dir, pred_json, pred_dir) -> dict:
    argv = ["panoptic", "--gt-json", str(gt_json), "--gt-folder", str(gt_dir),
            "--pred-json", str(pred_json), "--pred-folder", str(pred_dir)]  # fmt: skip
    assert evaluate_main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_rgb_id_roundtrip():
    ids = np.array([[0, 1, 255], [256, 65536 + 7, 256**3 - 1]])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8
    assert rgb[0, 2].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [0, 1, 0]
    assert np.array_equal(rgb_to_id(rgb), ids)


def test_pq_cli_ground_truth_against_itself_is_one(coco_sample: Path, capsys):
    gt_json = coco_sample / "panoptic_examples.json"
    out = _run_cli(capsys, gt_json, coco_sample / "panoptic_examples", gt_json,
                   coco_sample / "panoptic_examples")  # fmt: skip
    for key, n in (("All", 8), ("Things", 4), ("Stuff", 4)):
        assert out[key] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}


def test_pq_cli_imperfect_prediction_matches_hand_computation(coco_sample: Path, tmp_path, capsys):
    """Drop a truck (FN), erode the sky of one image (known IoU), relabel the ball as a horse (FP)."""
    gt_json = coco_sample / "panoptic_examples.json"
    gt = json.loads(gt_json.read_text())
    pred = copy.deepcopy(gt)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    sky_iou = None
    for ann in pred["annotations"]:
        with Image.open(coco_sample / "panoptic_examples" / ann["file_name"]) as img:
            ids = rgb_to_id(np.asarray(img.convert("RGB")))
        if ann["image_id"] == 439180:
            truck = 4587520
            ids[ids == truck] = 0
            ann["segments_info"] = [s for s in ann["segments_info"] if s["id"] != truck]
        else:
            sky = 11829830
            rows = np.nonzero(ids == sky)[0]
            cut = np.percentile(rows, 30)
            eroded = (ids == sky) & (np.arange(ids.shape[0])[:, None] < cut)
            k, area = int(eroded.sum()), int((ids == sky).sum())
            assert area == 8204 and 0 < k < area / 2
            ids[eroded] = 0  # VOID: the prediction loses k pixels, the union stays the gt area
            sky_iou = (area - k) / area
            for seg in ann["segments_info"]:
                if seg["id"] == 16757838:  # the sports ball, predicted as a horse
                    seg["category_id"] = 19
        Image.fromarray(id_to_rgb(ids)).save(pred_dir / ann["file_name"])
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(pred))
    out = _run_cli(capsys, gt_json, coco_sample / "panoptic_examples", pred_json, pred_dir)

    # Things: person all matched (pq 1); sports ball 0 TP, 1 FN (pq 0, sq 0); truck 1 TP + 1 FN
    # (pq = 1 / 1.5); horse 11 TP (IoU 1) + 1 FP (pq = 11 / 11.5).
    things_pq = [1.0, 0.0, 1 / 1.5, 11 / 11.5]
    things_sq = [1.0, 0.0, 1.0, 1.0]
    # Stuff: gravel, tree, grass perfect; sky 2 TP with IoUs 1 and sky_iou.
    stuff_pq = [1.0, 1.0, 1.0, (1 + sky_iou) / 2]
    stuff_sq = stuff_pq
    assert out["Things"]["n"] == 4 and out["Stuff"]["n"] == 4 and out["All"]["n"] == 8
    assert out["Things"]["pq"] == pytest.approx(np.mean(things_pq))
    assert out["Things"]["sq"] == pytest.approx(np.mean(things_sq))
    assert out["Things"]["rq"] == pytest.approx(np.mean([1.0, 0.0, 1 / 1.5, 11 / 11.5]))
    assert out["Stuff"]["pq"] == pytest.approx(np.mean(stuff_pq))
    assert out["Stuff"]["sq"] == pytest.approx(np.mean(stuff_sq))
    assert out["Stuff"]["rq"] == pytest.approx(1.0)
    assert out["All"]["pq"] == pytest.approx(np.mean(things_pq + stuff_pq))


CATS = {1: True, 2: False}  # category 1 is a thing, 2 is stuff


def _img(rows, segments):
    return PanopticImage(id_map=np.array(rows), segments=segments)


def test_pq_in_memory_fp_void_crowd_and_strict_threshold():
    gt = _img(
        [[1, 1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [2, 2, 2, 2, 3, 3],
         [2, 2, 2, 2, 3, 3]],
        [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2},
         {"id": 3, "category_id": 1, "iscrowd": 1}],
    )  # fmt: skip
    pred = _img(
        [[5, 5, 5, 5, 7, 7],
         [5, 5, 6, 6, 7, 7],
         [9, 9, 9, 9, 8, 8],
         [9, 9, 9, 9, 8, 8]],
        [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1}, {"id": 7, "category_id": 1},
         {"id": 8, "category_id": 1}, {"id": 9, "category_id": 2}],
    )  # fmt: skip
    result = panoptic_quality([gt], [pred], CATS)
    # Thing: gt 1 (8 px) vs pred 5 (6 px): IoU 6/8 -> TP. Pred 6 (2 px, inside gt 1) -> FP.
    # Pred 7 lies in VOID and pred 8 in the crowd region: ignored. Stuff: IoU 1.
    thing = result.per_class[1]
    assert (thing["tp"], thing["fp"], thing["fn"]) == (1, 1, 0)
    assert thing["pq"] == pytest.approx(0.75 / 1.5)
    assert result.things.sq == pytest.approx(0.75) and result.things.rq == pytest.approx(1 / 1.5)
    assert result.stuff.pq == 1.0
    assert result.all.pq == pytest.approx((0.5 + 1.0) / 2)

    # IoU exactly 0.5 is not a match (strict >): 4 of 8 px.
    half = _img([[5, 5, 5, 5, 0, 0], [6, 6, 6, 6, 0, 0], [9] * 4 + [0, 0], [9] * 4 + [0, 0]],
                [{"id": 5, "category_id": 1}, {"id": 6, "category_id": 1},
                 {"id": 9, "category_id": 2}])  # fmt: skip
    res = panoptic_quality([gt], [half], CATS).per_class[1]
    assert (res["tp"], res["fp"], res["fn"]) == (0, 2, 1)

    # VOID pixels in the ground truth do not count in the union: pred 5 covers gt 1 and 2 VOID px.
    void = _img([[5, 5, 5, 5, 5, 0], [5, 5, 5, 5, 5, 0], [9] * 6, [9] * 6],
                [{"id": 5, "category_id": 1}, {"id": 9, "category_id": 2}])  # fmt: skip
    res = panoptic_quality([gt], [void], CATS)
    assert res.per_class[1]["iou_sum"] == pytest.approx(1.0)
    # Stuff pred 9 (12 px) vs gt 2 (8 px): IoU 8 / 12 (the crowd pixels are not VOID).
    assert res.per_class[2]["iou_sum"] == pytest.approx(8 / 12)


def test_pq_errors_and_empty():
    gt = _img([[1, 1]], [{"id": 1, "category_id": 1}])
    with pytest.raises(ValueError, match="missing"):
        panoptic_quality([gt], [_img([[4, 4]], [])], CATS)
    with pytest.raises(ValueError, match="absent"):
        panoptic_quality([gt], [_img([[0, 0]], [{"id": 4, "category_id": 1}])], CATS)
    with pytest.raises(ValueError, match="unknown category"):
        panoptic_quality([gt], [_img([[4, 4]], [{"id": 4, "category_id": 99}])], CATS)
    empty = panoptic_quality([], [], CATS)
    assert empty.all.n == 0 and empty.all.pq == 0.0


def test_coco_ap_ground_truth_as_predictions_is_one(coco_sample: Path):
    gt = json.loads((coco_sample / "panoptic_coco_detection_format.json").read_text())
    preds = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "segmentation": a["segmentation"], "score": 1.0}
        for a in gt["annotations"]
    ]  # fmt: skip
    box = coco_ap(gt, preds, iou_type="bbox")
    mask = coco_ap(gt, preds, iou_type="segm")
    assert box.ap == pytest.approx(1.0) and box.ap50 == pytest.approx(1.0)
    assert mask.ap == pytest.approx(1.0) and mask.ap75 == pytest.approx(1.0)
    # Half of the non-crowd objects missing: recall 0.5 caps AP near 0.5 for those classes.
    keep = [p for i, p in enumerate(preds) if i % 2 == 0]
    assert coco_ap(gt, keep, iou_type="segm").ap < 0.9
    assert coco_ap(gt, [], iou_type="bbox").ap == 0.0
    with pytest.raises(ValueError):
        coco_ap(gt, preds, iou_type="keypoints")


def test_miou_hand_computed():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 0]])
    # class 0: TP 3, FN 1 (pixel predicted 1), FP 0 -> 3/4.
    # class 1: TP 2, FN 1 (predicted 2), FP 1 -> 2/4. class 2: TP 0, FP 1 -> 0.
    # The ignored pixel (gt 255, pred 0) counts nowhere.
    result = miou([pred], [gt], num_classes=4, ignore_index=255)
    assert result.per_class[:3].tolist() == pytest.approx([0.75, 0.5, 0.0])
    assert np.isnan(result.per_class[3])
    assert result.miou == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert result.pixel_accuracy == pytest.approx(5 / 7)
    # Accumulated over images, not averaged per image; "no class" predictions are wrong.
    two = miou([pred, np.full((1, 2), -1)], [gt, np.array([[2, 2]])], num_classes=3)
    assert two.per_class.tolist() == pytest.approx([0.75, 0.5, 0.0])


def test_oiou_is_ratio_of_sums():
    a_gt = np.zeros((4, 4), bool)
    a_gt[:2] = True  # 8 px
    a_pred = np.zeros((4, 4), bool)
    a_pred[:1] = True  # 4 px inside: I 4, U 8
    b_gt = np.zeros((4, 4), bool)
    b_gt[0, 0] = True  # 1 px
    b_pred = np.zeros((4, 4), bool)
    b_pred[3, 3] = True  # I 0, U 2
    assert oiou([a_pred, b_pred], [a_gt, b_gt]) == pytest.approx(4 / 10)  # mean IoU would be 0.25
    assert oiou([np.zeros((2, 2), bool)], [np.zeros((2, 2), bool)]) == 0.0


def test_miou_parts_object_part_classes():
    classes = ["robot head", "robot arm", "car wheel", "background"]
    head = np.zeros((4, 4), bool)
    head[:2, :2] = True
    arm = np.zeros((4, 4), bool)
    arm[2:, :2] = True
    wheel = np.zeros((4, 4), bool)
    wheel[:, 3] = True
    gt = part_label_map(np.stack([head, arm, wheel]), [0, 1, 2], background=3)
    assert gt[0, 0] == 0 and gt[3, 0] == 1 and gt[0, 3] == 2 and gt[0, 2] == 3
    pred = gt.copy()
    pred[3, 3] = 0  # one wheel pixel predicted as robot head
    pred[:2, :2][0, 0] = 1  # one head pixel predicted as robot arm
    mean, per_class = miou_parts([pred], [gt], part_classes=classes, background_index=3)
    expected = {"robot head": 3 / 5, "robot arm": 4 / 5, "car wheel": 3 / 4}
    assert per_class == pytest.approx(expected)
    assert mean == pytest.approx(np.mean(list(expected.values())))


class _Oracle:
    """A predictor that answers every task with the scenes' own ground truth."""

    def __init__(self, scenes):
        self.scenes = {s.image.tobytes(): s for s in scenes}

    def _segments(self, items, scores):
        from types import SimpleNamespace

        masks = np.stack([m for m, _ in items]) if items else np.zeros((0, 1, 1), bool)
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (_bbox(m) for m, _ in items)]
        return SimpleNamespace(masks=masks, boxes=np.array(boxes).reshape(-1, 4),
                               labels=[label for _, label in items], scores=np.array(scores))  # fmt: skip

    def panoptic(self, image, things, stuff):
        segs = self.scenes[image.tobytes()].segments
        return self._segments([(s.mask, s.category) for s in segs], [0.9] * len(segs))

    def instance(self, image, vocabulary):
        segs = [s for s in self.scenes[image.tobytes()].segments if s.isthing]
        return self._segments([(s.mask, s.category) for s in segs], [0.9] * len(segs))

    def semantic(self, image, vocabulary):
        from types import SimpleNamespace

        return SimpleNamespace(label_map=self.scenes[image.tobytes()].semantic_map() - 1,
                               labels=list(vocabulary))  # fmt: skip

    def refer(self, image, expression):
        scene = self.scenes[image.tobytes()]
        seg_id = dict(scene.expressions)[expression]
        mask = next(s.mask for s in scene.segments if s.id == seg_id)
        return self._segments([(mask, expression)], [1.0])

    def parts(self, image, vocabulary):
        parts = self.scenes[image.tobytes()].parts
        scores = [1.0 if p.level == "subpart" else 0.5 for p in parts]  # subparts drawn last
        return self._segments([(p.mask, p.name) for p in parts], scores)


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_evaluate_scenes_with_ground_truth_answers_is_perfect():
    from hipie.evaluation.benchmark import evaluate_scenes
    from hipie.synthetic.generator import SceneConfig, SceneGenerator

    scenes = list(SceneGenerator(SceneConfig(width=96, height=80), seed=5).scenes(0, 3))
    out = evaluate_scenes(_Oracle(scenes), scenes)
    assert out["num_images"] == 3
    assert out["panoptic"]["All"]["pq"] == pytest.approx(1.0)
    assert out["semantic"]["miou"] == pytest.approx(1.0)
    assert out["instance"]["ap_box"] == pytest.approx(1.0)
    assert out["instance"]["ap_mask"] == pytest.approx(1.0)
    assert out["referring"]["oiou"] == 1.0
    assert out["referring"]["n"] == sum(len(s.expressions) for s in scenes)
    assert out["parts"]["miou_parts"] == pytest.approx(1.0)
    assert out["parts"]["miou_fine"] == pytest.approx(1.0)
    # Answering the semantic task with "sky" everywhere: IoU of sky = sky px / all px, others 0.
    oracle = _Oracle(scenes)
    oracle.semantic = lambda image, vocabulary: type("S", (), {
        "label_map": np.full(image.shape[:2], 5), "labels": list(vocabulary)})()  # fmt: skip
    sky = sum(int(s.mask.sum()) for sc in scenes for s in sc.segments if s.category == "sky")
    present = {s.category for sc in scenes for s in sc.segments}
    sem = evaluate_scenes(oracle, scenes, tasks=("semantic",))["semantic"]
    assert sem["miou"] == pytest.approx(sky / (3 * 96 * 80) / len(present))


def test_part_miou_groups_subparts_into_their_parts():
    """mIoU_PartS scores a subpart as its part: an answer that labels every subpart with its
    part's class is perfect there, and loses exactly the subpart classes in `miou_fine`."""
    from hipie.evaluation.benchmark import GROUPED_PART_CLASSES, evaluate_scenes, group_part_map
    from hipie.synthetic.generator import SceneConfig, SceneGenerator
    from hipie.synthetic.scene import PART_CLASSES, PART_OF_SUBPART

    assert PART_OF_SUBPART["robot eye"] == "robot head"
    assert PART_OF_SUBPART["car hubcap"] == "car wheel"
    assert "robot eye" not in GROUPED_PART_CLASSES and "robot head" in GROUPED_PART_CLASSES
    head, eye = PART_CLASSES.index("robot head"), PART_CLASSES.index("robot eye")
    grouped = group_part_map(np.array([[head, eye], [255, eye]]))
    g = GROUPED_PART_CLASSES.index("robot head")
    assert grouped.tolist() == [[g, g], [255, g]]

    scenes = list(SceneGenerator(SceneConfig(width=96, height=80), seed=5).scenes(0, 3))
    oracle = _Oracle(scenes)

    def coarse_parts(image, vocabulary):
        scene = oracle.scenes[image.tobytes()]
        parts = {p.id: p for p in scene.parts}
        # a subpart answered with its part's label; painted last, so it claims its pixels
        answer = [
            (p.mask, p.name if p.level == "part" else parts[p.parent_id].name) for p in scene.parts
        ]
        scores = [1.0 if p.level == "subpart" else 0.5 for p in scene.parts]
        return oracle._segments(answer, scores)

    oracle.parts = coarse_parts
    out = evaluate_scenes(oracle, scenes, tasks=("parts",))["parts"]
    assert out["miou_parts"] == pytest.approx(1.0)
    present = set(out["per_class_fine"])
    subparts = present & set(PART_OF_SUBPART)
    assert subparts and all(out["per_class_fine"][c] == 0.0 for c in subparts)
    holders = {PART_OF_SUBPART[c] for c in subparts}
    for name in present - subparts:  # a part holding subparts took their pixels too
        assert (out["per_class_fine"][name] < 1.0) == (name in holders), name
    assert out["miou_fine"] < out["miou_parts"]
