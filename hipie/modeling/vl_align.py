"""Vision-language alignment classifier of the release, and token -> class logit pooling.

The release scores each query against each *token* of the prompt (a GLIP-style dot product), then
turns token logits into class logits by pooling the tokens of each class name (its positive map).
The thing branch (per decoder layer) and the MaskDINO stuff branch (per decoder layer) each hold
their own `VLAlign`; parameter names are the release's, so checkpoint keys map by prefix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Logits of a class that a pass must not predict (a stuff class for thing queries in the
# things+stuff pass, and the other way round). The release writes -9999 into the class logits.
MASKED_LOGIT = -9999.0


class VLAlign(nn.Module):
    """Dot-product classifier: query features (B, Q, D) x token features (B, T, Dt) -> (B, Q, T).

    Token features are L2-normalised and halved before a linear map to the query width; a per-token
    bias (`bias_lang` . token + `bias0`) is added; logits are divided by exp(`log_scale`) and clamped
    to +-50000, as in the release (`MODEL.DYHEAD.FUSE_CONFIG.CLAMP_DOT_PRODUCT` is on).
    """

    def __init__(self, dim: int, text_dim: int, prior_prob: float = 0.01, log_scale: float = 0.0):
        super().__init__()
        self.dot_product_projection_text = nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor([log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior_prob) / prior_prob)]))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tokens = F.normalize(tokens, p=2, dim=-1)
        projected = self.dot_product_projection_text(tokens / 2.0)  # B x T x D
        token_bias = tokens @ self.bias_lang + self.bias0  # B x T
        logits = queries @ projected.transpose(-1, -2) / self.log_scale.exp()
        logits = logits + token_bias[:, None, :]
        return logits.clamp(min=-50000.0, max=50000.0)


def token_to_class_logits(
    token_logits: torch.Tensor,
    positive_map: Mapping[int, Sequence[int]],
    num_classes: int,
    *,
    max_pool: bool = True,
    is_thing: Mapping[int, bool] | None = None,
    mode: str | None = None,
) -> torch.Tensor:
    """Pool token logits (B, Q, T) into class logits (B, Q, num_classes).

    `positive_map` maps a 1-based class id to the token positions of its name. Each class takes the
    max (the release's `TEST.MAX_POOL`, on in the released configs) or the mean of its tokens'
    logits. `mode` "FG" masks stuff classes (`is_thing[c]` False) with `MASKED_LOGIT`, "BG" masks
    thing classes; a class missing from `is_thing` counts as a thing, as in the release. Classes
    absent from `positive_map` stay 0.
    """
    if mode not in (None, "FG", "BG"):
        raise ValueError(f"mode must be None, 'FG' or 'BG', not {mode!r}")
    is_thing = is_thing or {}
    out = token_logits.new_zeros(*token_logits.shape[:2], num_classes)
    for cls, tokens in positive_map.items():
        picked = token_logits[:, :, list(tokens)]
        out[:, :, cls - 1] = picked.amax(-1) if max_pool else picked.mean(-1)
        thing = is_thing.get(cls, True)
        if (mode == "FG" and not thing) or (mode == "BG" and thing):
            out[:, :, cls - 1] = MASKED_LOGIT
    return out
