"""`dataset.apply_model(HipieModel(...), label_field="hipie")` on a real FiftyOne dataset (bundled
MongoDB): the COCO sample's two photos and two generated scenes, the shipped tiny model. The fields
are those `jobs.review` writes (with the label_field prefix), parents resolve inside the sample,
the per-sample margin, colours and saved views are set, and with SAM-style masks in a
`prompt_field` HIPIE votes onto them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hipie.synthetic.generator import SceneGenerator

LEVELS = ("instances", "stuff", "parts", "subparts")
LEVEL_OF = {"instances": "instance", "stuff": "stuff", "parts": "part", "subparts": "subpart"}
# the detection attributes that pipeline.review.ingest writes at ingest
INGEST_ATTRS = {
    "mask_id", "level", "model_label", "topk_labels", "topk_scores", "origin", "sam_iou",
    "sam_stability", "area",
}  # fmt: skip


def _sam_detections(scene) -> object:
    """The scene's thing and stuff masks as class-agnostic detections, as FiftyOne's SAM
    integration stores them (box-cropped masks, label "mask")."""
    import fiftyone as fo

    dets = []
    h, w = scene.height, scene.width
    for seg in scene.segments:
        ys, xs = np.nonzero(seg.mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        dets.append(
            fo.Detection(
                label="mask",
                bounding_box=[x0 / w, y0 / h, (x1 - x0) / w, (y1 - y0) / h],
                mask=seg.mask[y0:y1, x0:x1],
                predicted_iou=0.93,
            )
        )
    return fo.Detections(detections=dets)


@pytest.fixture(scope="module")
def applied(fiftyone_db, coco_sample, tmp_path_factory):
    """One dataset, the model applied twice: plain (``hipie``) and voting onto ``sam`` (``voted``)."""
    fo = fiftyone_db
    from pipeline.review.model import HipieModel

    folder = tmp_path_factory.mktemp("apply-model")
    samples = []
    for scene in SceneGenerator(seed=3).scenes(0, 2):
        path = folder / f"scene_{scene.image_id}.png"
        Image.fromarray(scene.image).save(path)
        samples.append(fo.Sample(filepath=str(path), sam=_sam_detections(scene)))
    for path in sorted((coco_sample / "input_images").glob("*.jpg")):
        samples.append(fo.Sample(filepath=str(path)))
    name = "apply-model-test"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name)
    dataset.add_samples(samples, progress=False)
    model = HipieModel("tiny", "synthetic", score_threshold=0.3)
    assert model.device == "cpu" or model.device.startswith("cuda")
    dataset.apply_model(model, label_field="hipie", batch_size=8)
    dataset.apply_model(model, label_field="voted", batch_size=8, prompt_field="sam")
    yield dataset, model
    dataset.delete()


def test_apply_model_writes_the_review_fields_with_parents_inside_the_sample(applied):
    import fiftyone as fo

    dataset, model = applied
    schema = dataset.get_field_schema()
    for level in LEVELS:
        assert schema[f"hipie_{level}"].document_type is fo.Detections
    assert {"hipie_label_run", "hipie_min_margin", "hipie_label_error"} <= set(schema)
    runs = set(dataset.values("hipie_label_run"))
    assert len(runs) == 1 and next(iter(runs)).startswith(f"hipie:tiny | {model.vocabulary.hash}")

    counts = {level: 0 for level in LEVELS}
    linked = 0
    for sample in dataset:
        dets = {level: sample[f"hipie_{level}"].detections for level in LEVELS}
        by_id = {d.id: d for level in LEVELS for d in dets[level]}
        for level in LEVELS:
            counts[level] += len(dets[level])
            for d in dets[level]:
                assert INGEST_ATTRS <= set(d.field_names), d.field_names
                assert d.level == LEVEL_OF[level]
                assert d.mask is not None and d.mask.dtype == bool
                w, h = d.bounding_box[2:]
                assert d.mask.shape == (
                    round(h * sample.metadata.height),
                    round(w * sample.metadata.width),
                )
                scores = list(d.topk_scores)
                assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
                assert len(d.topk_labels) == len(scores) and 0 < d.confidence <= 1
                if level in ("instances", "stuff"):  # the part pass may relabel within a thing
                    assert d.topk_labels[0] == d.label
        for d in dets["parts"] + dets["subparts"]:
            if d.get_attribute_value("parent_id", None) is None:
                continue
            parent = by_id[d.parent_id]  # resolvable inside the sample
            assert parent.mask_id == d.parent_mask_id
            expected = "instance" if d.level == "part" else "part"
            assert parent.level == expected
            instance = parent if expected == "instance" else by_id[parent.parent_id]
            assert d.instance_label == instance.label
            linked += 1
    assert counts["instances"] >= 4 and counts["stuff"] >= 2 and counts["parts"] >= 4, counts
    assert linked >= 4
    # the App's sidebar can filter on the new attribute: "the parts of robots"
    assert "hipie_parts.detections.instance_label" in dataset.get_field_schema(flat=True)
    robots = dataset.filter_labels("hipie_parts", fo.ViewField("instance_label") == "robot")
    assert robots.count("hipie_parts.detections") >= 1


def test_min_margin_colours_and_saved_views_after_apply_model(applied):
    dataset, _ = applied
    margins = {}
    for sample in dataset:
        values = [
            (d.topk_scores[0] - (d.topk_scores[1] if len(d.topk_scores) > 1 else 0.0))
            for level in LEVELS
            for d in sample[f"hipie_{level}"].detections
        ]
        assert sample.hipie_min_margin == pytest.approx(min(values), abs=1e-6)
        margins[sample.id] = min(values)

    views = dataset.list_saved_views()
    for name in ("needs review", "errors", "reviewed"):
        assert f"hipie: {name}" in views and f"voted: {name}" in views
    needs = dataset.load_saved_view("hipie: needs review")
    assert needs.values("id") == sorted(margins, key=margins.get)  # least certain first
    assert len(dataset.load_saved_view("hipie: errors")) == 0
    dataset.take(1, seed=0).tag_samples("reviewed")
    try:
        assert len(dataset.load_saved_view("hipie: reviewed")) == 1
        assert len(dataset.load_saved_view("hipie: needs review")) == len(dataset) - 1
    finally:
        dataset.untag_samples("reviewed")

    scheme = dataset.app_config.color_scheme
    assert scheme.color_by == "value"
    fields = {f["path"]: f for f in scheme.fields}
    colours = {v["value"]: v["color"] for v in fields["hipie_instances"]["valueColors"]}
    labels = dataset.distinct("hipie_instances.detections.label")
    assert len(labels) >= 3
    assert len({colours[label] for label in labels}) == len(labels)  # one colour per class
    assert fields["hipie_parts"]["valueColors"] == fields["hipie_instances"]["valueColors"]


def test_prompt_field_masks_are_voted_onto(applied):
    dataset, _ = applied
    scenes = dataset.exists("sam")
    photos = dataset.exists("sam", bool=False)
    for sample in scenes:
        prompts = len(sample.sam.detections)
        voted = [d for level in LEVELS for d in sample[f"voted_{level}"].detections]
        from_sam = [d for d in voted if d.origin == "sam"]
        # every prompt mask is labeled, except those of the replace classes (person, bird),
        # whose masks HIPIE's own replace (App. A.8.2)
        replaced = [d for d in voted if d.origin == "hipie"]
        assert from_sam and len(from_sam) <= prompts
        assert len(from_sam) == prompts or replaced
        assert all(d.sam_iou == pytest.approx(0.93) for d in from_sam)
    # without prompt masks the output is HIPIE's own hierarchy, as in the plain run
    for sample in photos:
        for level in LEVELS:
            assert [d.label for d in sample[f"voted_{level}"].detections] == [
                d.label for d in sample[f"hipie_{level}"].detections
            ]
