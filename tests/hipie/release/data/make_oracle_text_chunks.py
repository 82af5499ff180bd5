"""Regenerate `oracle_text_chunks.safetensors`: the official BertEncoder on prompts > 512 tokens.

Runs in the oracle venv (../shared/tools/official_hipie/README.md), BERT filled by the weight rule
(r50 key list, seed 1):

    flock /tmp/heavy.lock /work/hipie_ref/venv/bin/python \
        tests/hipie/release/data/make_oracle_text_chunks.py /work/hipie_ref/src OUT.safetensors

Stored per case: the valid input ids, the positive map as (first, last) token per class, and the
BERT features of the valid tokens at every 96th channel (to keep the file small).
"""

import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
TOOLS = HERE.parents[4] / ".." / "shared" / "tools" / "official_hipie"
CASES = {
    "n203_L1024": ([f"class_{i} object(extra) part" for i in range(203)], 1024),
    "n700_L4096": ([f"class_{i} object(extra) part" for i in range(700)], 4096),
    "coco_L1024": (
        ["person", "traffic light", "fire_hydrant", "teddy bear (toy)", "hair drier"] * 60,
        1024,
    ),
}
COLUMNS = slice(None, None, 96)


def main(src: str, out_path: str) -> None:
    sys.path.insert(0, str(TOOLS.resolve()))
    torch.set_num_threads(2)
    import make_reference as mr
    import shims

    out_path = str(Path(out_path).resolve())
    shims.install(src)
    import detectron2.projects.hipie  # noqa: F401
    from detectron2.projects.hipie.data.coco_dataset_mapper_uni import create_queries_and_maps
    from detectron2.projects.hipie.models.deformable_detr.bert_model import BertEncoder
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    sd = mr.rule_state_dict(mr.load_key_list("r50_parts"), 1)
    pre = "text_encoder.body.model."
    bert_sd = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    del sd
    tok = AutoTokenizer.from_pretrained("projects/HIPIE/bert-base-uncased")
    tensors = {}
    for name, (names, max_len) in CASES.items():
        lb = types.SimpleNamespace(
            MODEL_TYPE="bert-base-uncased", MAX_QUERY_LEN=max_len, USE_CHECKPOINT=False, N_LAYERS=1
        )
        cfg = types.SimpleNamespace(
            MODEL=types.SimpleNamespace(LANGUAGE_BACKBONE=lb, PARALLEL_DET=False)
        )
        enc = BertEncoder(cfg)
        enc.model.load_state_dict(bert_sd, strict=True)
        enc.eval()
        expr, pmap = create_queries_and_maps([{"name": n} for n in names], tok)
        t = tok.batch_encode_plus(
            [expr], max_length=max_len, padding="max_length", return_tensors="pt", truncation=True
        )
        with torch.no_grad():
            res = enc(
                {"input_ids": t.input_ids.clone(), "attention_mask": t.attention_mask},
                sep=tok(".").input_ids[1],
            )
        n = int(t.attention_mask.sum())
        assert float(res["hidden"][0, n:].abs().max()) == 0.0
        tensors[f"{name}/input_ids"] = t.input_ids[0, :n].clone()
        tensors[f"{name}/positive_map"] = torch.tensor(
            [[pmap[k][0], pmap[k][-1]] for k in sorted(pmap)], dtype=torch.int64
        )
        tensors[f"{name}/hidden_cols"] = res["hidden"][0, :n, COLUMNS].contiguous()
    save_file(tensors, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
