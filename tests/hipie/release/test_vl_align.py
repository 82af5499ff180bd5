"""VLAlign and token -> class pooling against hand-computed values."""

from __future__ import annotations

import torch

from hipie.modeling.vl_align import MASKED_LOGIT, VLAlign, token_to_class_logits


def test_vl_align_formula():
    torch.manual_seed(0)
    head = VLAlign(dim=4, text_dim=6)
    with torch.no_grad():
        head.log_scale.fill_(0.5)
        head.bias_lang.normal_()
    q, t = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    tn = t / t.norm(dim=-1, keepdim=True)
    proj = (
        tn / 2
    ) @ head.dot_product_projection_text.weight.T + head.dot_product_projection_text.bias
    expected = q @ proj.transpose(1, 2) / torch.exp(torch.tensor(0.5))
    expected = expected + (tn @ head.bias_lang + head.bias0)[:, None, :]
    assert torch.allclose(head(q, t), expected, atol=1e-5)


def test_token_to_class_max_mean_and_masking():
    logits = torch.tensor([[[0.0, 1.0, 3.0, -2.0, 5.0]]])
    pmap = {1: [1, 2], 2: [3], 3: [4]}
    maxed = token_to_class_logits(logits, pmap, 3)
    assert maxed.tolist() == [[[3.0, -2.0, 5.0]]]
    meaned = token_to_class_logits(logits, pmap, 3, max_pool=False)
    assert meaned.tolist() == [[[2.0, -2.0, 5.0]]]
    fg = token_to_class_logits(logits, pmap, 3, is_thing={1: True, 2: False}, mode="FG")
    assert fg.tolist() == [[[3.0, MASKED_LOGIT, 5.0]]]  # class 3 absent from is_thing: a thing
    bg = token_to_class_logits(logits, pmap, 3, is_thing={1: True, 2: False}, mode="BG")
    assert bg.tolist() == [[[MASKED_LOGIT, -2.0, MASKED_LOGIT]]]
