"""What the ingest (`jobs.review`) sets up for the App, on the real bundled MongoDB: parts and
subparts carry their instance's class (`instance_label`), every sample its least certain mask
margin (`min_margin`), the dataset colours by class and has the saved views `needs review`,
`errors` and `reviewed`."""

from __future__ import annotations

import pytest

from pipeline.review import app, fields, ingest
from tests.pipeline.conftest import write_labels

LEVELS = ("instances", "stuff", "parts", "subparts")


def _margin(scores) -> float | None:
    scores = list(scores or [])
    if not scores:
        return None
    return scores[0] - (scores[1] if len(scores) > 1 else 0.0)


def test_ingest_sets_instance_labels_margins_colours_and_saved_views(
    fiftyone_db, labels_dir, dataset_name, tmp_path
):
    from fiftyone import ViewField as F

    dataset, _ = ingest.ingest_labels(labels_dir, dataset_name, media_dir=tmp_path / "media")

    # parts and subparts name their instance's class; the sidebar can filter on it
    checked = 0
    for sample in dataset.exists("instances"):
        instances = {d.id: d for d in sample.instances.detections}
        parts = {d.id: d for d in sample.parts.detections}
        for part in parts.values():
            assert part.instance_label == instances[part.parent_id].label
            checked += 1
        for sub in sample.subparts.detections:
            assert sub.instance_label == instances[parts[sub.parent_id].parent_id].label
    assert checked >= 4
    assert "parts.detections.instance_label" in dataset.get_field_schema(flat=True)
    people = dataset.filter_labels("parts", F("instance_label") == "person")
    assert 0 < people.count("parts.detections") < dataset.count("parts.detections")

    # the least certain mask of each sample, lowest first in "needs review"
    expected = {}
    for sample in dataset:
        margins = [
            _margin(d.topk_scores)
            for level in LEVELS
            if sample[level] is not None
            for d in sample[level].detections
        ]
        margins = [m for m in margins if m is not None]
        assert sample.min_margin == (pytest.approx(min(margins)) if margins else None)
        if margins:
            expected[sample.image_id] = min(margins)
    assert expected  # the parts have top-2 scores (0.75, 0.25)
    assert set(dataset.list_saved_views()) >= {"needs review", "errors", "reviewed"}
    needs = dataset.load_saved_view("needs review")
    assert needs.values("min_margin") == sorted(expected.values())
    assert dataset.load_saved_view("errors").values("image_id") == ["broken-1"]
    assert len(dataset.load_saved_view("reviewed")) == 0
    first = needs.first().image_id
    dataset.match(F("image_id") == first).tag_samples("reviewed")
    assert dataset.load_saved_view("reviewed").values("image_id") == [first]
    assert first not in dataset.load_saved_view("needs review").values("image_id")

    # colour by class: one colour per class present, the same in every level field
    scheme = dataset.app_config.color_scheme
    assert scheme.color_by == "value"
    by_path = {f["path"]: f for f in scheme.fields}
    assert set(by_path) == set(LEVELS)
    colours = {v["value"]: v["color"] for v in by_path["instances"]["valueColors"]}
    present = set()
    for level in LEVELS:
        present.update(dataset.distinct(f"{level}.detections.label"))
        assert by_path[level]["colorByAttribute"] == "label"
    assert len(present) >= 3
    assert len({colours[label] for label in present}) == len(present)

    # a second ingest of other labels keeps the colours of the classes already there
    app.set_color_scheme(dataset, list(LEVELS), ["zebra", "aardvark"])
    again = {
        v["value"]: v["color"]
        for v in next(f for f in dataset.app_config.color_scheme.fields if f["path"] == "stuff")[
            "valueColors"
        ]
    }
    assert all(again[label] == colours[label] for label in present)
    assert {"zebra", "aardvark"} <= set(again)


def test_samples_whose_image_cannot_be_shown_are_errors_not_in_needs_review(
    fiftyone_db, label_rows, coco_rows, coco_sample, dataset_name, tmp_path
):
    import copy

    from fiftyone import ViewField as F

    # labels fine (parts with top-2 scores, so it has a margin), image gone: tag media-error only
    gone = copy.deepcopy(next(r for r in label_rows if r["image_id"] == "439180"))
    gone.update(image_id="gone-1", uri=str(coco_sample / "input_images" / "moved-away.jpg"))
    labels = write_labels(label_rows + [gone], tmp_path / "labels", coco_rows[1])
    dataset, result = ingest.ingest_labels(labels, dataset_name, media_dir=tmp_path / "media")
    assert result.media_errors == 2  # gone-1 and the error row's missing file

    tags = dict(zip(*dataset.values(["image_id", "tags"])))
    assert tags["gone-1"] == [fields.MEDIA_ERROR_TAG]
    assert dataset.match(F("image_id") == "gone-1").values("min_margin")[0] is not None
    needs = dataset.load_saved_view("needs review").values("image_id")
    assert "gone-1" not in needs and "broken-1" not in needs
    assert set(needs) == {"439180", "142238", "sa_1"}
    assert sorted(dataset.load_saved_view("errors").values("image_id")) == ["broken-1", "gone-1"]
