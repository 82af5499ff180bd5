"""Stuff decoder (Sec. 3.5): MaskDINO style, on the UNFUSED image features (Fig. 4c).

Queries are the top-k encoder tokens (content and reference boxes, MaskDINO's query selection);
classes come from label embeddings pooled from the unfused text features. Boxes are predicted
only so that the criterion can match stuff queries with things for the auxiliary class + box
loss; stuff masks get no box loss. No denoising queries (deviation: MaskDINO also denoises;
the paper names DINO denoising for the thing decoder only).
"""

from __future__ import annotations

from hipie.modeling.query_decoder import QueryDecoder


class StuffDecoder(QueryDecoder):
    """`QueryDecoder` whose query content comes from the selected encoder tokens."""

    def __init__(self, **kwargs) -> None:
        super().__init__(learned_content=False, **kwargs)
