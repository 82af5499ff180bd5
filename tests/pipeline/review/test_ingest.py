"""Ingest of real label Parquet files into FiftyOne on the bundled MongoDB, idempotence,
versioning of newer runs, and the read-back of corrections.

Expected counts come from the sample's panoptic JSON: image 142238 has 15 thing segments and 3
stuff segments, 12 of the things cover >= 400 pixels (and so get a "top" part and a "top left"
subpart); image 439180 has 28 things, 4 stuff, 27 things >= 400 pixels.
"""

from __future__ import annotations

import numpy as np

from schemas import rle
from tests.pipeline.conftest import relabel, write_labels

EXPECTED = {  # image_id -> (instances, stuff, parts, subparts)
    "142238": (15, 3, 12, 12),
    "439180": (28, 4, 27, 27),
    "sa_1": (28, 4, 27, 27),
    "broken-1": (0, 0, 0, 0),
}


def _by_image(dataset, field):
    keys, values = dataset.values(["image_id", field])
    return dict(zip(keys, values))


def test_ingest_counts_parents_masks_and_media(fiftyone_db, dataset_name, labels_dir, label_rows):
    from pipeline.review.ingest import ingest_labels
    from pipeline.review.read import full_mask

    dataset, result = ingest_labels(labels_dir, dataset_name)
    assert (result.added, result.unchanged, result.versioned, result.errors) == (4, 0, 0, 1)
    assert len(dataset) == 4 and dataset.persistent
    counts = {
        key: tuple(len(_by_image(dataset, f"{f}.detections")[key] or []) for f in fields)
        for key in EXPECTED
        for fields in [("instances", "stuff", "parts", "subparts")]
    }
    assert counts == EXPECTED

    # error rows: tagged, with the reason (broken-1's image file does not exist either)
    assert dataset.count_sample_tags() == {"label-error": 1, "media-error": 1}
    errors = dataset.match_tags("label-error")
    assert errors.values("image_id") == ["broken-1"]
    assert errors.values("label_error") == ["image decode failed: file not found"]

    # the tar member was extracted by name into <labels>/media, the JSON beside it was not
    paths = _by_image(dataset, "filepath")
    media = labels_dir / "media" / "sa_000000" / "sa_1.jpg"
    assert paths["sa_1"] == str(media.resolve())
    assert sorted(p.name for p in (labels_dir / "media").rglob("*") if p.is_file()) == ["sa_1.jpg"]
    rows = {r["image_id"]: r for r in label_rows}
    assert media.read_bytes() == open(rows["439180"]["uri"], "rb").read()
    assert paths["142238"] == rows["142238"]["uri"]  # plain paths are kept

    # parent links and masks, checked pixel for pixel against the Parquet rows
    sample = dataset.match({"image_id": "142238"}).first()
    w, h = sample.metadata.width, sample.metadata.height
    source = {m["mask_id"]: m for m in rows["142238"]["masks"]}
    instances = {d.id: d for d in sample.instances.detections}
    parts = {d.id: d for d in sample.parts.detections}
    for det in sample.instances.detections + sample.stuff.detections:
        x, y, bw, bh = (int(v) for v in source[det.mask_id]["bbox"])
        assert det.mask.shape == (bh, bw)  # cropped to the box, FiftyOne's convention
        assert np.allclose(det.bounding_box, [x / w, y / h, bw / w, bh / h])
        assert np.array_equal(full_mask(det, w, h), rle.decode(source[det.mask_id]["rle"]))
    for det in sample.parts.detections:
        parent = instances[det.parent_id]
        assert det.parent_mask_id == source[det.mask_id]["parent_id"] == parent.mask_id
        part_mask, parent_mask = full_mask(det, w, h), full_mask(parent, w, h)
        assert part_mask.any() and not (part_mask & ~parent_mask).any()
        assert det.topk_labels == ["top", "bottom"] and np.allclose(det.topk_scores, [0.75, 0.25])
        assert det.confidence == 0.75
    for det in sample.subparts.detections:
        assert parts[det.parent_id].mask_id == det.parent_mask_id
        assert det.origin == "sam" and abs(det.sam_iou - 0.9) < 1e-6


def test_second_ingest_duplicates_nothing(fiftyone_db, dataset_name, labels_dir):
    from pipeline.review.ingest import ingest_labels

    dataset, _ = ingest_labels(labels_dir, dataset_name)
    before = dataset.values(["instances.detections.id", "parts.detections.parent_id", "filepath"])
    schema_before = set(dataset.get_field_schema())
    dataset, again = ingest_labels(labels_dir, dataset_name)
    assert (again.added, again.unchanged, again.replaced, again.versioned) == (0, 4, 0, 0)
    assert len(dataset) == 4
    assert dataset.values(
        ["instances.detections.id", "parts.detections.parent_id", "filepath"]
    ) == (before)
    assert set(dataset.get_field_schema()) == schema_before  # no new version fields
    assert dataset.count("instances.detections") == 15 + 28 + 28


def test_reviewed_and_edited_samples_survive_a_new_run(
    fiftyone_db, dataset_name, labels_dir, label_rows, coco_rows, tmp_path
):
    from pipeline.review.ingest import ingest_labels
    from pipeline.review.read import read_rows

    dataset, _ = ingest_labels(labels_dir, dataset_name)
    # a reviewer renames the first instance of 142238 and tags it reviewed; another edits 439180
    # without tagging it; sa_1 stays untouched
    labels = _by_image(dataset, "instances")
    for key, new_label in (("142238", "referee"), ("439180", "rider")):
        labels[key].detections[0].label = new_label
        dataset.set_values("instances", {key: labels[key]}, key_field="image_id")
    dataset.match({"image_id": "142238"}).tag_samples("reviewed")

    newer = relabel(label_rows, model="hipie-v2", label="human", hours=5)
    newer[-1] = relabel(label_rows[:1], model="hipie-v2", label="human", hours=5)[0] | {
        "image_id": "broken-1",
        "shard": "sa_000000.tar",
    }
    new_dir = write_labels(newer, tmp_path / "labels-v2", coco_rows[1])
    _, result = ingest_labels(new_dir, dataset_name, replace_unreviewed=True, media_dir=tmp_path)
    # reviewed (142238) and edited (439180) get version 2; sa_1 and the error sample are replaced
    assert (result.added, result.unchanged, result.replaced, result.versioned) == (0, 0, 2, 2)

    first = _by_image(dataset, "instances.detections.label")
    assert first["142238"][0] == "referee" and first["439180"][0] == "rider"
    assert set(first["142238"][1:]) == {"person", "sports ball"}
    assert set(first["sa_1"]) == {"human"}  # untouched: replaced in place
    assert set(first["broken-1"]) == {"human"}
    # the replaced error sample keeps its image path, which still does not exist
    assert dataset.count_sample_tags() == {"reviewed": 1, "media-error": 1}
    second = _by_image(dataset, "instances_v2.detections.label")
    assert set(second["142238"]) == {"human"} and set(second["439180"]) == {"human"}
    assert second["sa_1"] is None
    runs = _by_image(dataset, "label_runs")
    assert [r.split(" | ")[0] for r in runs["142238"]] == ["ground-truth", "hipie-v2"]
    assert [r.split(" | ")[0] for r in runs["sa_1"]] == ["hipie-v2"]

    # ingesting the newer run again changes nothing; by default a new run never replaces
    _, again = ingest_labels(new_dir, dataset_name, replace_unreviewed=True, media_dir=tmp_path)
    assert (again.unchanged, again.replaced, again.versioned) == (4, 0, 0)
    newest = relabel(label_rows[:1], model="hipie-v3", label="person", hours=9)
    _, third = ingest_labels(
        write_labels(newest, tmp_path / "labels-v3", coco_rows[1]), dataset_name, media_dir=tmp_path
    )
    assert (third.replaced, third.versioned) == (0, 1)
    assert _by_image(dataset, "instances.detections.label")["142238"][0] == "referee"
    assert set(_by_image(dataset, "instances_v3.detections.label")["142238"]) == {"person"}

    # read-back: the corrections, in schema v1, with the run of each version
    rows, reviewed = read_rows(dataset)
    assert reviewed == {"142238"}
    row = next(r for r in rows if r["image_id"] == "142238")
    corrected = [m for m in row["masks"] if m["label"] == "referee"]
    assert len(corrected) == 1 and corrected[0]["score"] == 1.0
    assert corrected[0]["topk_labels"] == ["referee"]
    rows_v2, _ = read_rows(dataset, version=2)
    assert sorted(r["image_id"] for r in rows_v2) == ["142238", "439180"]
    assert {r["model"] for r in rows_v2} == {"hipie-v2"}


def test_read_back_equals_the_ingested_rows(fiftyone_db, dataset_name, labels_dir, label_rows):
    import schemas
    from pipeline.review.ingest import ingest_labels
    from pipeline.review.read import read_rows

    dataset, _ = ingest_labels(labels_dir, dataset_name)
    rows, reviewed = read_rows(dataset)
    assert reviewed == set()
    schemas.validate_table(schemas.rows_to_table(rows))
    got = {r["image_id"]: r for r in rows}
    for want in label_rows:
        row = got[want["image_id"]]
        assert (row["status"], row["error"], row["uri"]) == (
            want["status"],
            want["error"],
            want["uri"],
        )
        assert (row["model"], row["labeled_at"]) == (want["model"], want["labeled_at"])
        key = lambda m: m["mask_id"]  # noqa: E731
        for a, b in zip(sorted(row["masks"], key=key), sorted(want["masks"], key=key), strict=True):
            for name in ("mask_id", "rle", "bbox", "area", "level", "label", "parent_id", "origin"):
                assert a[name] == b[name], (want["image_id"], a["mask_id"], name)
            assert np.allclose(a["topk_scores"], b["topk_scores"]) and a["score"] == b["score"]


def test_media_paths_stay_inside_the_media_folder(fiftyone_db, tmp_path):
    from pipeline.review.media import MediaResolver

    media = MediaResolver(media_dir=tmp_path / "media")
    evil = media.target("tar:///data/sa_000001.tar#../../../etc/passwd")
    assert evil == (tmp_path / "media" / "sa_000001" / "passwd").resolve()
    assert media.target("/data/photo.jpg") is None and media.target("file:///data/a.jpg") is None
    assert media.resolve(["file:///data/a.jpg", "/data/b.jpg"]) == ["/data/a.jpg", "/data/b.jpg"]


def test_decode_crop_equals_a_crop_of_the_full_decode(fiftyone_db):
    from pipeline.review.ingest import decode_crop

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = np.zeros((height, width), bool)
        y0, y1 = sorted(rng.integers(0, height, 2))
        x0, x1 = sorted(rng.integers(0, width, 2))
        mask[y0 : y1 + 1, x0 : x1 + 1] = rng.random((y1 + 1 - y0, x1 + 1 - x0)) > 0.3
        encoded = rle.encode(mask)
        x, y, w, h = (int(v) for v in rle.bbox(encoded))
        if w == 0:
            continue
        assert np.array_equal(decode_crop(encoded, x, y, w, h), mask[y : y + h, x : x + w])
        checked += 1
    assert checked > 50
