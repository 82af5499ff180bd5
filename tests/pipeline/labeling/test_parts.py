"""Part files and shard commits (no Ray): rows go to part files, only records reach the
committer; a shard is committed once every image is accounted for, each image once, and part
files that no record names are never counted."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipeline.export.formats import label_files
from pipeline.labeling import parts, sinks
from pipeline.labeling.config import COUNT, END
from pipeline.labeling.parts import PARTS_DIR, ShardCommitter, write_parts
from pipeline.sources.listing import Shard
from pipeline.vocabulary import Vocabulary

VOCABULARY = Vocabulary.from_lists(things=["robot"], stuff=["sky"], parts=["head"])


def _shard(name: str, n: int) -> Shard:
    return Shard(name=name, uri=f"/in/{name}", kind="tar")


def _batch(shard: str, ids: list[str], *, end: int | None = None, status="ok") -> pa.Table:
    rows = []
    for i in ids:
        if status == "ok":
            row = schemas.make_ok_row(
                image_id=i,
                uri=f"/in/{shard}/{i}",
                shard=shard,
                width=4,
                height=3,
                masks=[],
                model="hipie:test",
                vocabulary_hash=VOCABULARY.hash,
            )
        else:
            row = schemas.make_error_row(image_id=i, uri=f"/in/{i}", shard=shard, error=status)
        rows.append({**row, END: False, COUNT: 0})
    if end is not None:
        row = schemas.make_error_row(image_id="", uri="", shard=shard, error="end of shard")
        rows.append({**row, END: True, COUNT: end})
    schema = schemas.LABELS_V1.append(pa.field(END, pa.bool_())).append(pa.field(COUNT, pa.int64()))
    return pa.Table.from_pylist(rows, schema=schema)


def _part_files(out: Path) -> list[Path]:
    return sorted((out / PARTS_DIR).rglob("*.parquet")) if (out / PARTS_DIR).exists() else []


def test_rows_go_to_part_files_and_only_records_come_back(tmp_path):
    out = tmp_path / "labels"
    records = write_parts(_batch("a", ["1.jpg", "2.jpg"], end=3), output=str(out))
    assert records.schema == parts.RECORD_SCHEMA
    assert "masks" not in records.column_names  # no label data in the records
    recs = records.to_pylist()
    assert [r["expected"] for r in recs] == [3, -1]
    assert recs[1]["image_ids"] == ["1.jpg", "2.jpg"]
    part = Path(recs[1]["part"])
    assert part.parent == out / PARTS_DIR / "a" and part.is_file()
    assert pq.read_table(part).column("image_id").to_pylist() == ["1.jpg", "2.jpg"]


def test_commit_once_complete_with_duplicates_and_orphans_ignored(tmp_path):
    out = tmp_path / "labels"
    committer = ShardCommitter(str(out), [_shard("a", 3)], vocabulary=VOCABULARY)
    committer.add(write_parts(_batch("a", ["1.jpg", "2.jpg"]), output=str(out)))
    # an orphan: written by a worker that died before its record reached the driver
    orphan = write_parts(_batch("a", ["3.jpg"], status="orphan"), output=str(out))
    # a retried batch whose record also arrived: its images are already accounted for
    committer.add(write_parts(_batch("a", ["2.jpg"], status="retried"), output=str(out)))
    committer.add(write_parts(_batch("a", [], end=3), output=str(out)))
    assert not (out / "a.parquet").exists()  # 2 of 3 images accounted for
    assert committer.incomplete() == {"a": (2, 3)}
    committer.add(write_parts(_batch("a", ["3.jpg"]), output=str(out)))
    assert committer.incomplete() == {}
    assert [s.images_ok for s in committer.written] == [3]
    table, info = schemas.read_parquet(out / "a.parquet")
    schemas.validate_table(table)
    assert table.column("image_id").to_pylist() == ["1.jpg", "2.jpg", "3.jpg"]
    assert set(table.column("status").to_pylist()) == {"ok"}  # no orphan, no retried row
    assert info["extra"]["n_records"] == 3 and info["extra"]["shard"] == "a"
    assert sinks.shard_done(out, "a", expected_rows=3, vocabulary_hash=VOCABULARY.hash)
    assert _part_files(out) == [] and Path(orphan.to_pylist()[0]["part"]).exists() is False
    assert label_files(out) == [out / "a.parquet"]


def test_commit_task_rerun_returns_the_committed_file(tmp_path):
    out = tmp_path / "labels"
    recs = write_parts(_batch("a", ["1.jpg"]), output=str(out)).to_pylist()
    kwargs = dict(vocabulary_json=VOCABULARY.to_json(), n_records=1)
    first = parts.commit_shard(str(out), _shard("a", 1), [recs[0]["part"]], **kwargs)
    again = parts.commit_shard(str(out), _shard("a", 1), [recs[0]["part"]], **kwargs)
    assert first.images_ok == again.images_ok == 1
    with pytest.raises(FileNotFoundError):
        parts.commit_shard(str(out), _shard("b", 1), [str(out / "nope.parquet")], **kwargs)


def test_readers_never_see_part_files(tmp_path):
    out = tmp_path / "labels"
    committer = ShardCommitter(str(out), [_shard("a", 1)], vocabulary=VOCABULARY)
    committer.add(write_parts(_batch("a", ["1.jpg"], end=1), output=str(out)))
    write_parts(_batch("b", ["9.jpg"]), output=str(out))  # a shard still open (or orphaned)
    assert len(_part_files(out)) == 1
    assert label_files(out) == [out / "a.parquet"]
    summary = sinks.write_summary(out, {"seconds": 1.0, "shards_written": 1, "images": 1})
    assert summary.shards == 1 and summary.images_ok == 1
    assert parts.clean_parts(str(out)) and not (out / PARTS_DIR).exists()
    assert not parts.clean_parts(str(out))
