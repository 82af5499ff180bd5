"""Training configs as files: a JSON / YAML mapping in, a frozen config dataclass out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["config_from_dict", "read_config_file"]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a .json or .yaml/.yml training config."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def config_from_dict(cls, data: Mapping[str, Any], nested: Mapping[str, type] | None = None):
    """``cls(**data)`` for a config dataclass read from a file: lists become tuples, the fields
    in ``nested`` (name -> dataclass) are built from their mappings, and unknown fields are an
    error that names them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise TypeError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    for name, field_cls in (nested or {}).items():
        if isinstance(kwargs.get(name), Mapping):
            kwargs[name] = field_cls(**kwargs[name])
    return cls(**kwargs)
