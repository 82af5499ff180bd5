"""`postprocess_release` against the official `HIPIE_IMG.inference` on more synthetic cases: other
seeds, BG_CLS_AGNOSTIC, and the CLIP ensemble with a stub MaskCLIP (the formulas, the masks each
path classifies and the seen / novel split are the release's). The reference file is made by
`oracle/make_postproc_oracle.py` (see its docstring); this test needs no official code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hipie.clip_release import ClipEnsemble
from hipie.modeling.vl_align import token_to_class_logits
from hipie.postprocess_release import class_logit_modes, postprocess_release
from tests.hipie.release.reference import assert_close
from tests.hipie.release.synthetic_postproc import NUM_BG, synthetic_postproc_inputs

DATA = Path(__file__).parent / "data" / "postproc_oracle"


def stub_clip_logits(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The oracle's stub MaskCLIP (`make_postproc_oracle.stub_clip_logits`): (..., Q, H, W) ->
    (..., Q, C) = 8 mean(sigmoid(mask)) w + b + 2 tanh(max(mask) / 4) v, w, b, v from seed 7."""
    g = torch.Generator().manual_seed(7)
    w, b, v = (torch.randn(num_classes, generator=g) for _ in range(3))
    mean = masks.sigmoid().mean((-2, -1))[..., None]
    peak = torch.tanh(masks.amax((-2, -1)) / 4)[..., None]
    return 8 * mean * w + b + 2 * peak * v


class StubMaskClip:
    def class_probs(self, image, mask_logits, class_names):
        logits = stub_clip_logits(mask_logits, len(class_names))
        return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)


@pytest.fixture(scope="module")
def oracle():
    from safetensors import safe_open

    meta = json.loads(DATA.with_suffix(".json").read_text())
    f = safe_open(str(DATA.with_suffix(".safetensors")), framework="pt")
    return meta, {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("case", ["seed2", "seed3_agnostic", "clip_seed1", "clip_seed4_agnostic"])
def test_against_official_inference(oracle, case):
    meta, t = oracle
    c = meta["cases"][case]
    x = synthetic_postproc_inputs(c["seed"], NUM_BG, 900, 300)
    pmap = {int(k): v for k, v in c["positive_map_label_to_token"].items()}
    is_thing = {int(k): v for k, v in c["is_thing"].items()}
    thing_mode, stuff_mode = class_logit_modes(is_thing, bg_cls_agnostic=c["bg_cls_agnostic"])
    n = len(pmap)
    thing = token_to_class_logits(
        x["box_cls"][:, NUM_BG:], pmap, n, is_thing=is_thing, mode=thing_mode
    )
    stuff = token_to_class_logits(
        x["pred_logits_maskdino"], pmap, n, is_thing=is_thing, mode=stuff_mode
    )
    image = torch.zeros(3, *c["image_size"])
    clip = ClipEnsemble(StubMaskClip(), image, meta["class_names"]) if c["clip"] else None
    if clip is not None:
        assert clip.seen.tolist() == [True, False, True, True, False]
    res = postprocess_release(
        thing[0], x["box_pred"][0, NUM_BG:], x["iou_pred"][0, NUM_BG:], x["mask_pred"][0, NUM_BG:, 0],
        stuff[0], x["pred_masks_maskdino"][0], c["image_size"], c["output_size"], is_thing,
        clip=clip,
    )  # fmt: skip
    inst = res.instances
    assert inst.classes.tolist() == t[f"{case}/classes"].tolist()
    assert_close(inst.scores, t[f"{case}/scores"], f"{case}/scores", rel=1e-6)
    assert float((inst.boxes - t[f"{case}/boxes_xyxy"]).abs().max()) <= 1e-4
    areas = inst.masks.flatten(1).sum(1)
    assert areas.tolist() == t[f"{case}/mask_areas"].tolist()
    packed = np.packbits(inst.masks[areas > 0].numpy(), axis=-1)
    assert np.array_equal(packed, t[f"{case}/masks_nonempty_packbits"].numpy())
    assert_close(res.sem_seg[:, ::4, ::4], t[f"{case}/sem_seg_sub4"], f"{case}/sem", rel=1e-5)
    assert torch.equal(res.sem_seg.argmax(0).to(torch.uint8), t[f"{case}/sem_seg_argmax"])
    assert torch.equal(res.panoptic_seg.to(torch.uint8), t[f"{case}/panoptic_seg"])
    assert res.segments_info == c["segments_info"]
