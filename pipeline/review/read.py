"""Read a FiftyOne dataset's current labels (the reviewers' corrections) back as schema-v1 rows.

One reading path for ``jobs.export --dataset`` and ``jobs.train --dataset``, for both ways labels
get into a dataset:

- the ingest (``jobs.review``, ``pipeline.review.ingest``): the plain fields ``instances``,
  ``stuff``, ``parts``, ``subparts`` (version *n* in ``instances_v<n>``, ...), the run ids in
  ``label_runs``, the key in ``image_id``. Its label field prefix is ``""``.
- ``dataset.apply_model(HipieModel(...), label_field="hipie")`` (``pipeline.review.model``):
  ``hipie_instances``, ..., the run id in ``hipie_label_run``, the error in
  ``hipie_label_error``. Its prefix is ``"hipie_"``; one version only (a new ``apply_model`` with
  the same ``label_field`` overwrites it).

``label_prefixes`` lists the prefixes a dataset holds and ``resolve_prefix`` turns a user's
``--label-field`` (``hipie``, ``hipie_``, or None to detect) into one.

Image ids: the sample's ``image_id`` when it has one (every ingested sample). Otherwise (a dataset
of one's own photos) the file name without extension when no other sample of the dataset has the
same one (so COCO photos keep their COCO ids: ``000000439180.jpg`` exports as image 439180), else
the FiftyOne sample id. Both stay the same from one export to the next.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import PurePath

import fiftyone as fo
import numpy as np

import schemas
from pipeline.review.fields import FIELD_LEVELS, REVIEWED_TAG, parse_run_id, version_suffix
from schemas import rle as rle_utils

RUN_FIELD = "label_run"  # apply_model: <prefix>label_run holds the run id of the sample's labels


# --------------------------------------------------------------------------- label fields
def label_prefixes(collection) -> list[str]:
    """The label field prefixes ``collection`` holds: ``""`` for ingested labels (it has
    ``label_runs``), ``"<label_field>_"`` for each ``apply_model`` run (it has
    ``<label_field>_label_run``)."""
    schema = collection.get_field_schema()
    prefixes = [""] if "label_runs" in schema else []
    for name in sorted(schema):
        if name.endswith(f"_{RUN_FIELD}") and isinstance(schema[name], fo.StringField):
            prefix = name[: -len(RUN_FIELD)]
            if any(f"{prefix}{level}" in schema for level in FIELD_LEVELS):
                prefixes.append(prefix)
    return prefixes


def resolve_prefix(collection, label_field: str | None = None) -> str:
    """The prefix of the labels to read.

    Args:
        label_field: what was given to ``apply_model`` (``hipie`` or ``hipie_``), ``""`` for the
            ingest's fields, or None: the ingest's fields when the dataset has them, else the one
            ``apply_model`` run it holds.

    Raises:
        ValueError: no such labels, or None given and several ``apply_model`` runs to choose from.
    """
    found = label_prefixes(collection)
    names = ", ".join(repr(p.rstrip("_")) if p else "'' (ingested)" for p in found) or "none"
    if label_field is None:
        if "" in found or len(found) == 1:
            return found[0]
        if not found:
            raise ValueError("the dataset holds no HIPIE labels (no label_runs, no *_label_run)")
        raise ValueError(f"the dataset holds several label fields ({names}): choose one")
    prefix = label_field if label_field == "" or label_field.endswith("_") else f"{label_field}_"
    if prefix not in found:
        raise ValueError(f"no labels under label field {label_field!r}; the dataset has {names}")
    return prefix


def sample_keys(collection) -> list[str]:
    """The image id of each sample of ``collection`` (in its order); see the module docstring."""
    dataset = collection._dataset
    schema = collection.get_field_schema()
    ids, paths = collection.values(["id", "filepath"])
    keys = collection.values("image_id") if "image_id" in schema else [None] * len(ids)
    stems = [PurePath(p).stem for p in paths]
    if any(k is None for k in keys):
        counts: dict[str, int] = {}
        all_paths = paths if collection is dataset else dataset.values("filepath")
        for path in all_paths:
            stem = PurePath(path).stem
            counts[stem] = counts.get(stem, 0) + 1
        if "image_id" in schema:  # a stem that is another sample's image_id is taken too
            for key in dataset.values("image_id"):
                if key is not None and key in counts:
                    counts[key] += 1
        keys = [
            k if k is not None else (stem if stem and counts[stem] == 1 else sample_id)
            for k, stem, sample_id in zip(keys, stems, ids)
        ]
    return [str(k) for k in keys]


def image_paths(collection) -> dict[str, str]:
    """{image id: local file} of the samples of ``collection`` (the ids ``read_rows`` gives)."""
    return dict(zip(sample_keys(collection), collection.values("filepath")))


# --------------------------------------------------------------------------- masks
def full_mask(det: fo.Detection, width: int, height: int) -> np.ndarray:
    """The (H, W) bool mask of a detection, its box-cropped mask pasted back at pixel precision."""
    full = np.zeros((height, width), dtype=bool)
    if det.mask is None:
        return full
    bx, by, bw, bh = det.bounding_box
    x0, y0 = int(round(bx * width)), int(round(by * height))
    x1, y1 = int(round((bx + bw) * width)), int(round((by + bh) * height))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return full
    mask = np.asarray(det.mask).astype(bool)
    if mask.shape != (y1 - y0, x1 - x0):  # e.g. drawn in an annotation tool: nearest resize
        rows = (np.arange(y1 - y0) * mask.shape[0] // (y1 - y0)).clip(0, mask.shape[0] - 1)
        cols = (np.arange(x1 - x0) * mask.shape[1] // (x1 - x0)).clip(0, mask.shape[1] - 1)
        mask = mask[rows][:, cols]
    full[y0:y1, x0:x1] = mask
    return full


def masks_from_sample(labels: dict[str, fo.Detections | None], width: int, height: int) -> list:
    """Schema masks from the current detections (keyed by level field name without prefix);
    new detections get fresh mask ids, parents follow ``parent_id`` (so a part's object is its
    instance's current label, whatever its ``instance_label`` attribute says)."""
    dets = [
        (FIELD_LEVELS[name], det)
        for name in FIELD_LEVELS
        for det in (labels.get(name).detections if labels.get(name) else [])
    ]
    used: set[int] = set()
    ids: list[int] = []
    for _, det in dets:  # keep ingested mask ids where they are still unique
        mid = getattr(det, "mask_id", None)
        ids.append(-1 if mid is None or mid in used else int(mid))
        used.add(ids[-1])
    next_id = max(used | {-1}) + 1
    for k, value in enumerate(ids):
        if value < 0:
            ids[k], next_id = next_id, next_id + 1
    by_det_id = {det.id: mask_id for (_, det), mask_id in zip(dets, ids)}
    masks = []
    for (level, det), mask_id in zip(dets, ids):
        get = lambda name, det=det: getattr(det, name, None)  # noqa: E731
        model_label = get("model_label")
        corrected = model_label is not None and det.label != model_label
        parent = by_det_id.get(get("parent_id")) if get("parent_id") else None
        masks.append(
            schemas.make_mask(
                mask_id=mask_id,
                rle=rle_utils.encode(full_mask(det, width, height)),
                level=level,
                label=det.label,
                # a label a reviewer changed is a human label: the model's score and top-k no
                # longer describe it
                score=1.0 if corrected or det.confidence is None else float(det.confidence),
                topk_labels=[det.label] if corrected else list(get("topk_labels") or []),
                topk_scores=[1.0] if corrected else list(get("topk_scores") or []),
                parent_id=parent if parent != mask_id else None,
                origin=get("origin") if get("origin") in schemas.ORIGINS else "hipie",
                sam_iou=get("sam_iou"),
                sam_stability=get("sam_stability"),
            )
        )
    return masks


# --------------------------------------------------------------------------- rows
def read_rows(
    collection, *, version: int = 1, label_field: str | None = None
) -> tuple[list[dict], set[str]]:
    """Schema-v1 rows from the current field values (the reviewers' corrections) of a dataset or
    view, and the image ids of the samples tagged ``reviewed``.

    Args:
        collection: a dataset or view (e.g. ``dataset.match_tags("reviewed")``).
        version: which label version to read (1 = the plain fields; ingested labels only).
        label_field: whose labels: see ``resolve_prefix`` (None: detect).
    """
    prefix = resolve_prefix(collection, label_field)
    if prefix and version != 1:
        raise ValueError(f"apply_model labels ({prefix.rstrip('_')!r}) have one version only")
    suffix = version_suffix(version)
    schema = collection.get_field_schema()
    names = [n for n in FIELD_LEVELS if f"{prefix}{n}{suffix}" in schema]
    error_field = f"{prefix}label_error{suffix}"
    if prefix:  # apply_model: one run id per sample; the image is the sample's file
        fields = ["filepath", "tags", f"{prefix}{RUN_FIELD}", "metadata"]
    else:
        fields = ["uri", "tags", "label_runs", "metadata"]
    extra = [f"{prefix}{n}{suffix}" for n in names] + (
        [error_field] if error_field in schema else []
    )
    columns = collection.values(fields + extra)
    keys = sample_keys(collection)
    shards = collection.values("shard") if "shard" in schema else [None] * len(keys)
    rows, reviewed = [], set()
    for s, key in enumerate(keys):
        uri, tags, runs, metadata = (columns[i][s] for i in range(len(fields)))
        labels = {n: columns[len(fields) + i][s] for i, n in enumerate(names)}
        error = columns[-1][s] if error_field in schema else None
        if REVIEWED_TAG in (tags or []):
            reviewed.add(key)
        runs = ([runs] if runs else []) if prefix else (runs or [])
        if len(runs) < version:
            continue  # the sample has no such version (or apply_model did not label it)
        model, vocabulary_hash, labeled_at = parse_run_id(runs[version - 1])
        width = metadata.width if metadata else None
        height = metadata.height if metadata else None
        common = dict(image_id=key, uri=uri, shard=shards[s] or "", model=model)
        common.update(vocabulary_hash=vocabulary_hash, width=width, height=height)
        if error or not width or not height:
            rows.append(
                schemas.make_error_row(
                    error=error or "no image size", labeled_at=labeled_at, **common
                )
            )
            continue
        masks = masks_from_sample(labels, width, height)
        rows.append(
            schemas.make_ok_row(
                masks=masks, labeled_at=labeled_at or datetime.now(timezone.utc), **common
            )
        )
    return rows, reviewed
