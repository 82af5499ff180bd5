"""Presets of the released architecture and loading the released checkpoints.

`release_model("r50")` / `release_model("vit_h")` build the shapes of `r50_parts.pth` and
`vit_h_cloud.pth` (BERT-base text encoder; `text="random"` builds it with random weights and
downloads nothing, for benchmarks; a folder or hub name loads pretrained BERT).
`load_release_checkpoint(path)` reads a release `.pth` (weights only), tells R50 from ViT-H,
builds that preset, maps every key (`hipie.release_checkpoint`) and loads it strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hipie.modeling.hipie_release import HipieRelease
from hipie.modeling.language import MAX_QUERY_LEN, RANDOM, ReleaseTextEncoder
from hipie.modeling.resnet import ResNet, ResNetSpec
from hipie.modeling.stuff_branch import StuffBranch
from hipie.modeling.thing_branch import ThingBranch
from hipie.modeling.vit import ViT, ViTSpec
from hipie.release_checkpoint import (
    convert_state_dict,
    read_release_state_dict,
    release_variant,
    resolve_release_path,
)

RELEASE_PRESETS = ("r50", "vit_h")


@dataclass(frozen=True)
class ReleaseSettings:
    """Inference settings of a released config that are not weights."""

    name: str
    min_size_test: int = 1024  # INPUT.MIN_SIZE_TEST
    max_size_test: int = 2048  # INPUT.MAX_SIZE_TEST
    bg_cls_agnostic: bool = False  # TEST.BG_CLS_AGNOSTIC (on in the ViT-H eval config)


SETTINGS = {
    "r50": ReleaseSettings("r50"),  # configs/training/r50_parts.yaml
    # configs/eval/image_joint_vit_huge_32g_pan_maskdino_ade_test.yaml
    "vit_h": ReleaseSettings("vit_h", bg_cls_agnostic=True),
}


def release_model(name: str, *, text: str | Path = RANDOM) -> HipieRelease:
    """The released architecture `name` ("r50" or "vit_h") with random weights (eval mode).

    text: the BERT-base weights: "random" (offline, random), a local folder, or a hub name.
    """
    if name not in SETTINGS:
        raise ValueError(f"unknown release preset {name!r}; choose from {RELEASE_PRESETS}")
    if name == "r50":
        backbone = ResNet(ResNetSpec())
    else:
        backbone = ViT(ViTSpec.preset("huge"))
    channels = tuple(backbone.out_channels[k] for k in ("res3", "res4", "res5"))
    model = HipieRelease(
        backbone=backbone,
        text=ReleaseTextEncoder.build(text, max_query_len=MAX_QUERY_LEN[name]),
        thing=ThingBranch(),
        stuff=StuffBranch(channels),
    )
    model.settings = SETTINGS[name]
    return model.eval()


def load_release_checkpoint(path: str | Path) -> HipieRelease:
    """A released checkpoint (`r50_parts.pth`, `vit_h_cloud.pth`, or a hub `repo_id/filename`)
    as a `HipieRelease` in eval mode, every key mapped and used (else a `ReleaseCheckpointError`
    naming the keys). The BERT weights come from the checkpoint, so nothing is downloaded."""
    state, _training_state = read_release_state_dict(resolve_release_path(path))
    name = release_variant(state)
    model = release_model(name, text=RANDOM)
    converted, _skipped = convert_state_dict(state, model.state_dict())
    model.load_state_dict(converted, strict=True)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (shared modules counted once), as the release's 197.69 M / 805.25 M."""
    return sum(p.numel() for p in model.parameters())
