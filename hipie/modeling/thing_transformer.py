"""The thing branch's deformable transformer as released (DINO-style two-stage Deformable DETR).

Encoder: six post-norm deformable self-attention layers over the four flattened levels; before the
first one the bi-directional VL fusion (`vl_fusion.VLFuse`) updates both the image tokens and the
text tokens (later layers leave the text alone). Two-stage selection: every encoder token proposes
a box around its pixel (w = h = 0.05 * 2^level), scored by a text-free linear head
(`decoder.class_embed[6]`, the release's `Still_Classifier`) and refined by `decoder.bbox_embed[6]`;
the 900 best become the reference boxes (mixed query selection: content queries are the learned
`tgt_embed`, positions come from the proposals). Ten learned background queries (`tgt_embed_bg`
with learned boxes `bg_query_refs`) go first. Decoder: six post-norm layers (self-attention, then
deformable cross-attention, then FFN) whose query position is an MLP (`ref_point_head`) of the
sine embedding of the current box; each layer refines the boxes in logit space with its own MLP
(`bbox_embed[l]`), "look forward twice": the returned box of layer l keeps its gradient path.

Parameter names are the release's (`detr.detr.transformer.*` maps to this module by prefix).
Release quirks kept: proposals on padded or border pixels get infinite logits (sigmoid 1) and a
zero memory row, yet still compete in the top-k; text padding never reaches the image side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hipie.modeling.common import MLP, inverse_sigmoid, sine_embed
from hipie.modeling.deformable_layers import (
    DeformableDecoderLayer,
    DeformableEncoderLayer,
    FeatureResizer,
)
from hipie.modeling.vl_align import VLAlign
from hipie.modeling.vl_fusion import VLFuse


def mask_sine_pos(mask: torch.Tensor, num_feats: int = 128) -> torch.Tensor:
    """The release's `PositionEmbeddingSine(normalize=True)` of a padding mask.

    mask: (B, H, W) bool, True at padding. Returns (B, 2 * num_feats, H, W): y block, then x block;
    coordinates are cumulative counts of valid pixels, normalized to (0, 2 pi].
    """
    valid = ~mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = 10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2) fraction of valid columns and rows (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


class ProposalScorer(nn.Module):
    """Text-free objectness of encoder tokens (release: `Still_Classifier`, a Linear `body`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ThingEncoder(nn.Module):
    """VL fusion before the first `num_vl_layers` layers, then deformable encoder layers."""

    def __init__(self, layer_args: dict, num_layers: int, num_vl_layers: int, vl_args: dict):
        super().__init__()
        self.vl_layers = nn.ModuleList(VLFuse(**vl_args) for _ in range(num_vl_layers))
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_args) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], ratios: torch.Tensor):
        """Pixel centres of every level, (B, S, L, 2), in the valid-region frame of each level."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=ratios.device)
            xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=ratios.device)
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * ratios[:, None]

    def forward(self, src, pos, lang, lang_mask, spatial_shapes, ratios, padding_mask):
        """Returns (memory, text after fusion, image tokens right after the fusion)."""
        shapes_t = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src.device)
        refs = self.reference_points(spatial_shapes, ratios)
        fused_visual = src
        for i, layer in enumerate(self.layers):
            if i < len(self.vl_layers):
                src, lang = self.vl_layers[i](src, lang, lang_mask)
                if i == 0:
                    fused_visual = src
            src = layer(src, pos, refs, shapes_t, padding_mask)
        return src, lang, fused_visual


class ThingDecoder(nn.Module):
    """DINO decoder with iterative box refinement; holds the per-layer heads, as released.

    `class_embed[0..L-1]` are the per-layer VL-align classifiers, `class_embed[L]` the encoder
    proposal scorer; `bbox_embed[0..L-1]` refine the boxes of each layer, `bbox_embed[L]` the
    encoder proposals.
    """

    def __init__(self, dim: int, text_dim: int, num_layers: int, layer_args: dict):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(**layer_args) for _ in range(num_layers))
        self.ref_point_head = MLP(in_dim=2 * dim, hidden_dim=dim, out_dim=dim, num_layers=2)
        self.bbox_embed = nn.ModuleList(
            MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3) for _ in range(num_layers + 1)
        )
        heads: list[nn.Module] = [VLAlign(dim, text_dim) for _ in range(num_layers)]
        self.class_embed = nn.ModuleList([*heads, ProposalScorer(dim)])
        self.num_layers, self.dim = num_layers, dim

    def forward(self, tgt, refs, memory, spatial_shapes, ratios, padding_mask):
        """tgt (B, Q, D), refs (B, Q, 4) cxcywh in [0, 1] -> (hs (L, B, Q, D), boxes (L, B, Q, 4))."""
        shapes_t = torch.as_tensor(spatial_shapes, dtype=torch.long, device=memory.device)
        ratios4 = torch.cat([ratios, ratios], -1)[:, None]  # B x 1 x L x 4
        out, states, boxes = tgt, [], []
        for lid, layer in enumerate(self.layers):
            refs_in = refs[:, :, None] * ratios4  # B x Q x L x 4
            # sine embedding of (y, x, w, h) of the level-0 box, dim/2 (128) features each
            box = refs_in[:, :, 0][..., [1, 0, 2, 3]]
            query_pos = self.ref_point_head(sine_embed(box, self.dim // 2))
            out = layer(out, query_pos, refs_in, memory, shapes_t, padding_mask)
            new_refs = (self.bbox_embed[lid](out) + inverse_sigmoid(refs)).sigmoid()
            states.append(out)
            boxes.append(new_refs)  # look forward twice: no detach on the returned boxes
            refs = new_refs.detach()
        return torch.stack(states), torch.stack(boxes)


@dataclass
class TransformerOutputs:
    """What the thing transformer computes for a batch (Q = background + two-stage queries)."""

    hidden: torch.Tensor  # (L, B, Q, D) decoder states of every layer
    init_reference: torch.Tensor  # (B, Q, 4) boxes the decoder starts from
    inter_references: torch.Tensor  # (L, B, Q, 4) boxes after each layer
    memory: torch.Tensor  # (B, S, D) encoder output
    fused_visual: torch.Tensor  # (B, S, D) image tokens right after the VL fusion
    lang: torch.Tensor  # (B, T, text_dim) text tokens after the VL fusion
    enc_class: torch.Tensor  # (B, S) two-stage proposal scores
    enc_boxes: torch.Tensor  # (B, S, 4) two-stage proposal boxes (sigmoid; 1 at invalid tokens)
    topk_proposals: torch.Tensor  # (B, num_queries) indices of the selected encoder tokens
    spatial_shapes: list[tuple[int, int]]


class ThingTransformer(nn.Module):
    """The release's `DeformableTransformerVLDINO` at inference (no denoising queries)."""

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
        layer_args = dict(
            dim=dim,
            ffn_dim=ffn_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
        )
        vl_args = dict(v_dim=dim, l_dim=text_dim, embed_dim=vl_dim, num_heads=8)
        self.encoder = ThingEncoder(layer_args, enc_layers, num_vl_layers, vl_args)
        self.decoder = ThingDecoder(dim, text_dim, dec_layers, layer_args)
        self.level_embed = nn.Parameter(torch.randn(num_levels, dim))
        self.tgt_embed = nn.Embedding(num_queries, dim)
        self.tgt_embed_bg = nn.Embedding(num_background, dim)
        self.bg_query_refs = nn.Embedding(num_background, 4)
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        # The release pools the fused text into `ref_feat` through this resizer and adds
        # 0.0 * ref_feat to the queries (MODEL.DECOUPLE_TGT + STILL_TGT_FOR_BOTH on in every
        # released config): it holds weights but does not change any output, so we skip it.
        self.resizer = FeatureResizer(text_dim, dim)
        self.num_queries = num_queries

    def proposals(self, memory, padding_mask, spatial_shapes):
        """Encoder tokens -> (normalized memory (B, S, D), proposal boxes in logit space (B, S, 4))."""
        b = memory.shape[0]
        props, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes):
            m = padding_mask[:, start : start + h * w].view(b, h, w)
            valid_h = (~m[:, :, 0]).sum(1)
            valid_w = (~m[:, 0, :]).sum(1)
            ys = torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device)
            xs = torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.cat([gx[..., None], gy[..., None]], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(b, 1, 1, 2)
            grid = (grid[None].expand(b, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * (0.05 * 2.0**lvl)
            props.append(torch.cat((grid, wh), -1).view(b, -1, 4))
            start += h * w
        props = torch.cat(props, 1)
        keep = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        invalid = padding_mask[..., None] | ~keep
        props = props.masked_fill(invalid, float("inf"))
        out = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(out)), props

    def select_proposals(self, enc_class: torch.Tensor) -> torch.Tensor:
        """Two-stage query selection: the `num_queries` best proposals (B x S) -> (B x Q)."""
        return torch.topk(enc_class, self.num_queries, dim=1)[1]

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> TransformerOutputs:
        """srcs: per level (B, D, H_l, W_l); masks: per level (B, H_l, W_l) bool (True = pad);
        tokens: (B, T, text_dim) text features; token_mask: (B, T), nonzero at real tokens."""
        flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask) in enumerate(zip(srcs, masks)):
            shapes.append((int(src.shape[2]), int(src.shape[3])))
            pos = mask_sine_pos(mask, src.shape[1] // 2).to(src.dtype)
            flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat, mask_flat = torch.cat(flat, 1), torch.cat(mask_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # B x L x 2

        memory, lang, fused_visual = self.encoder(
            src_flat, pos_flat, tokens, token_mask, shapes, ratios, mask_flat
        )

        b = memory.shape[0]
        enc_memory, enc_props = self.proposals(memory, mask_flat, shapes)
        last = self.decoder.num_layers
        enc_class = self.decoder.class_embed[last](enc_memory)[..., 0]  # B x S
        enc_coord = self.decoder.bbox_embed[last](enc_memory) + enc_props
        topk = self.select_proposals(enc_class)
        refs = torch.gather(enc_coord, 1, topk[..., None].expand(-1, -1, 4)).sigmoid()

        tgt = torch.cat([self.tgt_embed_bg.weight, self.tgt_embed.weight])[None].expand(b, -1, -1)
        refs = torch.cat([self.bg_query_refs.weight[None].expand(b, -1, -1), refs], 1)
        hidden, inter = self.decoder(tgt, refs, memory, shapes, ratios, mask_flat)
        return TransformerOutputs(
            hidden=hidden,
            init_reference=refs,
            inter_references=inter,
            memory=memory,
            fused_visual=fused_visual,
            lang=lang,
            enc_class=enc_class,
            enc_boxes=enc_coord.sigmoid(),
            topk_proposals=topk,
            spatial_shapes=shapes,
        )
