"""FiftyOne ingest of label Parquet files, and the read-back of reviewers' corrections.

Layout of one sample (one image, keyed by ``image_id``):

- ``filepath``: a local image file (``pipeline.review.media``). Plain paths are kept; ``file://``
  is stripped; SA-1B members ``tar://<tar path>#<member>`` are extracted (that member only) into
  ``media_dir``; other remote URIs are copied there with fsspec. ``uri`` keeps the original URI, ``shard`` the input shard.
- ``instances``, ``parts``, ``subparts``, ``stuff``: ``fo.Detections``, one per mask level. Each
  ``fo.Detection`` follows FiftyOne's convention: ``bounding_box`` is ``[x, y, w, h]`` relative to
  the image in [0, 1] and ``mask`` is a bool array covering only that box (so documents stay far
  below MongoDB's 16 MB limit even at SA-1B size). ``confidence`` is the score; attributes:
  ``mask_id``, ``level``, ``model_label`` (the label as the model gave it), ``topk_labels``,
  ``topk_scores``, ``origin``, ``sam_iou``, ``sam_stability``, ``area`` (pixels), and for parts
  and subparts ``parent_id`` (the FiftyOne id of the parent detection: the instance of a part, the
  part of a subpart) and ``parent_mask_id`` (its ``mask_id`` in the Parquet row).
- ``label_runs``: the labeling runs the sample holds, one run id per version; a run id is
  ``"<model> | <vocabulary_hash> | <labeled_at ISO>"``. Version 1 lives in the plain fields above,
  version ``n > 1`` in ``instances_v<n>``, ``parts_v<n>``, ... ``label_error_v<n>``.
- ``label_fingerprint``: a hash of the version-1 detections (ids, labels, boxes) as ingested; when
  the current values hash differently, a reviewer edited the sample.
- Error rows: the sample is tagged ``label-error`` and ``label_error`` holds the reason.
- Unreadable media (a missing file, a missing or cut-off tar, an unreachable URI): the sample is
  still ingested with its labels, tagged ``media-error``, and ``media_error`` holds the reason;
  the ingest goes on.

Reading the labels back as rows (export, fine-tuning) is ``pipeline.review.read``.

Ingest rules (see ``ingest_rows``): a run id the sample already holds changes nothing (idempotent);
a newer run of an existing sample goes into the next version's fields and never overwrites the
plain fields, except with ``replace_unreviewed=True`` for samples that are neither tagged
``reviewed`` nor edited (nor error samples, which have nothing to protect).
All writes are bulk: ``add_samples`` for new images and ``set_values`` keyed by ``image_id`` for
existing ones; there is no per-sample save loop.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F

import schemas
from pipeline.export.formats import label_files
from pipeline.review.app import setup_review
from pipeline.review.fields import (
    ERROR_TAG,
    FIELD_LEVELS,
    LEVEL_FIELDS,
    MEDIA_ERROR_TAG,
    REVIEWED_TAG,
    run_id,
    version_suffix,
)
from pipeline.review.media import MediaResolver
from schemas import rle as rle_utils


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class IngestResult:
    """What one ingest did, counted in samples."""

    added: int  # new samples (images not in the dataset before)
    unchanged: int  # samples that already held this labeling run
    replaced: int  # untouched samples whose version-1 fields took the new run
    versioned: int  # samples whose new run went into new version fields
    errors: int  # error rows among the ingested rows
    media_errors: int = 0  # new samples whose image could not be materialized (tagged)


# --------------------------------------------------------------------------- rows -> labels
def decode_crop(rle: dict, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The (h, w) bool window at (x, y) of an RLE mask, decoding only the box's columns.

    COCO RLE runs are column-major, so columns x..x+w-1 are the flat pixel range
    [x * H, (x + w) * H); the runs are clipped to that range and expanded, which costs the box's
    area instead of the image's (a full decode of every SA-1B mask takes ~1 s per image).
    """
    height = int(rle["size"][0])
    runs = np.asarray(rle_utils.run_lengths(rle), dtype=np.int64)
    ends = np.cumsum(runs)
    starts = ends - runs
    lo, hi = x * height, (x + w) * height
    lengths = np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0, None)
    values = (np.arange(len(runs)) % 2).astype(bool)  # background first, then alternating
    flat = np.repeat(values, lengths)
    return flat.reshape(w, height).T[y : y + h].copy()


def _detection(mask: dict, width: int, height: int) -> fo.Detection:
    """One schema mask as a FiftyOne detection with its mask cropped to the (pixel) box."""
    x, y, w, h = (int(round(v)) for v in rle_utils.bbox(mask["rle"]))
    crop = None
    if w > 0 and h > 0:
        crop = decode_crop(mask["rle"], x, y, w, h)
    return fo.Detection(
        label=mask["label"],
        bounding_box=[x / width, y / height, w / width, h / height],
        mask=crop,
        confidence=float(mask["score"]),
        mask_id=int(mask["mask_id"]),
        level=mask["level"],
        model_label=mask["label"],
        topk_labels=list(mask["topk_labels"] or []),
        topk_scores=[float(s) for s in mask["topk_scores"] or []],
        origin=mask["origin"],
        sam_iou=mask["sam_iou"],
        sam_stability=mask["sam_stability"],
        area=int(mask["area"]),
    )


def row_labels(row: dict) -> dict[str, fo.Detections]:
    """The four level fields of an ok row, parents linked by FiftyOne detection id."""
    fields: dict[str, list[fo.Detection]] = {name: [] for name in FIELD_LEVELS}
    if row["status"] != "ok":
        return {name: fo.Detections(detections=[]) for name in fields}
    by_mask_id: dict[int, fo.Detection] = {}
    width, height = int(row["width"]), int(row["height"])
    for mask in row["masks"] or []:
        det = _detection(mask, width, height)
        by_mask_id[det["mask_id"]] = det
        fields[LEVEL_FIELDS[mask["level"]]].append(det)
    for mask in row["masks"] or []:
        parent = mask["parent_id"]
        if parent is not None and parent in by_mask_id:
            det = by_mask_id[int(mask["mask_id"])]
            det["parent_id"] = by_mask_id[parent].id
            det["parent_mask_id"] = int(parent)
    by_id = {int(m["mask_id"]): m for m in row["masks"] or []}
    for mask in row["masks"] or []:  # "the parts of horses": the App filters on instance_label
        if mask["level"] in ("part", "subpart"):
            instance = schemas.instance_of(mask, by_id)
            by_mask_id[int(mask["mask_id"])]["instance_label"] = instance and instance["label"]
    return {name: fo.Detections(detections=dets) for name, dets in fields.items()}


def fingerprint(
    ids: Iterable[Sequence[str] | None],
    labels: Iterable[Sequence[str] | None],
    boxes: Iterable[Sequence[Sequence[float]] | None],
) -> str:
    """Hash of the level fields' detections (per field: ids, labels, boxes in that order)."""
    digest = hashlib.sha1()
    for field_ids, field_labels, field_boxes in zip(ids, labels, boxes):
        for i, label, box in zip(field_ids or [], field_labels or [], field_boxes or []):
            digest.update(f"{i}|{label}|{[round(float(v), 6) for v in box]};".encode())
        digest.update(b"#")
    return digest.hexdigest()


def _labels_fingerprint(labels: dict[str, fo.Detections]) -> str:
    names = list(FIELD_LEVELS)
    return fingerprint(
        [[d.id for d in labels[n].detections] for n in names],
        [[d.label for d in labels[n].detections] for n in names],
        [[d.bounding_box for d in labels[n].detections] for n in names],
    )


# --------------------------------------------------------------------------- ingest
def open_dataset(name: str) -> fo.Dataset:
    """The persistent dataset ``name`` (created, with a unique ``image_id`` index, if new)."""
    if fo.dataset_exists(name):
        return fo.load_dataset(name)
    dataset = fo.Dataset(name, persistent=True)
    for field in ("image_id", "uri", "shard", "label_fingerprint", "media_error"):
        dataset.add_sample_field(field, fo.StringField)
    dataset.add_sample_field("label_runs", fo.ListField, subfield=fo.StringField)
    _add_version_fields(dataset, 1)
    dataset.create_index("image_id", unique=True)
    return dataset


def _add_version_fields(dataset: fo.Dataset, version: int) -> None:
    """Declare the fields of a label version (so all-empty values still have a type)."""
    suffix = version_suffix(version)
    schema = dataset.get_field_schema()
    for name in FIELD_LEVELS:
        if f"{name}{suffix}" not in schema:
            dataset.add_sample_field(
                f"{name}{suffix}", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
            )
    if f"label_error{suffix}" not in schema:
        dataset.add_sample_field(f"label_error{suffix}", fo.StringField)


def _current_fingerprints(view: fo.DatasetView) -> list[str]:
    names = list(FIELD_LEVELS)
    paths = [f"{n}.detections.{attr}" for attr in ("id", "label", "bounding_box") for n in names]
    values = view.values(paths)
    k = len(names)
    per_field = [values[0:k], values[k : 2 * k], values[2 * k : 3 * k]]
    return [
        fingerprint(
            [per_field[0][f][s] for f in range(k)],
            [per_field[1][f][s] for f in range(k)],
            [per_field[2][f][s] for f in range(k)],
        )
        for s in range(len(values[0]))
    ]


def _version_values(row: dict, labels: dict[str, fo.Detections]) -> dict[str, object]:
    values: dict[str, object] = dict(labels)
    values["label_error"] = row["error"] if row["status"] == "error" else None
    return values


def ingest_rows(
    dataset: fo.Dataset,
    rows: Sequence[dict],
    *,
    media_dir: str | os.PathLike,
    replace_unreviewed: bool = False,
) -> IngestResult:
    """Ingest schema-v1 rows (dicts, e.g. ``table.to_pylist()``) into ``dataset``.

    Args:
        dataset: from ``open_dataset``.
        rows: one per image; a later row of the same image_id in ``rows`` wins.
        media_dir: where archive members and remote images are materialized.
        replace_unreviewed: let a new run overwrite the version-1 fields of samples nobody
            reviewed (not tagged ``reviewed`` and fingerprint unchanged); otherwise a new run of
            an existing sample always goes into new version fields.
    """
    latest = {row["image_id"]: row for row in rows}
    rows = list(latest.values())
    if not rows:
        return IngestResult(added=0, unchanged=0, replaced=0, versioned=0, errors=0)
    ids = [row["image_id"] for row in rows]
    view = dataset.match(F("image_id").is_in(ids))
    state: dict[str, dict] = {}
    if len(view):
        keys, runs, tags, stored = view.values(
            ["image_id", "label_runs", "tags", "label_fingerprint"]
        )
        current = _current_fingerprints(view)
        for key, r, t, s, c in zip(keys, runs, tags, stored, current):
            state[key] = {"runs": list(r or []), "tags": list(t or []), "edited": s != c}

    new_rows = [row for row in rows if row["image_id"] not in state]
    media = MediaResolver(media_dir=media_dir).resolve_with_errors([r["uri"] for r in new_rows])
    samples = []
    media_errors = 0
    for row, (path, media_error) in zip(new_rows, media):
        labels = row_labels(row)
        tags = [ERROR_TAG] if row["status"] == "error" else []
        if media_error is not None:
            tags.append(MEDIA_ERROR_TAG)
            media_errors += 1
        sample = fo.Sample(
            filepath=path,
            tags=tags,
            image_id=row["image_id"],
            uri=row["uri"],
            shard=row["shard"],
            media_error=media_error,
            label_runs=[run_id(row)],
            label_fingerprint=_labels_fingerprint(labels),
            **_version_values(row, labels),
        )
        if row["width"] and row["height"]:
            sample.metadata = fo.ImageMetadata(width=int(row["width"]), height=int(row["height"]))
        samples.append(sample)
    if samples:
        dataset.add_samples(samples, progress=False)

    updates: dict[str, dict[str, object]] = defaultdict(dict)  # field -> image_id -> value
    unchanged = replaced = versioned = 0
    for row in rows:
        key = row["image_id"]
        if key not in state:
            continue
        old, run = state[key], run_id(row)
        if run in old["runs"]:
            unchanged += 1
            continue
        labels = row_labels(row)
        values = _version_values(row, labels)
        is_error = ERROR_TAG in old["tags"]
        untouched = REVIEWED_TAG not in old["tags"] and not old["edited"]
        if untouched and (replace_unreviewed or is_error):
            replaced += 1
            values["label_fingerprint"] = _labels_fingerprint(labels)
            updates["label_runs"][key] = [run] + old["runs"][1:]
            tags = [t for t in old["tags"] if t != ERROR_TAG]
            updates["tags"][key] = tags + ([ERROR_TAG] if row["status"] == "error" else [])
            if row["width"] and row["height"]:
                size = dict(width=int(row["width"]), height=int(row["height"]))
                updates["metadata"][key] = fo.ImageMetadata(**size)
            suffix = ""
        else:
            versioned += 1
            updates["label_runs"][key] = old["runs"] + [run]
            suffix = version_suffix(len(old["runs"]) + 1)
            _add_version_fields(dataset, len(old["runs"]) + 1)
        for name, value in values.items():
            updates[f"{name}{suffix}"][key] = value
    for name, by_key in updates.items():
        dataset.set_values(name, by_key, key_field="image_id")
    return IngestResult(
        added=len(samples),
        unchanged=unchanged,
        replaced=replaced,
        versioned=versioned,
        errors=sum(row["status"] == "error" for row in rows),
        media_errors=media_errors,
    )


def iter_label_rows(
    labels: str | os.PathLike, *, batch_size: int = 512
) -> Iterator[tuple[list[dict], dict]]:
    """(rows, metadata) batches from every label file under ``labels``."""
    for path in label_files(labels):
        table, info = schemas.read_parquet(path)
        for batch in table.to_batches(max_chunksize=batch_size):
            yield batch.to_pylist(), info


def default_media_dir(labels: str | os.PathLike) -> Path:
    """Where review materializes images when no media folder is given: ``<labels>/media`` for a
    local folder (beside a local file), and a local cache folder for labels in object storage
    (``$HIPIE_MEDIA_CACHE`` or ``~/.cache/hipie/media``, one subfolder per labels URI), since
    FiftyOne needs the images on a local disk."""
    text = str(labels)
    if "://" in text and not text.startswith("file://"):
        cache = Path(
            os.environ.get("HIPIE_MEDIA_CACHE", Path.home() / ".cache" / "hipie" / "media")
        )
        digest = hashlib.sha256(text.split("?", 1)[0].encode()).hexdigest()[:16]
        return cache / digest
    root = Path(text.removeprefix("file://"))
    return (root if root.is_dir() else root.parent) / "media"


def ingest_labels(
    labels: str | os.PathLike,
    dataset_name: str,
    *,
    media_dir: str | os.PathLike | None = None,
    replace_unreviewed: bool = False,
    batch_size: int = 512,
) -> tuple[fo.Dataset, IngestResult]:
    """Ingest every label file under ``labels`` into the persistent dataset ``dataset_name``.

    ``media_dir`` defaults to `default_media_dir(labels)`. Vocabularies from the files'
    metadata are kept in ``dataset.info["vocabularies"]`` by vocabulary hash (when the rows name
    one).
    """
    dataset = open_dataset(dataset_name)
    media = Path(media_dir) if media_dir else default_media_dir(labels)
    totals = dict(added=0, unchanged=0, replaced=0, versioned=0, errors=0, media_errors=0)
    vocabularies = dict(dataset.info.get("vocabularies", {}))
    for rows, info in iter_label_rows(labels, batch_size=batch_size):
        result = ingest_rows(dataset, rows, media_dir=media, replace_unreviewed=replace_unreviewed)
        for name in totals:
            totals[name] += getattr(result, name)
        for row in rows:
            if row["vocabulary_hash"] and info["vocabulary"]:
                vocabularies.setdefault(row["vocabulary_hash"], info["vocabulary"])
    if totals["added"] or totals["replaced"] or totals["versioned"]:
        dataset.add_dynamic_sample_fields()  # expose detection attributes in the App's filters
    if vocabularies != dataset.info.get("vocabularies", {}):
        dataset.info["vocabularies"] = vocabularies
        dataset.save()
    if totals["added"] or totals["replaced"] or totals["versioned"]:
        classes = [
            c
            for v in vocabularies.values()
            for k in ("things", "stuff", "parts")
            for c in v.get(k, [])
        ]
        setup_review(dataset, vocabulary=classes)  # colours, min_margin, saved views
    return dataset, IngestResult(**totals)
