"""Forward latency and peak memory of HIPIE-R50 and HIPIE-ViT-H (random weights).

    python bench/model_speed.py                       # r50 + vit_h, 1024, fp32 + bf16, batch 1 + 8
    python bench/model_speed.py --presets r50 --batches 1 --dtypes fp32 --size 512

On CUDA: warm-up then timed repetitions with synchronization, peak memory from
`torch.cuda.max_memory_allocated`. On CPU (no GPU): a small number of repetitions, batch sizes
capped by --cpu-max-batch, peak memory = growth of the process's max RSS. The text encoder is a
random bert-base-shaped model (no download). The timed call is `encode_image` + `decode`
(things + stuff) with a 10-label vocabulary whose text features are computed once beforehand,
as the predictor does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import torch

from hipie.build import PRESETS, build_hipie, parameter_counts, random_bert_base_text_config

VOCAB = ["person", "dog", "car", "bicycle", "tree", "grass", "sky", "road", "building", "wall"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    model,
    *,
    size: int,
    batch: int,
    dtype: torch.dtype,
    reps: int,
    warmup: int,
    device: torch.device,
) -> dict:
    """Time `reps` forwards of a (batch, 3, size, size) input; returns seconds and memory."""
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        text = model.encode_text(VOCAB)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with torch.inference_mode(), autocast:
            feats = model.encode_image(images)
            out = model.decode(feats, text)
        return out

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20
    med = sorted(times)[len(times) // 2]
    return {
        "batch": batch,
        "dtype": str(dtype).split(".")[-1],
        "size": size,
        "s_per_batch": round(med, 4),
        "s_per_image": round(med / batch, 4),
        "peak_mem_gib": round(peak, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["r50", "vit_h"], choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    parser.add_argument("--cpu-max-batch", type=int, default=1)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or (10 if device.type == "cuda" else 1)
    warmup = 3 if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print("device:", torch.cuda.get_device_name(device))
    else:
        print("device: cpu (no CUDA) -- small repetition count, batch <=", args.cpu_max_batch)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name in args.presets:
        cfg = dataclasses.replace(PRESETS[name](), text_encoder=random_bert_base_text_config())
        model = build_hipie(cfg).to(device)
        counts = parameter_counts(model)
        print(
            json.dumps(
                {"preset": name, "params_M": {k: round(v / 1e6, 1) for k, v in counts.items()}}
            )
        )
        for dt in args.dtypes:
            for batch in args.batches:
                if device.type == "cpu" and batch > args.cpu_max_batch:
                    continue
                try:
                    row = bench_one(
                        model,
                        size=args.size,
                        batch=batch,
                        dtype=dtypes[dt],
                        reps=reps,
                        warmup=warmup,
                        device=device,
                    )
                except torch.OutOfMemoryError:
                    row = {"batch": batch, "dtype": dt, "error": "out of memory"}
                    torch.cuda.empty_cache()
                print(json.dumps({"preset": name, **row}))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
