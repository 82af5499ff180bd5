"""The release's stuff branch: MaskDINO pixel decoder + decoder + its VL-align class heads.

`StuffBranch.forward(features, tokens)` runs the branch from the backbone features (res3..res5)
to 300 per-query outputs: token logits of the last layer, boxes and 1/4-resolution mask logits.
The branch sees the image only (no language inside MaskDINO); the prompt enters at the end, where
`mask_dino_cls_embed[-1]` (a `VLAlign`) scores the 256-d class embeddings against the tokens.

What the release feeds as `tokens` (`DDETRSegmUniDN.coco_inference`):
- detection (things+stuff pass, part pass): the thing branch's language features *after* its
  VL-fusion encoder (`language_dict_features["hidden"]` returned by the deformable transformer),
  768-d, one row per token;
- grounding: one "token", the masked mean of the BERT features before fusion (`lang_feat_pool`).

Release keys map by prefix (`hipie.release_checkpoint.PREFIXES`, root `stuff.`);
`detr.mask_dino_criterion.*` is training-only.
The 11 VL heads are all loaded; at inference only the last one shapes the outputs ([0..8] score
the auxiliary layers, [9] the two-stage proposals, in training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hipie.modeling.maskdino_decoder import MaskDINODecoder, MaskDINODecoderOutput
from hipie.modeling.maskdino_encoder import MaskDINOEncoder
from hipie.modeling.vl_align import MASKED_LOGIT, VLAlign


@dataclass
class StuffOutputs:
    """Per-query outputs of the stuff branch (B images, Q = 300 queries, T tokens)."""

    token_logits: torch.Tensor  # (B, Q, T) last layer; MASKED_LOGIT at padded tokens
    boxes: torch.Tensor  # (B, Q, 4) cxcywh, normalized to the padded image
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)
    decoder: MaskDINODecoderOutput  # class embeddings, references, top-k, ...
    mask_features: torch.Tensor  # (B, 256, H/4, W/4)
    levels: list[torch.Tensor]  # the encoder's 4 maps, strides 8, 16, 32, 64
    memory: torch.Tensor  # (B, S, 256) encoder output, levels flattened in that order


class StuffBranch(nn.Module):
    """MaskDINO encoder + decoder + 11 VL-align heads, as `HIPIE_IMG` builds them.

    `in_channels` are the backbone widths of res3, res4, res5 (R50 (512, 1024, 2048), ViT-H
    (640, 1280, 1280)); the other sizes are those of the released MaskDINO config.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024, 2048),
        *,
        dim: int = 256,
        text_dim: int = 768,
        num_queries: int = 300,
        enc_layers: int = 6,
        dec_layers: int = 9,
        ffn_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.pixel_decoder = MaskDINOEncoder(
            in_channels, dim=dim, mask_dim=dim, ffn_dim=ffn_dim, num_layers=enc_layers
        )
        self.predictor = MaskDINODecoder(
            dim=dim,
            num_classes=dim,
            mask_dim=dim,
            num_queries=num_queries,
            num_layers=dec_layers,
            ffn_dim=ffn_dim,
            text_dim=text_dim,
        )
        # One head per prediction (initial + dec_layers) plus one for the two-stage proposals.
        self.cls_embed = nn.ModuleList(VLAlign(dim, text_dim) for _ in range(dec_layers + 2))

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> StuffOutputs:
        """Backbone features {"res3", "res4", "res5"} and token features (B, T, 768).

        `token_mask` (B, T) bool, True at real tokens: padded tokens' logits become MASKED_LOGIT
        (the release leaves them as computed; no release output reads them).
        """
        mask_features, levels, memory = self.pixel_decoder(features)
        dec = self.predictor(levels, mask_features)
        return StuffOutputs(
            token_logits=self.score(dec.class_embeds[-1], tokens, token_mask),
            boxes=dec.pred_boxes,
            mask_logits=dec.pred_masks,
            decoder=dec,
            mask_features=mask_features,
            levels=levels,
            memory=memory,
        )

    def score(
        self,
        class_embed: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token logits (B, Q, T) of final class embeddings (B, Q, 256) for a prompt.

        The image part of the branch does not depend on the prompt, so a second prompt on the same
        image (the part pass) can reuse `out.decoder.class_embeds[-1]` and call only this.
        """
        logits = self.cls_embed[-1](class_embed, tokens.to(class_embed.dtype))
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask.bool()[:, None, :], MASKED_LOGIT)
        return logits

    def layer_token_logits(self, out: StuffOutputs, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Token logits of every prediction (initial, then each layer), the release's heads
        `cls_embed[0..L-1]` for the auxiliary ones and `cls_embed[-1]` for the last."""
        embeds = out.decoder.class_embeds
        heads = list(self.cls_embed[: len(embeds) - 1]) + [self.cls_embed[-1]]
        return [head(e, tokens.to(e.dtype)) for head, e in zip(heads, embeds)]
