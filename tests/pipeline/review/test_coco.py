"""Round trips with FiftyOne's own COCO format (real MongoDB, real files):

- our export (`python -m jobs.export --format coco`) loads with
  `fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, label_types="segmentations")`,
  every annotation a detection with its mask, pixel for pixel;
- a COCO dataset that FiftyOne itself exported (`dataset.export(dataset_type=
  fo.types.COCODetectionDataset)`, polygons) trains with `python -m jobs.train --coco`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.review import ingest, read
from schemas import rle
from tests.pipeline.conftest import add_parts, write_labels

REPO = Path(__file__).resolve().parents[3]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_our_coco_export_loads_in_fiftyone_with_masks(
    fiftyone_db, coco_rows, coco_sample, dataset_name, tmp_path
):
    fo = fiftyone_db
    rows, vocabulary = coco_rows
    rows = [add_parts(row) for row in rows]
    labels = write_labels(rows, tmp_path / "labels", vocabulary)
    out = tmp_path / "coco"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.export", "--labels", str(labels), "--format", "coco"]
        + ["--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    coco = json.loads((out / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}

    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(coco_sample / "input_images"),
        labels_path=str(out / "instances.json"),
        label_types="segmentations",
        label_field="coco",
        name=dataset_name,
    )
    assert len(dataset) == len(rows) == len(coco["images"])
    by_file = {Path(row["uri"]).name: row for row in rows}
    checked = 0
    for sample in dataset:
        row = by_file[Path(sample.filepath).name]
        w, h = row["width"], row["height"]
        image_id = next(i["id"] for i in coco["images"] if i["hipie_image_id"] == row["image_id"])
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        dets = sample.coco.detections
        assert len(dets) == len(anns) == len(row["masks"])
        for det in dets:
            # extra annotation attributes come along
            ann = next(a for a in anns if a["hipie_mask_id"] == det.hipie_mask_id)
            assert det.label == names[ann["category_id"]]
            assert det.mask is not None
            assert det.confidence == ann["score"]
            full = read.full_mask(det, w, h)
            mask = next(m for m in row["masks"] if m["mask_id"] == ann["hipie_mask_id"])
            assert _iou(full, rle.decode(mask["rle"])) == 1.0
            checked += 1
    assert checked == sum(len(row["masks"]) for row in rows)
    # parts come in as "<object> <part>" classes, e.g. "person top"
    assert any(label.endswith(" top") for label in dataset.distinct("coco.detections.label"))


def test_a_coco_export_made_by_fiftyone_trains_with_jobs_train(
    fiftyone_db, coco_rows, dataset_name, tmp_path
):
    fo = fiftyone_db
    rows, vocabulary = coco_rows
    labels = write_labels(rows, tmp_path / "labels", vocabulary)
    dataset, _ = ingest.ingest_labels(labels, dataset_name, media_dir=tmp_path / "media")
    export_dir = tmp_path / "fo_coco"
    dataset.export(
        export_dir=str(export_dir),
        dataset_type=fo.types.COCODetectionDataset,
        label_field="instances",
    )
    labels_json, images = export_dir / "labels.json", export_dir / "data"
    exported = json.loads(labels_json.read_text())
    assert all(isinstance(a["segmentation"], list) for a in exported["annotations"])  # polygons

    # what jobs.train --coco reads: the same images, classes and (polygon-rounded) masks
    from jobs.train import build_parser, training_set_from_args

    args = build_parser().parse_args(
        ["--coco", str(labels_json), "--images", str(images), "--output", str(tmp_path / "x")]
    )
    training_set = training_set_from_args(args)
    expected_things = {m["label"] for row in rows for m in row["masks"] if m["level"] == "instance"}
    assert set(training_set.things) == expected_things
    by_name = {Path(row["uri"]).name: row for row in rows}
    assert len(training_set.rows) == len(rows)
    inter = union = 0
    for got in training_set.rows:
        original = by_name[Path(got["uri"]).name]  # FiftyOne keeps the file names
        instances = [m for m in original["masks"] if m["level"] == "instance"]
        assert [m["label"] for m in got["masks"]] == [m["label"] for m in instances]
        for a, b in zip(got["masks"], instances):  # polygons: small masks lose a rim
            a, b = rle.decode(a["rle"]), rle.decode(b["rle"])
            assert _iou(a, b) > 0.5
            inter, union = inter + (a & b).sum(), union + (a | b).sum()
    assert inter / union > 0.9, inter / union

    out = tmp_path / "ft"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--coco", str(labels_json), "--images", str(images),
         "--init", "random:tiny", "--output", str(out), "--steps", "2", "--batch-size", "1",
         "--image-size", "128", "--workers", "1", "--cpus-per-worker", "0.5", "--num-cpus", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summary = json.loads(done.stdout[done.stdout.rindex('{\n  "checkpoint"') :])
    assert summary["step"] == 2
    learned = json.loads(Path(summary["vocabulary"]).read_text())
    assert set(learned["things"]) == expected_things
