"""Text encoder: prompts, label-token pooling, 512-token windowing, random-weight BERT configs."""

from __future__ import annotations

import pytest
import torch

from hipie.config import TextEncoderConfig
from hipie.modeling.text_encoder import build_prompt, build_text_encoder, pool_labels


@pytest.fixture(scope="module")
def encoder():
    """The offline MiniLM (real weights), projected to 32 channels."""
    torch.manual_seed(0)
    return build_text_encoder(TextEncoderConfig(), hidden_dim=32).eval()


def test_prompt_joins_labels_with_other():
    text, spans = build_prompt(["surfboard", "traffic light"])
    assert text == "surfboard. traffic light. other"
    assert [text[a:b] for a, b in spans] == ["surfboard", "traffic light", "other"]


def test_label_tokens_match_the_tokenizer(encoder):
    # By hand: [CLS] surf ##board . traffic light . other [SEP]
    #           0     1    2       3 4       5     6 7     8
    ids, per_label = encoder.tokenize_labels(["surfboard", "traffic light"])
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "surf", "##board", ".", "traffic", "light", ".", "other", "[SEP]"]
    assert per_label == [[1, 2], [4, 5], [7]]
    feats = encoder([["surfboard", "traffic light"]])
    assert feats.labels == (("surfboard", "traffic light", "other"),)
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[0, [1, 2]] = expected[1, [4, 5]] = expected[2, 7] = True
    assert torch.equal(feats.label_tokens[0], expected)


def test_pool_labels_mean_and_max():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [5.0, -2.0], [7.0, 1.0]]])  # 1 x 4 x 2
    sel = torch.tensor(
        [[[False, True, True, False], [True, False, False, False], [False, False, False, False]]]
    )  # 1 x 3 x 4
    mean = pool_labels(tokens, sel, "mean")
    assert torch.allclose(mean[0], torch.tensor([[4.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
    mx = pool_labels(tokens, sel, "max")
    assert torch.allclose(mx[0], torch.tensor([[5.0, 4.0], [1.0, 0.0], [0.0, 0.0]]))


def test_expression_uses_cls_token(encoder):
    feats = encoder(["the dog on the left"], expression=True)
    assert feats.label_tokens.shape[1] == 1
    assert feats.label_tokens[0, 0].nonzero().flatten().tolist() == [0]


def test_short_windowing_equals_one_pass(encoder):
    ids, _ = encoder.tokenize_labels(["dog", "cat", "potted plant"])
    feats, mask = encoder.encode_ids([ids])
    with torch.no_grad():
        direct = encoder.bert(input_ids=torch.tensor([ids])).last_hidden_state
    assert mask.all()
    assert torch.allclose(feats, direct, atol=1e-5)


def test_long_sequence_is_encoded_window_by_window(encoder):
    ids, _ = encoder.tokenize_labels([f"label {i}" for i in range(6)])
    old = encoder.max_tokens
    encoder.max_tokens = 8
    try:
        feats, mask = encoder.encode_ids([ids])
    finally:
        encoder.max_tokens = old
    with torch.no_grad():
        chunks = [
            encoder.bert(input_ids=torch.tensor([ids[s : s + 8]])).last_hidden_state[0]
            for s in range(0, len(ids), 8)
        ]
    assert len(chunks) > 2
    assert torch.allclose(feats[0], torch.cat(chunks), atol=1e-5)
    # windows differ from a single pass (positions restart), so the test can fail
    with torch.no_grad():
        single = encoder.bert(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert not torch.allclose(single, feats[0], atol=1e-3)


def test_vocabulary_over_512_tokens(encoder):
    labels = [f"object number {i}" for i in range(300)]
    with torch.no_grad():
        feats = encoder([labels])
    assert feats.tokens.shape[1] > 512
    assert feats.label_tokens.shape[:2] == (1, 301)
    assert feats.label_tokens.any(-1).all()  # every label (and "other") found its tokens
    assert torch.isfinite(feats.tokens).all()


def test_batch_of_vocabularies_pads_labels(encoder):
    feats = encoder([["dog"], ["dog", "cat", "sky"]])
    assert feats.label_mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    one = encoder([["dog"]])
    T = one.tokens.shape[1]
    assert torch.allclose(feats.tokens[0, :T], one.tokens[0], atol=1e-5)


def test_empty_vocabulary_raises(encoder):
    with pytest.raises(ValueError, match="empty vocabulary"):
        encoder([[]])


def test_random_weight_bert_from_config():
    cfg = TextEncoderConfig(
        name_or_path=None,
        pretrained=False,
        bert_config=dict(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
        ),
    )
    enc = build_text_encoder(cfg, hidden_dim=16)
    assert enc.bert.config.hidden_size == 48
    feats = enc([["dog", "cat"]])
    assert feats.tokens.shape == (1, 7, 16)
