"""Official `HIPIE_IMG.inference` on synthetic head outputs, with and without the CLIP ensemble.

Not a test: it runs the released code, so it needs the oracle venv and the exported source of
`../shared/tools/official_hipie/` (README there). It writes the small reference file that
`test_postprocess_oracle.py` reads (no official code needed there):

    /work/hipie_ref/venv/bin/python tests/hipie/release/oracle/make_postproc_oracle.py \
        --src /work/hipie_ref/src --out tests/hipie/release/data/postproc_oracle

`HIPIE_IMG.inference` is called unbound on a namespace that holds the inference settings of the
released configs (no model is built). Cases: the synthetic inputs of the fixtures' `postproc`
pass (`make_reference.synthetic_postproc_inputs`) for more seeds, BG_CLS_AGNOSTIC off and on, and
with `MODEL.CLIP.ENABLED` where the MaskCLIP call is a stub whose class logits are a documented
function of each mask (`stub_clip_logits`): the formulas, the masks each path classifies and the
seen / novel split are the release's, only the CLIP network is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.abspath(os.path.join(HERE, "../../../../../shared/tools/official_hipie"))

CLASS_NAMES = ["person", "horse head", "kid,boy", "grass", "lava"]
CASES = [  # name, seed, BG_CLS_AGNOSTIC, CLIP enabled
    ("seed2", 2, False, False),
    ("seed3_agnostic", 3, True, False),
    ("clip_seed1", 1, False, True),
    ("clip_seed4_agnostic", 4, True, True),
]


def stub_clip_logits(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(1, Q, H, W) mask logits -> (1, Q, C) class logits: 8 * mean(sigmoid(mask)) * w_c + b_c +
    2 * tanh(max(mask) / 4) * v_c, with w, b, v ~ N(0, 1) from `torch.Generator().manual_seed(7)`."""
    g = torch.Generator().manual_seed(7)
    w, b, v = (torch.randn(num_classes, generator=g) for _ in range(3))
    mean = masks.sigmoid().mean((-2, -1))[..., None]
    peak = torch.tanh(masks.amax((-2, -1)) / 4)[..., None]
    return 8 * mean * w + b + 2 * peak * v


class StubClip:
    def build_text_embed(self, labels, verbose=False, always_cache=False):
        return torch.zeros(sum(len(x) for x in labels), 4)

    def __call__(self, image, masks, text_embed, labels):
        return {"mask_pred_open_logits": stub_clip_logits(masks, len(labels))}


def fake_model(hipie_img, agnostic: bool, clip: bool):
    from detectron2.projects.hipie.data.datasets.catids import get_openseg_labels

    m = types.SimpleNamespace(
        num_bg=10, ota=True, mode_free_inference=False, max_pool_token_test=True, demo_only=False,
        mask_on=True, mask_stride=4, mask_thres=0.5, transform_eval=True, pano_temp=0.06,
        pano_temp_fg=0.01, object_mask_threshold=0.25, overlap_threshold=0.8,
        use_bg_for_pano=False, bg_cls_agnostic=agnostic, enable_clip=clip, clip_alpha=0.2,
        clip_beta=0.45, clip_fg_a=0.3, clip_fg_b=1.7, clip_agg_mode="MUL", device="cpu",
        detr=types.SimpleNamespace(bg_query_from_lang=False, decouple_decoder=True,
                                   mask_dino_fixed_linear_head=False),
        train_labels=get_openseg_labels("coco_panoptic", prompt_engineered=True),
        clip=StubClip(),
    )  # fmt: skip
    cls = hipie_img.HIPIE_IMG
    for name in ("get_clip_logits", "semantic_inference", "panoptic_inference"):
        setattr(m, name, types.MethodType(getattr(cls, name), m))
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    torch.set_num_threads(2)
    sys.path.insert(0, TOOLS)
    import make_reference
    import shims

    shims.install(args.src)
    import detectron2.projects.hipie  # noqa: F401
    from detectron2.projects.hipie import hipie_img
    from detectron2.projects.hipie.models.ddetrs import segmentation_postprocess
    from detectron2.structures import ImageList

    tensors, meta = {}, {"class_names": CLASS_NAMES, "cases": {}}
    for name, seed, agnostic, clip in CASES:
        x, pmap, is_thing, image_size, out_size = make_reference.synthetic_postproc_inputs(
            seed, 10, 900, 300
        )
        model = fake_model(hipie_img, agnostic, clip)
        labels = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
        output = {k: x[k] for k in ("pred_logits_maskdino", "pred_boxes_maskdino",
                                    "pred_masks_maskdino")}  # fmt: skip
        images = ImageList.from_tensors([torch.zeros(3, *image_size)])
        with torch.no_grad():
            res = hipie_img.HIPIE_IMG.inference(
                model, x["box_cls"], x["box_pred"], x["mask_pred"], [image_size], pmap, len(pmap),
                task="detection", iou_pred=x["iou_pred"], is_thing=[is_thing], sizes=[out_size],
                output=output, bg_queries_lang=None, test_labels=[labels], images=images,
            )[0]  # fmt: skip
            inst = segmentation_postprocess(res["instances"], *out_size)
        masks = inst.pred_masks.to(torch.bool)
        areas = masks.flatten(1).sum(1).long()
        sem = res["sem_seg"]
        t = {  # kept small: masks of non-empty instances only, sem_seg every 4th row / column
            "boxes_xyxy": inst.pred_boxes.tensor,
            "scores": inst.scores,
            "classes": inst.pred_classes.long(),
            "mask_areas": areas,
            "masks_nonempty_packbits": torch.from_numpy(
                np.packbits(masks[areas > 0].numpy(), axis=-1)
            ),
            "sem_seg_sub4": sem[:, ::4, ::4],
            "sem_seg_argmax": sem.argmax(0).to(torch.uint8),
            "panoptic_seg": res["panoptic_seg"][0].to(torch.uint8),
        }
        for k, v in t.items():
            tensors[f"{name}/{k}"] = v.detach().contiguous()
        meta["cases"][name] = {
            "seed": seed, "bg_cls_agnostic": agnostic, "clip": clip,
            "image_size": list(image_size), "output_size": list(out_size),
            "positive_map_label_to_token": {str(k): v for k, v in pmap.items()},
            "is_thing": {str(k): v for k, v in is_thing.items()},
            "segments_info": [dict(d) for d in res["panoptic_seg"][1]],
        }  # fmt: skip
        print(name, len(inst), "instances,", len(res["panoptic_seg"][1]), "segments")
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
