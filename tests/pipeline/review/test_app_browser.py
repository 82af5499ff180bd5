"""A real browser test of the review session: `python -m jobs.review --launch` serves the FiftyOne
App for a small dataset (the COCO sample's two photos and three flat generated scenes with a horse,
a car and a tree), headless Chromium (Debian's `chromium` package: `apt-get install -y chromium`)
takes screenshots, and they must show

- the rendered sample grid, not a blank or loading page;
- the masks of different classes in different colours: on the scenes' black background a mask
  pixel is its class colour (from the dataset's colour scheme) times the App's opacity, and at
  least three class colours must cover many pixels;
- the saved views: the App opened on `?view=needs-review` names that view, and the App's GraphQL
  API lists `needs review`, `errors` and `reviewed`.

`REVIEW_SCREENSHOT=/some/dir` keeps the screenshots there to look at."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import schemas
from schemas import rle
from tests.pipeline.conftest import LABELED_AT, write_labels

CHROMIUM = "/usr/bin/chromium"
FLAT_CLASSES = ("horse", "car", "tree")  # the generated scenes' classes
REPO = Path(__file__).resolve().parents[3]
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


def _grid_drawn(image: np.ndarray) -> bool:
    """The tiles are drawn: many colours, and saturated (mask) pixels over > 2 % of the page."""
    spread = image.max(axis=2).astype(int) - image.min(axis=2).astype(int)
    return len(np.unique(image.reshape(-1, 3), axis=0)) > 2000 and (spread > 100).mean() > 0.02


def _chromium(url: str, tmp: Path, *extra: str, budget: int = 15000) -> subprocess.CompletedProcess:
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
        f"--virtual-time-budget={budget}",
        *extra,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def flat_scene_rows(folder: Path, count: int = 3) -> list[dict]:
    """``count`` black 320 x 240 PNGs, each with a horse, a car and a tree (big rectangles, top-2
    labels) and a part "head" of the horse, as schema-v1 rows in shard "flat"."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = 240, 320
    rows = []
    for k in range(count):
        path = folder / f"flat_{k}.png"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
        masks = []
        boxes = [(10, 20, 90, 200), (115, 40, 95, 160), (220, 10 + 10 * k, 90, 210 - 10 * k)]
        for i, (label, (x, y, bw, bh)) in enumerate(zip(FLAT_CLASSES, boxes)):
            dense = np.zeros((h, w), bool)
            dense[y : y + bh, x : x + bw] = True
            score = 0.5 + 0.1 * i + 0.05 * k
            masks.append(
                schemas.make_mask(
                    mask_id=i,
                    rle=rle.encode(dense),
                    level="instance",
                    label=label,
                    score=score,
                    topk_labels=(label, FLAT_CLASSES[(i + 1) % 3]),
                    topk_scores=(score, 0.3),
                    origin="hipie",
                )
            )
        head = np.zeros((h, w), bool)
        head[20:70, 10:100] = True
        masks.append(
            schemas.make_mask(
                mask_id=3, rle=rle.encode(head), level="part", label="head", score=0.9,
                topk_labels=("head",), topk_scores=(0.9,), parent_id=0, origin="hipie",
            )
        )  # fmt: skip
        rows.append(
            schemas.make_ok_row(
                image_id=f"flat-{k}", uri=str(path), shard="flat", width=w, height=h,
                masks=masks, model="test", vocabulary_hash="flat", labeled_at=LABELED_AT,
            )
        )  # fmt: skip
    return rows


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=float)


def class_pixels(image: np.ndarray, color: str) -> int:
    """Pixels that are ``color`` scaled by an opacity in [0.3, 1] (a mask over black)."""
    c = _hex_rgb(color)
    p = image.reshape(-1, 3).astype(float)
    alpha = p @ c / (c @ c)
    residual = np.linalg.norm(p - alpha[:, None] * c[None], axis=1)
    return int(((alpha > 0.3) & (alpha < 1.05) & (residual < 12)).sum())


def _saved_views_graphql(url: str, dataset: str) -> list[dict]:
    query = "query Q($name: String!) { savedViews(datasetName: $name) { name slug } }"
    body = json.dumps({"query": query, "variables": {"name": dataset}}).encode()
    request = urllib.request.Request(
        f"{url}graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]["savedViews"]


def test_app_shows_the_sample_grid_in_headless_chromium(
    fiftyone_db, dataset_name, coco_rows, tmp_path
):
    rows, vocabulary = coco_rows
    rows = list(rows) + flat_scene_rows(tmp_path / "flat")
    labels = write_labels(rows, tmp_path / "labels", vocabulary)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    view_url = f"{url}datasets/{urllib.parse.quote(dataset_name)}?view=needs-review"
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
    shot, view_shot = tmp_path / "app.png", tmp_path / "needs_review.png"
    try:
        lines = _wait_for_line(proc, f"FiftyOne App: {url}", timeout=60)
        assert any("5 samples" in line for line in lines)
        _wait_http(url, timeout=30)

        # A loaded machine may shoot before the grid's tiles are drawn: shoot again (longer
        # budget) until the tiles show; the assertions below hold on the last picture.
        for attempt in range(3):
            done = _chromium(url, tmp_path, f"--screenshot={shot}", budget=15000 * (attempt + 1))
            assert shot.is_file(), done.stderr[-2000:]
            if _grid_drawn(np.asarray(Image.open(shot).convert("RGB"))):
                break
            time.sleep(5)
        for attempt in range(3):  # the App's script fills the page; a loaded machine is slow
            dom = _chromium(url, tmp_path, "--dump-dom", budget=15000 * (attempt + 1)).stdout
            if dataset_name in dom:
                break
        for attempt in range(3):  # the saved view's grid, shot again while not yet drawn
            budget = 15000 * (attempt + 1)
            done = _chromium(view_url, tmp_path, f"--screenshot={view_shot}", budget=budget)
            assert view_shot.is_file(), done.stderr[-2000:]
            view_picture = np.asarray(Image.open(view_shot).convert("RGB"))
            if len(np.unique(view_picture.reshape(-1, 3), axis=0)) > 2000:
                break
            time.sleep(5)
        for attempt in range(3):
            view_dom = _chromium(view_url, tmp_path, "--dump-dom", budget=15000 * (attempt + 1))
            view_dom = view_dom.stdout
            if "needs review" in view_dom:
                break
        saved = _saved_views_graphql(url, dataset_name)
    finally:
        proc.send_signal(signal.SIGINT)  # jobs.review closes the session and exits
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    keep = os.environ.get("REVIEW_SCREENSHOT")  # a folder, to look at the pictures by hand
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "app.png")
        shutil.copy(view_shot, Path(keep) / "needs_review.png")

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

    # colour by class: each flat class has its own colour in the dataset's scheme, and the
    # screenshot shows each of them over many pixels (one colour per field would show one)
    dataset = fiftyone_db.load_dataset(dataset_name)
    scheme = dataset.app_config.color_scheme
    assert scheme.color_by == "value"
    value_colors = next(f for f in scheme.fields if f["path"] == "instances")["valueColors"]
    class_color = {v["value"]: v["color"] for v in value_colors}
    assert len({class_color[c] for c in FLAT_CLASSES}) == 3
    counts = {c: class_pixels(image, class_color[c]) for c in FLAT_CLASSES}
    assert sum(n > 1500 for n in counts.values()) >= 3, counts

    # the saved views, as the App's API and UI show them
    assert {v["name"] for v in saved} >= {"needs review", "errors", "reviewed"}
    assert {v["slug"] for v in saved} >= {"needs-review", "errors", "reviewed"}
    assert "needs review" in view_dom
    view_image = np.asarray(Image.open(view_shot).convert("RGB"))
    assert len(np.unique(view_image.reshape(-1, 3), axis=0)) > 2000
