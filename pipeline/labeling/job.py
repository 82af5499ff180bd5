"""The labeling job on Ray Data: read shards, decode on CPU tasks, label in an actor pool, write
part files where the rows are made, commit one Parquet file per input shard.

Flow (all streaming; ``pipeline.labeling.transform.label_dataset`` is the decode + label
part)::

    shards ─flat_map(read)─► records ─map(decode)─► images ─map_batches(Labeler)─► rows
      ─map_batches(write_parts)─► <output>/_parts/<shard>/*.parquet, and part records
                                                                          │ (small)
                      driver: ShardCommitter ─► commit task per complete shard ─► <shard>.parquet

Every image a source yields becomes exactly one row: reading, decoding and labeling failures are
turned into ``error`` rows where they happen. After the last image of a shard the reader emits an
*end marker* carrying the shard's image count; it travels through decode and labeling untouched.
The rows never reach the driver: it gets the part records (shard, part path, image ids) and
starts the shard's commit (``pipeline.labeling.parts.commit_shard``: merge, validate, write
atomically) once the end marker's count of images is accounted for. A rerun removes the part files of killed
runs and skips shards whose file is complete, so a killed job resumes where it stopped and never
duplicates rows (see ``pipeline.labeling.parts`` for exactly-once).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from pipeline.labeling import parts, sinks
from pipeline.labeling.config import COUNT, END, LabelJobConfig
from pipeline.labeling.transform import label_dataset
from pipeline.sources.listing import Shard, list_inputs
from pipeline.sources.reading import iter_shard

# Ray CPUs of a shard's commit task (reads its parts, writes one file): none, so that commits
# are never starved by the streaming stages on small clusters.
COMMIT_CPUS = 0.0


def read_shard(item: dict, *, shards: list[Shard]) -> Iterator[dict]:
    """Ray flat_map: the records of shard ``item["index"]``, then its end marker."""
    shard = shards[item["index"]]
    n = 0
    for rec in iter_shard(shard):
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


def run_label_job(config: LabelJobConfig, *, progress: bool = True) -> sinks.RunSummary:
    """Label every shard of ``config.inputs`` that has no complete output yet; return the summary
    of the whole output folder (this run and earlier ones), also written to ``_summary.json``.

    Ray must be initialised by the caller (``jobs.label`` does it: a local cluster or --address).
    """
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = progress
    vocabulary = config.vocabulary
    listing = list_inputs(list(config.inputs), shard_size=config.folder_shard_size)
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
