"""HIPIE labeling as a Ray Data transform: ``label_dataset(ds, config)`` turns a Ray Dataset of
images into a Dataset of label rows (the columns of ``schemas.LABELS_V1``), to compose with your
own Ray Data pipeline::

    ds = ray.data.read_images("photos/", mode="RGB", include_paths=True)
    labels = label_dataset(ds, config)          # lazy, streaming
    labels.write_parquet("s3://bucket/labels/") # or .iter_batches(), .filter(), ...

Input columns (other columns are ignored):

- the image: ``image`` (an (H, W[, C]) array, what ``ray.data.read_images`` gives), or ``data``
  (the encoded file's bytes), or ``uri`` (read in the decode task through fsspec: local paths,
  ``s3://``, ``gs://``, ``tar://<tar>#<member>``);
- optional: ``image_id`` (default: the file name of ``path`` / ``uri``, else a hash of the
  pixels), ``path`` (``read_images(include_paths=True)``, used as the row's ``uri``), ``shard``
  (default: the ``shard`` argument), ``sam_json`` (an SA-1B annotation json, bytes or str: its
  masks are labeled instead of HIPIE's own or SAM's).

Every input row becomes one label row; an image that cannot be read or decoded becomes an
``error`` row. ``python -m jobs.label`` runs the same transform on its reader's records (with
the shards' end markers kept, ``keep_markers=True``) before writing part files.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.labeling.config import COUNT, END, MARKER_COLUMNS, LabelJobConfig
from pipeline.masks import sam_json
from pipeline.sources import decode
from pipeline.sources.reading import read_uri

DEFAULT_SHARD = "dataset"
EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)  # the image of a record that has none (yet)


def to_record(
    row: dict,
    *,
    image_column: str = "image",
    uri_column: str = "uri",
    masks_column: str = "sam_json",
    shard: str = DEFAULT_SHARD,
) -> dict:
    """A user's row as a reader record of ``pipeline.labeling.job`` (see the module docstring)."""
    pixels = row.get(image_column)
    pixels = EMPTY_IMAGE if pixels is None else np.asarray(pixels)
    uri = str(row.get(uri_column) or row.get("path") or "")
    image_id = str(row.get("image_id") or "")
    if not image_id and uri:
        image_id = posixpath.basename(uri.rstrip("/").split("#")[-1]) or uri
    if not image_id and pixels.size:
        digest = hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]
        image_id = f"{digest}.png"
    sam = row.get(masks_column)
    rec = {
        "shard": str(row.get("shard") or shard),
        "image_id": image_id,
        "uri": uri,
        "pixels": pixels,
        "data": b"",
        "sam_json": sam if sam is not None else b"",
        "has_sam_json": sam is not None and len(sam) > 0,
        "error": "",
        END: False,
        COUNT: 0,
    }
    if pixels.size:
        return rec
    data = row.get("data")
    if data is not None and len(data):
        rec["data"] = bytes(data)
    elif uri:
        try:
            rec["data"] = read_uri(uri)
        except Exception as exc:  # noqa: BLE001 - a row that cannot be read is an error row
            rec["error"] = f"cannot read {uri}: {type(exc).__name__}: {exc}"
    else:
        rec["error"] = f"no image: the row has no {image_column!r}, 'data' or {uri_column!r}"
    return rec


def decode_record(rec: dict, *, max_pixels: int, max_side: int | None = None) -> dict:
    """Ray map (CPU task): image bytes to an RGB array and the SA-1B json to validated RLEs.

    The image is resized so that its longer side is at most ``max_side`` (the model's test size;
    None keeps the full size), so no full-resolution array travels to the labeler; ``height`` and
    ``width`` keep the image's own size. The SAM masks travel as their RLE counts strings
    (``sam_counts``, one per line, "" when the source has none; the RLEs are of the image's own
    size) and a float64 array of their box, area, predicted IoU and stability score
    (``sam_meta``, bytes of an (N, 7) array; NaN where the json has no value).
    A failure fills ``error`` (and an empty image) instead of raising, so the row is kept.
    A record may bring its image already decoded (``pixels``, an (H, W[, C]) array, as
    ``ray.data.read_images`` gives; ``to_record``) instead of file bytes (``data``).
    """
    out = {
        "shard": rec["shard"],
        "image_id": rec["image_id"],
        "uri": rec["uri"],
        "error": rec["error"],
        "image": EMPTY_IMAGE,
        "height": 0,
        "width": 0,
        "sam_counts": "",
        "sam_meta": b"",
        END: rec[END],
        COUNT: rec[COUNT],
    }
    if rec[END] or rec["error"]:
        return out
    pixels = rec.get("pixels")
    try:
        if pixels is not None and np.asarray(pixels).size:
            image, (h, w) = decode.array_for_model(pixels, max_pixels=max_pixels, max_side=max_side)
        else:
            image, (h, w) = decode.decode_image_for_model(
                rec["data"], max_pixels=max_pixels, max_side=max_side
            )
    except decode.ImageDecodeError as exc:
        out["error"] = f"cannot decode image: {exc.reason}"
        return out
    out.update(image=image, height=h, width=w)
    if rec["has_sam_json"]:
        try:
            masks = sam_json.decode_sam_json(rec["sam_json"], w, h)
        except sam_json.MaskDecodeError as exc:
            out["error"] = f"cannot use the SAM mask json: {exc.reason}"
            out["image"] = EMPTY_IMAGE
            return out
        out["sam_counts"], out["sam_meta"] = sam_json.pack_sam_masks(masks)
    return out


def prepare_row(row: dict, *, max_pixels: int, max_side: int | None, **columns) -> dict:
    """Ray map: a user's row or a job reader's record, decoded for the labeler."""
    if END not in row:
        row = to_record(row, **columns)
    return decode_record(row, max_pixels=max_pixels, max_side=max_side)


def drop_markers(batch: pa.Table) -> pa.Table:
    """Ray map_batches: the label rows without the job's end markers and marker columns."""
    keep = pc.invert(batch.column(END))
    return batch.filter(keep).drop_columns(list(MARKER_COLUMNS))


def _model_input_side(checkpoint: str) -> int | None:
    from pipeline.labeling.labeler import model_input_side

    return model_input_side(checkpoint)


def label_dataset(
    ds,
    config: LabelJobConfig,
    *,
    image_column: str = "image",
    uri_column: str = "uri",
    masks_column: str = "sam_json",
    shard: str = DEFAULT_SHARD,
    keep_markers: bool = False,
):
    """Label the images of a Ray Dataset with HIPIE; returns a lazy Dataset of label rows.

    Args:
        ds: a ``ray.data.Dataset`` with an image column (see the module docstring).
        config: the model, vocabulary and Ray resources (``inputs`` and ``output`` are not used).
        image_column, uri_column, masks_column: names of the input columns.
        shard: the ``shard`` value of rows that have no ``shard`` column.
        keep_markers: keep the end-marker rows and columns (``pipeline.labeling.job``'s use).
    Returns:
        A ``ray.data.Dataset`` with the ``schemas.LABELS_V1`` columns, one row per input row
        (in no particular order).
    """
    import ray

    from pipeline.labeling.labeler import Labeler

    # Images are resized to the model's size in the decode tasks, unless SAM makes masks from
    # them in the labeler (at the image's own size). The size is read in a task: finding it
    # imports the model's package (torch, ~470 MB), which the driver never needs.
    side = None
    if not config.sam_checkpoint:
        side = ray.get(ray.remote(num_cpus=0)(_model_input_side).remote(config.checkpoint))
    ds = ds.map(
        prepare_row,
        fn_kwargs={
            "max_pixels": config.max_pixels,
            "max_side": side,
            "image_column": image_column,
            "uri_column": uri_column,
            "masks_column": masks_column,
            "shard": shard,
        },
    ).map_batches(
        Labeler,
        fn_constructor_kwargs={"config": config},
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        batch_format="numpy",
        # Ray Data restarts a dead labeler actor and retries its batches by default
        # (max_restarts=-1, max_task_retries=-1): tests/pipeline/labeling/test_job.py kills one.
    )
    if keep_markers:
        return ds
    return ds.map_batches(drop_markers, batch_size=None, batch_format="pyarrow")
