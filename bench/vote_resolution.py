"""How much the labels of SAM masks change when HIPIE's masks stay at the model's resolution.

Before, the labeler gave HIPIE the full-resolution image and the vote (Eq. 5) used HIPIE's masks
upsampled to the image (bilinear logits for parts, nearest for panoptic segments). Now the decode
task resizes the image to the model's size (PIL, bilinear; JPEGs at a reduced DCT scale) and the
vote uses the model-resolution masks' nearest-neighbour upsampling (exactly, see
`hipie.vote_areas`). This compares the two on generated scenes upscaled to a high-resolution
photo, with the scenes' own masks (things, stuff, parts, subparts) as the SAM masks: how often
the two agree, and how often each gives the scene's true class.

    .venv/bin/python -m bench.vote_resolution --scenes 20
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from hipie import HipiePredictor, build_hipie, rle_torch
from hipie.synthetic.generator import SceneGenerator
from pipeline.sources.decode import decode_image_for_model
from pipeline.vocabulary import load_vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--scale", type=int, default=4, help="upscaling of the 256 x 256 scenes")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vocab = load_vocabulary("synthetic")
    things, stuff, parts = list(vocab.things), list(vocab.stuff), list(vocab.parts)
    options = {
        "thing_parts": dict(vocab.thing_parts) or None,
        "part_groups": dict(vocab.part_groups),
    }
    predictor = HipiePredictor(build_hipie(checkpoint="tiny"))
    side = predictor.config.test_size
    same = {"label": 0, "level": 0, "parent": 0}
    same_masks_only = {"label": 0, "level": 0}
    correct = {"before": 0, "after": 0, "model_resize": 0}
    total, tv, exact_checks = 0, [], 0
    for scene in SceneGenerator(seed=args.seed).scenes(0, args.scenes):
        height, width = (s * args.scale for s in scene.image.shape[:2])
        photo = np.asarray(Image.fromarray(scene.image).resize((width, height), Image.BICUBIC))
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG", quality=95)
        masks = [s.mask for s in scene.segments] + [p.mask for p in scene.parts]
        big = np.stack([np.kron(m, np.ones((args.scale, args.scale), bool)) for m in masks])
        rles = mask_utils.encode(np.asfortranarray(big.transpose(1, 2, 0).astype(np.uint8)))
        sam = [{"size": [height, width], "counts": r["counts"].decode()} for r in rles]

        full = predictor.hierarchy(photo, things, stuff, parts, **options)
        before = predictor.vote_from_hierarchy(full, sam, things)
        small_image, _ = decode_image_for_model(buffer.getvalue(), max_side=side)
        small = predictor.hierarchy(small_image, things, stuff, parts, **options)
        encoded = rle_torch.encode(small.masks, (height, width))
        after = predictor.vote_from_hierarchy(small, sam, things, hipie_rles=encoded.rles)
        grid = predictor.vote_from_hierarchy(small, sam, things, method="grid")
        # the model's own resize (torch, antialiased bilinear) instead of the decode task's:
        # what remains is the masks' resolution alone (and the image's rounding to uint8)
        x = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float()
        size = small_image.shape[:2]
        x = torch.nn.functional.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=True
        )
        same_input = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        small_t = predictor.hierarchy(same_input, things, stuff, parts, **options)
        masks_only = predictor.vote_from_hierarchy(small_t, sam, things)
        for key, a, b in (
            ("label", before.labels, masks_only.labels),
            ("level", before.level, masks_only.level),
        ):
            same_masks_only[key] += sum(x == y for x, y in zip(a, b))
        assert grid.labels == after.labels and torch.allclose(grid.probs, after.probs, atol=1e-6)
        exact_checks += 1
        truth = [s.category for s in scene.segments] + [p.name for p in scene.parts]
        for key, voted in (("before", before), ("after", after), ("model_resize", masks_only)):
            correct[key] += sum(a == b for a, b in zip(voted.labels, truth))
        total += len(sam)
        same["label"] += sum(a == b for a, b in zip(before.labels, after.labels))
        same["level"] += sum(a == b for a, b in zip(before.level, after.level))
        same["parent"] += int((before.parents == after.parents).sum())
        tv.extend((0.5 * (before.probs - after.probs).abs().sum(1)).tolist())
    result = {
        "scenes": args.scenes,
        "image": f"{width} x {height}",
        "sam_masks": total,
        "same_label": round(same["label"] / total, 4),
        "same_level": round(same["level"] / total, 4),
        "same_parent": round(same["parent"] / total, 4),
        "class_distribution_tv_mean": round(float(np.mean(tv)), 4),
        "class_distribution_tv_p95": round(float(np.percentile(tv, 95)), 4),
        "model_resize_same_label": round(same_masks_only["label"] / total, 4),
        "model_resize_same_level": round(same_masks_only["level"] / total, 4),
        "correct_label_before": round(correct["before"] / total, 4),
        "correct_label_after": round(correct["after"] / total, 4),
        "correct_label_model_resize": round(correct["model_resize"] / total, 4),
        "grid_vote_equals_rle_vote": exact_checks,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
