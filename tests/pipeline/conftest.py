"""Label fixtures for the review and export tests: the COCO sample's ground truth through schema v1,
with synthetic parts and subparts cut out of the instances, an SA-1B style tar member and an error
row, written to real Parquet files."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import schemas
from jobs.demo import coco_sample_rows
from schemas import rle

PART_MIN_AREA = 400  # instances smaller than this get no part
LABELED_AT = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def add_parts(row: dict) -> dict:
    """A copy of ``row`` where each instance of >= PART_MIN_AREA pixels gets a part "top" (its rows
    above the middle of its box) and the part a subpart "top left" (the part's left half)."""
    row = copy.deepcopy(row)
    masks = list(row["masks"])
    next_id = max(m["mask_id"] for m in masks) + 1
    for m in row["masks"]:
        if m["level"] != "instance" or m["area"] < PART_MIN_AREA:
            continue
        dense = rle.decode(m["rle"])
        x, y, w, h = (int(v) for v in m["bbox"])
        top = dense.copy()
        top[y + h // 2 :] = False
        left = top.copy()
        left[:, x + w // 2 :] = False
        part_id, sub_id = next_id, next_id + 1
        next_id += 2
        masks.append(
            schemas.make_mask(
                mask_id=part_id,
                rle=rle.encode(top),
                level="part",
                label="top",
                score=0.75,
                topk_labels=("top", "bottom"),
                topk_scores=(0.75, 0.25),
                parent_id=m["mask_id"],
                origin="hipie",
            )
        )
        masks.append(
            schemas.make_mask(
                mask_id=sub_id,
                rle=rle.encode(left),
                level="subpart",
                label="top left",
                score=0.5,
                parent_id=part_id,
                origin="sam",
                sam_iou=0.9,
                sam_stability=0.95,
            )
        )
    row["masks"] = masks
    return row


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def relabel(rows: list[dict], *, model: str, label: str, hours: int) -> list[dict]:
    """A newer labeling run of ``rows``: every instance labeled ``label``, labeled ``hours`` later."""
    out = []
    for row in rows:
        row = copy.deepcopy(row)
        row["model"] = model
        row["labeled_at"] = LABELED_AT + timedelta(hours=hours)
        for m in row["masks"]:
            if m["level"] == "instance":
                m["label"] = label
                m["topk_labels"] = [label]
                m["topk_scores"] = [m["score"]]
        out.append(row)
    return out


@pytest.fixture(scope="session")
def coco_rows(coco_sample) -> tuple[list[dict], dict]:
    """The sample's ground truth as schema rows (stuff + instances only) and its vocabulary."""
    rows, vocabulary = coco_sample_rows(coco_sample)
    for row in rows:
        row["labeled_at"] = LABELED_AT
    return rows, vocabulary


@pytest.fixture()
def label_rows(coco_rows, coco_sample, tmp_path) -> list[dict]:
    """Four rows: the two COCO photos with parts, one of them again as member ``sa_1.jpg`` of an
    SA-1B style tar (beside a ``sa_1.json`` that ingest must not extract), and an error row."""
    rows, _ = coco_rows
    with_parts = [add_parts(row) for row in rows]
    photo = next(r for r in with_parts if r["image_id"] == "439180")
    tar_path = tmp_path / "shards" / "sa_000000.tar"
    tar_path.parent.mkdir()
    write_tar(
        tar_path,
        {
            "sa_1.jpg": Path(photo["uri"]).read_bytes(),
            "sa_1.json": json.dumps({"annotations": []}).encode(),
        },
    )
    tar_row = copy.deepcopy(photo)
    tar_row.update(image_id="sa_1", uri=f"tar://{tar_path}#sa_1.jpg", shard="sa_000000.tar")
    error = schemas.make_error_row(
        image_id="broken-1",
        uri=str(coco_sample / "input_images" / "missing.jpg"),
        shard="sa_000000.tar",
        error="image decode failed: file not found",
        labeled_at=LABELED_AT,
    )
    return with_parts + [tar_row, error]


def write_labels(rows: list[dict], folder: Path, vocabulary: dict) -> Path:
    """Rows as label Parquet files (one per shard, as the pipeline writes them) under ``folder``."""
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for shard, shard_rows in by_shard.items():
        table = schemas.rows_to_table(shard_rows)
        schemas.validate_table(table)
        schemas.write_parquet(table, folder / f"{shard}.parquet", vocabulary=vocabulary)
    return folder


@pytest.fixture()
def labels_dir(label_rows, coco_rows, tmp_path) -> Path:
    """``label_rows`` written to real Parquet files in ``tmp_path/labels``."""
    return write_labels(label_rows, tmp_path / "labels", coco_rows[1])


@pytest.fixture()
def dataset_name(fiftyone_db, request):
    """A fresh persistent dataset name for one test; the dataset is deleted afterwards."""
    name = f"review-test-{request.node.name}"[:100]
    if fiftyone_db.dataset_exists(name):
        fiftyone_db.delete_dataset(name)
    yield name
    if fiftyone_db.dataset_exists(name):
        fiftyone_db.delete_dataset(name)
