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

# The released presets (`random:<name>` in `build_hipie`); `release_model` also builds our
# "tiny" at small size (`random:tiny` still names the older tiny family until it is retired).
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
    # ours: the same architecture at small size, for CPU training on the synthetic scenes
    "tiny": ReleaseSettings("tiny", min_size_test=320, max_size_test=512),
}
TINY_DIM = 64  # hidden width of both branches of the tiny preset
TINY_QUERY_LEN = 256  # its padded prompt length (the release pads to 1024 / 4096)


def release_model(name: str, *, text: str | Path = RANDOM) -> HipieRelease:
    """The released architecture `name` ("r50", "vit_h" or our "tiny") with random weights
    (eval mode).

    text: the BERT weights: "random" (offline, random), a local folder, or a hub name. The tiny
    preset always uses the offline MiniLM (a 384-d BERT of 6 layers, same vocabulary).
    """
    if name not in SETTINGS:
        raise ValueError(f"unknown release preset {name!r}; choose from {sorted(SETTINGS)}")
    if name == "tiny":
        return tiny_release_model()
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


def tiny_release_model() -> HipieRelease:
    """The released architecture at small size (our deviation, for the shipped `tiny` model):
    ResNet-18 (FrozenBN, res3-res5), both branches 64-d with 2 encoder and 3 decoder layers,
    60 + 3 background thing queries and 40 stuff queries, the offline MiniLM as text encoder."""
    from hipie.modeling.text_encoder import minilm_folder

    backbone = ResNet(ResNetSpec(depth=18, res2_channels=64))
    channels = tuple(backbone.out_channels[k] for k in ("res3", "res4", "res5"))
    text = ReleaseTextEncoder.build(minilm_folder(), max_query_len=TINY_QUERY_LEN)
    dim, text_dim = TINY_DIM, text.hidden_size
    thing = ThingBranch(
        dim=dim,
        text_dim=text_dim,
        num_heads=4,
        ffn_dim=256,
        enc_layers=2,
        dec_layers=3,
        num_queries=60,
        num_background=3,
        vl_dim=256,
    )
    stuff = StuffBranch(
        channels,
        dim=dim,
        text_dim=text_dim,
        num_queries=40,
        enc_layers=2,
        dec_layers=3,
        ffn_dim=256,
    )
    model = HipieRelease(backbone=backbone, text=text, thing=thing, stuff=stuff, hidden_dim=dim)
    model.settings = SETTINGS["tiny"]
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


# ------------------------------------------------------------------------------ our format
RELEASE_FORMAT = "hipie-release"


def save_release_folder(model: HipieRelease, out_dir: str | Path, *, source: str = "") -> Path:
    """Write a `HipieRelease` as our checkpoint: `model.safetensors` + `config.json`.

    Shared modules (the release's aliased heads) are stored once (safetensors' `save_model`);
    config.json names the preset, so loading builds that architecture and needs no download.
    The tiny preset's text encoder (the frozen offline MiniLM) is not stored: loading takes it
    from its package.
    """
    import json

    from safetensors.torch import save_model

    settings = getattr(model, "settings", None)
    if settings is None:
        raise ValueError("only the release presets (r50, vit_h) can be saved this way")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = model.text
    if settings.name == "tiny":  # stored without its text encoder, put back right after
        model._modules["text"] = None
    try:
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    finally:
        model._modules["text"] = text
    config = {"format": RELEASE_FORMAT, "preset": settings.name, "converted_from": source}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def is_release_folder(path: str | Path) -> bool:
    """True for a folder written by `save_release_folder`."""
    import json

    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format") == RELEASE_FORMAT
    except (OSError, ValueError):
        return False


def load_release_folder(path: str | Path) -> HipieRelease:
    """A folder written by `save_release_folder` (safetensors only, strict)."""
    import json

    from safetensors.torch import load_model

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    model = release_model(config["preset"], text=RANDOM)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if config["preset"] == "tiny":  # its MiniLM comes from the package (see save_release_folder)
        missing = [k for k in missing if not _is_text(k)]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the {config['preset']} release preset: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval()


def _is_text(key: str) -> bool:
    return key.startswith("text.")
