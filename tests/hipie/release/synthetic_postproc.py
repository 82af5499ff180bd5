"""The synthetic head outputs of the fixtures' `postproc` pass, re-implemented.

`make_reference.synthetic_postproc_inputs(seed, num_bg, num_fg, num_stuff)` of
`../shared/tools/official_hipie/` documents them (a function of a seed); the compact ViT-H fixture
does not store them, so the tests regenerate them here (checked equal to the stored r50 inputs).
"""

from __future__ import annotations

import torch

NUM_BG = 10  # background queries of the thing branch; `HIPIE_IMG.inference` drops them


def synthetic_postproc_inputs(seed: int, num_bg: int, num_fg: int, num_stuff: int):
    """The fixtures' synthetic head outputs (`make_reference.synthetic_postproc_inputs`, spec in
    its docstring), re-implemented: same generator calls in the same order."""
    g = torch.Generator().manual_seed(seed)
    n_tok, h, w = 12, 24, 32
    nq = num_bg + num_fg
    box_cls = torch.randn(1, nq, n_tok, generator=g) - 8.0
    iou = torch.randn(1, nq, 1, generator=g) * 0.5 + 1.0
    cxcy = torch.rand(1, nq, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(1, nq, 2, generator=g) * 0.3 + 0.05
    box = torch.cat([cxcy, wh], -1)
    masks = torch.randn(1, nq, 1, h, w, generator=g) * 2.0 - 6.0
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32) + 0.5,
        torch.arange(w, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    objects = [  # query, class tokens, cx, cy, radius (cells), logit
        (11, [1], 0.15, 0.25, 4.0, 2.5),
        (57, [3, 4], 0.45, 0.30, 5.0, 2.0),
        (123, [6], 0.80, 0.25, 4.0, 1.5),
        (300, [1], 0.20, 0.75, 5.0, 1.2),
        (450, [3, 4], 0.55, 0.70, 6.0, 3.0),
        (601, [6], 0.85, 0.70, 4.0, 0.8),
        (702, [1], 0.55, 0.72, 2.5, 0.5),
        (777, [3, 4], 0.35, 0.50, 3.0, 0.3),
    ]
    for q, toks, cx, cy, r, logit in objects:
        q = num_bg + q
        box_cls[0, q, toks] = logit
        box[0, q] = torch.tensor([cx, cy, 2 * r / w, 2 * r / h])
        masks[0, q, 0] = 8.0 - 8.0 * ((xx - cx * w) ** 2 + (yy - cy * h) ** 2) / (r * r)
    for q, src, toks, logit in [(12, 11, [1], 2.0), (58, 57, [6], 1.8)]:
        q, src = num_bg + q, num_bg + src
        box_cls[0, q, toks] = logit
        box[0, q] = box[0, src] * torch.tensor([1.0, 1.0, 1.05, 1.05])
        masks[0, q, 0] = masks[0, src, 0] - 0.5
    stuff_cls = torch.randn(1, num_stuff, n_tok, generator=g) - 8.0
    stuff_box = torch.rand(1, num_stuff, 4, generator=g) * 0.5 + 0.25
    stuff_masks = torch.randn(1, num_stuff, h, w, generator=g) * 2.0 - 6.0
    for q, toks, y0, y1, logit in [
        (5, [8], 0.0, 0.2, 2.0),
        (40, [8], 0.15, 0.35, 1.5),
        (77, [10], 0.85, 1.0, 2.2),
        (150, [1], 0.4, 0.6, 3.0),
    ]:
        stuff_cls[0, q, toks] = logit
        stuff_masks[0, q] = torch.where((yy >= y0 * h) & (yy < y1 * h), 6.0, -6.0)
    return {
        "box_cls": box_cls,
        "box_pred": box,
        "mask_pred": masks,
        "iou_pred": iou,
        "pred_logits_maskdino": stuff_cls,
        "pred_boxes_maskdino": stuff_box,
        "pred_masks_maskdino": stuff_masks,
    }
