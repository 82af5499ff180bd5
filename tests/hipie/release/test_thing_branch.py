"""The thing branch against the official HIPIE (r50 fixture, rule weights seed 1).

The branch is fed the fixture's projected levels, padding masks and BERT token features, loaded
from the rule's release state dict through the prefix table, and every stored thing-branch
intermediate of the three passes is compared (`det`: things + stuff; `part`: the part vocabulary;
`ref`: grounding, scored against the pooled pre-fusion text).
"""

from __future__ import annotations

import pytest
import torch

from hipie.modeling.thing_branch import (
    ThingBranch,
    grounding_token,
)
from hipie.modeling.vl_align import MASKED_LOGIT, token_to_class_logits
from hipie.release_checkpoint import branch_state_dict, official_prefixes
from tests.hipie.release.reference import assert_close, fixture, key_list, rule_state_dict

PASSES = ("det", "part", "ref")


@pytest.fixture(scope="module")
def branch() -> ThingBranch:
    release = rule_state_dict("r50")
    ours = branch_state_dict(release, "thing")
    model = ThingBranch().eval()
    model.load_state_dict(ours, strict=True)
    return model


@pytest.fixture(scope="module")
def runs(branch):
    """The outputs of the three passes (image features come from the first pass)."""
    torch.set_num_threads(2)
    f = fixture("r50")
    srcs = [f[f"det/thing/src.{lvl}"] for lvl in range(4)]
    masks = [f[f"det/thing/padding_mask.{lvl}"].bool()[None] for lvl in range(4)]
    out = {}
    with torch.no_grad():
        for p in PASSES:
            tokens = f[f"{p}/text/bert_hidden"][None]  # valid tokens only
            grounding = f.passes()[p]["task"] == "grounding"
            class_tokens = grounding_token(tokens) if grounding else None
            out[p] = branch(srcs, masks, tokens, None, class_tokens)
    return out


def test_every_release_key_of_the_branch_is_used(branch):
    keys = [e["key"] for e in key_list("r50")["entries"]]
    mine = [k for k in keys if k.startswith(official_prefixes("thing"))]
    assert len(mine) == 442
    assert sorted(branch_state_dict(dict.fromkeys(mine), "thing")) == sorted(branch.state_dict())


def _stored(p: str) -> list[str]:
    f = fixture("r50")
    names = [
        "fused_visual",
        "fused_lang",
        "encoder_memory",
        "lang_after_fusion",
        "enc_outputs_class",
        "init_reference",
        "inter_references",
        "decoder_hs_last",
        "pred_logits",
        "pred_boxes",
        "pred_boxious",
        "mask_head_features",
    ]
    return [n for n in names if f"{p}/thing/{n}" in f]


def _ours(out, name: str) -> torch.Tensor:
    return {
        "fused_visual": lambda: out.fused_visual[0],
        "fused_lang": lambda: out.lang[0],
        "encoder_memory": lambda: out.memory[0],
        "lang_after_fusion": lambda: out.lang[0],
        "enc_outputs_class": lambda: out.enc_class[0],
        "init_reference": lambda: out.init_reference[0],
        "inter_references": lambda: out.inter_references[:, 0],
        "decoder_hs_last": lambda: out.hidden[-1, 0],
        "pred_logits": lambda: out.token_logits[0],
        "pred_boxes": lambda: out.boxes[0],
        "pred_boxious": lambda: out.iou_logits[0],
        "mask_head_features": lambda: out.mask_features[0],
    }[name]()


@pytest.mark.parametrize("p", PASSES)
def test_intermediates(runs, p):
    f = fixture("r50")
    names = _stored(p)
    # image-only tensors (fused_visual, encoder_memory) are stored in the first pass only
    assert len(names) == (12 if p == "det" else 10)
    for name in names:
        assert_close(_ours(runs[p], name), f[f"{p}/thing/{name}"], f"{p}/thing/{name}")


@pytest.mark.parametrize("p", PASSES)
def test_two_stage_selection_and_decoder_states(runs, p):
    f = fixture("r50")
    out = runs[p]
    assert torch.equal(out.topk_proposals[0], f[f"{p}/thing/topk_proposals"])
    rows = f[f"{p}/thing/decoder_hs_selected_rows"]
    expected = f[f"{p}/thing/decoder_hs_selected"]
    assert_close(out.hidden[:, 0, rows], expected, f"{p}/thing/decoder_hs_selected")


@pytest.mark.parametrize("p", PASSES)
def test_class_logits(runs, p):
    """Token logits pooled to classes as the release's inference does (max pool, FG masking)."""
    f = fixture("r50")
    info = f.passes()[p]
    pmap = {int(k): v for k, v in info["positive_map_label_to_token"].items()}
    is_thing = {int(k): v for k, v in (info.get("test_is_thing") or info["is_thing"]).items()}
    mode = "FG" if any(is_thing.values()) else None
    nbg = runs[p].num_background
    od = token_to_class_logits(
        runs[p].token_logits[:, nbg:], pmap, len(pmap), is_thing=is_thing, mode=mode
    )[0]
    expected = f[f"{p}/thing/od_logits"]
    masked = expected == MASKED_LOGIT
    assert torch.equal(od == MASKED_LOGIT, masked)
    # compare the unmasked logits on their own scale (-9999 would hide any error)
    assert_close(od[~masked], expected[~masked], f"{p}/thing/od_logits")


@pytest.mark.parametrize("p", ("det", "ref"))  # the r50 fixture drops the part pass's copy
def test_final_mask_logits(branch, runs, p):
    """1/4-resolution mask logits of the release's final instances (queries after NMS + top-k)."""
    f = fixture("r50")
    h, w = f.inputs["resized_hw"]
    rows = f[f"{p}/thing/final_query_index"] + runs[p].num_background
    with torch.no_grad():
        logits = branch.mask_logits(runs[p], rows, (h, w))
    assert_close(logits, f[f"{p}/thing/final_mask_logits"], f"{p}/thing/final_mask_logits")


def test_boxes_are_the_last_refined_references(runs):
    out = runs["det"]
    assert torch.allclose(out.boxes, out.inter_references[-1], atol=1e-6)


def test_batch_with_padded_tokens_matches_single_passes(branch, runs):
    """Two images in one batch, the shorter prompt zero-padded and masked as the release pads."""
    f = fixture("r50")
    srcs = [f[f"det/thing/src.{lvl}"].expand(2, -1, -1, -1) for lvl in range(4)]
    masks = [f[f"det/thing/padding_mask.{lvl}"].bool()[None].expand(2, -1, -1) for lvl in range(4)]
    det, ref = f["det/text/bert_hidden"], f["ref/text/bert_hidden"]
    n_ref = ref.shape[0]
    tokens = torch.zeros(2, det.shape[0], det.shape[1])
    tokens[0], tokens[1, :n_ref] = det, ref
    token_mask = torch.zeros(2, det.shape[0], dtype=torch.long)
    token_mask[0], token_mask[1, :n_ref] = 1, 1
    with torch.no_grad():
        out = branch(srcs, masks, tokens, token_mask)
        expected_ref_logits = branch.class_embed[-2](runs["ref"].hidden[-1], runs["ref"].lang)
    for i, p in enumerate(("det", "ref")):
        single = runs[p]
        for name in ("memory", "enc_class"):
            assert_close(getattr(out, name)[i], getattr(single, name)[0], f"batch {i} {name}")
        order = _tie_aligned_order(
            out.topk_proposals[i],
            single.topk_proposals[0],
            single.enc_class[0],
            branch.num_background,
        )
        assert_close(out.init_reference[i, order], single.init_reference[0], f"batch {i} refs")
        # A tie swap hands two query slots (each with its own learned content) the other's
        # proposal; self-attention spreads that change, so the other queries match to 1e-3.
        same = order == torch.arange(len(order))
        rel = 1e-4 if bool(same.all()) else 1e-3
        for name in ("boxes", "iou_logits"):
            a, e = getattr(out, name)[i], getattr(single, name)[0]
            assert_close(a[same], e[same], f"batch {i} {name}", rel=rel)
        hidden = out.hidden[:, i, same]
        assert_close(hidden, single.hidden[:, 0, same], f"batch {i} hidden", rel=rel)
        if p == "det":
            det_same, det_rel = same, rel
    same, rel = det_same, det_rel
    det_logits = runs["det"].token_logits[0, same]
    assert_close(out.token_logits[0, same], det_logits, "batch 0 token_logits", rel=rel)
    assert_close(out.lang[1, :n_ref], runs["ref"].lang[0], "batch 1 fused text")
    assert_close(out.token_logits[1, :, :n_ref], expected_ref_logits[0], "batch 1 token_logits")
    pooled = grounding_token(tokens, token_mask)[1]
    assert_close(pooled, grounding_token(ref[None])[0], "masked grounding token")


def _tie_aligned_order(
    batched: torch.Tensor, single: torch.Tensor, scores: torch.Tensor, num_background: int
) -> torch.Tensor:
    """The order that maps the batched top-k onto the single pass's.

    Batching changes float rounding, so two proposals whose two-stage scores tie to rounding may
    swap places in the top-k. Anything else (a different set, or a swap of proposals whose scores
    differ) fails. Returns indices into the batched queries (background first, as the branch puts
    them), in the single pass's order.
    """
    assert sorted(batched.tolist()) == sorted(single.tolist()), "top-k selects other proposals"
    score = scores.max(-1).values if scores.dim() > 1 else scores
    swapped = (batched != single).nonzero().flatten()
    assert len(swapped) <= 4, f"{len(swapped)} top-k places differ"
    gap = (score[batched[swapped]] - score[single[swapped]]).abs()
    assert bool((gap <= 1e-5 * score.abs().max()).all()), f"non-tied proposals swapped: {gap}"
    position = {int(q): k for k, q in enumerate(batched)}
    order = torch.tensor([position[int(q)] for q in single])
    return torch.cat([torch.arange(num_background), num_background + order])


def test_small_branch_runs_with_its_own_sizes():
    """The same architecture at small size (for `tiny`): shapes follow the constructor."""
    torch.manual_seed(0)
    model = ThingBranch(
        dim=64,
        text_dim=48,
        num_heads=4,
        ffn_dim=128,
        enc_layers=2,
        dec_layers=2,
        num_queries=30,
        num_background=3,
        vl_dim=128,
    ).eval()
    srcs = [torch.randn(2, 64, 32 // 2**lvl, 48 // 2**lvl) for lvl in range(4)]
    masks = [torch.zeros(2, s.shape[2], s.shape[3], dtype=torch.bool) for s in srcs]
    masks[0][1, :, -3:] = True
    with torch.no_grad():
        out = model(srcs, masks, torch.randn(2, 5, 48))
        logits = model.mask_logits(out, torch.tensor([0, 5, 7]), (256, 360), batch_index=1)
    assert out.token_logits.shape == (2, 33, 5)
    assert out.boxes.shape == (2, 33, 4) and out.iou_logits.shape == (2, 33)
    assert out.hidden.shape == (2, 2, 33, 64) and out.mask_features.shape == (2, 8, 32, 48)
    assert logits.shape == (3, 64, 96) and torch.isfinite(logits).all()
