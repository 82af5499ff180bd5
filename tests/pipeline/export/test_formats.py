"""Exports: COCO instances (pycocotools, AP 1.0 against itself), COCO panoptic (PQ 1.0 against the
sample's original ground truth), Parquet with the reviewed flag, and corrections made in FiftyOne
showing up in the export."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

import schemas
from jobs import export as export_job
from pipeline.export import formats
from schemas import rle
from tests.pipeline.conftest import write_labels


def _coco_eval_ap(coco_gt, iou_type: str) -> float:
    from pycocotools.cocoeval import COCOeval

    results = [dict(a) for a in coco_gt.dataset["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def test_coco_export_loads_and_scores_ap_1_against_itself(labels_dir, label_rows, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    assert (
        export_job.main(["--labels", str(labels_dir), "--format", "coco", "--output", str(out)])
        == 0
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "instances.json"))
    ok_rows = [r for r in label_rows if r["status"] == "ok"]
    assert len(coco.getImgIds()) == 3  # the error row has no image entry
    assert len(coco.getAnnIds()) == sum(len(r["masks"]) for r in ok_rows) == 42 + 86 + 86
    cats = {c["name"]: c for c in coco.loadCats(coco.getCatIds())}
    assert cats["person top"]["supercategory"] == "person" and cats["person top"]["level"] == "part"
    assert cats["horse top left"]["supercategory"] == "horse"
    assert cats["grass-merged"]["isthing"] == 0 and cats["person"]["isthing"] == 1
    # masks survive the trip: the decoded annotation equals the Parquet mask
    row = next(r for r in ok_rows if r["image_id"] == "142238")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[142238]))
    by_mask = {a["hipie_mask_id"]: a for a in anns}
    for m in row["masks"]:
        assert np.array_equal(
            coco.annToMask(by_mask[m["mask_id"]]).astype(bool), rle.decode(m["rle"])
        )
    assert _coco_eval_ap(coco, "bbox") == pytest.approx(1.0)
    assert _coco_eval_ap(coco, "segm") == pytest.approx(1.0)


def test_coco_panoptic_export_of_the_ground_truth_has_pq_1(coco_sample, coco_rows, tmp_path):
    from hipie.evaluation.metrics import PanopticImage, panoptic_quality, rgb_to_id

    rows, vocabulary = coco_rows
    labels = write_labels(rows, tmp_path / "labels", vocabulary)
    out = tmp_path / "panoptic"
    categories = coco_sample / "panoptic_coco_categories.json"
    argv = ["--labels", str(labels), "--format", "coco-panoptic", "--output", str(out)]
    assert export_job.main(argv + ["--categories", str(categories)]) == 0

    gt = json.loads((coco_sample / "panoptic_examples.json").read_text())
    pred = json.loads((out / "panoptic.json").read_text())
    pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
    gt_images, pred_images = [], []
    for ann in gt["annotations"]:
        gt_ids = rgb_to_id(
            np.asarray(Image.open(coco_sample / "panoptic_examples" / ann["file_name"]))
        )
        p = pred_by_image[ann["image_id"]]
        pred_ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / p["file_name"])))
        gt_images.append(PanopticImage(gt_ids, ann["segments_info"]))
        pred_images.append(PanopticImage(pred_ids, p["segments_info"]))
        # pixel for pixel: every original segment is one exported segment of the same category
        pred_cat = {s["id"]: s["category_id"] for s in p["segments_info"]}
        for s in ann["segments_info"]:
            ids = np.unique(pred_ids[gt_ids == s["id"]])
            assert len(ids) == 1 and pred_cat[int(ids[0])] == s["category_id"]
            assert np.array_equal(pred_ids == ids[0], gt_ids == s["id"])
    all_categories = json.loads(categories.read_text())
    result = panoptic_quality(gt_images, pred_images, all_categories)
    assert result.all.pq == pytest.approx(1.0) and result.all.n == 8
    assert result.things.pq == pytest.approx(1.0) and result.stuff.pq == pytest.approx(1.0)

    # the same through the evaluator's command line, on the files
    from hipie import evaluate

    argv = ["panoptic", "--gt-json", str(coco_sample / "panoptic_examples.json")]
    argv += ["--gt-folder", str(coco_sample / "panoptic_examples")]
    argv += ["--pred-json", str(out / "panoptic.json"), "--pred-folder", str(out / "panoptic")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate.main(argv + ["--categories-json", str(categories)])
    summary = json.loads(printed.getvalue())
    assert summary["All"]["pq"] == pytest.approx(1.0) and summary["All"]["n"] == 8


def test_parquet_export_from_labels_keeps_every_row(labels_dir, label_rows, tmp_path):
    out = tmp_path / "parquet"
    argv = ["--labels", str(labels_dir), "--format", "parquet", "--output", str(out)]
    assert export_job.main(argv) == 0
    table, info = schemas.read_parquet(out / "labels.parquet")
    schemas.validate_table(table)
    assert sorted(table.column("image_id").to_pylist()) == sorted(r["image_id"] for r in label_rows)
    assert schemas.count_levels(table) == {"stuff": 11, "instance": 71, "part": 66, "subpart": 66}
    assert info["extra"] == {
        "reviewed_file": "labels.reviewed.parquet",
        "num_reviewed": 0,
        "num_rows": 4,
    }
    import pyarrow.parquet as pq

    assert (
        pq.read_table(out / "labels.reviewed.parquet").column("reviewed").to_pylist() == [False] * 4
    )


def test_corrections_in_the_dataset_show_up_in_the_export(
    fiftyone_db, dataset_name, labels_dir, tmp_path
):
    from pycocotools.coco import COCO

    from pipeline.review.ingest import ingest_labels

    dataset, _ = ingest_labels(labels_dir, dataset_name)
    keys, instances = dataset.values(["image_id", "instances"])
    labels = dict(zip(keys, instances))["142238"]
    labels.detections[0].label = "referee"  # a person, renamed by a reviewer
    del labels.detections[-1]  # a false positive, deleted (the sports ball)
    dataset.set_values("instances", {"142238": labels}, key_field="image_id")
    dataset.match({"image_id": "142238"}).tag_samples("reviewed")

    common = ["--dataset", dataset_name, "--tag", "reviewed", "--output"]
    assert export_job.main(common + [str(tmp_path / "coco"), "--format", "coco"]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "coco" / "instances.json"))
    assert coco.getImgIds() == [142238]
    names = [coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"]]
    assert names.count("referee") == 1 and names.count("person") == 13
    assert "sports ball" not in names and names.count("person top") == 11
    referee = next(
        a for a in coco.dataset["annotations"] if coco.cats[a["category_id"]]["name"] == "referee"
    )
    assert referee["score"] == 1.0
    # the reviewed sample's parts still point at their (renamed) instance
    tops = [
        a for a in coco.dataset["annotations"] if a["hipie_parent_id"] == referee["hipie_mask_id"]
    ]
    assert len(tops) == 1 and coco.cats[tops[0]["category_id"]]["name"] == "referee top"

    assert (
        export_job.main(
            ["--dataset", dataset_name, "--format", "parquet", "--output", str(tmp_path / "pq")]
        )
        == 0
    )
    table, info = schemas.read_parquet(tmp_path / "pq" / "labels.parquet")
    assert info["extra"]["num_reviewed"] == 1 and table.num_rows == 4
    import pyarrow.parquet as pq

    flags = dict(
        zip(*pq.read_table(tmp_path / "pq" / "labels.reviewed.parquet").to_pydict().values())
    )
    assert flags == {"142238": True, "439180": False, "sa_1": False, "broken-1": False}
    row = next(r for r in table.to_pylist() if r["image_id"] == "142238")
    labels = [m["label"] for m in row["masks"] if m["level"] == "instance"]
    assert labels.count("referee") == 1 and "sports ball" not in labels


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown format"):
        formats.export_rows([], "unused", format="voc")
