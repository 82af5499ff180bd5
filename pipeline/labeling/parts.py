"""Labeled rows written where they are made: part files on the workers, one commit per shard.

The labeling job's last Ray Data stage (``write_parts``, a task after the labeler actors) writes
each batch's rows, per shard, to a part file of the output::

    <output>/_parts/<shard>/<random hex>.parquet      rows of one batch of one shard (schema v1)

and passes on only a small *record* per part: the shard, the part's path and its image ids (and,
for a shard's end marker, the shard's number of images). The driver (``ShardCommitter``) keeps
for each open shard the parts the records name and the image ids they account for; once every
image of a shard is accounted for, a Ray task (``commit_shard``) merges the named parts into the
shard's labels file (``sinks.write_shard``: validated, atomic, the usual metadata) and removes
the shard's part folder.

Exactly once: a part is counted only through its record, and each image id only once (the first
record naming it wins; ``commit_shard`` keeps the first row per image id in record order). A part
written by a task or actor that died before its record reached the driver is named by no record:
it is never read, and goes with the shard's part folder at commit, or with ``clean_parts`` at the
start of the next run (after a killed driver). Readers of the output (summary, review, export,
fine-tuning) list only ``<output>/*.parquet`` and never look under ``_parts/``.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline import storage
from pipeline.labeling import sinks
from pipeline.labeling.config import COUNT, END, MARKER_COLUMNS
from pipeline.sources.listing import Shard
from pipeline.vocabulary import Vocabulary

PARTS_DIR = "_parts"

RECORD_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("part", pa.string()),  # path on the output's file system; "" for an end marker
        pa.field("image_ids", pa.list_(pa.string())),
        pa.field("expected", pa.int64()),  # the shard's image count on an end marker, else -1
    ]
)


def parts_dir(output: str, shard: str | None = None) -> tuple[storage.pafs.FileSystem, str]:
    """(file system, path) of ``<output>/_parts`` or of one shard's folder in it."""
    fs, base = storage.resolve(output)
    path = storage.join(base, PARTS_DIR)
    return fs, path if shard is None else storage.join(path, sinks.shard_name(shard))


def clean_parts(output: str) -> bool:
    """Remove every part file of the output (those of killed runs); True when there were any.

    Only run it when no other job writes into ``output``.
    """
    fs, path = parts_dir(output)
    return storage.remove_dir(fs, path)


def write_parts(batch: pa.Table, *, output: str) -> pa.Table:
    """Ray Data batch function: labeled rows (``LABELS_V1`` + marker columns) in, part records
    (``RECORD_SCHEMA``) out; the rows of each shard go to a new part file under
    ``<output>/_parts/<shard>/``."""
    fs, root = parts_dir(output)
    ends = batch.column(END).to_pylist()
    counts = batch.column(COUNT).to_pylist()
    shards = batch.column("shard").to_pylist()
    records = []
    rows_of: dict[str, list[int]] = {}
    for i, (shard, is_end) in enumerate(zip(shards, ends)):
        if is_end:
            records.append({"shard": shard, "part": "", "image_ids": [], "expected": counts[i]})
        else:
            rows_of.setdefault(shard, []).append(i)
    rows = batch.drop_columns(list(MARKER_COLUMNS))
    for shard, idx in rows_of.items():
        table = rows.take(pa.array(idx, pa.int64())).select(schemas.LABELS_V1.names)
        table = table.cast(schemas.LABELS_V1)
        path = storage.join(root, sinks.shard_name(shard), f"{uuid.uuid4().hex}.parquet")
        storage.write_parquet(fs, path, table)
        ids = table.column("image_id").to_pylist()
        records.append({"shard": shard, "part": path, "image_ids": ids, "expected": -1})
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def commit_shard(
    output: str,
    shard: Shard,
    parts: list[str],
    *,
    vocabulary_json: str,
    n_records: int,
    seconds: float = 0.0,
) -> sinks.ShardStats:
    """Merge the named part files of ``shard`` into its labels file and remove its part folder.

    The first row of each image id wins (in ``parts`` order); the result must hold exactly
    ``n_records`` rows (``sinks.write_shard`` checks it). Running it again after it finished
    (a retried task) finds the file complete and returns its counts.
    """
    fs, folder = parts_dir(output, shard.name)
    vocabulary = Vocabulary.from_json(vocabulary_json)
    if not all(storage.is_file(fs, p) for p in parts):
        if sinks.shard_done(output, shard, expected_rows=n_records):
            out_fs, path = sinks.shard_file(output, shard)
            stats = sinks.read_shard_stats(path, filesystem=out_fs)
            if stats is not None:
                return stats
        missing = [p for p in parts if not storage.is_file(fs, p)]
        raise FileNotFoundError(f"shard {shard.name}: part files missing {missing[:3]}")
    tables = [
        pq.read_table(p, filesystem=fs).select(schemas.LABELS_V1.names).cast(schemas.LABELS_V1)
        for p in parts
    ]
    table = pa.concat_tables(tables) if tables else schemas.rows_to_table([])
    if table.num_rows:
        ids = table.column("image_id")
        first = pc.index_in(ids, pc.unique(ids))  # position of each id among the unique ones
        keep = _first_occurrences(first.to_numpy(zero_copy_only=False))
        table = table.take(pa.array(keep, pa.int64()))
    stats = sinks.write_shard(
        output,
        shard,
        table,
        vocabulary=vocabulary,
        n_records=n_records,
        seconds=seconds,
    )
    storage.remove_dir(fs, folder)
    return stats


def _first_occurrences(codes) -> list[int]:
    seen: set[int] = set()
    keep = []
    for i, code in enumerate(codes.tolist()):
        if code not in seen:
            seen.add(code)
            keep.append(i)
    return keep


@dataclass
class _Open:
    """What the driver knows of one shard being labeled."""

    parts: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    expected: int | None = None  # known once the end marker's record arrived


class ShardCommitter:
    """Driver side: takes part records, and starts a commit task for each shard they complete.

    ``commit`` is the remote function (``ray.remote(commit_shard)``) or, without Ray, a plain
    function returning the stats. At most ``max_in_flight`` commit tasks run at once; the other
    complete shards wait in a queue (each a few part paths), so a burst of small shards starts
    neither a burst of worker processes nor a connection to each in the driver. Memory: per open
    or queued shard, its part paths and image ids.
    """

    def __init__(
        self,
        output: str,
        shards: list[Shard],
        *,
        vocabulary: Vocabulary,
        commit=None,
        max_in_flight: int = 2,
    ) -> None:
        self.output = output
        self.shards = {s.name: s for s in shards}
        self.vocabulary_json = vocabulary.to_json()
        self.commit = commit
        self.open: dict[str, _Open] = {}
        self.pending: dict[object, str] = {}  # commit task ref -> shard
        self.queue: deque[tuple[tuple, dict]] = deque()  # complete shards' commit arguments
        self.max_in_flight = max(1, max_in_flight)
        self.written: list[sinks.ShardStats] = []
        self.started = time.perf_counter()

    def add(self, records: pa.Table) -> None:
        """Take a batch of part records; start the commits of the shards it completes."""
        for rec in records.to_pylist():
            state = self.open.setdefault(rec["shard"], _Open())
            if rec["part"]:
                new = [i for i in rec["image_ids"] if i not in state.ids]
                if new:  # a part whose images are all accounted for adds nothing
                    state.parts.append(rec["part"])
                    state.ids.update(new)
            else:
                state.expected = int(rec["expected"])
            self._maybe_commit(rec["shard"])
        self.poll()

    def _maybe_commit(self, name: str) -> None:
        state = self.open[name]
        if state.expected is None or len(state.ids) < state.expected:
            return
        if len(state.ids) > state.expected:
            raise RuntimeError(f"shard {name!r}: {len(state.ids)} images for {state.expected}")
        del self.open[name]
        args = (self.output, self.shards[name], state.parts)
        kwargs = dict(
            vocabulary_json=self.vocabulary_json,
            n_records=state.expected,
            seconds=time.perf_counter() - self.started,
        )
        if self.commit is None or not hasattr(self.commit, "remote"):
            self.written.append((self.commit or commit_shard)(*args, **kwargs))
        else:
            self.queue.append((args, kwargs))
            self._launch()

    def _launch(self) -> None:
        while self.queue and len(self.pending) < self.max_in_flight:
            args, kwargs = self.queue.popleft()
            self.pending[self.commit.remote(*args, **kwargs)] = args[1].name

    def poll(self, *, wait: bool = False) -> None:
        """Collect finished commits and start queued ones; with ``wait``, until all are done.
        A failed commit raises."""
        import ray

        while self.pending:
            refs = list(self.pending)
            ready = len(refs) if not wait else 1
            done, _ = ray.wait(refs, num_returns=ready, timeout=None if wait else 0)
            for ref in done:
                del self.pending[ref]
                self.written.append(ray.get(ref))
            self._launch()
            if not wait:
                return

    def incomplete(self) -> dict[str, tuple[int, int | None]]:
        """Shards still open: name -> (images accounted for, images expected or None)."""
        return {k: (len(s.ids), s.expected) for k, s in self.open.items()}
