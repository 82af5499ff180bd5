"""Parquet sinks: atomic per-shard files, completeness checks for resume, leftovers, summaries."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipeline.labeling.sinks import (
    SUMMARY_NAME,
    RunRecord,
    ShardStats,
    ShardWriter,
    clean_temporaries,
    output_path,
    read_shard_stats,
    read_summary,
    scan_outputs,
    shard_done,
    write_shard,
    write_summary,
)
from pipeline.sources.listing import Shard, list_shards
from pipeline.vocabulary import Vocabulary
from tests.pipeline.badinputs import encode, gradient_rgb, rect_rle

VOCAB = Vocabulary.from_lists(things=["cat"], stuff=["sky"], parts=["head"])


def ok_row(image_id: str, shard: str, levels: tuple[str, ...] = ("instance", "stuff")) -> dict:
    masks = [
        schemas.make_mask(
            mask_id=k,
            rle=rect_rle(8, 12, 0, 2 + k, 0, 3),
            level=level,
            label="cat" if level == "instance" else "sky" if level == "stuff" else "head",
            score=0.5,
            origin="hipie",
        )
        for k, level in enumerate(levels)
    ]
    return schemas.make_ok_row(
        image_id=image_id,
        uri=f"/data/{image_id}",
        shard=shard,
        width=12,
        height=8,
        masks=masks,
        model="tiny",
        vocabulary_hash=VOCAB.hash,
    )


def error_row(image_id: str, shard: str) -> dict:
    return schemas.make_error_row(
        image_id=image_id, uri=f"/data/{image_id}", shard=shard, error="cannot decode image: empty"
    )


def folder_shards(tmp_path, n_images: int, shard_size: int) -> list[Shard]:
    root = tmp_path / "in"
    root.mkdir(exist_ok=True)
    for k in range(n_images):
        (root / f"img{k:02d}.png").write_bytes(encode(gradient_rgb(8, 12), "PNG"))
    return list_shards([str(root)], shard_size=shard_size)


def test_write_and_read_back(tmp_path):
    (shard,) = folder_shards(tmp_path, 3, 10)
    out = tmp_path / "out"
    rows = [ok_row("img02.png", shard.name), error_row("img00.png", shard.name)]
    rows.append(ok_row("img01.png", shard.name, ("instance", "part", "part")))
    stats = write_shard(out, shard, rows, vocabulary=VOCAB, seconds=1.5)
    assert stats == ShardStats(
        shard=shard.name,
        images_ok=2,
        images_error=1,
        masks_per_level={"stuff": 1, "instance": 2, "part": 2, "subpart": 0},
        seconds=1.5,
    )
    path = output_path(out, shard)
    assert path == out / f"{shard.name}.parquet"
    assert sorted(p.name for p in out.iterdir()) == [path.name]  # no temporary left
    table, info = schemas.read_parquet(path)
    assert table.column("image_id").to_pylist() == ["img00.png", "img01.png", "img02.png"]
    assert table.column("status").to_pylist() == ["error", "ok", "ok"]
    assert info["vocabulary"] == VOCAB.to_dict()
    extra = info["extra"]
    assert extra["shard"] == shard.name and extra["n_records"] == 3
    assert extra["fingerprint"] == shard.fingerprint and extra["vocabulary_hash"] == VOCAB.hash
    assert read_shard_stats(path) == stats
    assert shard_done(out, shard) and shard_done(out, shard.name)
    assert shard_done(out, shard, vocabulary_hash=VOCAB.hash)
    assert not shard_done(out, shard, vocabulary_hash="0" * 64)  # labeled with another vocabulary


def test_write_accepts_an_arrow_table(tmp_path):
    rows = [ok_row("b", "s1"), error_row("a", "s1")]
    table = schemas.rows_to_table(rows)
    stats = write_shard(tmp_path, "s1", table, vocabulary=VOCAB.to_dict(), n_records=2)
    assert (stats.images_ok, stats.images_error) == (1, 1)
    assert pq.read_table(tmp_path / "s1.parquet").column("image_id").to_pylist() == ["a", "b"]
    assert shard_done(tmp_path, "s1", expected_rows=2)
    assert not shard_done(tmp_path, "s1", expected_rows=3)


def test_shard_done_rejects_incomplete_or_foreign_files(tmp_path):
    shards = folder_shards(tmp_path, 4, 2)
    out = tmp_path / "out"
    assert not shard_done(out, shards[0])  # nothing yet
    write_shard(
        out, shards[0], [ok_row(i, shards[0].name) for i, _ in shards[0].items], vocabulary=VOCAB
    )
    assert shard_done(out, shards[0])
    # A file cut short (e.g. copied while being written by hand): unreadable footer.
    data = output_path(out, shards[0]).read_bytes()
    output_path(out, shards[1]).write_bytes(data[: len(data) // 2])
    assert not shard_done(out, shards[1])
    # A Parquet file not written by the sink: no recorded row count.
    pq.write_table(pa.table({"x": [1, 2]}), output_path(out, "other"))
    assert not shard_done(out, "other")
    # Another shard's file under this shard's name.
    output_path(out, shards[1]).write_bytes(data)
    assert not shard_done(out, shards[1])
    # The folder changed: the first group now holds other images (same count, other ids).
    (tmp_path / "in" / "img00.png").rename(tmp_path / "in" / "img99.png")
    changed = list_shards([str(tmp_path / "in")], shard_size=2)
    assert changed[0].name == shards[0].name and changed[0].expected == 2
    assert not shard_done(out, changed[0])


def test_write_refuses_rows_that_do_not_match_the_input(tmp_path):
    (shard,) = folder_shards(tmp_path, 2, 10)
    out = tmp_path / "out"
    one = [ok_row("img00.png", shard.name)]
    with pytest.raises(ValueError, match="1 rows for 2 input records"):
        write_shard(out, shard, one, vocabulary=VOCAB)
    with pytest.raises(ValueError, match="duplicated image ids"):
        write_shard(out, shard, one + one, vocabulary=VOCAB)
    with pytest.raises(ValueError, match="rows of other shards"):
        write_shard(out, shard, one + [ok_row("img01.png", "elsewhere")], vocabulary=VOCAB)
    with pytest.raises(ValueError, match="2 rows for 3 input records"):
        write_shard(out, "tarshard", [ok_row("a", "tarshard"), ok_row("b", "tarshard")],
                    vocabulary=VOCAB, n_records=3)  # fmt: skip
    bad = ok_row("img01.png", shard.name)
    bad["masks"][0]["level"] = "galaxy"
    with pytest.raises(schemas.SchemaError, match="galaxy"):
        write_shard(out, shard, one + [bad], vocabulary=VOCAB)
    assert not out.exists() or list(out.iterdir()) == []  # nothing written, no temporaries


def test_output_names_never_leave_the_folder(tmp_path):
    for name in ("../x", "a/b", "", ".hidden", "a\\b"):
        with pytest.raises(ValueError, match="invalid shard name"):
            output_path(tmp_path, name)


def test_writer_skip_and_overwrite(tmp_path):
    (shard,) = folder_shards(tmp_path, 1, 10)
    out = tmp_path / "out"
    writer = ShardWriter(out, vocabulary=VOCAB)
    assert not writer.done(shard)
    writer.write(shard, [error_row("img00.png", shard.name)])
    assert writer.done(shard)
    other_vocab = ShardWriter(out, vocabulary=Vocabulary.from_lists(things=["dog"]))
    assert not other_vocab.done(shard)  # relabel when the vocabulary changed
    overwriting = pickle.loads(pickle.dumps(ShardWriter(out, vocabulary=VOCAB, overwrite=True)))
    assert not overwriting.done(shard)
    overwriting.write(shard, [ok_row("img00.png", shard.name)])
    table, _ = schemas.read_parquet(output_path(out, shard))
    assert table.column("status").to_pylist() == ["ok"]
    assert writer.done(shard)


def test_clean_temporaries(tmp_path):
    write_shard(tmp_path, "s", [ok_row("a", "s")], vocabulary=VOCAB)
    leftovers = [
        tmp_path / f".s.parquet.{'ab' * 16}.tmp",  # schemas.write_parquet's pattern
        tmp_path / f".{SUMMARY_NAME}.{'0' * 32}.tmp",
    ]
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / f".x.{'z' * 32}.tmp"]
    for path in leftovers + keep:
        path.write_bytes(b"partial")
    assert clean_temporaries(tmp_path, older_than_s=3600) == []  # all fresh
    assert sorted(clean_temporaries(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["s.parquet"] + [p.name for p in keep]
    )
    assert clean_temporaries(tmp_path / "missing") == []


def test_summary_merges_runs_without_double_counting(tmp_path):
    out = tmp_path / "out"
    # Run 1 writes two shards, then is killed before writing its summary.
    write_shard(out, "a", [ok_row("1", "a"), error_row("2", "a")], vocabulary=VOCAB)
    write_shard(out, "b", [ok_row("3", "b", ("instance", "part"))], vocabulary=VOCAB)
    assert read_summary(out) is None
    # Run 2 (resumed) writes shard c and its summary: a and b are counted from their files.
    write_shard(out, "c", [ok_row("4", "c")], vocabulary=VOCAB)
    first = write_summary(
        out, {"seconds": 2.0, "shards_written": 1, "shards_skipped": 2, "images_ok": 1}
    )
    assert (first.shards, first.images_ok, first.images_error) == (3, 3, 1)
    assert first.masks_per_level == {"stuff": 2, "instance": 3, "part": 1, "subpart": 0}
    assert (first.seconds, first.images_per_s) == (2.0, 0.5)
    # Run 3 relabels shard a with overwrite: replaced, not added.
    write_shard(out, "a", [ok_row("1", "a"), ok_row("2", "a")], vocabulary=VOCAB)
    run = RunRecord(
        finished_at="2026-11-25T13:00:00+00:00",
        seconds=2.0,
        shards_written=1,
        shards_skipped=2,
        images=2,
        images_per_s=1.0,
    )
    second = write_summary(out, run)
    assert (second.shards, second.images_ok, second.images_error) == (3, 4, 0)
    assert second.masks_per_level == {"stuff": 3, "instance": 4, "part": 1, "subpart": 0}
    assert len(second.runs) == 2 and second.runs[1] == run
    assert (second.seconds, second.images_per_s) == (4.0, 0.75)
    on_disk = json.loads((out / SUMMARY_NAME).read_text())
    assert on_disk == second.to_dict() and read_summary(out) == second
    assert sorted(scan_outputs(out)) == ["a", "b", "c"]
    # Dataset readers of the folder skip the summary (leading underscore).
    assert pq.read_table(out).num_rows == 4
