"""The release's thing branch, from projected features and text tokens to per-query outputs.

`ThingBranch` ties together the deformable transformer with early VL fusion
(`thing_transformer.ThingTransformer`), the last decoder layer's heads (VL-align token logits,
box refinement, IoU logit) and the CondInst mask branch (`dynamic_mask`). It mirrors the
`detr` part of the release's `DDETRSegmUniDN` (minus backbone, input projections and the MaskDINO
stuff branch), so its state-dict keys are the release's with the prefixes that
`hipie.release_checkpoint.PREFIXES` maps to `thing.` replaced; like the release, `class_embed` / `bbox_embed` are the same modules
as `transformer.decoder.class_embed` / `.bbox_embed`, so both key names exist.

Query rows: the first `num_background` (10) rows are the background queries, then the 900
two-stage queries; the release's inference drops the background rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hipie.modeling.common import MLP, inverse_sigmoid
from hipie.modeling.deformable_layers import FeatureResizer
from hipie.modeling.dynamic_mask import MaskFeatureHead, dynamic_mask_logits, num_dynamic_params
from hipie.modeling.thing_transformer import ThingTransformer


def grounding_token(tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The referring "token" of the release's grounding task: (B, T, C) -> (B, 1, C).

    Masked average of the BERT features *before* the VL fusion (`MODEL.CLS_POOL_TYPE` average);
    the thing branch scores queries against it instead of the prompt's tokens.
    """
    if token_mask is None:
        return tokens.mean(1, keepdim=True)
    m = token_mask.to(tokens.dtype)
    return ((tokens * m[..., None]).sum(1) / m.sum(-1, keepdim=True))[:, None]


@dataclass
class ThingOutputs:
    """Per-query outputs of the thing branch for a batch; Q = num_background + num_queries."""

    token_logits: torch.Tensor  # (B, Q, T) VL-align logits of the last decoder layer
    # (B, Q, 4) cxcywh normalized to the image before padding (the decoder works in the frame of
    # the valid region; `mask_logits` scales by the unpadded size)
    boxes: torch.Tensor
    iou_logits: torch.Tensor  # (B, Q)
    hidden: torch.Tensor  # (L, B, Q, D) decoder states of every layer
    init_reference: torch.Tensor  # (B, Q, 4)
    inter_references: torch.Tensor  # (L, B, Q, 4); inter_references[-1] equals boxes
    memory: torch.Tensor  # (B, S, D) encoder output
    fused_visual: torch.Tensor  # (B, S, D) image tokens after the VL fusion
    lang: torch.Tensor  # (B, T, text_dim) text tokens after the VL fusion
    enc_class: torch.Tensor  # (B, S) two-stage proposal scores
    enc_boxes: torch.Tensor  # (B, S, 4) two-stage proposal boxes (sigmoid; 1 at invalid tokens)
    topk_proposals: torch.Tensor  # (B, num_queries)
    mask_features: torch.Tensor  # (B, 8, H/8, W/8)
    spatial_shapes: list[tuple[int, int]]
    num_background: int


class ThingBranch(nn.Module):
    """Thing branch of the release (r50 and ViT-H share its shape)."""

    def __init__(
        self,
        *,
        dim: int = 256,
        text_dim: int = 768,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        enc_layers: int = 6,
        dec_layers: int = 6,
        num_levels: int = 4,
        num_points: int = 4,
        num_queries: int = 900,
        num_background: int = 10,
        vl_dim: int = 2048,
        num_vl_layers: int = 1,
    ):
        super().__init__()
        self.transformer = ThingTransformer(
            dim=dim,
            text_dim=text_dim,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            enc_layers=enc_layers,
            dec_layers=dec_layers,
            num_levels=num_levels,
            num_points=num_points,
            num_queries=num_queries,
            num_background=num_background,
            vl_dim=vl_dim,
            num_vl_layers=num_vl_layers,
        )
        # shared with the decoder, as in the release (both key names are in its checkpoints)
        self.class_embed = self.transformer.decoder.class_embed
        self.bbox_embed = self.transformer.decoder.bbox_embed
        self.iou_head = nn.ModuleList(nn.Linear(dim, 1) for _ in range(dec_layers))
        self.controller = MLP(
            in_dim=dim, hidden_dim=dim, out_dim=num_dynamic_params(), num_layers=3
        )
        self.mask_head = MaskFeatureHead(dim)
        # The release's label encoder for training (denoising labels with DYNAMIC_LABEL_ENC, and
        # background queries from text with DDETRS.BG_QUERY_FROM_LANG, off in released configs).
        # Kept so release checkpoints load with every key used; inference never calls it.
        self.resizer = FeatureResizer(text_dim, dim)
        self.num_background = num_background
        self.mask_feat_stride = 8
        self.mask_out_stride = 4

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        class_tokens: torch.Tensor | None = None,
    ) -> ThingOutputs:
        """Run the branch.

        Args:
            srcs: the 4 projected levels, each (B, D, H_l, W_l) (strides 8, 16, 32, 64).
            masks: their padding masks, each (B, H_l, W_l) bool, True at padding.
            tokens: (B, T, text_dim) BERT token features (padded positions zero).
            token_mask: (B, T), nonzero at real tokens; None = all real.
            class_tokens: (B, T', text_dim) what the queries are scored against; default: the
                text tokens after the fusion (detection). Grounding passes `grounding_token`.
        """
        tr = self.transformer(srcs, masks, tokens, token_mask)
        targets = tr.lang if class_tokens is None else class_tokens
        last = tr.hidden.shape[0] - 1
        token_logits, boxes, iou_logits = self.layer_heads(
            tr.hidden, tr.init_reference, tr.inter_references, targets, last
        )

        b, _, d = tr.memory.shape
        levels, start = [], 0
        for h, w in tr.spatial_shapes[:3]:  # strides 8, 16, 32
            levels.append(tr.memory[:, start : start + h * w].transpose(1, 2).reshape(b, d, h, w))
            start += h * w
        return ThingOutputs(
            token_logits=token_logits,
            boxes=boxes,
            iou_logits=iou_logits,
            hidden=tr.hidden,
            init_reference=tr.init_reference,
            inter_references=tr.inter_references,
            memory=tr.memory,
            fused_visual=tr.fused_visual,
            lang=tr.lang,
            enc_class=tr.enc_class,
            enc_boxes=tr.enc_boxes,
            topk_proposals=tr.topk_proposals,
            mask_features=self.mask_head(levels),
            spatial_shapes=tr.spatial_shapes,
            num_background=self.num_background,
        )

    def layer_heads(
        self,
        hidden: torch.Tensor,
        init_reference: torch.Tensor,
        inter_references: torch.Tensor,
        class_tokens: torch.Tensor,
        layer: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token logits (B, Q, T), boxes (B, Q, 4), IoU logits (B, Q)) of one decoder layer.

        The box refines the box that entered the layer, taken *with* its gradient ("look forward
        twice"), as the release's heads do in training and at inference.
        """
        hs = hidden[layer]
        token_logits = self.class_embed[layer](hs, class_tokens)
        prev = init_reference if layer == 0 else inter_references[layer - 1]
        boxes = (self.bbox_embed[layer](hs) + inverse_sigmoid(prev)).sigmoid()
        return token_logits, boxes, self.iou_head[layer](hs)[..., 0]

    def mask_logits(
        self,
        outputs: ThingOutputs,
        rows: torch.Tensor,
        image_size: tuple[int, int],
        batch_index: int = 0,
        layer: int = -1,
    ) -> torch.Tensor:
        """Mask logits at 1/4 of the padded input for chosen queries of one image.

        Args:
            outputs: `forward`'s result.
            rows: (K,) long, indices into the query axis of `outputs` (background rows included:
                the release's two-stage query q is row `num_background + q`).
            image_size: (h, w) of the image before padding: the reference points are scaled by it
                (the release's `image_sizes`).
            layer: decoder layer whose states make the dynamic convs (training supervises every
                layer's masks; inference uses the last).
        Returns:
            (K, H/4, W/4) logits, H, W = 8 x the size of the finest level.
        """
        layer = layer % outputs.hidden.shape[0]
        hs = outputs.hidden[layer, batch_index, rows]
        params = self.controller(hs)
        # the dynamic convs are centred on the boxes that entered the layer
        entering = outputs.init_reference if layer == 0 else outputs.inter_references[layer - 1]
        ref = entering[batch_index, rows, :2]
        h, w = image_size
        centres = ref * torch.tensor([w, h], dtype=ref.dtype, device=ref.device)
        return dynamic_mask_logits(
            outputs.mask_features[batch_index],
            params,
            centres,
            feat_stride=self.mask_feat_stride,
            out_stride=self.mask_out_stride,
        )
