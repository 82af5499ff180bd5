"""Thing decoder (Sec. 3.5): Deformable DETR, two-stage, DINO denoising, UNINEXT-style mask head.

It reads the FUSED image tokens F'_v and classifies against label embeddings pooled from the
fused text F'_t (Fig. 4c). Query content is a learned embedding (DINO mixed query selection);
reference boxes come from the top-k encoder proposals. In training, when targets are given,
DINO contrastive denoising queries (noised ground-truth boxes; content = a projection of the
(possibly flipped) label's text embedding, since an open vocabulary has no fixed label table)
are decoded together with the matching queries behind an attention mask.
"""

from __future__ import annotations

import torch
from torch import nn

from hipie.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from hipie.modeling.outputs import DecoderOutput, DenoisingMeta
from hipie.modeling.pixel_decoder import ImageFeatures
from hipie.modeling.query_decoder import QueryDecoder


class ThingDecoder(QueryDecoder):
    """`QueryDecoder` with learned query content and DINO denoising."""

    def __init__(
        self,
        *,
        dn_groups: int,
        dn_label_noise: float,
        dn_box_noise: float,
        max_dn_queries: int,
        **kwargs,
    ) -> None:
        super().__init__(learned_content=True, **kwargs)
        self.dn_groups, self.dn_label_noise, self.dn_box_noise = (
            dn_groups,
            dn_label_noise,
            dn_box_noise,
        )
        self.max_dn_queries = max_dn_queries
        self.dn_content = nn.Linear(self.dim, self.dim)

    def denoising_queries(
        self,
        targets: list[dict[str, torch.Tensor]],
        label_emb: torch.Tensor,
        label_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, DenoisingMeta] | None:
        """Build DINO contrastive denoising queries.

        Args:
            targets: per image {"labels": (n,) long into the K labels, "boxes": (n, 4) cxcywh}.
            label_emb: (B, K, D); label_mask: (B, K) bool.
        Returns:
            content (B, N_dn, D), reference boxes (B, N_dn, 4), meta; None when no targets.
        """
        counts = [len(t["labels"]) for t in targets]
        max_n = max(counts, default=0)
        if self.dn_groups <= 0 or max_n == 0:
            return None
        groups = max(1, min(self.dn_groups, self.max_dn_queries // (2 * max_n)))
        B, device = len(targets), label_emb.device
        n_dn = groups * 2 * max_n
        tgt_index = torch.full((B, n_dn), -1, dtype=torch.long, device=device)
        positive = torch.zeros((B, n_dn), dtype=torch.bool, device=device)
        labels = torch.zeros((B, n_dn), dtype=torch.long, device=device)
        boxes = torch.full((B, n_dn, 4), 0.5, device=device)
        for b, t in enumerate(targets):
            n = counts[b]
            if n == 0:
                continue
            ar = torch.arange(n, device=device)
            for g in range(groups):
                for sign, offset in ((1, 0), (0, max_n)):
                    slot = g * 2 * max_n + offset + ar
                    tgt_index[b, slot] = ar
                    positive[b, slot] = bool(sign)
                    lab = t["labels"].to(device).clone()
                    flip = torch.rand(n, device=device) < self.dn_label_noise * 0.5
                    num_valid = int(label_mask[b].sum())
                    lab[flip] = torch.randint(0, num_valid, (int(flip.sum()),), device=device)
                    labels[b, slot] = lab
                    # box noise: positives move < 1x half-size, negatives between 1x and 2x
                    box = t["boxes"].to(device).float()
                    xyxy = box_cxcywh_to_xyxy(box)
                    half = torch.cat([box[:, 2:], box[:, 2:]], -1) / 2
                    part = torch.rand_like(xyxy) + (0.0 if sign else 1.0)
                    sgn = torch.randint(0, 2, xyxy.shape, device=device).float() * 2 - 1
                    xyxy = (xyxy + sgn * part * half * self.dn_box_noise).clamp(0, 1)
                    boxes[b, slot] = box_xyxy_to_cxcywh(xyxy).clamp(1e-4, 1 - 1e-4)
        emb = torch.gather(label_emb, 1, labels[..., None].expand(-1, -1, label_emb.shape[-1]))
        meta = DenoisingMeta(
            targets=tgt_index, positive=positive, num_groups=groups, max_targets=max_n
        )
        return self.dn_content(emb), boxes.to(label_emb.dtype), meta

    @staticmethod
    def attention_mask(
        n_dn: int, n_match: int, group_size: int, device: torch.device
    ) -> torch.Tensor:
        """(N, N) bool, True = blocked: matching queries never see denoising queries and each
        denoising group sees only itself and the matching queries (DINO)."""
        n = n_dn + n_match
        mask = torch.zeros(n, n, dtype=torch.bool, device=device)
        mask[n_dn:, :n_dn] = True
        for start in range(0, n_dn, group_size):
            mask[start : start + group_size, :start] = True
            mask[start : start + group_size, start + group_size : n_dn] = True
        return mask

    def forward(
        self,
        feats: ImageFeatures,
        memory: torch.Tensor,
        label_emb: torch.Tensor,
        label_mask: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> DecoderOutput:
        """Decode things; denoising queries only in training mode with `targets`."""
        content, reference, enc = self.select_queries(feats, memory, label_emb, label_mask)
        dn = (
            self.denoising_queries(targets, label_emb, label_mask)
            if (self.training and targets is not None)
            else None
        )
        attn_mask, n_dn = None, 0
        if dn is not None:
            dn_content, dn_ref, meta = dn
            n_dn = dn_content.shape[1]
            content = torch.cat([dn_content, content], 1)
            reference = torch.cat([dn_ref, reference], 1)
            attn_mask = self.attention_mask(
                n_dn, content.shape[1] - n_dn, 2 * meta.max_targets, content.device
            )
        outs = self.run_layers(
            content, reference, feats, memory, label_emb, label_mask, attn_mask, self.training
        )

        def split(o: DecoderOutput, part: slice) -> DecoderOutput:
            return DecoderOutput(
                logits=o.logits[:, part],
                masks=o.masks[:, part],
                boxes=o.boxes[:, part],
                embeddings=o.embeddings[:, part],
            )

        match = [split(o, slice(n_dn, None)) for o in outs]
        dn_out = None
        if dn is not None:
            dns = [split(o, slice(0, n_dn)) for o in outs]
            dn_out = DecoderOutput.from_layers(dns)
        return DecoderOutput.from_layers(
            match,
            dn=dn_out,
            dn_meta=dn[2] if dn is not None else None,
            enc=enc if self.training else None,
        )
