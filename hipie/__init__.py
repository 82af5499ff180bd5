"""HIPIE: hierarchical open-vocabulary universal image segmentation (pure PyTorch).

Public API (imported lazily so that `import hipie` stays light):
    build_hipie, save_checkpoint, HipieConfig, HipieModel, HipiePredictor,
    Segments, SemanticMap, HipieOutput, DecoderOutput, DenoisingMeta, TextFeatures, ImageFeatures
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_hipie": "hipie.build",
    "save_checkpoint": "hipie.build",
    "PRESETS": "hipie.build",
    "HipieConfig": "hipie.config",
    "HipieModel": "hipie.modeling.model",
    "HipiePredictor": "hipie.predictor",
    "Segments": "hipie.predictor",
    "SemanticMap": "hipie.predictor",
    "HipieOutput": "hipie.modeling.outputs",
    "DecoderOutput": "hipie.modeling.outputs",
    "DenoisingMeta": "hipie.modeling.outputs",
    "TextFeatures": "hipie.modeling.text_encoder",
    "ImageFeatures": "hipie.modeling.pixel_decoder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hipie' has no attribute {name!r}")
