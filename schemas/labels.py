"""The label contract: Arrow schema v1, row builders, validation and Parquet I/O.

One row per input image, always. ``status`` is ``ok`` (the image was labeled; ``masks`` holds its
labels) or ``error`` (``error`` says why, in words a person can act on). Parquet key-value metadata
carries the schema version and the run's vocabulary.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import rle as rle_utils

SCHEMA_VERSION = "1"
LEVELS = ("stuff", "instance", "part", "subpart")
ORIGINS = ("sam", "hipie")
STATUSES = ("ok", "error")

META_SCHEMA_VERSION = b"hipie.schema_version"
META_VOCABULARY = b"hipie.vocabulary"
META_EXTRA = b"hipie.extra"

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

MASK_TYPE = pa.struct(
    [
        ("mask_id", pa.int32()),  # unique within the image
        ("rle", RLE_TYPE),  # COCO RLE, size == [height, width]
        ("bbox", pa.list_(pa.float32())),  # [x, y, w, h] in pixels
        ("area", pa.int64()),  # pixels inside the mask
        ("level", pa.string()),  # one of LEVELS
        ("label", pa.string()),  # class name from the run's vocabulary
        ("score", pa.float32()),  # in [0, 1]
        ("topk_labels", pa.list_(pa.string())),  # best labels, best first
        ("topk_scores", pa.list_(pa.float32())),  # their scores, same length
        ("parent_id", pa.int32()),  # mask_id of the instance (or part) holding it; null if none
        ("origin", pa.string()),  # one of ORIGINS
        ("sam_iou", pa.float32()),  # SAM's predicted IoU where known
        ("sam_stability", pa.float32()),  # SAM's stability score where known
    ]
)

LABELS_V1 = pa.schema(
    [
        ("schema_version", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model", pa.string()),
        ("vocabulary_hash", pa.string()),
        ("labeled_at", pa.timestamp("us", tz="UTC")),
        ("masks", pa.list_(MASK_TYPE)),
    ],
    metadata={META_SCHEMA_VERSION: SCHEMA_VERSION.encode()},
)


class SchemaError(ValueError):
    """A table breaks the label contract; the message names the field (and the row)."""


def make_mask(
    *,
    mask_id: int,
    rle: Mapping[str, Any],
    level: str,
    label: str,
    score: float,
    origin: str,
    topk_labels: Sequence[str] = (),
    topk_scores: Sequence[float] = (),
    parent_id: int | None = None,
    sam_iou: float | None = None,
    sam_stability: float | None = None,
    bbox: Sequence[float] | None = None,
    area: int | None = None,
) -> dict:
    """One mask struct of ``MASK_TYPE``; bbox and area are derived from the RLE when not given."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    clean_rle = {"size": [int(v) for v in rle["size"]], "counts": counts}
    return {
        "mask_id": int(mask_id),
        "rle": clean_rle,
        "bbox": [float(v) for v in (bbox if bbox is not None else rle_utils.bbox(clean_rle))],
        "area": int(area if area is not None else rle_utils.area(clean_rle)),
        "level": level,
        "label": label,
        "score": float(score),
        "topk_labels": list(topk_labels),
        "topk_scores": [float(v) for v in topk_scores],
        "parent_id": None if parent_id is None else int(parent_id),
        "origin": origin,
        "sam_iou": None if sam_iou is None else float(sam_iou),
        "sam_stability": None if sam_stability is None else float(sam_stability),
    }


def instance_of(mask: Mapping[str, Any], by_id: Mapping[int, Mapping[str, Any]]) -> dict | None:
    """The instance mask above a part or subpart, following ``parent_id`` links through
    ``by_id`` (mask id -> mask of the same image); None when there is none or the links loop."""
    seen: set[int] = set()
    current = mask
    while current["parent_id"] is not None and current["parent_id"] in by_id:
        if current["parent_id"] in seen:
            return None
        seen.add(current["parent_id"])
        current = by_id[current["parent_id"]]
        if current["level"] == "instance":
            return dict(current)
    return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def make_ok_row(
    *,
    image_id: str,
    uri: str,
    shard: str,
    width: int,
    height: int,
    masks: Iterable[dict],
    model: str,
    vocabulary_hash: str,
    labeled_at: datetime | None = None,
) -> dict:
    """The row of a labeled image."""
    return {
        "schema_version": SCHEMA_VERSION,
        "image_id": str(image_id),
        "uri": uri,
        "shard": shard,
        "status": "ok",
        "error": None,
        "width": int(width),
        "height": int(height),
        "model": model,
        "vocabulary_hash": vocabulary_hash,
        "labeled_at": labeled_at or _now(),
        "masks": list(masks),
    }


def make_error_row(
    *,
    image_id: str,
    uri: str,
    shard: str,
    error: str,
    width: int | None = None,
    height: int | None = None,
    model: str = "",
    vocabulary_hash: str = "",
    labeled_at: datetime | None = None,
) -> dict:
    """The row of an image that could not be labeled; ``error`` says why."""
    if not error:
        raise ValueError("an error row needs a non-empty reason")
    return {
        "schema_version": SCHEMA_VERSION,
        "image_id": str(image_id),
        "uri": uri,
        "shard": shard,
        "status": "error",
        "error": error,
        "width": width,
        "height": height,
        "model": model,
        "vocabulary_hash": vocabulary_hash,
        "labeled_at": labeled_at or _now(),
        "masks": [],
    }


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    """Rows (from ``make_ok_row`` / ``make_error_row``) as a table of ``LABELS_V1``."""
    return pa.Table.from_pylist(list(rows), schema=LABELS_V1)


def _row_name(table: pa.Table, i: int) -> str:
    image_id = table.column("image_id")[i].as_py()
    return f"row {i} (image_id {image_id!r})"


def validate_table(table: pa.Table, *, check_rle_counts: bool = True) -> None:
    """Check ``table`` against the label contract; raise ``SchemaError`` naming the bad field.

    Checks: every column present with its type; status in ok|error with an error text on error rows;
    ok rows with width and height; per mask: level, origin, score and top-k scores in [0, 1], top-k
    lengths equal, bbox of 4 numbers, unique mask ids, parent ids that exist in the same row, RLE
    size equal to the image's (height, width) and (with ``check_rle_counts``) counts covering
    exactly height x width pixels.
    """
    for field in LABELS_V1:
        if field.name not in table.column_names:
            raise SchemaError(f"missing column {field.name!r}")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(
                f"column {field.name!r} has type {actual}, the contract says {field.type}"
            )
    extra = [n for n in table.column_names if n not in LABELS_V1.names]
    if extra:
        raise SchemaError(f"unexpected columns {extra}")

    for i, row in enumerate(table.to_pylist()):
        where = _row_name(table, i)
        for name in ("schema_version", "image_id", "uri", "status"):
            if row[name] is None:
                raise SchemaError(f"{where}: {name} is null")
        if row["schema_version"] != SCHEMA_VERSION:
            raise SchemaError(
                f"{where}: schema_version {row['schema_version']!r}, expected {SCHEMA_VERSION!r}"
            )
        status = row["status"]
        if status not in STATUSES:
            raise SchemaError(f"{where}: status {status!r} is not one of {STATUSES}")
        if status == "error":
            if not row["error"]:
                raise SchemaError(f"{where}: error rows need a reason in 'error'")
            if row["masks"]:
                raise SchemaError(f"{where}: masks must be empty on an error row")
            continue
        height, width = row["height"], row["width"]
        if height is None or width is None or height <= 0 or width <= 0:
            raise SchemaError(f"{where}: width/height must be positive on an ok row")
        _validate_masks(row["masks"] or [], height, width, where, check_rle_counts)


def _validate_masks(
    masks: list[dict], height: int, width: int, where: str, check_rle_counts: bool
) -> None:
    ids = [m["mask_id"] for m in masks]
    if any(v is None for v in ids):
        raise SchemaError(f"{where}: masks[].mask_id is null")
    if len(set(ids)) != len(ids):
        raise SchemaError(f"{where}: masks[].mask_id values are not unique")
    known = set(ids)
    for j, m in enumerate(masks):
        at = f"{where}: masks[{j}]"
        if m["level"] not in LEVELS:
            raise SchemaError(f"{at}.level = {m['level']!r} is not one of {LEVELS}")
        if m["origin"] not in ORIGINS:
            raise SchemaError(f"{at}.origin = {m['origin']!r} is not one of {ORIGINS}")
        if not m["label"]:
            raise SchemaError(f"{at}.label is empty")
        score = m["score"]
        if score is None:
            raise SchemaError(f"{at}.score is null")
        if not 0.0 <= score <= 1.0:
            raise SchemaError(f"{at}.score = {score:.6g} is outside [0, 1]")
        labels, scores = m["topk_labels"] or [], m["topk_scores"] or []
        if len(labels) != len(scores):
            raise SchemaError(
                f"{at}.topk_scores has {len(scores)} values for {len(labels)} topk_labels"
            )
        if any(s is None or not 0.0 <= s <= 1.0 for s in scores):
            raise SchemaError(f"{at}.topk_scores has a value outside [0, 1]")
        for key in ("sam_iou", "sam_stability"):
            if m[key] is not None and not 0.0 <= m[key] <= 1.5:
                raise SchemaError(f"{at}.{key} = {m[key]} is out of range")
        if m["bbox"] is None or len(m["bbox"]) != 4:
            raise SchemaError(f"{at}.bbox must be [x, y, w, h]")
        if m["area"] is None or m["area"] < 0:
            raise SchemaError(f"{at}.area must be >= 0")
        if m["parent_id"] is not None and (m["parent_id"] not in known or m["parent_id"] == ids[j]):
            raise SchemaError(
                f"{at}.parent_id = {m['parent_id']} does not name another mask of this image"
            )
        rle = m["rle"]
        if rle is None or rle["size"] is None or rle["counts"] is None:
            raise SchemaError(f"{at}.rle is missing size or counts")
        if list(rle["size"]) != [height, width]:
            raise SchemaError(
                f"{at}.rle size {list(rle['size'])} differs from the image's [height, width] "
                f"[{height}, {width}]"
            )
        if check_rle_counts:
            reason = rle_utils.check(rle, height, width)
            if reason:
                raise SchemaError(f"{at}.rle: {reason}")


def with_label_metadata(
    table: pa.Table, *, vocabulary: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> pa.Table:
    """``table`` with the label key-value metadata: the schema version, the vocabulary as JSON
    and ``extra`` as JSON (for example the shard's row count, so a reader can tell a complete
    file)."""
    metadata = dict(table.schema.metadata or {})
    metadata[META_SCHEMA_VERSION] = SCHEMA_VERSION.encode()
    metadata[META_VOCABULARY] = json.dumps(vocabulary, sort_keys=True).encode()
    metadata[META_EXTRA] = json.dumps(dict(extra or {}), sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def write_parquet(
    table: pa.Table,
    path: str | os.PathLike,
    *,
    vocabulary: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``table`` to ``path`` atomically (temporary name in the same folder, then rename),
    with the label metadata of ``with_label_metadata``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    table = with_label_metadata(table, vocabulary=vocabulary, extra=extra)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metadata(path: str | os.PathLike, *, filesystem=None) -> dict:
    """The label metadata of a Parquet file: schema_version, vocabulary, extra, num_rows.

    ``filesystem``: a ``pyarrow.fs.FileSystem`` that ``path`` is on (default: the local one).
    """
    meta = pq.read_metadata(os.fspath(path), filesystem=filesystem)
    kv = meta.metadata or {}
    return {
        "schema_version": kv.get(META_SCHEMA_VERSION, b"").decode() or None,
        "vocabulary": json.loads(kv.get(META_VOCABULARY, b"{}")),
        "extra": json.loads(kv.get(META_EXTRA, b"{}")),
        "num_rows": meta.num_rows,
    }


def read_parquet(path: str | os.PathLike, *, filesystem=None) -> tuple[pa.Table, dict]:
    """Read a labels file; return the table (cast to ``LABELS_V1``) and its label metadata.

    ``filesystem``: a ``pyarrow.fs.FileSystem`` that ``path`` is on (default: the local one).
    """
    table = pq.read_table(os.fspath(path), filesystem=filesystem)
    info = read_metadata(path, filesystem=filesystem)
    if info["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: schema version {info['schema_version']!r}, this code reads {SCHEMA_VERSION!r}"
        )
    return table.select(LABELS_V1.names).cast(LABELS_V1), info


def count_levels(table: pa.Table) -> dict[str, int]:
    """Number of masks per level over the table's ok rows."""
    flat = pc.list_flatten(table.column("masks"))
    if len(flat) == 0:
        return {level: 0 for level in LEVELS}
    levels = pc.struct_field(flat, "level")
    counts = {v["values"]: v["counts"] for v in pc.value_counts(levels).to_pylist()}
    return {level: int(counts.get(level, 0)) for level in LEVELS}
