"""COCO-panoptic segment ids <-> PNG colours (id = R + 256 G + 256^2 B), the one copy."""

from __future__ import annotations

import numpy as np

__all__ = ["id_to_rgb", "rgb_to_id"]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO-panoptic PNG colours `(H, W, 3)` uint8 -> segment ids `(H, W)` int64."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids `(H, W)` (< 256^3) -> COCO-panoptic PNG colours `(H, W, 3)` uint8."""
    ids = np.asarray(ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("panoptic ids must be in [0, 256^3)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)
