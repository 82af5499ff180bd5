"""Parquet sinks with resume: one labels file per input shard, and a run summary beside them.

Layout of an output folder (a local path or a URI such as ``s3://bucket/labels``, written
through ``pyarrow.fs``, see ``pipeline.storage``)::

    <output>/<shard name>.parquet     one per shard, schema v1, written atomically
    <output>/_summary.json            totals over all complete shards + one record per run
                                      (with the input files it skipped, by reason)
    <output>/_parts/<shard>/...       part files of shards being labeled
                                      (``pipeline.labeling.parts``); never read as labels,
                                      removed when the shard is committed

A shard's file is written once all of its rows are in, under a temporary name that is then
renamed (on object stores: as one object, which appears only once complete), so a file under the
final name is always complete. Its
key-value metadata ("extra") records the shard name, the number of rows, the shard's
fingerprint (for folder and manifest groups: a hash of their image ids), the vocabulary hash and
the shard's counts. ``shard_done`` checks these against the input, so a rerun skips exactly the
shards whose output is complete and relabels the rest; ``overwrite=True`` relabels everything.
Temporary files of killed runs are removed by ``clean_temporaries``.

``write_summary`` recomputes the totals from the metadata of the complete files and keeps the
records of earlier runs, so a resumed job reports the counts of the whole output (shards written
by a killed run included), with nothing counted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import schemas
from pipeline import storage
from pipeline.sources.listing import Shard
from pipeline.vocabulary import Vocabulary

OUTPUT_SUFFIX = ".parquet"
# Leading "_": Parquet dataset readers of the folder skip it.
SUMMARY_NAME = "_summary.json"
# Temporary files: schemas.write_parquet's ".<name>.<uuid hex>.tmp" and this module's own.
_TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


@dataclass(frozen=True, kw_only=True)
class ShardStats:
    """Counts of one written shard (also stored in its Parquet metadata)."""

    shard: str  # shard name
    images_ok: int  # rows with status "ok"
    images_error: int  # rows with status "error"
    masks_per_level: dict[str, int]  # masks per level (schemas.LEVELS) over the ok rows
    seconds: float = 0.0  # time spent labeling the shard, as measured by the caller

    @property
    def images(self) -> int:
        """All rows of the shard."""
        return self.images_ok + self.images_error


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One finished run of a job over an output folder (a resumed job adds one more)."""

    finished_at: str  # ISO 8601, UTC
    seconds: float  # wall time of the run
    shards_written: int  # shards labeled and written by this run
    shards_skipped: int  # shards found complete and skipped
    images: int  # images (ok + error) written by this run
    images_per_s: float  # images / seconds of this run
    # Files of the input folders that are not images, by reason ({"not an image": 3}), and a
    # few of their paths: nothing is left out without a word.
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """Totals over every complete shard of an output folder, and the runs that wrote them."""

    shards: int  # complete shard files
    images_ok: int  # ok rows in them
    images_error: int  # error rows in them
    masks_per_level: dict[str, int]  # masks per level over the ok rows
    seconds: float  # wall time summed over the runs
    images_per_s: float  # images written by the runs / their seconds
    runs: tuple[RunRecord, ...] = field(default=())  # oldest first
    # The latest run's skipped input files by reason (see RunRecord.skipped).
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``_summary.json`` holds)."""
        data = asdict(self)
        data["runs"] = [asdict(r) for r in self.runs]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        runs = tuple(RunRecord(**r) for r in data.get("runs", ()))
        return cls(**{**data, "runs": runs})


# ---------------------------------------------------------------------------------------------
# Files of one shard


def shard_name(shard: Shard | str) -> str:
    """The shard's name; refuses names that would leave the output folder or hide the file."""
    name = shard.name if isinstance(shard, Shard) else shard
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise ValueError(f"invalid shard name {name!r}")
    return name


def output_path(output_dir: str | os.PathLike, shard: Shard | str) -> Path | str:
    """``<output_dir>/<shard name>.parquet``: a Path for a local folder, a URI string for a URI."""
    name = shard_name(shard)
    if storage.is_uri(output_dir):
        return storage.uri_join(output_dir, f"{name}{OUTPUT_SUFFIX}")
    return Path(output_dir) / f"{name}{OUTPUT_SUFFIX}"


def shard_file(output_dir: str | os.PathLike, shard: Shard | str):
    """(file system, path on it) of the shard's labels file."""
    fs, base = storage.resolve(output_dir)
    return fs, storage.join(base, f"{shard_name(shard)}{OUTPUT_SUFFIX}")


def shard_done(
    output_dir: str | os.PathLike,
    shard: Shard | str,
    *,
    expected_rows: int | None = None,
    vocabulary_hash: str | None = None,
) -> bool:
    """True when the shard's output file is complete, readable and matches the input.

    Checks the Parquet footer (a missing, partial or foreign file is not done): schema version,
    the shard name and row count recorded at write time against the footer's row count, and,
    when known, against the input: ``expected_rows`` (default: ``shard.expected`` for folder
    and manifest groups) and the shard's fingerprint; ``vocabulary_hash``, when given, must
    equal the one the file was labeled with.
    """
    fs, path = shard_file(output_dir, shard)
    try:
        if not storage.is_file(fs, path):
            return False
        info = schemas.read_metadata(path, filesystem=fs)
    except Exception:  # truncated or not Parquet at all
        return False
    extra = info.get("extra") or {}
    name = shard.name if isinstance(shard, Shard) else shard
    if info.get("schema_version") != schemas.SCHEMA_VERSION or extra.get("shard") != name:
        return False
    if extra.get("n_records") != info["num_rows"]:
        return False
    if isinstance(shard, Shard):
        if expected_rows is None:
            expected_rows = shard.expected
        if shard.fingerprint and extra.get("fingerprint") != shard.fingerprint:
            return False
    if expected_rows is not None and info["num_rows"] != expected_rows:
        return False
    return vocabulary_hash is None or extra.get("vocabulary_hash") == vocabulary_hash


def read_shard_stats(path: str | os.PathLike, *, filesystem=None) -> ShardStats | None:
    """The counts stored in a labels file's metadata (None for files this module did not write).

    ``filesystem``: the ``pyarrow.fs.FileSystem`` of ``path`` (default: local).
    """
    try:
        extra = schemas.read_metadata(path, filesystem=filesystem).get("extra") or {}
        return ShardStats(
            shard=extra["shard"],
            images_ok=int(extra["images_ok"]),
            images_error=int(extra["images_error"]),
            masks_per_level={k: int(v) for k, v in extra["masks_per_level"].items()},
            seconds=float(extra.get("seconds", 0.0)),
        )
    except Exception:
        return None


def clean_temporaries(output_dir: str | os.PathLike, *, older_than_s: float = 0.0) -> list[Path]:
    """Delete temporary files of killed runs (``.<name>.<hex>.tmp``); return what was deleted.

    Only run it when no other job writes into ``output_dir``, or pass ``older_than_s`` larger
    than the time a shard takes to write.
    """
    fs, base = storage.resolve(output_dir)
    now = time.time()
    removed = []
    for entry in storage.list_dir(fs, base):
        if entry.type != storage.pafs.FileType.File or not _TEMP_PATTERN.match(entry.base_name):
            continue
        mtime = entry.mtime.timestamp() if entry.mtime is not None else 0.0
        if now - mtime >= older_than_s:
            storage.remove_file(fs, entry.path)
            removed.append(Path(entry.path) if not storage.is_uri(output_dir) else entry.path)
    return removed


class ShardWriter:
    """Writes one labels file per shard. Picklable: build it on the driver, use it in Ray tasks."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        vocabulary: Vocabulary | Mapping[str, Any],
        overwrite: bool = False,
        validate: bool = True,
    ) -> None:
        """
        Args:
            output_dir: local folder or URI for the files (created if missing).
            vocabulary: the run's vocabulary, recorded in each file's metadata.
            overwrite: relabel shards whose output is already complete.
            validate: check each table against the label contract before writing (RLE counts
                are not re-parsed: rows built from validated masks).
        """
        self.output_dir = str(output_dir)
        self.vocabulary, self.vocabulary_hash = _vocabulary_and_hash(vocabulary)
        self.overwrite = overwrite
        self.validate = validate

    def done(self, shard: Shard | str, *, expected_rows: int | None = None) -> bool:
        """Whether to skip ``shard``: complete output, same vocabulary, and no ``overwrite``."""
        if self.overwrite:
            return False
        return shard_done(
            self.output_dir,
            shard,
            expected_rows=expected_rows,
            vocabulary_hash=self.vocabulary_hash,
        )

    def write(
        self,
        shard: Shard | str,
        rows: Sequence[dict] | pa.Table,
        *,
        n_records: int | None = None,
        seconds: float = 0.0,
    ) -> ShardStats:
        """Write all rows of one shard atomically (see ``write_shard``) and return its counts."""
        return write_shard(
            self.output_dir,
            shard,
            rows,
            vocabulary=self.vocabulary,
            n_records=n_records,
            seconds=seconds,
            validate=self.validate,
        )


def write_shard(
    output_dir: str | os.PathLike,
    shard: Shard | str,
    rows: Sequence[dict] | pa.Table,
    *,
    vocabulary: Vocabulary | Mapping[str, Any],
    n_records: int | None = None,
    seconds: float = 0.0,
    validate: bool = True,
) -> ShardStats:
    """Write all rows of one shard to ``output_path(output_dir, shard)`` atomically.

    Args:
        output_dir: local folder or URI (``pipeline.storage``; created if missing).
        shard: the shard (or its name) the rows belong to; a ``Shard`` also checks the row
            count against its known size and records its fingerprint.
        rows: one row per record the source yielded (``schemas.make_ok_row`` /
            ``make_error_row`` dicts, or a ``schemas.LABELS_V1`` table), in any order; written
            sorted by image id.
        vocabulary: the run's vocabulary, recorded in the file's metadata with its hash.
        n_records: how many records the source yielded for the shard, when ``shard`` does not
            know it up front (tars); checked against the number of rows.
        seconds: labeling time of the shard, kept in the metadata.
        validate: check the table against the label contract first (without re-parsing RLE
            counts: rows are built from validated masks).
    Returns:
        The shard's counts.
    Raises:
        ValueError: rows of another shard, duplicated image ids, or a row count different from
            the input's (a file that ``shard_done`` would reject is never written).
        schemas.SchemaError: a row breaks the label contract (with ``validate``).
    """
    name = shard_name(shard)
    fs, path = shard_file(output_dir, name)
    vocabulary_dict, vocabulary_hash = _vocabulary_and_hash(vocabulary)
    if isinstance(rows, pa.Table):
        table = rows.select(schemas.LABELS_V1.names).cast(schemas.LABELS_V1)
    else:
        table = schemas.rows_to_table(list(rows))
    expected = shard.expected if isinstance(shard, Shard) else None
    for want in (expected, n_records):
        if want is not None and want != table.num_rows:
            raise ValueError(f"shard {name}: {table.num_rows} rows for {want} input records")
    ids = table.column("image_id")
    if len(pc.unique(ids)) != table.num_rows:
        counts = pc.value_counts(ids).to_pylist()
        dupes = sorted(c["values"] for c in counts if c["counts"] > 1)[:5]
        raise ValueError(f"shard {name}: duplicated image ids {dupes}")
    others = set(pc.unique(table.column("shard")).to_pylist()) - {name}
    if others:
        raise ValueError(f"shard {name}: rows of other shards {sorted(map(str, others))[:5]}")
    table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending")]))
    if validate:
        schemas.validate_table(table, check_rle_counts=False)
    stats = table_stats(table, shard=name, seconds=seconds)
    extra = {
        "shard": name,
        "n_records": table.num_rows,
        "fingerprint": shard.fingerprint if isinstance(shard, Shard) else "",
        "source": shard.uri if isinstance(shard, Shard) else "",
        "vocabulary_hash": vocabulary_hash,
        "images_ok": stats.images_ok,
        "images_error": stats.images_error,
        "masks_per_level": stats.masks_per_level,
        "seconds": stats.seconds,
        "written_at": _now(),
    }
    table = schemas.with_label_metadata(table, vocabulary=vocabulary_dict, extra=extra)
    storage.write_parquet(fs, path, table)
    return stats


def table_stats(table: pa.Table, *, shard: str, seconds: float = 0.0) -> ShardStats:
    """Counts of a labels table (rows per status, masks per level)."""
    status = table.column("status")
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    return ShardStats(
        shard=shard,
        images_ok=ok,
        images_error=table.num_rows - ok,
        masks_per_level=schemas.count_levels(table),
        seconds=float(seconds),
    )


# ---------------------------------------------------------------------------------------------
# Run summary


def read_summary(output_dir: str | os.PathLike) -> RunSummary | None:
    """The summary in ``output_dir`` (None when missing or unreadable)."""
    try:
        fs, base = storage.resolve(output_dir)
        text = storage.read_text(fs, storage.join(base, SUMMARY_NAME))
        return RunSummary.from_dict(json.loads(text))
    except Exception:
        return None


def scan_outputs(output_dir: str | os.PathLike) -> dict[str, ShardStats]:
    """Counts of every complete shard file in ``output_dir`` (read from the Parquet footers).

    Only the folder's own ``<shard>.parquet`` files count (not ``_parts/``, not temporaries).
    """
    found: dict[str, ShardStats] = {}
    fs, base = storage.resolve(output_dir)
    for entry in storage.list_dir(fs, base):
        name = entry.base_name
        if entry.type != storage.pafs.FileType.File or not name.endswith(OUTPUT_SUFFIX):
            continue
        if name.startswith("."):
            continue
        stats = read_shard_stats(entry.path, filesystem=fs)
        if stats is not None and name == f"{stats.shard}{OUTPUT_SUFFIX}":
            if shard_done(output_dir, stats.shard):
                found[stats.shard] = stats
    return found


def write_summary(
    output_dir: str | os.PathLike, run: RunRecord | Mapping[str, Any] | None = None
) -> RunSummary:
    """Write ``<output_dir>/_summary.json`` for the whole folder and return it.

    Totals (shards, images ok / error, masks per level) are recomputed from the complete shard
    files, so shards written by earlier (killed or finished) runs are counted once each, and
    shards relabeled with ``overwrite`` are not counted twice. ``run`` (this run's record, or a
    mapping with ``seconds``, ``shards_written``, ``shards_skipped`` and ``images`` or
    ``images_ok`` + ``images_error``, optionally ``skipped`` and ``skipped_examples``) is
    appended to the runs kept from the earlier summary; the summary's ``skipped`` is the last
    run's.
    """
    previous = read_summary(output_dir)
    runs = previous.runs if previous is not None else ()
    if run is not None:
        runs = (*runs, run if isinstance(run, RunRecord) else _run_record(run))
    shards = scan_outputs(output_dir)
    levels = {level: 0 for level in schemas.LEVELS}
    for stats in shards.values():
        for level, n in stats.masks_per_level.items():
            levels[level] = levels.get(level, 0) + n
    seconds = sum(r.seconds for r in runs)
    summary = RunSummary(
        shards=len(shards),
        images_ok=sum(s.images_ok for s in shards.values()),
        images_error=sum(s.images_error for s in shards.values()),
        masks_per_level=levels,
        seconds=seconds,
        images_per_s=sum(r.images for r in runs) / seconds if seconds > 0 else 0.0,
        runs=runs,
        skipped=dict(runs[-1].skipped) if runs else {},
    )
    fs, base = storage.resolve(output_dir)
    text = json.dumps(summary.to_dict(), indent=2) + "\n"
    storage.write_text(fs, storage.join(base, SUMMARY_NAME), text)
    return summary


def _run_record(run: Mapping[str, Any]) -> RunRecord:
    seconds = float(run.get("seconds", 0.0))
    images = int(run.get("images", int(run.get("images_ok", 0)) + int(run.get("images_error", 0))))
    return RunRecord(
        finished_at=str(run.get("finished_at") or _now()),
        seconds=seconds,
        shards_written=int(run.get("shards_written", 0)),
        shards_skipped=int(run.get("shards_skipped", 0)),
        images=images,
        images_per_s=images / seconds if seconds > 0 else 0.0,
        skipped={str(k): int(v) for k, v in dict(run.get("skipped") or {}).items()},
        skipped_examples={
            str(k): [str(p) for p in v] for k, v in dict(run.get("skipped_examples") or {}).items()
        },
    )


def _vocabulary_and_hash(vocabulary: Vocabulary | Mapping[str, Any]) -> tuple[dict, str]:
    """The vocabulary as a dict and its hash (``Vocabulary.hash``; for a mapping that is not a
    vocabulary of this module, the sha256 of its canonical JSON)."""
    if not isinstance(vocabulary, Vocabulary):
        try:
            vocabulary = Vocabulary.from_dict(vocabulary)
        except ValueError:
            text = json.dumps(dict(vocabulary), sort_keys=True, separators=(",", ":"))
            return dict(vocabulary), hashlib.sha256(text.encode("utf-8")).hexdigest()
    return vocabulary.to_dict(), vocabulary.hash


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
