"""Read the released HIPIE checkpoints (`r50_parts.pth`, `vit_h_cloud.pth`) into our modules.

A release checkpoint is a detectron2/fvcore file: `{"model": state_dict, ...}` (optimizer,
scheduler and iteration entries may sit beside "model"). It is read with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers, so no
code from the file ever runs. Every official key is mapped by the explicit prefix table
`PREFIXES`; the training-only entries in `SKIPPED` are listed and dropped; any other key that the
table does not map, or that our model does not have, and any key of ours that the file lacks,
fails with a message naming the keys.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

# official key prefix -> our key prefix, first match wins. Every official key of the two released
# configs (keys/r50_parts.json, keys/vit_h.json in the oracle tool) falls under one of these or
# under SKIPPED. Both backbones sit at the same official prefix.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("detr.detr.backbone.0.backbone.", "backbone."),
    ("text_encoder.body.model.", "text.model."),
    ("detr.detr.input_proj.", "input_proj.input_proj."),
    ("detr.detr.transformer.", "thing.transformer."),
    ("detr.detr.class_embed.", "thing.class_embed."),
    ("detr.detr.bbox_embed.", "thing.bbox_embed."),
    ("detr.detr.iou_head.", "thing.iou_head."),
    ("detr.controller.", "thing.controller."),
    ("detr.mask_head.", "thing.mask_head."),
    ("detr.resizer.", "thing.resizer."),
    ("detr.mask_dino_cls_embed.", "stuff.cls_embed."),
    ("detr.mask_dino.", "stuff."),
)

# Entries of a release checkpoint that inference does not use: loss buffers, and BERT's
# position_ids buffer that older transformers saved (a non-persistent buffer today).
SKIPPED: tuple[str, ...] = (
    "criterion._iter",
    "detr.mask_dino_criterion.empty_weight",
    "text_encoder.body.model.embeddings.position_ids",
)

# Top-level entries of a detectron2 checkpoint beside "model" (training state).
TRAINING_STATE = ("optimizer", "scheduler", "iteration", "trainer", "grad_scaler")


class ReleaseCheckpointError(RuntimeError):
    """A file is not a release checkpoint, or its keys do not fit the model."""


def is_release_checkpoint(path: str | Path) -> bool:
    """True for a `.pth` / `.pt` file (a release checkpoint); our checkpoints are folders."""
    p = Path(path)
    return p.suffix in (".pth", ".pt") and not p.is_dir()


def read_release_state_dict(path: str | Path) -> tuple[OrderedDict[str, torch.Tensor], list[str]]:
    """The "model" state dict of a release checkpoint and the top-level entries left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no release checkpoint at {path}")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a class, a truncated file, not a torch file
        raise ReleaseCheckpointError(
            f"{path} could not be read as a checkpoint with torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(blob, Mapping):
        raise ReleaseCheckpointError(f"{path} holds a {type(blob).__name__}, not a state dict")
    if "model" in blob and isinstance(blob["model"], Mapping):
        state, dropped = blob["model"], sorted(k for k in blob if k != "model")
    else:
        state, dropped = blob, []
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ReleaseCheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return OrderedDict(state), dropped


def release_variant(state: Mapping[str, torch.Tensor]) -> str:
    """'vit_h' or 'r50', told from the backbone's keys."""
    if "detr.detr.backbone.0.backbone.patch_embed.proj.weight" in state:
        return "vit_h"
    if "detr.detr.backbone.0.backbone.stem.conv1.weight" in state:
        return "r50"
    raise ReleaseCheckpointError(
        "not a HIPIE release checkpoint: neither a ResNet stem "
        "(detr.detr.backbone.0.backbone.stem.conv1.weight) nor a ViT patch embedding "
        "(detr.detr.backbone.0.backbone.patch_embed.proj.weight)"
    )


def map_key(key: str) -> str | None:
    """Our name of an official key (None when the table has no prefix for it)."""
    for official, ours in PREFIXES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return None


def convert_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[OrderedDict[str, torch.Tensor], list[str]]:
    """Map a release state dict onto our key names.

    Args:
        state: the release "model" state dict.
        expected: our model's state dict (names and shapes to fit).
    Returns:
        (our state dict, the official keys skipped as training-only).
    Raises:
        ReleaseCheckpointError naming unmapped, unexpected, missing or mis-shaped keys.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    skipped, unmapped, unexpected, shapes = [], [], [], []
    for key, value in state.items():
        if key in SKIPPED:
            skipped.append(key)
            continue
        ours = map_key(key)
        if ours is None:
            unmapped.append(key)
        elif ours not in expected:
            unexpected.append(f"{key} -> {ours}")
        elif tuple(expected[ours].shape) != tuple(value.shape):
            shapes.append(f"{key}: {tuple(value.shape)} vs ours {tuple(expected[ours].shape)}")
        else:
            out[ours] = value
    missing = [k for k in expected if k not in out]
    problems = []
    for what, keys in (
        ("official keys the table does not map", unmapped),
        ("official keys our model does not have", unexpected),
        ("shape mismatches", shapes),
        ("keys of our model missing from the checkpoint", missing),
    ):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise ReleaseCheckpointError("release checkpoint does not fit: " + "; ".join(problems))
    return out, skipped


def official_prefixes(root: str) -> tuple[str, ...]:
    """The official key prefixes that the table maps under our module `root` (e.g. "thing")."""
    return tuple(official for official, ours in PREFIXES if ours.startswith(root + "."))


def branch_state_dict(state: Mapping[str, torch.Tensor], root: str) -> dict[str, torch.Tensor]:
    """The entries of a release state dict that the table maps under our module `root`, named as
    that module's own keys (for loading one branch, e.g. "thing" or "stuff", on its own)."""
    out = {}
    for key, value in state.items():
        ours = map_key(key)
        if ours is not None and ours.startswith(root + "."):
            out[ours[len(root) + 1 :]] = value
    return out


_HUB = re.compile(r"^[\w.-]+/[\w.-]+/[\w./-]+\.pth?$")


def resolve_release_path(spec: str | Path) -> Path:
    """A local release checkpoint, or a Hugging Face `repo_id/filename` fetched with hub caching.

    `owner/repo/r50_parts.pth` is looked up locally first; if no such file exists it is
    downloaded with `huggingface_hub.hf_hub_download` (offline: a clear error).
    """
    p = Path(spec)
    if p.is_file():
        return p
    text = str(spec)
    if not _HUB.match(text):
        raise FileNotFoundError(f"no release checkpoint at {p}")
    owner, repo, filename = text.split("/", 2)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=f"{owner}/{repo}", filename=filename))
    except Exception as e:
        raise FileNotFoundError(
            f"{text} is not a local file, and downloading it from the Hugging Face hub "
            f"(repo {owner}/{repo}, file {filename}) failed: {type(e).__name__}: {e}. Offline? "
            "Download the checkpoint where you are online and pass its local path."
        ) from e
