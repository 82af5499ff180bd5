"""The labeling job on a real local Ray cluster: one row per image whatever the input, resume
without duplicates, and survival of a killed labeler actor and a killed driver."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

import schemas
from pipeline.labeling import sinks
from pipeline.labeling.config import LabelJobConfig
from pipeline.labeling.job import run_label_job
from pipeline.vocabulary import Vocabulary
from tests.pipeline.badinputs import build_bad_corpus
from tests.pipeline.label_command import label_command

REPO = Path(__file__).resolve().parents[3]
# No "person"/"bird": nothing is replaced, so every SAM mask comes back as exactly one label.
VOCABULARY = Vocabulary.from_lists(
    things=["robot", "car"], stuff=["sky", "grass"], parts=["head", "wheel"]
)


def _config(inputs, output, **kw) -> LabelJobConfig:
    base = dict(
        inputs=tuple(str(i) for i in inputs),
        output=str(output),
        vocabulary_json=VOCABULARY.to_json(),
        checkpoint="random:tiny",
        batch_size=2,
        actors=1,
        cpus_per_actor=0.5,
        folder_shard_size=4,
    )
    base.update(kw)
    return LabelJobConfig(**base)


def _rows(output) -> list[dict]:
    rows = []
    for path in sorted(Path(output).glob("*.parquet")):
        table, _ = schemas.read_parquet(path)
        schemas.validate_table(table)
        rows.extend(table.to_pylist())
    return rows


def _photo_folder(folder: Path, n: int, size=(48, 64)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return folder


def test_bad_input_corpus_gives_one_row_per_image(ray_local, tmp_path):
    corpus = build_bad_corpus(tmp_path / "corpus")
    out = tmp_path / "labels"
    summary = run_label_job(_config(corpus.inputs, out), progress=False)

    rows = _rows(out)
    by_key = {}
    for r in rows:
        assert (r["shard"], r["image_id"]) not in by_key, "duplicated row"
        by_key[(r["shard"], r["image_id"])] = r
    assert len(rows) == len(corpus.expected)
    by_id = {}
    for r in rows:
        by_id.setdefault(r["image_id"], []).append(r)
    for exp in corpus.expected:
        matches = [r for r in by_id[exp.image_id] if exp.source in _source_of(r, corpus)]
        assert len(matches) == 1, exp
        row = matches[0]
        assert row["status"] == exp.status, (exp, row["error"])
        if exp.status == "error":
            assert exp.reason in row["error"].lower(), (exp, row["error"])
        else:
            assert (row["height"], row["width"]) == exp.size
            if exp.sam_masks is not None:
                assert len(row["masks"]) == exp.sam_masks
                assert {m["origin"] for m in row["masks"]} <= {"sam"}
    assert not corpus.outside.exists()
    written = sorted(p.name for p in out.iterdir())
    assert all(n.endswith(".parquet") for n in written if n != "_summary.json")
    n_ok = sum(e.status == "ok" for e in corpus.expected)
    assert summary.images_ok == n_ok
    assert summary.images_error == len(corpus.expected) - n_ok


def _source_of(row: dict, corpus) -> str:
    if row["uri"].startswith("tar://"):
        return "truncated_tar" if corpus.truncated_tar.name in row["uri"] else "tar"
    return "folder"


def test_rerun_skips_complete_shards_and_overwrite_relabels(ray_local, tmp_path):
    folder = _photo_folder(tmp_path / "photos", 6)
    out = tmp_path / "labels"
    first = run_label_job(_config([folder], out), progress=False)
    assert first.shards == 2 and first.images_ok == 6
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.parquet")}

    again = run_label_job(_config([folder], out), progress=False)
    assert again.runs[-1].shards_written == 0 and again.runs[-1].shards_skipped == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == mtimes
    assert len(_rows(out)) == 6

    relabeled = run_label_job(_config([folder], out, overwrite=True), progress=False)
    assert relabeled.runs[-1].shards_written == 2
    rows = _rows(out)
    assert sorted(r["image_id"] for r in rows) == [f"img_{i:03d}.png" for i in range(6)]
    assert all(r["status"] == "ok" and r["width"] == 64 and r["height"] == 48 for r in rows)


def _labeler_pids() -> list[int]:
    """Processes of live labeler actors (Ray titles its workers "ray::<actor class>...")."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::") and "Labeler" in cmdline:
            pids.append(proc.pid)
    return pids


def test_killed_labeler_actor_is_replaced_and_every_row_written(ray_local, tmp_path):
    n = 12
    folder = _photo_folder(tmp_path / "photos", n)
    out = tmp_path / "labels"
    config = _config([folder], out, folder_shard_size=2, batch_size=1)
    result: dict = {}

    def run():
        try:
            result["summary"] = run_label_job(config, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and thread.is_alive():
        done = len(list(out.glob("*.parquet"))) if out.exists() else 0
        pids = _labeler_pids()
        if done >= 1 and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    thread.join(timeout=400)
    assert killed is not None, "the job finished before an actor could be killed"
    assert "error" not in result, result.get("error")
    rows = _rows(out)
    assert sorted(r["image_id"] for r in rows) == [f"img_{i:03d}.png" for i in range(n)]
    assert all(r["status"] == "ok" for r in rows)
    assert result["summary"].shards == n // 2


def test_killed_driver_then_rerun_has_no_missing_and_no_duplicated_rows(ray_local, tmp_path):
    import ray

    n = 12
    folder = _photo_folder(tmp_path / "photos", n)
    out = tmp_path / "labels"
    address = ray.get_runtime_context().gcs_address
    cmd = label_command(folder, out, "--parts", "head", "--address", address)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(list(out.glob("*.parquet"))) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the driver finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert 1 <= len(before) < n // 2
    for path in out.glob("*.parquet"):  # what was written is complete and valid
        assert sinks.shard_done(out, path.stem)

    vocab = Vocabulary.from_lists(things=["robot", "car"], stuff=["sky"], parts=["head"])
    config = _config([folder], out, folder_shard_size=2, vocabulary_json=vocab.to_json())
    summary = run_label_job(config, progress=False)
    assert summary.runs[-1].shards_skipped == len(before)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert {k: after[k] for k in before} == before  # complete shards were not redone
    rows = _rows(out)
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == [f"img_{i:03d}.png" for i in range(n)]


def test_rerun_ignores_and_removes_orphan_part_files(ray_local, tmp_path):
    """Part files that no record names (left by a killed driver or a dead actor) are never
    counted: the rerun removes them and writes each image exactly once."""
    from pipeline.labeling import parts
    from pipeline.labeling.config import COUNT, END
    from pipeline.sources.listing import list_shards

    folder = _photo_folder(tmp_path / "photos", 4)
    out = tmp_path / "labels"
    config = _config([folder], out, folder_shard_size=2)
    # Orphans for both shards of the folder: bogus error rows, under the real shard names.
    names = [s.name for s in list_shards([str(folder)], shard_size=2)]
    for name, ids in zip(names, (["img_000.png", "img_001.png"], ["img_002.png"])):
        rows = [
            schemas.make_error_row(image_id=i, uri="orphan", shard=name, error="orphan")
            for i in ids
        ]
        batch = schemas.rows_to_table(rows)
        batch = batch.append_column(END, pa.array([False] * len(ids)))
        batch = batch.append_column(COUNT, pa.array([0] * len(ids), pa.int64()))
        parts.write_parts(batch, output=str(out))
    assert len(list((out / parts.PARTS_DIR).rglob("*.parquet"))) == 2

    summary = run_label_job(config, progress=False)
    assert not (out / parts.PARTS_DIR).exists()
    rows = _rows(out)
    assert sorted(r["image_id"] for r in rows) == [f"img_{i:03d}.png" for i in range(4)]
    assert all(r["status"] == "ok" and r["uri"] != "orphan" for r in rows)
    assert summary.shards == 2 and summary.images_ok == 4 and summary.images_error == 0
