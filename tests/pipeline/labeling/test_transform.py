"""``label_dataset`` on a real local Ray cluster: label rows from ``ray.data.read_images`` over real
photos, from a column of URIs (with an SA-1B masks column) and composed with a user's own stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

import schemas
from pipeline.labeling.config import LabelJobConfig
from pipeline.labeling.transform import label_dataset
from pipeline.vocabulary import Vocabulary
from schemas import rle

VOCABULARY = Vocabulary.from_lists(things=["person", "car"], stuff=["sky", "grass"], parts=["head"])


def _config(**kw) -> LabelJobConfig:
    base = dict(
        inputs=(),
        output="",
        vocabulary_json=VOCABULARY.to_json(),
        checkpoint="random:tiny",
        replace_classes=(),
        batch_size=2,
        cpus_per_actor=0.5,
    )
    base.update(kw)
    return LabelJobConfig(**base)


def _check(rows: list[dict]) -> None:
    schemas.validate_table(schemas.rows_to_table(rows))
    assert all(r["vocabulary_hash"] == VOCABULARY.hash for r in rows if r["status"] == "ok")


def test_read_images_of_real_photos(ray_local, coco_sample):
    ray = ray_local
    folder = coco_sample / "input_images"
    photos = sorted(folder.glob("*.jpg"))
    ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
    labels = label_dataset(ds, _config())
    assert set(labels.schema().names) == set(schemas.LABELS_V1.names)
    rows = sorted(labels.take_all(), key=lambda r: r["image_id"])
    _check(rows)
    assert [r["image_id"] for r in rows] == [p.name for p in photos]
    for row, photo in zip(rows, photos):
        assert row["status"] == "ok", row["error"]
        with Image.open(photo) as im:
            assert (row["width"], row["height"]) == im.size  # the photo's own size
        assert row["shard"] == "dataset" and row["uri"].endswith(photo.name)
        # HIPIE's own masks (an untrained model may find none on a photo)
        assert {m["origin"] for m in row["masks"]} <= {"hipie"}
        for m in row["masks"]:
            assert rle.decode(m["rle"]).shape == (row["height"], row["width"])


def test_uri_column_with_masks_and_bad_rows(ray_local, coco_sample, tmp_path):
    ray = ray_local
    photo = sorted((coco_sample / "input_images").glob("*.jpg"))[0]
    with Image.open(photo) as im:
        w, h = im.size
    box = np.zeros((h, w), bool)
    box[10:60, 20:90] = True
    ann = {"annotations": [{"segmentation": rle.encode(box), "predicted_iou": 0.9}]}
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    items = [
        {"uri": str(photo), "sam_json": json.dumps(ann), "shard": "s1"},
        {"uri": str(photo), "sam_json": None, "shard": "s1", "image_id": "again.jpg"},
        {"uri": str(tmp_path / "broken.jpg"), "sam_json": None, "shard": "s1"},
        {"uri": str(tmp_path / "missing.jpg"), "sam_json": None, "shard": "s2"},
    ]
    ds = ray.data.from_items(items)
    # composed with the user's own stages before and after
    ds = ds.filter(lambda r: True)
    labels = label_dataset(ds, _config()).filter(lambda r: r["shard"] == "s1")
    rows = {r["image_id"]: r for r in labels.take_all()}
    _check(list(rows.values()))
    assert sorted(rows) == [photo.name, "again.jpg", "broken.jpg"]
    sam = rows[photo.name]
    assert sam["status"] == "ok" and (sam["width"], sam["height"]) == (w, h)
    assert len(sam["masks"]) == 1 and sam["masks"][0]["origin"] == "sam"
    assert rle.decode(sam["masks"][0]["rle"]).sum() == box.sum()
    assert rows["again.jpg"]["status"] == "ok"
    assert {m["origin"] for m in rows["again.jpg"]["masks"]} <= {"hipie"}
    assert rows["broken.jpg"]["status"] == "error" and "decode" in rows["broken.jpg"]["error"]


def test_missing_uri_is_an_error_row(ray_local, tmp_path):
    ray = ray_local
    img = tmp_path / "x.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(img)
    ds = ray.data.from_items([{"uri": str(tmp_path / "missing.png")}, {"uri": str(img)}])
    rows = {Path(r["image_id"]).name: r for r in label_dataset(ds, _config()).take_all()}
    assert (
        rows["missing.png"]["status"] == "error" and "cannot read" in rows["missing.png"]["error"]
    )
    assert rows["x.png"]["status"] == "ok" and (
        rows["x.png"]["width"],
        rows["x.png"]["height"],
    ) == (30, 20)
