"""Shared fixtures: where the real sample data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO_SAMPLE = (REPO / ".." / "shared" / "data" / "coco_panoptic_sample").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """The COCO panoptic sample (2 photos + ground truth) beside the checkout."""
    if not COCO_SAMPLE.is_dir():
        pytest.fail(
            f"COCO sample not found at {COCO_SAMPLE}: the shared/ folder must sit beside the repo"
        )
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the tests of one session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fiftyone_db(tmp_path_factory):
    """FiftyOne on the bundled MongoDB, with its data in a temporary folder of this test session."""
    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path_factory.mktemp("fiftyone-db"))
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    import fiftyone as fo

    yield fo
