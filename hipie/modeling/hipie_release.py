"""HIPIE as released (`HIPIE_IMG`): backbone, text, the thing branch and the stuff branch.

One image encoding serves every text pass, as in the release: the backbone, the thing branch's
input projections and the whole MaskDINO stuff branch (which never sees the prompt) depend on the
image only; a pass (things + stuff, parts, a referring expression) runs the text encoder, the thing
branch (VL fusion, deformable encoder and decoder) and the stuff branch's VL-align head.

Parameter names follow the release under these roots (`hipie.release_checkpoint.PREFIXES` maps
the release's keys onto them): `backbone`, `text` (`text.model` = BERT), `input_proj`, `thing`,
`stuff`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hipie.modeling.image_input import PIXEL_MEAN, PIXEL_STD, batch_images, normalize
from hipie.modeling.input_proj import InputProjection
from hipie.modeling.language import GROUNDING_POSITIVE_MAP, ReleaseTextEncoder
from hipie.modeling.maskdino_decoder import MaskDINODecoderOutput
from hipie.modeling.stuff_branch import StuffBranch
from hipie.modeling.thing_branch import ThingBranch, ThingOutputs, grounding_token

BACKBONE_LEVELS = ("res3", "res4", "res5")


@dataclass
class ImageEncoding:
    """Prompt-independent features of a batch of images (padded to a common size)."""

    srcs: list[torch.Tensor]  # thing-branch input levels (B, D, h_l, w_l)
    masks: list[torch.Tensor]  # their padding masks (B, h_l, w_l), True at padding
    stuff: MaskDINODecoderOutput  # the whole MaskDINO branch; only its VL head sees a prompt
    image_sizes: list[tuple[int, int]]  # (h, w) of each image before padding
    images: list[torch.Tensor] | None = None  # the (3, h, w) inputs (for the CLIP ensemble)


@dataclass
class Prompt:
    """One text pass for a batch: a class vocabulary (detection) or an expression (grounding)."""

    tokens: torch.Tensor  # (B, T, text_dim) BERT features, cut to the longest valid prompt
    token_mask: torch.Tensor  # (B, T) bool, True at real tokens
    positive_map: dict[int, list[int]]  # 1-based class id -> token positions
    class_names: list[str]
    is_thing: dict[int, bool] = field(default_factory=dict)  # 1-based class id -> thing?
    grounding: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class PassOutputs:
    """Head outputs of one pass: the thing branch's and the stuff branch's token logits."""

    thing: ThingOutputs
    stuff_token_logits: torch.Tensor  # (B, 300, T') against the pass's class tokens


class HipieRelease(nn.Module):
    """The released HIPIE architecture, at any size (the presets live in `hipie.release_build`)."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        text: ReleaseTextEncoder,
        thing: ThingBranch,
        stuff: StuffBranch,
        hidden_dim: int = 256,
        num_levels: int = 4,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.text = text
        channels = [backbone.out_channels[k] for k in BACKBONE_LEVELS]
        self.input_proj = InputProjection(channels, hidden_dim=hidden_dim, num_levels=num_levels)
        self.thing = thing
        self.stuff = stuff
        # The release pads a batch to a multiple of the backbone's size divisibility: 32 for its
        # ViT, none for its ResNet (one R50 image is not padded at all).
        self.size_divisibility = int(getattr(backbone, "size_divisibility", 32))
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)

    @property
    def device(self) -> torch.device:
        return next(self.thing.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.thing.parameters()).dtype

    # ------------------------------------------------------------------------------ images
    def encode_image(self, images: Sequence[torch.Tensor]) -> ImageEncoding:
        """Backbone, thing input projections and the stuff branch's image part, once per image."""
        normalized = [normalize(x.to(self.device), self.pixel_mean, self.pixel_std) for x in images]
        batch, mask, sizes = batch_images(normalized, self.size_divisibility)
        batch = batch.to(self.dtype)
        feats = self.backbone(batch)
        srcs, masks = self.input_proj([feats[k] for k in BACKBONE_LEVELS], mask)
        mask_features, levels, _ = self.stuff.pixel_decoder(feats)
        stuff = self.stuff.predictor(levels, mask_features)
        return ImageEncoding(srcs, masks, stuff, sizes, list(images))

    # ------------------------------------------------------------------------------ text
    def encode_classes(
        self, class_names: Sequence[str], is_thing: Mapping[int, bool] | None = None
    ) -> Prompt:
        """A class vocabulary as the release prompts it ("a. b. c"), shared by the batch."""
        if not class_names:
            raise ValueError("empty vocabulary: give at least one class name")
        prompt, pmap = self.text.class_prompt(list(class_names))
        if len(pmap) != len(class_names):
            lost = [class_names[c] for c in range(len(class_names)) if c + 1 not in pmap]
            raise ValueError(f"class names with no token in the prompt: {lost}")
        tokens, token_mask = self._encode([prompt])
        return Prompt(tokens, token_mask, pmap, list(class_names), dict(is_thing or {}))

    def encode_expression(self, expressions: Sequence[str]) -> Prompt:
        """Referring expressions, one per image (the release's grounding task)."""
        tokens, token_mask = self._encode(list(expressions))
        return Prompt(tokens, token_mask, dict(GROUNDING_POSITIVE_MAP), ["object"], grounding=True)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text(prompts)
        valid = out["attention_mask"].bool()
        # Padded tokens are masked everywhere downstream; dropping the all-padding tail leaves
        # every output unchanged and saves the fusion attending over 1024 / 4096 positions.
        n = int(valid.sum(-1).max())
        return out["hidden"][:, :n].to(self.dtype), valid[:, :n]

    # ------------------------------------------------------------------------------ a pass
    def forward_pass(self, enc: ImageEncoding, prompt: Prompt) -> PassOutputs:
        """The thing branch and the stuff branch's VL head for one prompt on encoded images."""
        B = enc.srcs[0].shape[0]
        tokens, token_mask = _expand(prompt.tokens, B), _expand(prompt.token_mask, B)
        class_tokens = grounding_token(tokens, token_mask) if prompt.grounding else None
        thing = self.thing(enc.srcs, enc.masks, tokens, token_mask, class_tokens)
        embeds = enc.stuff.class_embeds[-1]
        if prompt.grounding:  # the stuff head scores the pooled expression as one token
            stuff_logits = self.stuff.score(embeds, class_tokens)
        else:  # the text after the thing branch's fusion (the release's "hidden")
            stuff_logits = self.stuff.score(embeds, thing.lang, token_mask)
        return PassOutputs(thing, stuff_logits)


def _expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"a prompt for {x.shape[0]} images does not fit a batch of {batch}")
    return x.expand(batch, *x.shape[1:])
