"""Labeling into object storage for real: a local S3-compatible server (s3rver, from npm; `make
s3rver`), the labeling job writing there through pyarrow.fs, killed and resumed, then review and
export reading from it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

import schemas
from pipeline.labeling import parts, sinks
from tests.pipeline.label_command import label_command

REPO = Path(__file__).resolve().parents[2]
S3RVER = Path(os.environ.get("S3RVER_BIN", REPO / ".s3rver" / "node_modules" / ".bin" / "s3rver"))
BUCKET = "labels"
# s3rver stores the aws-chunked bodies that newer AWS SDKs send by default (flexible checksums)
# verbatim: ask the SDK in pyarrow for checksums only where S3 requires them.
S3_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(tmp_path, monkeypatch):
    """An s3rver on 127.0.0.1 with an empty bucket; yields the base URI of the bucket."""
    if not S3RVER.exists() or shutil.which("node") is None:
        pytest.skip(f"s3rver not installed at {S3RVER} (run `make s3rver`: npm and node needed)")
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    port = _free_port()
    data = tmp_path / "s3data"
    data.mkdir()
    cmd = [str(S3RVER), "-d", str(data), "-a", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--configure-bucket", BUCKET],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("s3rver did not start")
                time.sleep(0.2)
        yield f"s3://S3RVER:S3RVER@{BUCKET}/{{}}?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        img = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return folder


def _label_cmd(folder: Path, output: str) -> list[str]:
    return label_command(folder, output, "--num-cpus", "2")


def _objects(output: str) -> dict[str, float]:
    """Committed and part objects under ``output``: key -> modification time."""
    fs, base = pafs.FileSystem.from_uri(output)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1 :]: i.mtime for i in infos if i.type == pafs.FileType.File}


def test_label_kill_resume_review_and_export_on_s3(
    s3_server, tmp_path, fiftyone_db, dataset_name, monkeypatch
):
    from jobs import export as export_job
    from jobs import review as review_job

    n = 12
    folder = _photos(tmp_path / "photos", n)
    output = s3_server.format("run1")
    env = {**os.environ, **S3_ENV}

    # 1. a run killed after its first committed shard
    proc = subprocess.Popen(
        _label_cmd(folder, output),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(k.endswith(".parquet") and "/" not in k for k in _objects(output)):
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {k: t for k, t in _objects(output).items() if "/" not in k and k.endswith(".parquet")}
    assert 1 <= len(before) < n // 2
    for key in before:  # what was committed is complete
        assert sinks.shard_done(output, key[: -len(".parquet")])

    # 2. the rerun resumes: committed shards stay, the rest is labeled, no part is left
    done = subprocess.run(
        _label_cmd(folder, output), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    objects = _objects(output)
    assert {k: objects[k] for k in before} == before
    assert not [k for k in objects if k.startswith(parts.PARTS_DIR)]
    shard_keys = sorted(k for k in objects if k.endswith(".parquet"))
    assert len(shard_keys) == n // 2 and "_summary.json" in objects
    rows = []
    for key in shard_keys:
        table, info = schemas.read_parquet(sinks.output_path(output, key[: -len(".parquet")]))
        schemas.validate_table(table)
        assert info["extra"]["n_records"] == table.num_rows == 2
        rows.extend(table.to_pylist())
    assert sorted(r["image_id"] for r in rows) == [f"img_{i:03d}.png" for i in range(n)]
    summary = sinks.read_summary(output)
    assert summary.shards == n // 2 and summary.images_ok == n and len(summary.runs) == 1

    # 3. review and export read the committed shards from the bucket
    # (no --media-dir: labels in a bucket get a local media cache, never an "s3:" folder here)
    monkeypatch.setenv("HIPIE_MEDIA_CACHE", str(tmp_path / "media_cache"))
    monkeypatch.chdir(tmp_path)
    assert review_job.main(["--labels", output, "--dataset", dataset_name]) == 0
    assert not (tmp_path / "s3:").exists()
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert sorted(dataset.values("image_id")) == sorted(r["image_id"] for r in rows)
    target = tmp_path / "export"
    argv = ["--labels", output, "--format", "coco", "--output", str(target)]
    assert export_job.main(argv) == 0
    coco = json.loads((target / "instances.json").read_text())
    assert len(coco["images"]) == n


def test_killed_labeler_actor_on_s3_writes_every_row_once(s3_server, tmp_path):
    """An actor killed mid-run (after the first committed shard): Ray restarts it, the job ends
    well, and the bucket holds every image once, in committed shards, with no part left over."""
    from tests.pipeline.labeling.test_job import _labeler_pids

    n = 12
    folder = _photos(tmp_path / "photos", n)
    output = s3_server.format("actor_kill")
    proc = subprocess.Popen(
        _label_cmd(folder, output),
        cwd=REPO,
        env={**os.environ, **S3_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    killed, deadline = None, time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            committed = [k for k in _objects(output) if k.endswith(".parquet") and "/" not in k]
            pids = _labeler_pids()
            if committed and pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
                break
            time.sleep(0.3)
        assert killed is not None, "the job finished before an actor could be killed"
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    objects = _objects(output)
    assert not [k for k in objects if k.startswith(parts.PARTS_DIR)]
    shard_keys = sorted(k for k in objects if k.endswith(".parquet"))
    assert len(shard_keys) == n // 2
    rows = []
    for key in shard_keys:
        table, _ = schemas.read_parquet(sinks.output_path(output, key[: -len(".parquet")]))
        rows.extend(table.to_pylist())
    assert sorted(r["image_id"] for r in rows) == [f"img_{i:03d}.png" for i in range(n)]
    assert all(r["status"] == "ok" for r in rows)
    assert sinks.read_summary(output).images_ok == n
