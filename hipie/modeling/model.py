"""HipieModel (Fig. 3): encoders, early fusion, thing and stuff decoders.

F_v = Enc_v(I)                   encode_image  (once per image, shared by every text pass)
F_t = Enc_t(T)                   encode_text   (once per vocabulary)
Things = ThingDecoder(Fusion(F_v, F_t))        decode
Stuff  = StuffDecoder(F_v, F_t)                decode (unfused, Fig. 4c)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hipie.config import HipieConfig
from hipie.modeling.fusion import BiCrossAttentionFusion
from hipie.modeling.outputs import HipieOutput
from hipie.modeling.pixel_decoder import ImageFeatures, PixelDecoder
from hipie.modeling.stuff_decoder import StuffDecoder
from hipie.modeling.text_encoder import TextEncoder, TextFeatures, pool_labels
from hipie.modeling.thing_decoder import ThingDecoder

Prompts = Sequence[str] | Sequence[Sequence[str]] | TextFeatures


class HipieModel(nn.Module):
    """Hierarchical open-vocabulary universal segmentation model."""

    def __init__(
        self,
        *,
        config: HipieConfig,
        image_encoder: nn.Module,
        pixel_decoder: PixelDecoder,
        text_encoder: TextEncoder,
        fusion: BiCrossAttentionFusion | None,
        thing_decoder: ThingDecoder,
        stuff_decoder: StuffDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.pixel_decoder = pixel_decoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.thing_decoder = thing_decoder
        self.stuff_decoder = stuff_decoder
        mean = torch.tensor(config.image_encoder.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(config.image_encoder.pixel_std).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in 0-255 -> normalized float images."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def encode_text(
        self, prompts: Sequence[str] | Sequence[Sequence[str]], *, expression: bool = False
    ) -> TextFeatures:
        """Encode text prompts.

        Args:
            prompts: one vocabulary (a list of labels, shared by the batch, B = 1), a list of
                per-image vocabularies, or (with `expression=True`) one expression per image.
        """
        if expression:
            if isinstance(prompts, str):
                prompts = [prompts]
            return self.text_encoder(list(prompts), expression=True)
        if len(prompts) > 0 and all(isinstance(p, str) for p in prompts):
            prompts = [list(prompts)]
        if len(prompts) == 0:
            raise ValueError("empty vocabulary: give at least one label")
        return self.text_encoder([list(p) for p in prompts])

    def encode_image(
        self, images: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> ImageFeatures:
        """Backbone + pixel decoder.

        Args:
            images: (B, 3, H, W) normalized, H and W multiples of 32.
            padding_mask: (B, H, W) bool, True in the padding; None = no padding.
        """
        H, W = images.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"image size {(H, W)} must be a multiple of 32 (pad the images)")
        if padding_mask is None:
            padding_mask = torch.zeros(
                images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device
            )
        return self.pixel_decoder(self.image_encoder(images), padding_mask)

    def decode(
        self,
        image_feats: ImageFeatures,
        text_feats: TextFeatures,
        *,
        things: bool = True,
        stuff: bool = True,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> HipieOutput:
        """Run the decoders for one text pass.

        Args:
            image_feats: from `encode_image` (B images).
            text_feats: from `encode_text` (B or 1 prompts).
            things, stuff: which decoders to run.
            targets: thing targets for DINO denoising in training, per image
                {"labels": (n,) long into the prompt's labels, "boxes": (n, 4) normalized cxcywh}.
        """
        B = image_feats.memory.shape[0]
        text = text_feats.expand(B)
        mode = self.text_encoder.pooling
        thing_out = stuff_out = None
        if things:
            memory, tokens = image_feats.memory, text.tokens
            if self.fusion is not None:
                memory, tokens = self.fusion(
                    memory,
                    tokens,
                    image_padding_mask=image_feats.padding_mask,
                    text_mask=text.token_mask,
                )
            label_emb = pool_labels(tokens, text.label_tokens, mode)  # B x K x D, from F'_t
            thing_out = self.thing_decoder(image_feats, memory, label_emb, text.label_mask, targets)
        if stuff:
            label_emb = pool_labels(text.tokens, text.label_tokens, mode)  # B x K x D, from F_t
            stuff_out = self.stuff_decoder(
                image_feats, image_feats.memory, label_emb, text.label_mask
            )
        return HipieOutput(things=thing_out, stuff=stuff_out)

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor | Sequence[tuple[int, int]],
        text: Prompts,
        *,
        expression: bool = False,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> HipieOutput:
        """Full forward pass.

        Args:
            images: (B, 3, H, W) normalized (see `normalize`) and zero-padded to multiples of 32.
            image_sizes: (B, 2) valid (height, width) of each image inside the padding.
            text: TextFeatures, or prompts as in `encode_text`.
            targets: see `decode`.
        """
        B, _, H, W = images.shape
        sizes = torch.as_tensor(image_sizes, device=images.device).view(B, 2)
        rows = torch.arange(H, device=images.device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(W, device=images.device)[None, None, :] >= sizes[:, 1, None, None]
        padding_mask = rows | cols  # B x H x W
        feats = self.encode_image(images, padding_mask)
        if not isinstance(text, TextFeatures):
            text = self.encode_text(text, expression=expression)
        return self.decode(feats, text, targets=targets)
