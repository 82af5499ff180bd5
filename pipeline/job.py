"""The labeling job on Ray Data: read shards, decode on CPU tasks, label in an actor pool, write one
Parquet file per input shard.

Flow (all streaming)::

    shards ──flat_map(read)──► records ──map(decode)──► images ──map_batches(Labeler)──► rows
                                                                                          │
                                                    driver: ShardCollector ──► Parquet per shard

Every image a source yields becomes exactly one row: reading, decoding and labeling failures are
turned into ``error`` rows where they happen. After the last image of a shard the reader emits an
*end marker* carrying the shard's image count; it travels through decode and labeling untouched,
and the driver writes the shard's file (atomically) once it holds the marker and that many rows.
A rerun skips shards whose file is complete, so a killed job resumes where it stopped and never
duplicates rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

import schemas
from pipeline import decode, sinks, sources
from pipeline.vocabulary import Vocabulary

# Columns added to LABELS_V1 while rows travel through Ray (dropped before writing).
END = "_end"  # True on a shard's end marker
COUNT = "_count"  # the shard's number of images, on the end marker
MARKER_COLUMNS = (END, COUNT)


@dataclass(frozen=True)
class LabelJobConfig:
    """What `python -m jobs.label` asks for; everything the actors need is in here (picklable)."""

    inputs: tuple[
        str, ...
    ]  # folders, SA-1B tar shards (or folders of them), manifests; local or fsspec
    output: str  # local folder of the Parquet files (one per input shard) and _summary.json
    vocabulary_json: str  # pipeline.vocabulary.Vocabulary.to_json()
    checkpoint: str = "tiny"  # "tiny" (shipped), a checkpoint folder, or "random:<preset>"
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

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_json(self.vocabulary_json)


@dataclass
class ShardState:
    """Rows received so far for one shard."""

    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    expected: int | None = None  # known once the end marker arrived


class ShardCollector:
    """Gathers labeled rows per shard on the driver and writes each shard once it is complete."""

    def __init__(self, output: str, shards: list[sources.Shard], *, vocabulary: Vocabulary) -> None:
        self.output = output
        self.shards = {s.name: s for s in shards}
        self.vocabulary = vocabulary
        self.states: dict[str, ShardState] = {}
        self.written: list[sinks.ShardStats] = []
        self.started = time.perf_counter()

    def add(self, batch: pa.Table) -> None:
        """Take one batch of rows (LABELS_V1 + marker columns), writing the shards it completes."""
        ends = batch.column(END).to_pylist()
        counts = batch.column(COUNT).to_pylist()
        shard_col = batch.column("shard").to_pylist()
        row_idx: dict[str, list[int]] = {}
        for i, (shard, is_end) in enumerate(zip(shard_col, ends)):
            state = self.states.setdefault(shard, ShardState())
            if is_end:
                state.expected = int(counts[i])
            else:
                row_idx.setdefault(shard, []).append(i)
        rows = batch.drop_columns(list(MARKER_COLUMNS))
        for shard, idx in row_idx.items():
            state = self.states[shard]
            state.tables.append(rows.take(pa.array(idx, pa.int64())))
            state.rows += len(idx)
        for shard in list(self.states):
            self._maybe_write(shard)

    def _maybe_write(self, shard: str) -> None:
        state = self.states[shard]
        if state.expected is None or state.rows < state.expected:
            return
        if state.rows > state.expected:
            raise RuntimeError(
                f"shard {shard!r}: {state.rows} rows for {state.expected} images (duplicated rows)"
            )
        table = (
            pa.concat_tables(state.tables) if state.tables else schemas.rows_to_table([])
        ).cast(schemas.LABELS_V1)
        stats = sinks.write_shard(
            self.output,
            self.shards[shard],
            table,
            vocabulary=self.vocabulary,
            n_records=state.expected,
            seconds=time.perf_counter() - self.started,
        )
        del self.states[shard]
        self.written.append(stats)

    def incomplete(self) -> dict[str, tuple[int, int | None]]:
        """Shards still open: name -> (rows received, rows expected or None)."""
        return {k: (s.rows, s.expected) for k, s in self.states.items()}


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


def decode_record(rec: dict, *, max_pixels: int, max_side: int | None = None) -> dict:
    """Ray map (CPU task): image bytes to an RGB array and the SA-1B json to validated RLEs.

    The image is resized so that its longer side is at most ``max_side`` (the model's test size;
    None keeps the full size), so no full-resolution array travels to the labeler; ``height`` and
    ``width`` keep the image's own size. The SAM masks travel as their RLE counts strings
    (``sam_counts``, one per line, "" when the source has none; the RLEs are of the image's own
    size) and a float64 array of their box, area, predicted IoU and stability score
    (``sam_meta``, bytes of an (N, 7) array; NaN where the json has no value).
    A failure fills ``error`` (and an empty image) instead of raising, so the row is kept.
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
    try:
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

    from pipeline.labeler import Labeler, model_input_side

    ray.data.DataContext.get_current().enable_progress_bars = progress
    vocabulary = config.vocabulary
    listing = sources.list_inputs(list(config.inputs), shard_size=config.folder_shard_size)
    shards = listing.shards
    sinks.clean_temporaries(config.output)
    todo = [
        s
        for s in shards
        if config.overwrite
        or not sinks.shard_done(config.output, s, vocabulary_hash=vocabulary.hash)
    ]
    # Images are resized to the model's size in the decode tasks, unless SAM makes masks from
    # them in the labeler (at the image's own size).
    side = None if config.sam_checkpoint else model_input_side(config.checkpoint)
    start = time.perf_counter()
    collector = ShardCollector(config.output, todo, vocabulary=vocabulary)
    if todo:
        ds = (
            ray.data.from_items([{"index": i} for i in range(len(todo))])
            .repartition(len(todo))
            .flat_map(read_shard, fn_kwargs={"shards": todo})
            .map(decode_record, fn_kwargs={"max_pixels": config.max_pixels, "max_side": side})
            .map_batches(
                Labeler,
                fn_constructor_kwargs={"config": config},
                batch_size=config.batch_size,
                compute=ray.data.ActorPoolStrategy(size=config.actors),
                num_cpus=config.cpus_per_actor,
                num_gpus=config.gpus_per_actor,
                batch_format="numpy",
                # Ray Data restarts a dead labeler actor and retries its batches by default
                # (max_restarts=-1, max_task_retries=-1): tests/pipeline/test_job.py kills one.
            )
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            collector.add(batch)
        if collector.incomplete():
            raise RuntimeError(f"shards left incomplete: {collector.incomplete()}")
    seconds = time.perf_counter() - start
    return sinks.write_summary(
        config.output,
        {
            "seconds": seconds,
            "shards_written": len(collector.written),
            "shards_skipped": len(shards) - len(todo),
            "images_ok": sum(s.images_ok for s in collector.written),
            "images_error": sum(s.images_error for s in collector.written),
            "skipped": listing.skipped,
            "skipped_examples": listing.skipped_examples,
        },
    )
