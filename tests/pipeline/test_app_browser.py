"""A real browser test of the review session: `python -m jobs.review --launch` serves the FiftyOne
App for a small dataset, headless Chromium (Debian's `chromium` package: `apt-get install -y
chromium`) takes a screenshot, and the screenshot must show the rendered sample grid, not a blank
or loading page."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.pipeline.conftest import write_labels

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="headless browser test needs Debian's chromium: apt-get install -y chromium",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never printed; output:\n{''.join(lines)}")


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer")
        time.sleep(0.3)


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--window-size=1400,900",
        "--virtual-time-budget=15000",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_app_shows_the_sample_grid_in_headless_chromium(
    fiftyone_db, dataset_name, coco_rows, tmp_path
):
    rows, vocabulary = coco_rows
    labels = write_labels(rows, tmp_path / "labels", vocabulary)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "jobs.review", "--labels", str(labels)]
    command += ["--dataset", dataset_name, "--launch", "--port", str(port)]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=dict(os.environ),  # FIFTYONE_DATABASE_DIR of this test session
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _wait_for_line(proc, f"FiftyOne App: {url}", timeout=60)
        assert any("2 samples" in line for line in lines)
        _wait_http(url, timeout=30)

        shot = tmp_path / "app.png"
        done = _chromium(url, tmp_path, f"--screenshot={shot}")
        assert shot.is_file(), done.stderr[-2000:]
        dom = _chromium(url, tmp_path, "--dump-dom").stdout
    finally:
        proc.send_signal(signal.SIGINT)  # jobs.review closes the session and exits
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    keep = os.environ.get("REVIEW_SCREENSHOT")  # e.g. to look at the picture by hand
    if keep:
        shutil.copy(shot, keep)

    # the App itself rendered (not an error page) and knows the dataset
    assert dataset_name in dom
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (900, 1400, 3)
    # the grid: the two photos' tiles are full of colours, a loading page has a handful
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 2000, len(colours)
    # the labels: FiftyOne draws masks in saturated colours over the photos; count pixels whose
    # channels spread widely (the App's dark chrome is grey and text is near white)
    spread = image.max(axis=2).astype(int) - image.min(axis=2).astype(int)
    assert (spread > 100).mean() > 0.02
