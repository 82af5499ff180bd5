"""`ray job submit` as the README shows it, against a real Ray head with token authentication.

The head is started with ``ray start --head --block`` on 127.0.0.1, in its own temporary folder,
on ports of its own (so it never meets the local clusters other tests start), with the project's
environment first on its PATH, the way the README says to start it. ``jobs.label`` is submitted
with ``--working-dir`` through the CLI; the test waits for SUCCEEDED, reads the Parquet rows, and
stops every process of the head (also when the test fails). Ray's token file is a temporary one
(``RAY_AUTH_TOKEN_PATH``): ``~/.ray/auth_token`` is never read or written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import schemas

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the project's environment (not resolved: a venv)
RAY = VENV_BIN / "ray"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop(process: subprocess.Popen, root: Path) -> None:
    """SIGTERM, then SIGKILL, to the head and every process it started (the job's driver runs in
    a session of its own, so process groups are not enough) or that runs in its folder."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    try:
        head = psutil.Process(process.pid)
        procs[head.pid] = head
        procs.update({p.pid: p for p in head.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if str(root) in " ".join(p.info["cmdline"] or []):
            procs[p.pid] = p
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture()
def ray_head():
    """A Ray head with token authentication; yields (dashboard URL, client env, folder)."""
    if not RAY.exists():
        pytest.fail(f"no `ray` command in {VENV_BIN}: install the project (ray[default])")
    try:
        import aiohttp  # noqa: F401  (the job CLI and the dashboard need ray[default])
    except ImportError:
        pytest.fail("ray[default] is not installed: `pip install -e .` installs it")
    # Ray's socket paths must stay under ~108 characters: a short folder under /tmp.
    root = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dash, client, node, obj, agent_grpc, agent_http, metrics, env_agent = _free_ports(9)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # The job's `python` is the first one on the head's PATH: the project's environment first,
    # and nothing else that has a `python` (pyenv shims and the like are left out).
    head_env = {**base, **auth, "PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    log = open(root / "head.log", "wb")  # noqa: SIM115 (closed below)
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    cmd += [f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    cmd += [f"--ray-client-server-port={client}", f"--node-manager-port={node}"]
    cmd += [f"--object-manager-port={obj}", f"--dashboard-agent-grpc-port={agent_grpc}"]
    cmd += [f"--dashboard-agent-listen-port={agent_http}", f"--metrics-export-port={metrics}"]
    cmd += [f"--runtime-env-agent-port={env_agent}", "--min-worker-port=0"]
    cmd += ["--max-worker-port=0", "--num-cpus=2", f"--temp-dir={root}/t"]
    head = subprocess.Popen(
        cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_ready(url, token.read_text(), head, root)
        yield url, {**base, **auth}, root
    finally:
        _stop(head, root)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _client(url: str, token: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})


def _wait_ready(url: str, token: str, head: subprocess.Popen, root: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{_tail(root / 'head.log')}")
        try:
            _client(url, token).list_jobs()
            return
        except Exception:
            time.sleep(2)
    pytest.fail(f"the Ray head did not answer at {url}:\n{_tail(root / 'head.log')}")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_bytes()[-n:].decode(errors="replace") if path.exists() else ""


@pytest.mark.timeout(900)
def test_ray_job_submit_labels_with_token_auth(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    url, client_env, root = ray_head
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img_{i}.png")
    out = tmp_path / "labels"

    # Without RAY_AUTH_MODE=token the CLI sends no token, and the head refuses it.
    without = {k: v for k, v in client_env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(
        [str(RAY), "job", "list", "--address", url],
        env=without, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

    # The README's command: ray job submit --working-dir . -- python -m jobs.label ...
    submission_id = f"label-{secrets.token_hex(4)}"
    cmd = [str(RAY), "job", "submit", "--address", url, "--working-dir", "."]
    cmd += ["--submission-id", submission_id, "--", "python", "-m", "jobs.label"]
    cmd += ["--input", str(images), "--output", str(out), "--things", "robot", "car"]
    cmd += ["--stuff", "sky", "grass", "--parts", "head", "wheel", "--no-progress"]
    submitted = subprocess.run(
        cmd, cwd=REPO, env=client_env, capture_output=True, text=True, timeout=800
    )
    logs = submitted.stdout + submitted.stderr
    client = _client(url, (root / "auth_token").read_text())
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert submitted.returncode == 0, logs[-4000:]
    # the job ran on the project's interpreter (the first `python` on the head's PATH)
    driver_logs = client.get_job_logs(submission_id)
    assert f"jobs.label: python {VENV_BIN / 'python'}," in driver_logs, driver_logs[-3000:]

    files = sorted(out.glob("*.parquet"))
    assert len(files) == 1
    table, info = schemas.read_parquet(files[0])
    schemas.validate_table(table)
    rows = table.to_pylist()
    assert sorted(r["image_id"] for r in rows) == ["img_0.png", "img_1.png", "img_2.png"]
    assert all(r["status"] == "ok" and (r["width"], r["height"]) == (64, 48) for r in rows)
    assert all(r["masks"] for r in rows) and rows[0]["model"] == "hipie:tiny"
    assert info["vocabulary"]["things"] == ["robot", "car"]
