"""The official-HIPIE reference fixtures and the seeded weight rule, for equivalence tests.

`../shared/tools/official_hipie/README.md` (beside the checkout) specifies the rule: every entry of
a release state dict is drawn from the key list alone, so a test can write a release-format
checkpoint without the official code, load it through `hipie`, and compare against the fixtures in
`../shared/data/official_hipie_ref/<config>/` (made by the official code with the same weights).
This is our implementation of that specification; `test_reference_rule.py` checks it against the
fixtures' SHA-256 digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
SHARED = (REPO / ".." / "shared").resolve()
KEYS_DIR = SHARED / "tools" / "official_hipie" / "keys"
FIXTURES = SHARED / "data" / "official_hipie_ref"
KEY_LISTS = {"r50": "r50_parts", "vit_h": "vit_h"}

_FLOAT = {"float32", "float64", "float16", "bfloat16"}
_EMBEDDINGS = {
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "tgt_embed",
    "tgt_embed_bg",
    "query_feat",
    "query_embed",
    "label_enc",
}
_RESIDUAL_OUT = {"linear2", "output_proj", "out_proj"}
_CONTROLLER = "detr.controller.layers.2"
_COORD_ROWS = [o * 10 + i for o in range(8) for i in (0, 1)]


def require(path: Path) -> Path:
    """`path`, or fail the test saying that shared/ must sit beside the checkout."""
    if not path.exists():
        pytest.fail(f"{path} not found: the shared/ folder must sit beside the repository")
    return path


@lru_cache(maxsize=4)
def key_list(config: str) -> dict:
    """`keys/<name>.json`: 'entries' [{key, shape, dtype}] in state-dict order, 'alias_groups'."""
    return json.loads(require(KEYS_DIR / f"{KEY_LISTS[config]}.json").read_text())


def _kind(key: str, shape: list[int], dtype: str) -> str:
    parts = key.split(".")
    name, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if dtype not in _FLOAT:
        return "zeros"
    if name == "running_var":
        return "u0.5"
    if (name == "weight" and len(shape) == 1) or name in ("gamma_v", "gamma_l"):
        return "one"
    if name == "level_embed":
        return "n1"
    if key.endswith("bg_query_refs.weight"):
        return "u0.05"
    if name == "weight" and len(shape) == 2 and module in _EMBEDDINGS:
        return "n1"
    if name == "log_scale":
        return "mean-1"
    if name == "bias0":
        return "mean-1.5"
    if key == _CONTROLLER + ".weight":
        return "ctrl_w"
    if key == _CONTROLLER + ".bias":
        return "ctrl_b"
    if name == "weight" and len(shape) >= 2 and module in _RESIDUAL_OUT:
        return "fan_in/4"
    if name.endswith("weight") and len(shape) >= 2:
        return "fan_in"
    return "n0.02"


def _draw(key: str, shape: list[int], dtype: str, seed: int, canonical: str) -> torch.Tensor:
    kind = _kind(key, shape, dtype)
    shape = tuple(int(s) for s in shape)
    if kind == "zeros":
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(f"{seed}:{canonical}".encode()))
    f32 = torch.float32
    uniform = kind in ("u0.5", "u0.05")
    x = (torch.rand if uniform else torch.randn)(shape, generator=g, dtype=f32)
    s = torch.tensor(1.0 / math.sqrt(math.prod(shape[1:])), dtype=f32) if len(shape) else None
    if kind == "u0.5":
        x = x + 0.5
    elif kind == "u0.05":
        x = x * 0.9 + 0.05
    elif kind == "one":
        x = x * 0.02 + 1.0
    elif kind == "mean-1":
        x = x * 0.02 + -1.0
    elif kind == "mean-1.5":
        x = x * 0.02 + -1.5
    elif kind == "fan_in":
        x = x * s
    elif kind == "fan_in/4":
        x = x * s * 0.25
    elif kind == "ctrl_w":
        x = x * s
        x[_COORD_ROWS] = x[_COORD_ROWS] / 128.0
    elif kind == "ctrl_b":
        x = x * 0.02
        x[_COORD_ROWS] = x[_COORD_ROWS] / 128.0
        x[168] = x[168] - 1.0
    elif kind == "n0.02":
        x = x * 0.02
    return x.to(getattr(torch, dtype))


def rule_state_dict(config: str, seed: int = 1) -> OrderedDict[str, torch.Tensor]:
    """Every entry of the release state dict of `config` ('r50' or 'vit_h'), filled by the rule."""
    keys = key_list(config)
    canon = {e["key"]: e["key"] for e in keys["entries"]}
    for group in keys.get("alias_groups", []):
        for k in group:
            canon[k] = min(group)
    cache: dict[str, torch.Tensor] = {}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for e in keys["entries"]:
        c = canon[e["key"]]
        if c not in cache:
            cache[c] = _draw(c, e["shape"], e["dtype"], seed, c)
        out[e["key"]] = cache[c]
    return out


def digest(state_dict: OrderedDict[str, torch.Tensor]) -> str:
    """SHA-256 over (key, dtype, shape, raw bytes) of every entry, in order (the fixtures' check)."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def write_release_checkpoint(config: str, path: Path, seed: int = 1) -> Path:
    """The rule's weights saved exactly as a released checkpoint: `{"model": state_dict}`."""
    torch.save({"model": rule_state_dict(config, seed)}, path)
    return path


class Fixture:
    """One fixture folder: `inputs.json` plus the named tensors of `reference.safetensors`."""

    def __init__(self, config_or_dir: str | Path):
        folder = Path(config_or_dir)
        self.dir = require(folder if folder.is_dir() else FIXTURES / str(config_or_dir))
        self.inputs = json.loads((self.dir / "inputs.json").read_text())
        self.summary = json.loads((self.dir / "summary.json").read_text())
        from safetensors import safe_open

        self._file = safe_open(str(self.dir / "reference.safetensors"), framework="pt")
        self.names = set(self._file.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"{name} is not stored in {self.dir}")
        return self._file.get_tensor(name)

    def passes(self) -> dict:
        return self.inputs["passes"]

    def unpack_masks(self, name: str, width: int) -> np.ndarray:
        """`*_packbits` masks (packed along the last axis) back to bool arrays of `width` columns."""
        packed = self[name].numpy()
        return np.unpackbits(packed, axis=-1)[..., :width].astype(bool)


@lru_cache(maxsize=4)
def fixture(config_or_dir: str | Path) -> Fixture:
    """A shipped fixture by config name ("r50", "vit_h") or any fixture folder the tool wrote."""
    return Fixture(config_or_dir)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 1e-4):
    """The fixtures' gate for intermediates: |actual - expected| <= rel * max|expected|."""
    actual = actual.detach().to(torch.float32).cpu()
    expected = expected.to(torch.float32)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    )
    scale = float(expected.abs().max()) or 1.0
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert err <= rel * scale, f"{name}: max |diff| {err:.3g} > {rel} x max|ref| {scale:.3g}"
