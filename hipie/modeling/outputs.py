"""Typed outputs of the HIPIE model (consumed by the criterion and by post-processing)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DenoisingMeta:
    """Which ground truth each DINO denoising query reconstructs.

    targets: (B, N_dn) long, index into the image's target list, -1 for padding slots.
    positive: (B, N_dn) bool, True for positive (reconstruct) queries, False for negative
        (must predict "no object") and padding queries.
    num_groups: number of denoising groups; each holds 2 * max_targets queries
        (positives first, then negatives).
    max_targets: the largest number of targets of an image in the batch.
    """

    targets: torch.Tensor
    positive: torch.Tensor
    num_groups: int
    max_targets: int


@dataclass(frozen=True)
class DecoderOutput:
    """Predictions of one decoder layer.

    logits: (B, Q, K) class logits over the prompt's label space (vocabulary + "other");
        padded labels hold `heads.INVALID_LOGIT`.
    masks: (B, Q, h, w) mask logits at 1/4 of the padded input size.
    boxes: (B, Q, 4) normalized cxcywh boxes (relative to the padded input).
    embeddings: (B, Q, D) query embeddings (after the output norm).
    aux: outputs of the earlier decoder layers (training only; empty at inference).
    dn: outputs of the denoising queries (thing decoder, training with targets), with its own aux.
    dn_meta: how the denoising queries map to targets.
    enc: two-stage encoder proposals that initialized the queries (masks included).
    """

    logits: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    embeddings: torch.Tensor
    aux: list[DecoderOutput] = field(default_factory=list)
    dn: DecoderOutput | None = None
    dn_meta: DenoisingMeta | None = None
    enc: DecoderOutput | None = None

    @classmethod
    def from_layers(cls, layers: list[DecoderOutput], **extra) -> DecoderOutput:
        """The last layer's predictions with the earlier layers as `aux` (and `extra` fields)."""
        last = layers[-1]
        return cls(
            logits=last.logits,
            masks=last.masks,
            boxes=last.boxes,
            embeddings=last.embeddings,
            aux=layers[:-1],
            **extra,
        )


@dataclass(frozen=True)
class HipieOutput:
    """Things (Deformable-DETR/DINO decoder on fused features) and stuff (MaskDINO, unfused)."""

    things: DecoderOutput | None
    stuff: DecoderOutput | None
