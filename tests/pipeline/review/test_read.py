"""Export and fine-tuning data from the labels of `dataset.apply_model(HipieModel(...),
label_field="hipie")` (real bundled MongoDB, the COCO sample's two photos, the shipped tiny
model): `jobs.export --dataset --label-field hipie` writes COCO and Parquet files that validate and
hold the dataset's masks pixel for pixel, `jobs.train --dataset --label-field hipie` builds its
training set from them; and after a reviewer renames an instance, the export's part categories and
the training classes follow it, and `jobs.review --dataset` refreshes the parts' `instance_label`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import schemas
from schemas import rle

REPO = Path(__file__).resolve().parents[3]
LEVELS = ("instances", "stuff", "parts", "subparts")
LEVEL_OF = {"instances": "instance", "stuff": "stuff", "parts": "part", "subparts": "subpart"}


@pytest.fixture(scope="module")
def photos(fiftyone_db, coco_sample):
    """A dataset of the two COCO photos as a user has it (no image_id, no ingest fields), labeled
    with ``apply_model(..., label_field="hipie")``."""
    fo = fiftyone_db
    from pipeline.review.model import HipieModel

    name = "apply-model-export-test"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    dataset = fo.Dataset(name)
    paths = sorted((coco_sample / "input_images").glob("*.jpg"))
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in paths], progress=False)
    dataset.apply_model(HipieModel("tiny", score_threshold=0.3), label_field="hipie", batch_size=8)
    assert dataset.count("hipie_instances.detections") > 0
    assert dataset.count("hipie_parts.detections") > 0
    yield dataset
    dataset.delete()


def _masks_by_key(dataset, prefix: str) -> dict[tuple[str, int], tuple[str, str, np.ndarray]]:
    """{(file name, mask_id): (level, label, full mask)} of every detection in the dataset."""
    from pipeline.review.read import full_mask

    out = {}
    for sample in dataset:
        w, h = sample.metadata.width, sample.metadata.height
        for field in LEVELS:
            labels = sample[f"{prefix}{field}"]
            for det in labels.detections if labels else []:
                key = (Path(sample.filepath).name, int(det.mask_id))
                out[key] = (LEVEL_OF[field], det.label, full_mask(det, w, h))
    return out


def _export(dataset_name: str, fmt: str, out: Path, *extra: str) -> None:
    from jobs.export import main

    assert main(["--dataset", dataset_name, *extra, "--format", fmt, "--output", str(out)]) == 0


def test_apply_model_labels_export_as_coco_and_parquet_with_their_masks(photos, tmp_path):
    expected = _masks_by_key(photos, "hipie_")
    assert {level for level, _, _ in expected.values()} >= {"instance", "part"}

    _export(photos.name, "coco", tmp_path / "coco", "--label-field", "hipie")
    data = json.loads((tmp_path / "coco" / "instances.json").read_text())
    # no image_id field: the file stems, numeric here, so the COCO ids are the photos' own
    assert sorted(i["id"] for i in data["images"]) == [142238, 439180]
    assert sorted(i["hipie_image_id"] for i in data["images"]) == ["000000142238", "000000439180"]
    names = {i["id"]: i["file_name"] for i in data["images"]}
    cats = {c["id"]: c for c in data["categories"]}
    assert len(data["annotations"]) == len(expected)
    for ann in data["annotations"]:
        level, label, mask = expected[(names[ann["image_id"]], ann["hipie_mask_id"])]
        cat = cats[ann["category_id"]]
        assert cat["level"] == level
        assert cat["name"] == label or cat["name"].endswith(f" {label}")
        assert np.array_equal(rle.decode(ann["segmentation"]), mask)

    _export(photos.name, "parquet", tmp_path / "parquet", "--label-field", "hipie_")
    table, _ = schemas.read_parquet(tmp_path / "parquet" / "labels.parquet")
    schemas.validate_table(table)
    rows = table.to_pylist()
    assert sorted(r["image_id"] for r in rows) == ["000000142238", "000000439180"]
    assert all(r["status"] == "ok" for r in rows)
    got = {
        (Path(r["uri"]).name, m["mask_id"]): (m["level"], m["label"], rle.decode(m["rle"]))
        for r in rows
        for m in r["masks"]
    }
    assert got.keys() == expected.keys()
    for key, (level, label, mask) in expected.items():
        assert got[key][:2] == (level, label)
        assert np.array_equal(got[key][2], mask)
    parents = {  # the parent links inside each sample, as mask ids
        (Path(r["uri"]).name, m["mask_id"]): m["parent_id"] for r in rows for m in r["masks"]
    }
    linked = 0
    for sample in photos:
        fields = [sample[f"hipie_{f}"] for f in LEVELS]
        by_id = {d.id: d for f in fields if f for d in f.detections}
        for det in by_id.values():
            parent = by_id.get(det.get_attribute_value("parent_id", None))
            key = (Path(sample.filepath).name, det.mask_id)
            assert parents[key] == (parent.mask_id if parent else None)
            linked += parent is not None
    assert linked > 0

    # one apply_model run and no ingest fields: --label-field may be left out
    _export(photos.name, "coco", tmp_path / "auto")
    again = json.loads((tmp_path / "auto" / "instances.json").read_text())
    assert again["annotations"] == data["annotations"]


def test_a_wrong_label_field_is_a_usage_error(photos, tmp_path, capsys):
    from jobs.export import main

    args = ["--dataset", photos.name, "--format", "coco", "--output", str(tmp_path)]
    assert main([*args, "--label-field", "sam"]) == 2
    err = capsys.readouterr().err
    assert "no labels under label field 'sam'" in err and "'hipie'" in err


def test_jobs_train_reads_apply_model_labels(photos, tmp_path):
    from jobs.train import build_parser, training_set_from_args
    from pipeline.finetune.data import RowDataset

    args = build_parser().parse_args(
        ["--dataset", photos.name, "--label-field", "hipie", "--tag", "", "--output", "x"]
    )
    training_set = training_set_from_args(args)
    assert len(training_set.rows) == 2
    assert {r["uri"] for r in training_set.rows} == set(photos.values("filepath"))
    things = set(training_set.things)
    assert things and things <= set(photos.distinct("hipie_instances.detections.label"))
    assert training_set.parts
    sample = RowDataset(training_set, max_size=128)[0]  # what a fine-tuning worker reads
    assert sample.image.shape[0] == 3 and max(sample.image.shape[1:]) == 128
    assert len(sample.thing_masks) > 0 and set(sample.thing_classes) <= things

    # the command a user runs (2 steps on a local Ray cluster; same FiftyOne database)
    out = tmp_path / "ft"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--dataset", photos.name, "--label-field", "hipie",
         "--tag", "", "--init", "random:tiny", "--output", str(out), "--steps", "2",
         "--batch-size", "1", "--image-size", "128", "--workers", "1", "--cpus-per-worker", "0.5",
         "--num-cpus", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads(done.stdout[done.stdout.rindex('{\n  "checkpoint"') :])
    assert summary["step"] == 2
    learned = json.loads(Path(summary["vocabulary"]).read_text())
    assert set(learned["things"]) == things


def test_a_renamed_instance_reaches_its_parts_in_export_and_dataset(photos, tmp_path):
    from fiftyone import ViewField as F

    from jobs.review import main as review
    from pipeline.finetune.data import training_set_from_dataset

    dataset = photos.clone("apply-model-rename-test")
    try:
        linked = dataset.filter_labels("hipie_parts", F("parent_id").exists())
        sample = dataset[linked.first().id]
        part = next(d for d in sample.hipie_parts.detections if d.has_field("parent_id"))
        instance = next(d for d in sample.hipie_instances.detections if d.id == part.parent_id)
        old = instance.label
        assert part.instance_label == old
        instance.label = "android"  # the reviewer's rename, as the App saves it
        sample.save()
        parent_of = lambda d: d.get_attribute_value("parent_id", None)  # noqa: E731
        children = [d for d in sample.hipie_parts.detections if parent_of(d) == instance.id]

        # the export and the training data follow parent_id, before any refresh
        _export(dataset.name, "coco", tmp_path / "coco", "--label-field", "hipie")
        data = json.loads((tmp_path / "coco" / "instances.json").read_text())
        cats = {c["id"]: c for c in data["categories"]}
        image = next(i["id"] for i in data["images"] if i["file_name"] in sample.filepath)
        for child in children:
            ann = next(
                a
                for a in data["annotations"]
                if a["image_id"] == image and a["hipie_mask_id"] == child.mask_id
            )
            assert cats[ann["category_id"]]["name"] == f"android {child.label}"
            assert cats[ann["category_id"]]["supercategory"] == "android"
        training = training_set_from_dataset(dataset.name, tag=None, label_field="hipie")
        assert {f"android {c.label}" for c in children} <= set(training.parts)

        # the dataset's attribute is stale until the refresh (jobs.review without --labels)
        stale = dataset.filter_labels("hipie_parts", F("instance_label") == "android")
        assert stale.count("hipie_parts.detections") == 0
        assert review(["--dataset", dataset.name]) == 0
        fresh = dataset.filter_labels("hipie_parts", F("instance_label") == "android")
        assert fresh.count("hipie_parts.detections") == len(children)
        sample.reload()
        for det in sample.hipie_parts.detections:
            instances = {d.id: d.label for d in sample.hipie_instances.detections}
            assert det.get_attribute_value("instance_label", None) == instances.get(parent_of(det))
    finally:
        dataset.delete()


def test_ingested_parts_and_subparts_follow_a_renamed_instance(
    fiftyone_db, labels_dir, dataset_name, tmp_path
):
    from jobs.review import main as review
    from pipeline.review import app, ingest

    dataset, _ = ingest.ingest_labels(labels_dir, dataset_name, media_dir=tmp_path / "media")
    sample = next(s for s in dataset if s.image_id == "439180")
    parts = {d.id: d for d in sample.parts.detections}
    parents = {p.parent_id for p in parts.values()}
    instance = next(d for d in sample.instances.detections if d.id in parents)
    instance.label = "android"
    sample.save()
    own = [p for p in sample.parts.detections if p.parent_id == instance.id]
    subs = [s for s in sample.subparts.detections if s.parent_id in {p.id for p in own}]
    assert own and subs and all(p.instance_label != "android" for p in own + subs)

    assert app.refresh_instance_labels(dataset) == len(own) + len(subs)
    sample.reload()
    for det in sample.parts.detections + sample.subparts.detections:
        assert (det.instance_label == "android") == (det.id in {d.id for d in own + subs})
    assert app.refresh_instance_labels(dataset) == 0  # nothing stale is left
    assert review(["--dataset", dataset_name]) == 0  # the command runs the same refresh

    _export(dataset_name, "coco", tmp_path / "coco")
    data = json.loads((tmp_path / "coco" / "instances.json").read_text())
    assert {"android top", "android top left"} <= {c["name"] for c in data["categories"]}


def test_two_apply_model_runs_need_a_choice_and_the_ingest_fields_are_the_default(photos):
    import fiftyone as fo

    from pipeline.review.read import label_prefixes, read_rows, resolve_prefix

    dataset = photos.clone("apply-model-two-runs-test")
    try:
        dataset.clone_sample_field("hipie_instances", "sam2_instances")
        dataset.clone_sample_field("hipie_label_run", "sam2_label_run")
        assert label_prefixes(dataset) == ["hipie_", "sam2_"]
        with pytest.raises(ValueError, match="several label fields \\('hipie', 'sam2'\\)"):
            resolve_prefix(dataset)
        rows, _ = read_rows(dataset, label_field="sam2")
        assert sum(len(r["masks"]) for r in rows) == dataset.count("hipie_instances.detections")
        assert {m["level"] for r in rows for m in r["masks"]} == {"instance"}
        dataset.add_sample_field("label_runs", fo.ListField, subfield=fo.StringField)
        assert resolve_prefix(dataset) == ""  # the ingest's fields, as before apply_model existed
    finally:
        dataset.delete()
