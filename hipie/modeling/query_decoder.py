"""The deformable query decoder shared by the thing and the stuff decoder.

Two-stage (Deformable DETR / DINO / MaskDINO): every encoder token proposes a box around its
pixel; the top-k tokens by class score give the queries' reference boxes (and, for the MaskDINO
style stuff decoder, their content). Each layer does self-attention, deformable cross-attention
around the reference box, and an FFN, then refines the box. Every layer predicts class logits
(contrastive, against label embeddings), masks (dot product with the 1/4 mask features) and boxes.
"""

from __future__ import annotations

import torch
from torch import nn

from hipie.modeling.common import MLP, feed_forward, inverse_sigmoid, sine_embed
from hipie.modeling.deform_attn import MSDeformAttn
from hipie.modeling.heads import ContrastiveClassifier, mask_logits
from hipie.modeling.outputs import DecoderOutput
from hipie.modeling.pixel_decoder import ImageFeatures


class DecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention and FFN; post-norm as in Deformable DETR."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_levels: int,
        num_points: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(
            dim=dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference: torch.Tensor,
        feats: ImageFeatures,
        memory: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, query_pos: (B, Q, D); reference: (B, Q, 4) cxcywh -> (B, Q, D)."""
        q = k = tgt + query_pos
        sa, _ = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)
        tgt = self.norm1(tgt + self.dropout(sa))
        L = feats.spatial_shapes.shape[0]
        ref = reference[:, :, None, :].expand(-1, -1, L, -1)  # B x Q x L x 4
        ca = self.cross_attn(tgt + query_pos, ref, memory, feats.spatial_shapes, feats.padding_mask)
        tgt = self.norm2(tgt + self.dropout(ca))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class QueryDecoder(nn.Module):
    """Two-stage deformable decoder with class, box and mask heads."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        num_levels: int,
        num_points: int,
        num_queries: int,
        learned_content: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.num_queries = dim, num_queries
        self.layers = nn.ModuleList(
            DecoderLayer(
                dim=dim,
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                num_levels=num_levels,
                num_points=num_points,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        # two-stage proposal heads on the encoder tokens
        self.enc_output = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.enc_class = ContrastiveClassifier(dim=dim)
        self.enc_box = MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3)
        # per-layer heads (shared across layers)
        self.norm = nn.LayerNorm(dim)
        self.class_head = ContrastiveClassifier(dim=dim)
        self.box_head = MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3)
        self.mask_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=dim, num_layers=3)
        self.ref_point_head = MLP(in_dim=2 * dim, hidden_dim=dim, out_dim=dim, num_layers=2)
        self.query_content = nn.Embedding(num_queries, dim) if learned_content else None
        for head in (self.box_head, self.enc_box):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    # ---------------------------------------------------------------- two-stage proposals
    def proposals(
        self, feats: ImageFeatures, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token anchor boxes.

        Returns:
            (B, S, D) proposal features (zero at invalid tokens) and (B, S, 4) anchors in logit
            space (+inf at padded tokens / anchors outside the image).
        """
        anchors = []
        for lvl, (h, w) in enumerate(feats.spatial_shapes.tolist()):
            ys = (torch.arange(h, device=memory.device, dtype=torch.float32) + 0.5) / h
            xs = (torch.arange(w, device=memory.device, dtype=torch.float32) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            wh = torch.full_like(gx, 0.05 * 2.0**lvl)
            anchors.append(torch.stack([gx, gy, wh, wh], -1).view(-1, 4))
        anchors = torch.cat(anchors, 0)[None].expand(memory.shape[0], -1, -1)  # B x S x 4
        valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~feats.padding_mask  # B x S
        logit = inverse_sigmoid(anchors).masked_fill(~valid[..., None], float("inf"))
        out = memory.masked_fill(~valid[..., None], 0.0)
        return self.enc_output(out), logit.to(memory.dtype)

    def select_queries(
        self,
        feats: ImageFeatures,
        memory: torch.Tensor,
        label_emb: torch.Tensor,
        label_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, DecoderOutput]:
        """Top-k encoder proposals by their best class score.

        Returns:
            content (B, Q, D), reference boxes (B, Q, 4) (detached), and the encoder output of the
            selected proposals (for the two-stage loss).
        """
        out, anchor_logit = self.proposals(feats, memory)
        logits = self.enc_class(out, label_emb, label_mask)  # B x S x K
        boxes_logit = self.enc_box(out) + anchor_logit  # B x S x 4
        score = logits.max(-1).values.masked_fill(torch.isinf(anchor_logit).any(-1), -1e9)
        k = min(self.num_queries, score.shape[1])
        idx = score.topk(k, dim=1).indices  # B x k
        gather = lambda x: torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        sel_out, sel_box = gather(out), gather(boxes_logit).sigmoid()
        enc_masks = (
            mask_logits(self.mask_embed(sel_out), feats.mask_features)
            if self.training
            else sel_out.new_zeros(sel_out.shape[0], k, 0, 0)
        )  # only the loss needs them
        enc = DecoderOutput(
            logits=gather(logits),
            masks=enc_masks,
            boxes=sel_box,
            embeddings=sel_out,
        )
        if self.query_content is not None:  # DINO mixed query selection: static content
            content = self.query_content.weight[:k][None].expand(memory.shape[0], -1, -1)
        else:  # MaskDINO: content from the selected encoder features
            content = sel_out.detach()
        return content, sel_box.detach(), enc

    # ---------------------------------------------------------------- decoding
    def predict(
        self,
        tgt: torch.Tensor,
        boxes: torch.Tensor,
        feats: ImageFeatures,
        label_emb: torch.Tensor,
        label_mask: torch.Tensor,
        with_masks: bool = True,
    ) -> DecoderOutput:
        """Heads on a layer's output (B, Q, D) with its refined boxes (B, Q, 4)."""
        emb = self.norm(tgt)
        masks = (
            mask_logits(self.mask_embed(emb), feats.mask_features)
            if with_masks
            else emb.new_zeros(emb.shape[0], emb.shape[1], 0, 0)
        )
        return DecoderOutput(
            logits=self.class_head(emb, label_emb, label_mask),
            masks=masks,
            boxes=boxes,
            embeddings=emb,
        )

    def run_layers(
        self,
        tgt: torch.Tensor,
        reference: torch.Tensor,
        feats: ImageFeatures,
        memory: torch.Tensor,
        label_emb: torch.Tensor,
        label_mask: torch.Tensor,
        attn_mask: torch.Tensor | None,
        all_layers: bool,
    ) -> list[DecoderOutput]:
        """Run all layers with iterative box refinement.

        Args:
            tgt: (B, Q, D) initial content; reference: (B, Q, 4) initial cxcywh boxes.
            all_layers: predict after every layer (training); else only after the last one.
        Returns:
            One DecoderOutput per predicting layer, the last layer last.
        """
        outs = []
        for i, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(sine_embed(reference, self.dim // 2))  # B x Q x D
            tgt = layer(tgt, query_pos, reference, feats, memory, attn_mask)
            new_ref = (self.box_head(self.norm(tgt)) + inverse_sigmoid(reference)).sigmoid()
            if all_layers or i == len(self.layers) - 1:
                outs.append(self.predict(tgt, new_ref, feats, label_emb, label_mask))
            reference = new_ref.detach()
        return outs

    def forward(
        self,
        feats: ImageFeatures,
        memory: torch.Tensor,
        label_emb: torch.Tensor,
        label_mask: torch.Tensor,
    ) -> DecoderOutput:
        """Decode.

        Args:
            feats: image features (their `memory` may be replaced by `memory`, e.g. fused).
            memory: (B, S, D) tokens to attend to.
            label_emb: (B, K, D) label embeddings; label_mask: (B, K) bool.
        """
        content, reference, enc = self.select_queries(feats, memory, label_emb, label_mask)
        outs = self.run_layers(
            content, reference, feats, memory, label_emb, label_mask, None, self.training
        )
        return DecoderOutput.from_layers(outs, enc=enc if self.training else None)
