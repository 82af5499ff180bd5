"""The stuff branch's query decoder: the release's `MaskDINODecoder` at inference (no denoising).

Two-stage query selection over the four encoder levels (top 300 proposals), nine deformable
decoder layers with iterative box refinement, and per-query 256-d class embeddings (the release's
`class_embed` is a 256 -> 256 linear map whose output the VL-align heads score against the prompt
tokens, see `stuff_branch.py`), boxes and 1/4-resolution mask logits. Parameter names are the
release's (`detr.mask_dino.predictor.*` drops its prefix), including the 19 names of the one box
MLP (`_bbox_embed`, `bbox_embed.N`, `decoder.bbox_embed.N`) and the two of the final LayerNorm
(`decoder_norm`, `decoder.norm`); the denoising label encoder `resizer` is kept for its keys only.

Quirks of the release kept here:
- The decoder reads the encoder levels in reverse (stride 64 first), so proposal sizes
  0.05 * 2**level grow towards the *finer* levels.
- Proposals too close to the border keep their class score: they can enter the top-k with memory 0
  and an infinite (unsigmoided) box, i.e. a reference box of 1.0.
- The top-k ranks proposals by the max over the 256 channels of the class *embedding*, not by a
  class probability.
- Each decoder output passes `decoder_norm` twice before the heads (once as the decoder's own
  final norm, once in the prediction heads).
- The reported boxes apply the shared box MLP to the *normalized* layer outputs, whereas the
  decoder's own reference updates apply it to the raw outputs: `pred_boxes` differs from the last
  decoder reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hipie.modeling.common import MLP, inverse_sigmoid, sine_embed
from hipie.modeling.deformable_layers import DeformableDecoderLayer, FeatureResizer


@dataclass
class StuffPrediction:
    """One prediction set of the decoder, as the training loss reads it."""

    class_embed: torch.Tensor  # (B, Q, D) before VL alignment
    boxes: torch.Tensor  # (B, Q, 4) cxcywh in [0, 1]
    masks: torch.Tensor  # (B, Q, H/4, W/4) logits


@dataclass
class MaskDINODecoderOutput:
    """Per-query outputs of the last decoder layer plus the intermediates the fixtures store.

    `class_embeds` holds the 256-d class embeddings of every prediction: the initial one (selected
    proposals) then one per decoder layer; the last is the final `pred_logits` before VL alignment.
    """

    class_embeds: list[torch.Tensor]  # (num_layers + 1) x (B, Q, D)
    pred_boxes: torch.Tensor  # (B, Q, 4) cxcywh in [0, 1]
    pred_masks: torch.Tensor  # (B, Q, H/4, W/4)
    hidden: torch.Tensor  # (B, Q, D) last layer output after the decoder's norm
    references: torch.Tensor  # (num_layers + 1, B, Q, 4) reference boxes (sigmoid space)
    enc_class_max: torch.Tensor  # (B, S) proposal score used by the top-k
    topk_indices: torch.Tensor  # (B, Q) selected proposals (decoder level order)
    # Training mode only: every prediction in decoder order (the initial one, then each layer;
    # the last equals the outputs above) and the two-stage proposals (`interm_outputs`).
    predictions: list[StuffPrediction] | None = None
    proposals: StuffPrediction | None = None


class _DecoderStack(nn.Module):
    """The release's `TransformerDecoder` container: `layers`, `norm`, `ref_point_head`,
    `bbox_embed` (the last two shared with the parent, as in the release)."""

    def __init__(
        self, layers: Sequence[DeformableDecoderLayer], norm: nn.LayerNorm, dim: int
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.ref_point_head = MLP(in_dim=2 * dim, hidden_dim=dim, out_dim=dim, num_layers=2)
        self.bbox_embed: nn.ModuleList | None = None


def box_sine_embed(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """DINO's `gen_sineembed_for_position` of cxcywh boxes: blocks ordered (y, x, w, h)."""
    return sine_embed(boxes[..., [1, 0, 2, 3]], dim // 2)


def encoder_proposals(memory: torch.Tensor, shapes: torch.Tensor):
    """`gen_encoder_output_proposals` without padding: one box per pixel of each level.

    Returns the memory zeroed at invalid proposals and the unsigmoided boxes (inf where invalid,
    i.e. any coordinate outside (0.01, 0.99)).
    """
    boxes = []
    for lvl, (h, w) in enumerate(shapes.tolist()):
        ys = torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device)
        xs = torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        scale = torch.tensor([w, h], dtype=torch.float32, device=memory.device)
        grid = (torch.stack([grid_x, grid_y], -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        boxes.append(torch.cat([grid, wh], -1).view(-1, 4))
    props = torch.cat(boxes, 0)[None].expand(memory.shape[0], -1, -1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props)).masked_fill(~valid, float("inf"))
    return memory.masked_fill(~valid, 0.0), props.to(memory.dtype)


class MaskDINODecoder(nn.Module):
    """`forward(levels, mask_features) -> MaskDINODecoderOutput`.

    `levels` are the pixel decoder's four maps in its order (strides 8, 16, 32, 64), each
    (B, D, H, W); `mask_features` is (B, mask_dim, H/4, W/4).
    """

    def __init__(
        self,
        *,
        dim: int = 256,
        num_classes: int = 256,
        mask_dim: int = 256,
        num_queries: int = 300,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        text_dim: int = 768,
    ) -> None:
        super().__init__()
        self.dim, self.num_queries = dim, num_queries
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        # num_classes = the thing decoder's hidden width: a class *embedding* for VL alignment.
        self.class_embed = nn.Linear(dim, num_classes)
        self.resizer = FeatureResizer(text_dim, dim)
        self.mask_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=mask_dim, num_layers=3)
        self.decoder_norm = nn.LayerNorm(dim)
        layers = [
            DeformableDecoderLayer(dim, ffn_dim, num_heads, num_levels, num_points)
            for _ in range(num_layers)
        ]
        self.decoder = _DecoderStack(layers, self.decoder_norm, dim)
        self._bbox_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3)
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * num_layers)
        self.decoder.bbox_embed = self.bbox_embed

    def heads(self, hidden: torch.Tensor, mask_features: torch.Tensor | None):
        """`forward_prediction_heads`: class embedding (and mask logits) of decoder states."""
        x = self.decoder_norm(hidden)
        cls = self.class_embed(x)
        if mask_features is None:
            return cls, None
        return cls, torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)

    def forward(
        self, levels: Sequence[torch.Tensor], mask_features: torch.Tensor
    ) -> MaskDINODecoderOutput:
        levels = list(levels)[::-1]  # the decoder's level order: coarsest first
        shapes = torch.as_tensor([x.shape[-2:] for x in levels], dtype=torch.long)
        memory = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)  # B x S x D
        out_memory, proposals = encoder_proposals(memory, shapes)
        shapes = shapes.to(memory.device)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_class_max = self.class_embed(out_memory).max(-1)[0]
        enc_boxes = self._bbox_embed(out_memory) + proposals  # unsigmoided
        topk = torch.topk(enc_class_max, self.num_queries, dim=1)[1]
        ref_unsig = torch.gather(enc_boxes, 1, topk[..., None].expand(-1, -1, 4))
        tgt = torch.gather(out_memory, 1, topk[..., None].expand(-1, -1, self.dim))

        # Training: the selected proposals are scored with masks (`interm_outputs`), and the
        # decoder starts from detached queries and boxes, as the release trains; inference never
        # reads the proposals' masks, so they are not computed there.
        proposals = None
        if self.training:
            proposal_cls, proposal_masks = self.heads(tgt, mask_features)
            proposals = StuffPrediction(proposal_cls, ref_unsig.sigmoid(), proposal_masks)
            tgt, ref_unsig = tgt.detach(), ref_unsig.detach()
        tgt0 = tgt
        class_embeds = [self.heads(tgt, None)[0]]  # INITIAL_PRED: scores of the selections
        ref = ref_unsig.sigmoid()
        refs, hidden = [ref], []
        for layer, box_mlp in zip(self.decoder.layers, self.bbox_embed):
            # valid ratios are 1 (no padding mask): one reference box for every level
            ref_in = ref[:, :, None].expand(-1, -1, len(levels), -1)
            query_pos = self.decoder.ref_point_head(box_sine_embed(ref, self.dim))
            tgt = layer(tgt, query_pos, ref_in, memory, shapes)
            ref = (box_mlp(tgt) + inverse_sigmoid(ref)).sigmoid()
            refs.append(ref)
            hidden.append(self.decoder.norm(tgt))
            if self.training:  # each layer refines a detached box (DINO); losses see all
                ref = ref.detach()
        for h in hidden[:-1]:
            class_embeds.append(self.heads(h, None)[0])
        cls, masks = self.heads(hidden[-1], mask_features)
        class_embeds.append(cls)
        # `pred_box`: the box MLP on the normalized last output, from the last layer's input box.
        boxes = (self.bbox_embed[-1](hidden[-1]) + inverse_sigmoid(refs[-2])).sigmoid()
        predictions = None
        if self.training:
            predictions = [
                StuffPrediction(class_embeds[0], refs[0], self.heads(tgt0, mask_features)[1])
            ]
            for i, h in enumerate(hidden[:-1]):
                box = (self.bbox_embed[i](h) + inverse_sigmoid(refs[i])).sigmoid()
                predictions.append(
                    StuffPrediction(class_embeds[i + 1], box, self.heads(h, mask_features)[1])
                )
            predictions.append(StuffPrediction(cls, boxes, masks))
        return MaskDINODecoderOutput(
            class_embeds=class_embeds,
            pred_boxes=boxes,
            pred_masks=masks,
            hidden=hidden[-1],
            references=torch.stack(refs),
            enc_class_max=enc_class_max,
            topk_indices=topk,
            predictions=predictions,
            proposals=proposals,
        )
