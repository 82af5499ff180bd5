"""The labeling job on Ray Data: read shards, decode on CPU tasks, label in an actor pool, write
part files where the rows are made, commit one Parquet file per input shard.

Flow (all streaming; ``pipeline.transform.label_dataset`` is the decode + label part)::

    shards ─flat_map(read)─► records ─map(decode)─► images ─map_batches(Labeler)─► rows
      ─map_batches(write_parts)─► <output>/_parts/<shard>/*.parquet, and part records
                                                                          │ (small)
                      driver: ShardCommitter ─► commit task per complete shard ─► <shard>.parquet

Every image a source yields becomes exactly one row: reading, decoding and labeling failures are
turned into ``error`` rows where they happen. After the last image of a shard the reader emits an
*end marker* carrying the shard's image count; it travels through decode and labeling untouched.
The rows never reach the driver: it gets the part records (shard, part path, image ids) and
starts the shard's commit (``pipeline.parts.commit_shard``: merge, validate, write atomically)
once the end marker's count of images is accounted for. A rerun removes the part files of killed
runs and skips shards whose file is complete, so a killed job resumes where it stopped and never
duplicates rows (see ``pipeline.parts`` for exactly-once).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline import decode, parts, sinks, sources
from pipeline.parts import COUNT, END, MARKER_COLUMNS  # noqa: F401 - the labeler's imports
from pipeline.vocabulary import Vocabulary

# Ray CPUs of a shard's commit task (reads its parts, writes one file): none, so that commits
# are never starved by the streaming stages on small clusters.
COMMIT_CPUS = 0.0


@dataclass(frozen=True)
class LabelJobConfig:
    """What `python -m jobs.label` asks for; everything the actors need is in here (picklable)."""

    inputs: tuple[
        str, ...
    ]  # folders, SA-1B tar shards (or folders of them), manifests; local or fsspec
    output: str  # folder or URI (s3://, gs://, ...) of the Parquet files and _summary.json
    vocabulary_json: str  # pipeline.vocabulary.Vocabulary.to_json()
    checkpoint: str = "tiny"  # "tiny", a checkpoint folder, a release .pth, or "random:<preset>"
    sam_checkpoint: str | None = (
        None  # SAM weights for images without SA-1B masks; None = HIPIE only
    )
    sam_model_type: str = "vit_h"  # segment-anything registry key of the SAM checkpoint
    clip: str | None = None  # "MODEL:PRETRAINED" for the CLIP ensemble (Eq. 4); None = off
    replace_classes: tuple[str, ...] = ("person", "bird")  # HIPIE masks replace SAM's (App. A.8.2)
    batch_size: int = 4  # images per labeler call
    actors: int = 1  # labeler actors (one per GPU on a GPU cluster)
    gpus_per_actor: float = 0.0  # 1 on GPU clusters
    cpus_per_actor: float = 0.5  # fractional on small machines, so read/decode tasks still run
    folder_shard_size: int = 256  # images per output file for folder and manifest inputs
    max_pixels: int = decode.DEFAULT_MAX_PIXELS  # larger images become error rows (bombs)
    topk: int = 3  # labels and scores kept per mask
    overwrite: bool = False  # relabel shards whose output already exists
    test_size: int | None = None  # inference size (release: shortest edge); None = the model's

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_json(self.vocabulary_json)


def read_shard(item: dict, *, shards: list[sources.Shard]) -> Iterator[dict]:
    """Ray flat_map: the records of shard ``item["index"]``, then its end marker."""
    shard = shards[item["index"]]
    n = 0
    for rec in sources.iter_shard(shard):
        n += 1
        yield {
            "shard": shard.name,
            "image_id": rec.image_id,
            "uri": rec.uri,
            "data": rec.data or b"",
            "sam_json": rec.sam_json if rec.sam_json is not None else b"",
            "has_sam_json": rec.sam_json is not None,
            "error": rec.error or "",
            END: False,
            COUNT: 0,
        }
    yield {
        "shard": shard.name,
        "image_id": "",
        "uri": "",
        "data": b"",
        "sam_json": b"",
        "has_sam_json": False,
        "error": "",
        END: True,
        COUNT: n,
    }


EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)


def array_for_model(
    pixels, *, max_pixels: int, max_side: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """An already decoded image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as (h, w, 3) uint8 RGB
    resized for the model like ``decode.decode_image_for_model``, and its own (height, width).
    An alpha channel is dropped; values of other dtypes are clipped to 0..255."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise decode.ImageDecodeError(f"not an image array: shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    if h * w > max_pixels:
        raise decode.ImageDecodeError(f"{w}x{h} pixels, more than max_pixels={max_pixels}")
    if h == 0 or w == 0:
        raise decode.ImageDecodeError("empty image array")
    return decode.resize_to_model(np.ascontiguousarray(arr), max_side), (h, w)


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
    ``ray.data.read_images`` gives; ``pipeline.transform``) instead of file bytes (``data``).
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
            image, (h, w) = array_for_model(pixels, max_pixels=max_pixels, max_side=max_side)
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
            masks = decode.decode_sam_json(rec["sam_json"], w, h)
        except decode.MaskDecodeError as exc:
            out["error"] = f"cannot use the SAM mask json: {exc.reason}"
            out["image"] = EMPTY_IMAGE
            return out
        out["sam_counts"], out["sam_meta"] = decode.pack_sam_masks(masks)
    return out


def run_label_job(config: LabelJobConfig, *, progress: bool = True) -> sinks.RunSummary:
    """Label every shard of ``config.inputs`` that has no complete output yet; return the summary
    of the whole output folder (this run and earlier ones), also written to ``_summary.json``.

    Ray must be initialised by the caller (``jobs.label`` does it: a local cluster or --address).
    """
    import ray

    from pipeline.transform import label_dataset

    ray.data.DataContext.get_current().enable_progress_bars = progress
    vocabulary = config.vocabulary
    listing = sources.list_inputs(list(config.inputs), shard_size=config.folder_shard_size)
    shards = listing.shards
    sinks.clean_temporaries(config.output)
    parts.clean_parts(config.output)  # part files of killed runs: named by no record
    todo = [
        s
        for s in shards
        if config.overwrite
        or not sinks.shard_done(config.output, s, vocabulary_hash=vocabulary.hash)
    ]
    start = time.perf_counter()
    commit = ray.remote(num_cpus=COMMIT_CPUS, max_retries=3)(parts.commit_shard)
    committer = parts.ShardCommitter(config.output, todo, vocabulary=vocabulary, commit=commit)
    if todo:
        records = (
            ray.data.from_items([{"index": i} for i in range(len(todo))])
            .repartition(len(todo))
            .flat_map(read_shard, fn_kwargs={"shards": todo})
        )
        ds = label_dataset(records, config, keep_markers=True).map_batches(
            parts.write_parts,
            fn_kwargs={"output": config.output},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=0.25,
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            committer.add(batch)  # part records only: the rows stay in the part files
        committer.poll(wait=True)
        if committer.incomplete():
            raise RuntimeError(f"shards left incomplete: {committer.incomplete()}")
        parts.clean_parts(config.output)  # every shard committed: what is left is orphans
    seconds = time.perf_counter() - start
    return sinks.write_summary(
        config.output,
        {
            "seconds": seconds,
            "shards_written": len(committer.written),
            "shards_skipped": len(shards) - len(todo),
            "images_ok": sum(s.images_ok for s in committer.written),
            "images_error": sum(s.images_error for s in committer.written),
            "skipped": listing.skipped,
            "skipped_examples": listing.skipped_examples,
        },
    )
