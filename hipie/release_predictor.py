"""What one pass of the released HIPIE returns for an image, as the release's predictor runs it.

`ReleasePredictor(model, min_size=1024, max_size=2048)` resizes as the release does (shortest
edge, PIL bilinear on the uint8 image), encodes the image once and runs passes on it:

- `universal(image, things, stuff)`: one things + stuff pass: the top-k instances (before any
  display threshold), the semantic map and the panoptic segmentation;
- `universal(image, things=[], stuff=["person head", ...])`: the release's part pass;
- `refer(image, expression)`: the grounding top-1;
- `parts(...)`: the demo's part masks inside the instances of a things pass.

`clip=MaskClip(...)` turns on the CLIP ensemble of `vit_h_cloud` (`hipie.clip_release`) for the
detection passes (the release's grounding with CLIP indexes past its queries, so grounding runs
without it). `precision="bf16"` runs the network under bf16 autocast (for GPUs); the
post-processing stays in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hipie.clip_release import DEMO_SETTINGS, ClipEnsemble, ClipEnsembleSettings, MaskClip
from hipie.modeling.hipie_release import HipieRelease, ImageEncoding, Prompt
from hipie.modeling.image_input import resize_shortest_edge
from hipie.modeling.vl_align import token_to_class_logits
from hipie.postprocess_release import (
    DEMO_INSTANCE_THRESHOLD,
    PartMask,
    ReleaseResult,
    class_logit_modes,
    keep_above,
    part_instance_masks,
    postprocess_release,
)


class ReleasePredictor:
    """Image in, the release's outputs out (one image at a time; `encode` + `run` for reuse)."""

    def __init__(
        self,
        model: HipieRelease,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        bg_cls_agnostic: bool | None = None,
        clip: MaskClip | None = None,
        clip_settings: ClipEnsembleSettings = DEMO_SETTINGS,
        precision: str = "fp32",
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        settings = getattr(model, "settings", None)
        self.model = model.eval()
        self.min_size = min_size or (settings.min_size_test if settings else 1024)
        self.max_size = max_size or (settings.max_size_test if settings else 2048)
        if bg_cls_agnostic is None:
            bg_cls_agnostic = bool(settings and settings.bg_cls_agnostic)
        self.bg_cls_agnostic = bg_cls_agnostic
        self.clip, self.clip_settings = clip, clip_settings
        self.precision = precision

    def _autocast(self):
        device = self.model.device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def encode(self, image: np.ndarray) -> tuple[ImageEncoding, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> the image's encoding and its original size."""
        image = np.ascontiguousarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        resized = resize_shortest_edge(image, self.min_size, self.max_size)
        with self._autocast():
            enc = self.model.encode_image([resized])
        return enc, (image.shape[0], image.shape[1])

    @torch.no_grad()
    def run(
        self, enc: ImageEncoding, prompt: Prompt, output_size: tuple[int, int]
    ) -> ReleaseResult:
        """One pass on an encoded image, post-processed as `HIPIE_IMG.inference` does."""
        with self._autocast():
            out = self.model.forward_pass(enc, prompt)
        thing, nb = out.thing, out.thing.num_background
        n = prompt.num_classes
        thing_mode, stuff_mode = class_logit_modes(
            prompt.is_thing, bg_cls_agnostic=self.bg_cls_agnostic
        )
        if prompt.grounding:
            thing_mode = stuff_mode = None
        image_size = enc.image_sizes[0]
        thing_cls = token_to_class_logits(
            thing.token_logits[:, nb:].float(), prompt.positive_map, n,
            is_thing=prompt.is_thing, mode=thing_mode,
        )[0]  # fmt: skip
        rows = torch.arange(nb, thing.token_logits.shape[1], device=thing_cls.device)
        with self._autocast():
            thing_masks = self.model.thing.mask_logits(thing, rows, image_size).float()
        stuff_cls = stuff_masks = None
        if not prompt.grounding:
            stuff_cls = token_to_class_logits(
                out.stuff_token_logits.float(), prompt.positive_map, n,
                is_thing=prompt.is_thing, mode=stuff_mode,
            )[0]  # fmt: skip
            stuff_masks = enc.stuff.pred_masks[0].float()
        clip = None
        if self.clip is not None and not prompt.grounding:
            pixels = enc.images[0].to(thing_cls.device).float() / 255.0  # resized, unpadded
            clip = ClipEnsemble(self.clip, pixels, prompt.class_names, self.clip_settings)
        return postprocess_release(
            thing_cls, thing.boxes[0, nb:].float(), thing.iou_logits[0, nb:].float(), thing_masks,
            stuff_cls, stuff_masks, image_size, output_size, prompt.is_thing,
            task="grounding" if prompt.grounding else "detection", clip=clip,
        )  # fmt: skip

    # ------------------------------------------------------------------------------ tasks
    def universal(
        self, image: np.ndarray, things: Sequence[str], stuff: Sequence[str]
    ) -> ReleaseResult:
        """One things + stuff pass (`things=[]` and part names as stuff: the part pass)."""
        names = list(things) + list(stuff)
        is_thing = {i + 1: i < len(things) for i in range(len(names))}
        enc, size = self.encode(image)
        return self.run(enc, self.model.encode_classes(names, is_thing), size)

    def refer(self, image: np.ndarray, expression: str) -> ReleaseResult:
        """The release's grounding: the one best instance for `expression`."""
        enc, size = self.encode(image)
        return self.run(enc, self.model.encode_expression([expression]), size)

    def parts(
        self,
        image: np.ndarray,
        things: Sequence[str],
        stuff: Sequence[str],
        part_names: Sequence[str],
        *,
        instance_threshold: float = DEMO_INSTANCE_THRESHOLD,
    ) -> tuple[ReleaseResult, ReleaseResult, list[PartMask]]:
        """The demo: a things + stuff pass, a part pass ("<thing> <part>" names, all stuff) on the
        same encoding, and the part masks inside the instances above `instance_threshold`."""
        enc, size = self.encode(image)
        names = list(things) + list(stuff)
        det = self.run(
            enc,
            self.model.encode_classes(names, {i + 1: i < len(things) for i in range(len(names))}),
            size,
        )
        part_prompt = self.model.encode_classes(
            list(part_names), {i + 1: False for i in range(len(part_names))}
        )
        part = self.run(enc, part_prompt, size)
        kept = keep_above(det.instances, instance_threshold)
        masks = part_instance_masks(
            part.sem_seg.argmax(0),
            kept.masks,
            [names[int(c)] for c in kept.classes],
            list(part_names),
        )
        return det, part, masks
