"""Export schema-v1 label rows to training sets: COCO instances, COCO panoptic, Parquet.

The rows come from label Parquet files (``rows_from_labels``) or from a reviewed FiftyOne dataset
(``pipeline.review.read.read_rows``, which returns the reviewers' current values). This module does
not import FiftyOne.

Categories (COCO and COCO panoptic):

- instances and stuff are categories named by their label; ``isthing`` is 1 for instances and 0
  for stuff, ``supercategory`` comes from a given category list or is "thing" / "stuff".
- parts and subparts are categories named ``"<object> <part>"`` (e.g. "dog head", "dog eye"),
  the object being the label of the instance the part belongs to (walking up ``parent_id`` from a
  subpart through its part), with ``supercategory`` = the object class, so "dog head" and
  "cat head" are different classes and a loader can group them by object. A part whose label
  already starts with the object name is not prefixed again; a part without a parent instance
  keeps its own label and supercategory "part". Each category also carries ``level``
  (stuff|instance|part|subpart) and ``isthing``.
- Category ids: those of ``categories`` (a COCO category list, e.g. the dataset's
  ``panoptic_coco_categories.json``) where the names match, so an export can be evaluated against
  that dataset's ground truth; other names get new ids after the largest given one, in sorted
  order. Image ids are the rows' ``image_id`` as integers where they are decimal numbers; other
  images get the next integers after the largest (the original id is kept as ``hipie_image_id``).

Parquet: rows in schema v1, validated. The schema has no ``reviewed`` column and ``validate_table``
rejects extra columns, so the flag travels beside it: ``<name>.reviewed.parquet`` holds one row per
image (``image_id`` string, ``reviewed`` bool), and the labels file's key-value metadata
(``schemas.read_metadata(path)["extra"]``) names that file and counts the reviewed images. A side
file scales to millions of images where a list in the Parquet footer would not.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import schemas
from pipeline import storage
from schemas import rle as rle_utils
from schemas.panoptic import id_to_rgb
from schemas.part_names import part_class

FORMATS = ("coco", "coco-panoptic", "parquet")
_LEVEL_RANK = {"stuff": 0, "instance": 1, "part": 2, "subpart": 3}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    format: str  # one of FORMATS
    paths: tuple[Path, ...]  # the files (and folders) written
    num_images: int  # images in the export (ok rows; all rows for Parquet)
    num_annotations: int  # annotations / segments / masks written


# --------------------------------------------------------------------------- inputs
def _is_label_file(relative: str) -> bool:
    """Whether a path under the labels folder is a committed label file: ``*.parquet``, not a
    temporary file or a reviewed flag file, not under a folder named "_..." or "..." (the
    labeling job's ``_parts/`` of shards not yet committed)."""
    *folders, name = relative.replace("\\", "/").split("/")
    return (
        name.endswith(".parquet")
        and not name.startswith(".")
        and not name.endswith(".reviewed.parquet")
        and not any(d.startswith(("_", ".")) for d in folders)
    )


def label_files(labels: str | os.PathLike) -> list[Path] | list[str]:
    """The label Parquet files under a folder (or the file itself), sorted; temporary files and
    anything under a folder named "_..." or "..." (the labeling job's ``_parts/`` of shards not
    yet committed) are skipped. ``labels`` may be a URI (``s3://bucket/labels?...``): the files
    are then URIs too (readable by ``schemas.read_parquet``)."""
    if storage.is_uri(labels):
        return _label_uris(os.fspath(labels))
    root = Path(labels)
    if root.is_file():
        return [root]
    files = sorted(
        p for p in root.rglob("*.parquet") if _is_label_file(p.relative_to(root).as_posix())
    )
    if not files:
        raise FileNotFoundError(f"no .parquet label files under {root}")
    return files


def _label_uris(labels: str) -> list[str]:
    fs, base = storage.resolve(labels)
    if base.endswith(".parquet"):  # one file (no stat of the folder: not every server can)
        return [labels]
    files = []
    for entry in storage.list_dir(fs, base, recursive=True):
        relative = entry.path[len(base) :].lstrip("/")
        if entry.type == storage.pafs.FileType.File and _is_label_file(relative):
            files.append(storage.uri_join(labels, relative))
    if not files:
        raise FileNotFoundError(f"no .parquet label files under {labels}")
    return files


def rows_from_labels(labels: str | os.PathLike) -> tuple[list[dict], dict]:
    """All rows of the label files under ``labels`` and the vocabulary of the first file."""
    rows: list[dict] = []
    vocabulary: dict = {}
    for path in label_files(labels):
        table, info = schemas.read_parquet(path)
        rows.extend(table.to_pylist())
        vocabulary = vocabulary or info["vocabulary"]
    return rows, vocabulary


# --------------------------------------------------------------------------- categories
def _object_of(mask: dict, by_id: Mapping[int, dict]) -> str | None:
    """The label of the instance above a part/subpart (None when it has none)."""
    instance = schemas.instance_of(mask, by_id)
    return None if instance is None else instance["label"]


def category_key(mask: dict, by_id: Mapping[int, dict]) -> tuple[str, str, str]:
    """(name, supercategory, level) of a mask's category; see the module docstring."""
    level, label = mask["level"], mask["label"]
    if level in ("instance", "stuff"):
        return label, "thing" if level == "instance" else "stuff", level
    obj = _object_of(mask, by_id)
    if obj is None:
        return label, "part", level
    name = part_class(label, obj)
    return name, obj, level


class CategoryTable:
    """Category ids by name: given COCO categories first, new names after."""

    def __init__(self, *, categories: Sequence[Mapping[str, Any]] | None = None):
        self._given = {c["name"]: dict(c) for c in categories or []}
        self._new: dict[str, dict] = {}

    def add(self, name: str, supercategory: str, level: str) -> None:
        if name not in self._given and name not in self._new:
            self._new[name] = {
                "name": name,
                "supercategory": supercategory,
                "isthing": 0 if level == "stuff" else 1,
                "level": level,
            }

    def finish(self) -> dict[str, dict]:
        """Name -> COCO category dict with ``id``; ids of given categories are kept."""
        table = {name: dict(c) for name, c in self._given.items()}
        next_id = max([int(c["id"]) for c in table.values()] + [0]) + 1
        for name in sorted(self._new):
            table[name] = {"id": next_id, **self._new[name]}
            next_id += 1
        return table


def _image_ids(rows: Sequence[dict]) -> list[int]:
    """COCO image ids: the image_id as an integer where it is a decimal number (and not taken),
    else the next free integers after the largest such number."""
    numeric = [
        int(r["image_id"]) if re.fullmatch(r"\d{1,15}", r["image_id"]) else None for r in rows
    ]
    used: set[int] = set()
    ids: list[int | None] = []
    for value in numeric:
        ids.append(value if value is not None and value not in used else None)
        if value is not None:
            used.add(value)
    next_id = max(used | {0}) + 1
    for k, value in enumerate(ids):
        if value is None:
            ids[k], next_id = next_id, next_id + 1
    return ids  # type: ignore[return-value]


def _image_entry(row: dict, image_id: int) -> dict:
    uri = row["uri"]
    name = uri.rpartition("#")[2] if uri.startswith("tar://") else os.path.basename(uri)
    return {
        "id": image_id,
        "file_name": name,
        "width": int(row["width"]),
        "height": int(row["height"]),
        "hipie_image_id": row["image_id"],
        "hipie_uri": uri,
    }


def _write_coco(path: Path, images: list, annotations: list, cats: Mapping[Any, dict]) -> Path:
    """A COCO (or COCO-panoptic) json: our info, the images, annotations and categories by id."""
    data = {
        "info": {"description": "HIPIE auto-labels", "schema_version": schemas.SCHEMA_VERSION},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": sorted(cats.values(), key=lambda c: c["id"]),
    }
    _write_json(data, path)
    return path


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _ok_rows(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if row["status"] == "ok"]


# --------------------------------------------------------------------------- COCO instances
def export_coco(
    rows: Sequence[dict],
    output_dir: str | os.PathLike,
    *,
    categories: Sequence[Mapping[str, Any]] | None = None,
    levels: Collection[str] = schemas.LEVELS,
    file_name: str = "instances.json",
) -> ExportResult:
    """COCO instances JSON with RLE masks (``iscrowd`` 0, ``score`` kept) for ok rows.

    Args:
        rows: schema-v1 rows; error rows are skipped.
        output_dir: the JSON goes to ``output_dir/file_name``.
        categories: COCO categories whose ids to keep (matched by name).
        levels: mask levels to export (default all: stuff, instances, parts, subparts).
    """
    rows = _ok_rows(rows)
    table = CategoryTable(categories=categories)
    keyed = []
    for row in rows:
        by_id = {m["mask_id"]: m for m in row["masks"]}
        masks = [m for m in row["masks"] if m["level"] in levels]
        keys = [category_key(m, by_id) for m in masks]
        for key in keys:
            table.add(*key)
        keyed.append((masks, keys))
    cats = table.finish()
    images, annotations = [], []
    for row, image_id, (masks, keys) in zip(rows, _image_ids(rows), keyed):
        images.append(_image_entry(row, image_id))
        for mask, (name, _, _) in zip(masks, keys):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cats[name]["id"]),
                    "segmentation": dict(mask["rle"]),
                    "area": int(mask["area"]),
                    "bbox": [float(v) for v in mask["bbox"]],
                    "iscrowd": 0,
                    "score": float(mask["score"]),
                    "hipie_mask_id": int(mask["mask_id"]),
                    "hipie_parent_id": mask["parent_id"],
                }
            )
    path = _write_coco(Path(output_dir) / file_name, images, annotations, cats)
    return ExportResult("coco", (path,), len(images), len(annotations))


# --------------------------------------------------------------------------- COCO panoptic
def export_coco_panoptic(
    rows: Sequence[dict],
    output_dir: str | os.PathLike,
    *,
    categories: Sequence[Mapping[str, Any]] | None = None,
    name: str = "panoptic",
) -> ExportResult:
    """COCO panoptic: ``output_dir/<name>.json`` and one PNG per image in ``output_dir/<name>/``.

    Only stuff and instance masks form the panoptic map (parts live inside instances). Masks are
    painted stuff first, then instances, each in increasing score, so a higher-scored instance
    wins where masks overlap; segments left with no visible pixel are dropped, and area and bbox
    are those of the visible pixels.
    """
    rows = _ok_rows(rows)
    table = CategoryTable(categories=categories)
    for row in rows:
        for m in row["masks"]:
            if m["level"] in ("stuff", "instance"):
                table.add(*category_key(m, {}))
    cats = table.finish()
    png_dir = Path(output_dir) / name
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, num_segments = [], [], 0
    for row, image_id in zip(rows, _image_ids(rows)):
        masks = [m for m in row["masks"] if m["level"] in ("stuff", "instance")]
        masks.sort(key=lambda m: (_LEVEL_RANK[m["level"]], m["score"]))
        ids = np.zeros((int(row["height"]), int(row["width"])), dtype=np.int64)
        for k, mask in enumerate(masks, start=1):
            ids[rle_utils.decode(mask["rle"])] = k
        segments = []
        for k, mask in enumerate(masks, start=1):
            visible = ids == k
            area = int(visible.sum())
            if area == 0:
                continue
            ys, xs = np.nonzero(visible)
            x0, y0 = int(xs.min()), int(ys.min())
            segments.append(
                {
                    "id": k,
                    "category_id": int(cats[mask["label"]]["id"]),
                    "area": area,
                    "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                    "iscrowd": 0,
                }
            )
        png_name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{image_id}.png")
        Image.fromarray(id_to_rgb(ids)).save(png_dir / png_name)
        images.append(_image_entry(row, image_id))
        annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
        num_segments += len(segments)
    path = _write_coco(Path(output_dir) / f"{name}.json", images, annotations, cats)
    return ExportResult("coco-panoptic", (path, png_dir), len(images), num_segments)


# --------------------------------------------------------------------------- Parquet
def export_parquet(
    rows: Sequence[dict],
    output_dir: str | os.PathLike,
    *,
    reviewed: Collection[str] = (),
    vocabulary: Mapping[str, Any] | None = None,
    name: str = "labels",
) -> ExportResult:
    """``output_dir/<name>.parquet`` (schema v1, validated) and ``<name>.reviewed.parquet``.

    Args:
        rows: schema-v1 rows (ok and error).
        reviewed: image ids a person reviewed; the side file flags them.
        vocabulary: stored in the labels file's metadata.
    """
    out = Path(output_dir)
    table = schemas.rows_to_table(list(rows))
    schemas.validate_table(table)
    reviewed = set(reviewed)
    side = out / f"{name}.reviewed.parquet"
    path = out / f"{name}.parquet"
    keys = [row["image_id"] for row in rows]
    flags = pa.table(
        {
            "image_id": pa.array(keys, pa.string()),
            "reviewed": pa.array([k in reviewed for k in keys], pa.bool_()),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(f".{side.name}.tmp")
    pq.write_table(flags, tmp)
    os.replace(tmp, side)
    extra = {
        "reviewed_file": side.name,
        "num_reviewed": sum(k in reviewed for k in keys),
        "num_rows": len(keys),
    }
    schemas.write_parquet(table, path, vocabulary=dict(vocabulary or {}), extra=extra)
    return ExportResult("parquet", (path, side), len(keys), sum(len(r["masks"]) for r in rows))


def export_rows(
    rows: Sequence[dict],
    output_dir: str | os.PathLike,
    *,
    format: str,
    categories: Sequence[Mapping[str, Any]] | None = None,
    reviewed: Collection[str] = (),
    vocabulary: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Dispatch to the exporter of ``format`` (one of ``FORMATS``)."""
    if format == "coco":
        return export_coco(rows, output_dir, categories=categories)
    if format == "coco-panoptic":
        return export_coco_panoptic(rows, output_dir, categories=categories)
    if format == "parquet":
        return export_parquet(rows, output_dir, reviewed=reviewed, vocabulary=vocabulary)
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
