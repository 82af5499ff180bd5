"""The CLIP ensemble of the released ViT-H eval config (`MODEL.CLIP.ENABLED`), as functions.

The release (`HIPIE_IMG.get_clip_logits`, `open_vocab/clip.py`, after ODISE) classifies each
query's mask a second time with a frozen OpenAI CLIP (`MODEL.CLIP.NAME` = "ViT-L-14-336", built by
open_clip with `pretrained="openai"`, i.e. QuickGELU; its weights are not in the checkpoint) and
blends the two class distributions per class, geometrically:

    ensemble logit = log(p ** (1 - a) * q ** a),  a = alpha (class seen in COCO-panoptic training)
                                                     or beta (novel class)

- instances: p = softmax(sigmoid(logits) / T_fg) (sigmoid when there is one class), q = CLIP on
  the 900 thing queries' mask logits (1/4 of the padded input, not cropped: a release quirk);
  prob = sqrt(sigmoid(ensemble) ** 0.3 * sigmoid(iou) ** 1.7), 0 for masked classes;
- panoptic / semantic: p = softmax(sigmoid(logits) / 0.06), q = CLIP on the upsampled, cropped
  masks of [NMS-kept things; stuff]; probs = softmax(ensemble).

Mask pooling is MaskCLIP, not dense-feature averaging: the image (resized image / 255, squashed
to 336 x 336) runs through the CLIP ViT with one extra token per mask, a copy of the class token
after `ln_pre`; mask tokens attend to the class token and to the patches where the max-pooled
sigmoid(mask) reaches 0.5 (patch grid = conv1 stride), nothing attends to mask tokens; each mask
token then goes through `ln_post` and `proj`. Logits are cos(mask, text) x min(exp(logit_scale),
100), max over a class's synonyms (its name split at ","), each prompted "a photo of a {}.".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hipie.clip_seen_labels import COCO_PANOPTIC_TRAIN_NAMES
from hipie.postprocess_release import MASKED_LOGIT, PANO_TEMPERATURE

__all__ = [
    "CLIP_MODEL_NAME",
    "CLIP_RANDOM_MODEL_NAME",
    "DEMO_SETTINGS",
    "EVAL_SETTINGS",
    "ClipEnsemble",
    "ClipEnsembleSettings",
    "MaskClip",
    "clip_instance_probs",
    "clip_panoptic_probs",
    "ensemble_log_probs",
    "prompt_texts",
    "seen_classes",
]

# `MODEL.CLIP.NAME`; open_clip with pretrained="openai" builds it with QuickGELU, so a random
# model of the same architecture is `CLIP_RANDOM_MODEL_NAME` with pretrained=None.
CLIP_MODEL_NAME = "ViT-L-14-336"
CLIP_PRETRAINED = "openai"
CLIP_RANDOM_MODEL_NAME = "ViT-L-14-336-quickgelu"
PROMPT_TEMPLATE = "a photo of a {}."
LOGIT_SCALE_MAX = 100.0
# CLIP's patch tokens of a mask are visible to its mask token where max-pooled sigmoid >= 0.5.
PATCH_MASK_THRESHOLD = 0.5
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipEnsembleSettings:
    """alpha (seen classes), beta (novel classes), the instance-path temperature
    (`PANO_TEMPERATURE_CLIP_FG`), the IoU exponents (`FG_IOU_A/B`), `AGG_MODE`."""

    alpha: float
    beta: float
    fg_temperature: float
    iou_a: float = 0.3
    iou_b: float = 1.7
    agg_mode: str = "MUL"
    pano_temperature: float = PANO_TEMPERATURE


# The demo (`build_standard_demo`) overrides the config: these are the labels users see.
DEMO_SETTINGS = ClipEnsembleSettings(alpha=0.2, beta=0.45, fg_temperature=0.01)
# `configs/eval/image_joint_*_ade_test.yaml` (ALPHA 0.4, BETA 0.45, PANO_TEMPERATURE_CLIP_FG 0.06).
EVAL_SETTINGS = ClipEnsembleSettings(alpha=0.4, beta=0.45, fg_temperature=0.06)


# ------------------------------------------------------------------------------------------------
# The formulas


def ensemble_log_probs(
    p: torch.Tensor,
    q: torch.Tensor,
    seen: torch.Tensor,
    alpha: float,
    beta: float,
    *,
    agg_mode: str = "MUL",
) -> torch.Tensor:
    """(..., C) log(p^(1-a) q^a) with a = alpha where `seen` (C,) else beta ("MUL", released);
    "ADD": log(p (1-a) + q a + 1e-9).

    Computed as the release does, as two masked terms; a zero factor times an infinite log gives
    NaN there too (q underflows to 0 only with extreme CLIP logits).
    """
    seen = seen.to(device=p.device, dtype=torch.long)
    if agg_mode == "MUL":
        base = (p ** (1 - alpha) * q**alpha).log() * seen
        novel = (p ** (1 - beta) * q**beta).log() * (1 - seen)
    elif agg_mode == "ADD":
        base = (p * (1 - alpha) + q * alpha + 1e-9).log() * seen
        novel = (p * (1 - beta) + q * beta + 1e-9).log() * (1 - seen)
    else:
        raise ValueError(f"agg_mode must be 'MUL' or 'ADD', not {agg_mode!r}")
    return base + novel


def clip_instance_probs(
    class_logits: torch.Tensor,
    iou_logits: torch.Tensor,
    clip_probs: torch.Tensor,
    seen: torch.Tensor,
    settings: ClipEnsembleSettings = DEMO_SETTINGS,
) -> torch.Tensor:
    """(Q, C) instance probs with CLIP: sqrt(p_clip ** iou_a * sigmoid(iou) ** iou_b).

    p_clip = sigmoid(ensemble_log_probs(p, q)) x (class not masked); p = softmax(sigmoid(logits)
    / fg_temperature) over the classes (sigmoid with one class); the mask of masked classes is
    read from the first query's row, as the release. Feed the result to
    `postprocess_instances(..., probs=...)`.
    """
    valid = (class_logits[:1] != MASKED_LOGIT).float()
    if class_logits.shape[-1] > 1:
        p = F.softmax(class_logits.sigmoid() / settings.fg_temperature, dim=-1)
    else:
        p = class_logits.sigmoid()
    log_probs = ensemble_log_probs(
        p, clip_probs, seen, settings.alpha, settings.beta, agg_mode=settings.agg_mode
    )
    prob = log_probs.sigmoid() * valid
    iou = iou_logits.reshape(-1, 1).sigmoid()
    return torch.sqrt(prob**settings.iou_a * iou**settings.iou_b)


def clip_panoptic_probs(
    class_logits: torch.Tensor,
    clip_probs: torch.Tensor,
    seen: torch.Tensor,
    settings: ClipEnsembleSettings = DEMO_SETTINGS,
) -> torch.Tensor:
    """(Q, C) semantic / panoptic probs with CLIP: softmax(ensemble_log_probs(p, q)) with
    p = softmax(sigmoid(logits) / pano_temperature); `class_logits` = [NMS-kept things; stuff]."""
    p = F.softmax(class_logits.sigmoid() / settings.pano_temperature, dim=-1)
    log_probs = ensemble_log_probs(
        p, clip_probs, seen, settings.alpha, settings.beta, agg_mode=settings.agg_mode
    )
    return log_probs.softmax(-1)


def seen_classes(class_names: Sequence[str], train_names: Iterable[str]) -> torch.Tensor:
    """(C,) bool: a class is seen when one of its synonyms (name split at ",") is a synonym of a
    training class. The release's training vocabulary is COCO-panoptic with OpenSeg's prompt-
    engineered synonyms (`hipie.clip_seen_labels.COCO_PANOPTIC_TRAIN_NAMES`)."""
    train = {s for name in train_names for s in name.split(",")}
    return torch.tensor([not train.isdisjoint(name.split(",")) for name in class_names])


def prompt_texts(class_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """CLIP prompts of every synonym, flat, and the number of synonyms per class."""
    synonyms = [name.split(",") for name in class_names]
    return [PROMPT_TEMPLATE.format(s) for group in synonyms for s in group], [
        len(g) for g in synonyms
    ]


# ------------------------------------------------------------------------------------------------
# MaskCLIP on an open_clip model


class MaskClip:
    """Mask-token CLIP classification on an open_clip `CLIP` model (any ViT with a class token).

    `model`: e.g. `open_clip.create_model(CLIP_MODEL_NAME, pretrained=CLIP_PRETRAINED)` for the
    release, `open_clip.create_model(name, pretrained=None)` for random weights. `tokenizer`:
    defaults to `open_clip.tokenize` (what the release calls).
    """

    def __init__(self, model, tokenizer=None, mean=OPENAI_MEAN, std=OPENAI_STD):
        visual = model.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "class_embedding"):
            raise ValueError("MaskClip needs a ViT with a class token and no attention pooling")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._text_cache: dict[tuple[str, ...], tuple[torch.Tensor, list[int]]] = {}

    def to(self, device: str | torch.device) -> MaskClip:
        """Move the CLIP model (and the pixel statistics) to `device`."""
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        self._text_cache.clear()
        return self

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    @torch.no_grad()
    def text_embeddings(self, class_names: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(T, D) `encode_text` of every prompted synonym, and the synonyms per class (cached)."""
        key = tuple(class_names)
        if key in self._text_cache:
            return self._text_cache[key]
        texts, counts = prompt_texts(class_names)
        if self.tokenizer is None:
            import open_clip

            tokens = open_clip.tokenize(texts)
        else:
            tokens = self.tokenizer(texts)
        device = self.model.logit_scale.device
        self._text_cache[key] = (self.model.encode_text(tokens.to(device)), counts)
        return self._text_cache[key]

    @torch.no_grad()
    def mask_embeddings(self, image: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) CLIP embeddings of masks: `image` (B, 3, h, w) RGB in [0, 1], `mask_logits`
        (B, Q, h', w'); both are resized (bilinear) to the CLIP input size."""
        visual = self.model.visual
        image = F.interpolate(image, size=self.image_size, mode="bilinear", align_corners=False)
        image = (image - self.mean.to(image)) / self.std.to(image)
        masks = F.interpolate(mask_logits, size=image.shape[-2:], mode="bilinear",
                              align_corners=False)  # fmt: skip
        patch = F.max_pool2d(masks.sigmoid(), kernel_size=visual.conv1.kernel_size,
                             stride=visual.conv1.stride)  # fmt: skip
        batch, num_masks = masks.shape[:2]
        hidden_patch = (patch < PATCH_MASK_THRESHOLD).reshape(batch, num_masks, -1)

        x = visual.conv1(image.to(visual.conv1.weight.dtype))
        x = x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        n_img = x.shape[1]  # class token + patches
        x = torch.cat([x[:, :1].expand(-1, num_masks, -1), x], dim=1)

        # True = may not attend. Nothing attends to mask tokens; a mask token sees the class token
        # and its mask's patches.
        total = num_masks + n_img
        blocked = torch.zeros(batch, total, total, dtype=torch.bool, device=x.device)
        blocked[:, :, :num_masks] = True
        blocked[:, :num_masks, num_masks + 1 :] = hidden_patch
        x = _run_blocks(visual.transformer.resblocks, x, blocked)
        x = visual.ln_post(x[:, :num_masks])
        if visual.proj is not None:
            x = x @ visual.proj
        return x

    @torch.no_grad()
    def class_logits(
        self, mask_embed: torch.Tensor, text_embed: torch.Tensor, counts: Sequence[int]
    ) -> torch.Tensor:
        """(B, Q, C) cos(mask, text) x logit scale, max over each class's synonyms."""
        sims = torch.einsum(
            "bqd,td->bqt", F.normalize(mask_embed, dim=-1), F.normalize(text_embed, dim=-1)
        )
        sims = sims * self.logit_scale
        return torch.stack([g.amax(-1) for g in sims.split(list(counts), dim=-1)], dim=-1)

    def class_probs(
        self, image: torch.Tensor, mask_logits: torch.Tensor, class_names: Sequence[str]
    ) -> torch.Tensor:
        """(Q, C) q of one image: softmax over classes of `class_logits` (sigmoid with one class).

        `image` (3, h, w) or (1, 3, h, w): the resized, unpadded image / 255 (RGB); `mask_logits`
        (Q, h', w') as the release passes them (see the module docstring).
        """
        if image.dim() == 3:
            image = image[None]
        text, counts = self.text_embeddings(class_names)
        logits = self.class_logits(self.mask_embeddings(image, mask_logits[None]), text, counts)[0]
        return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)


class ClipEnsemble:
    """The release's CLIP ensemble for one image, for `postprocess_release(..., clip=...)`.

    `image`: (3, h, w) RGB in [0, 1], the resized image before padding (the release's
    `x["image"] / 255`); `class_names`: the pass's classes (synonyms joined by ","); `seen`
    (C,) bool, default: `seen_classes` against the release's COCO-panoptic vocabulary.

    For detection passes only. With CLIP on, the release's grounding pass (one class) is scored
    against the `open_seg_labels` the demo passes (the 133 COCO-panoptic classes): probs become
    (Q, 133) and its top-1 takes kept query number `flat index` of (kept query x 133) (the index
    is divided by 1, the prompt's class count), an IndexError when that exceeds the kept count
    (checked with the official code). That is a bug, not a method: run grounding without CLIP.
    """

    def __init__(
        self,
        maskclip: MaskClip,
        image: torch.Tensor,
        class_names: Sequence[str],
        settings: ClipEnsembleSettings = DEMO_SETTINGS,
        seen: torch.Tensor | None = None,
    ):
        self.maskclip = maskclip
        self.image = image
        self.class_names = list(class_names)
        self.settings = settings
        if seen is None:
            seen = seen_classes(self.class_names, COCO_PANOPTIC_TRAIN_NAMES)
        self.seen = seen

    def instance_probs(
        self, class_logits: torch.Tensor, iou_logits: torch.Tensor, mask_logits: torch.Tensor
    ) -> torch.Tensor:
        """`clip_instance_probs` with q from the thing queries' (Q, h, w) mask logits as they
        leave the mask head (1/4 of the padded input)."""
        q = self.maskclip.class_probs(self.image, mask_logits, self.class_names)
        return clip_instance_probs(class_logits, iou_logits, q, self.seen, self.settings)

    def panoptic_probs(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """`clip_panoptic_probs` with q from (Q, h_img, w_img) upsampled, cropped mask logits."""
        q = self.maskclip.class_probs(self.image, mask_logits, self.class_names)
        return clip_panoptic_probs(class_logits, q, self.seen, self.settings)


def _run_blocks(blocks, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """open_clip's `ResidualAttentionBlock`s on (B, L, D) tokens with a boolean (B, L, L) mask.

    The release passes the boolean mask to open_clip 2.0.2, whose blocks hand it to
    `nn.MultiheadAttention` as is; open_clip >= 2.2x casts masks to float (True -> +1.0, which
    would turn blocking into a bias), so the blocks are run here with the mask kept boolean.
    """
    for blk in blocks:
        attn = blk.attn
        if not isinstance(attn, torch.nn.MultiheadAttention):
            raise ValueError(f"unsupported attention block {type(attn).__name__}")
        heads = attn.num_heads
        mask = blocked.repeat_interleave(heads, dim=0)  # (B * heads, L, L), batch-major
        h = blk.ln_1(x)
        if not attn.batch_first:
            h = h.transpose(0, 1)
        out = attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        if not attn.batch_first:
            out = out.transpose(0, 1)
        x = x + _maybe(blk, "ls_1")(out)
        x = x + _maybe(blk, "ls_2")(blk.mlp(blk.ln_2(x)))
    return x


def _maybe(module, name: str):
    return getattr(module, name, None) or (lambda t: t)
