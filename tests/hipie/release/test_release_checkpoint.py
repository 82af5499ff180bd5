"""Reading release checkpoints: weights only, variant detection, the key table and its errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from hipie.release_checkpoint import (
    ReleaseCheckpointError,
    convert_state_dict,
    map_key,
    read_release_state_dict,
    release_variant,
    resolve_release_path,
)
from tests.hipie.release.reference import key_list


class _Payload:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("unpickled!",))


def test_reads_detectron2_format_and_lists_training_state(tmp_path):
    sd = {"detr.detr.backbone.0.backbone.stem.conv1.weight": torch.ones(2)}
    torch.save(
        {"model": sd, "iteration": 5, "optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "a.pth"
    )
    state, dropped = read_release_state_dict(tmp_path / "a.pth")
    assert list(state) == list(sd) and dropped == ["iteration", "optimizer"]
    assert release_variant(state) == "r50"


def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(ReleaseCheckpointError, match="weights_only=True"):
        read_release_state_dict(path)


@pytest.mark.parametrize("config, variant", [("r50", "r50"), ("vit_h", "vit_h")])
def test_every_release_key_is_mapped_or_skipped(config, variant):
    keys = [e["key"] for e in key_list(config)["entries"]]
    fake = {k: torch.zeros(1) for k in keys}
    assert release_variant(fake) == variant
    skipped = {"criterion._iter", "detr.mask_dino_criterion.empty_weight"}
    assert [k for k in keys if map_key(k) is None and k not in skipped] == []


def test_errors_name_the_keys():
    expected = {
        "thing.iou_head.0.weight": torch.zeros(2, 2),
        "backbone.stem.conv1.weight": torch.zeros(3),
    }
    state = {
        "detr.detr.iou_head.0.weight": torch.ones(2, 2),
        "detr.something_new.weight": torch.ones(1),
        "criterion._iter": torch.zeros(1),
    }
    with pytest.raises(ReleaseCheckpointError) as err:
        convert_state_dict(state, expected)
    msg = str(err.value)
    assert "detr.something_new.weight" in msg and "backbone.stem.conv1.weight" in msg
    state.pop("detr.something_new.weight")
    state["detr.detr.backbone.0.backbone.stem.conv1.weight"] = torch.ones(3)
    out, skipped = convert_state_dict(state, expected)
    assert skipped == ["criterion._iter"] and torch.equal(
        out["thing.iou_head.0.weight"], torch.ones(2, 2)
    )
    state["detr.detr.backbone.0.backbone.stem.conv1.weight"] = torch.ones(4)
    with pytest.raises(ReleaseCheckpointError, match=r"shape mismatches.*\(4,\) vs ours \(3,\)"):
        convert_state_dict(state, expected)


def test_hub_spec_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Hugging Face hub.*Offline"):
        resolve_release_path("berkeley-hipie/HIPIE/r50_parts.pth")
    with pytest.raises(FileNotFoundError, match="no release checkpoint"):
        resolve_release_path("/nonexistent/r50_parts.pth")
