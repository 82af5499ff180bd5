"""Evaluation metrics of HIPIE (Table 2 of the paper): PQ, mIoU, AP, oIoU, mIoU_PartS.

The functions in `hipie.evaluation.metrics` work on in-memory arrays and COCO-style dicts; the
command line `python -m hipie.evaluate` reads files and calls them.
"""

from hipie.evaluation.metrics import (
    APResult,
    MIoUResult,
    PanopticImage,
    PanopticResult,
    PQSummary,
    coco_ap,
    id_to_rgb,
    miou,
    miou_parts,
    oiou,
    panoptic_quality,
    part_label_map,
    rgb_to_id,
)

__all__ = [
    "APResult",
    "MIoUResult",
    "PQSummary",
    "PanopticImage",
    "PanopticResult",
    "coco_ap",
    "id_to_rgb",
    "miou",
    "miou_parts",
    "oiou",
    "panoptic_quality",
    "part_label_map",
    "rgb_to_id",
]
