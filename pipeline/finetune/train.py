"""Fine-tune HIPIE on reviewed labels with Ray Train (`python -m jobs.train`).

Flow::

    TrainingSet (reviewed rows + classes, pipeline.finetune.data)
        ──► TorchTrainer: N workers (one per GPU on a cluster; CPU workers with gloo locally)
              each: build HIPIE (or resume from ray.train.get_checkpoint()), DDP via
              ray.train.torch.prepare_model, its shard of every step's images, the losses of
              hipie.training (panoptic pass + part pass, Eq. 3), AdamW, ray.train.report every
              `report_every` steps (train_log.jsonl has every step) and a Ray Train checkpoint (hipie.save_checkpoint + optimizer state) every
              `checkpoint_every` steps
        ──► <output>/checkpoint/  (accepted by `python -m jobs.label --checkpoint`)
            <output>/vocabulary.json  (the classes it was fine-tuned on, for --vocabulary)
            <output>/train_log.jsonl  (rank 0: one line per step, start/resume and checkpoints)

A worker that dies makes Ray Train restart the worker group (`FailureConfig(max_failures)`); the
new workers continue from the last checkpoint, at its step, with its optimizer state. A
checkpoint counts once Ray Train's controller has taken its report (it polls the workers every
~2 s): a worker killed right after reporting one resumes from the one before. A rerun
with the same output folder continues the same way (Ray Train restores the run from its
storage folder) unless `overwrite` is set.

Fine-tuning defaults (deviations from the paper's from-scratch recipe, App. A.3.3): lr 2e-5
instead of 1e-4, the image encoder at lr x 0.1 (or frozen), the text encoder frozen, short
warm-up; the classes are the reviewed labels, whatever their names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.finetune.data import RowDataset, TrainingSet

__all__ = ["FinetuneConfig", "FinetuneResult", "run_finetune", "shard_indices", "train_worker"]

STATE_FILE = "trainer_state.pt"  # optimizer, scheduler and step inside a checkpoint folder
LOG_FILE = "train_log.jsonl"
INFO_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run (picklable: it travels to the Ray Train workers)."""

    output: str  # local folder: checkpoint/, vocabulary.json, train_log.jsonl, finetune.json
    init: str = "tiny"  # "tiny" (shipped; untrained when absent), "random:<preset>", or a folder
    steps: int = 500  # optimizer steps in total (a resumed run counts its earlier steps)
    batch_size: int = 2  # images per worker per step (global batch = batch_size x workers)
    lr: float = 2e-5  # AdamW base lr (paper 1e-4 for training from scratch; lower to fine-tune)
    backbone_lr_mult: float = 0.1  # lr factor of the image encoder (paper: 0.1)
    freeze_backbone: bool = False  # keep the image encoder fixed instead
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 20  # linear warm-up from 0.001 x lr
    lr_drops: tuple[float, ...] = (0.9,)  # fractions of `steps` where lr is multiplied by 0.1
    grad_clip: float = 0.1  # max global gradient norm; 0 = off
    image_size: int | None = None  # training image size (longer side) and the saved model's
    #   test size; None = the initial model's test size
    part_instance_prob: float = 0.5  # chance a part prompt also lists the instance labels
    part_distractors: int = 0  # absent "thing part" labels added to part prompts as negatives
    workers: int = 1  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker (NCCL); else CPU workers (gloo)
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    cpus_per_worker: float = 1.0  # fractional on small machines
    num_threads: int | None = None  # torch threads per worker; None = max(1, cpus_per_worker)
    report_every: int = 10  # steps between `ray.train.report` calls (metrics averaged over them;
    #   Ray Train's controller takes one report per worker every ~2 s, so reporting every fast
    #   step would throttle training; train_log.jsonl has every step)
    checkpoint_every: int = 100  # steps between checkpoints (the last step always saves)
    keep_checkpoints: int = 2  # Ray Train checkpoints kept in storage
    max_failures: int = 3  # worker-group restarts before the run fails
    seed: int = 0  # seeds the image order, prompt shuffling and torch
    storage: str | None = None  # Ray Train storage (shared by all nodes); None = <output>/ray
    run_name: str = "finetune"  # Ray Train run name (folder in storage)
    overwrite: bool = False  # start afresh instead of continuing a run found in storage


@dataclass(frozen=True)
class FinetuneResult:
    """What a run leaves behind.

    checkpoint: the final model folder (model.safetensors, config.json, tokenizer/, ...).
    step: the last step trained.
    metrics: the last reported metrics (loss terms, lr).
    vocabulary: the classes the model was fine-tuned on (`pipeline.vocabulary.Vocabulary`).
    seconds: wall time of the run.
    """

    checkpoint: Path
    step: int
    metrics: dict[str, float]
    vocabulary: Any
    seconds: float


# --------------------------------------------------------------------------- data sharding
def shard_indices(
    step: int, *, rank: int, world_size: int, batch_size: int, size: int, seed: int
) -> list[int]:
    """Dataset indices of worker ``rank`` at ``step``: a pure function of the step, so that a
    resumed run sees the batches it would have seen. Global sample k = (step x world_size + rank)
    x batch_size + j walks a fresh permutation of the set per epoch, so within an epoch the
    workers' shards are disjoint and every image is seen once."""
    out = []
    first = (step * world_size + rank) * batch_size
    for k in range(first, first + batch_size):
        epoch, pos = divmod(k, size)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(size)[pos]))
    return out


# --------------------------------------------------------------------------- model
def build_initial_model(init: str, image_size: int | None = None):
    """The model to start from (train mode not set): see `FinetuneConfig.init`."""
    from hipie.build import PRESETS, WEIGHTS_DIR, build_hipie

    if init.startswith("random:"):
        model = build_hipie(init.split(":", 1)[1])
    elif init in PRESETS and not Path(init).is_dir():
        shipped = WEIGHTS_DIR / init
        if (shipped / "model.safetensors").is_file():
            model = build_hipie(checkpoint=init)
        else:  # the shipped weights are not trained yet: start from an untrained model
            print(f"[finetune] no shipped weights at {shipped}: starting from random:{init}")
            model = build_hipie(init)
    else:
        model = build_hipie(checkpoint=init)
    if image_size:
        model.config = dataclasses.replace(model.config, test_size=int(image_size))
    return model


class LossModule(nn.Module):
    """HIPIE + criterion with `forward(batch, passes) -> (loss, logs)`, so that DDP (which syncs
    gradients of what runs inside its `forward`) covers the image encoding and every text pass."""

    def __init__(self, *, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, batch, passes) -> tuple[torch.Tensor, dict[str, float]]:
        from hipie.training.train import step_loss

        device = next(p for p in self.model.parameters() if p.requires_grad).device
        return step_loss(self.model, self.criterion, batch, passes, device)


def _train_config(cfg: FinetuneConfig):
    """The `hipie.training.train.TrainConfig` fields that its step helpers read."""
    from hipie.training.train import TrainConfig

    return TrainConfig(
        passes=("panoptic", "parts"),
        pass_weights=(1.0, 1.0),
        part_instance_prob=cfg.part_instance_prob,
        part_distractors=cfg.part_distractors,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        backbone_lr_mult=cfg.backbone_lr_mult,
        warmup_steps=cfg.warmup_steps,
        lr_drops=cfg.lr_drops,
        grad_clip=cfg.grad_clip,
        seed=cfg.seed,
    )


def _save(model, optimizer, scheduler, step: int, folder: Path, info: dict) -> None:
    """A checkpoint folder: hipie.save_checkpoint + trainer_state.pt + finetune.json."""
    from hipie.build import save_checkpoint

    # a frozen pretrained text encoder is reloaded from its source (keeps checkpoints small)
    save_checkpoint(model, folder, include_text_encoder=not model.config.text_encoder.pretrained)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(state, folder / STATE_FILE)
    (folder / INFO_FILE).write_text(json.dumps({**info, "step": step}, indent=2))


def _log(path: Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the worker loop
def train_worker(loop_config: dict) -> None:
    """Ray Train `train_loop_per_worker`: ``loop_config`` = {"config": FinetuneConfig,
    "training_set": TrainingSet}. Reads top to bottom: data, model (fresh or resumed), DDP,
    optimizer, loop with periodic reports and checkpoints."""
    import ray.train
    import ray.train.torch

    from hipie.build import build_hipie
    from hipie.training.criterion import build_criterion
    from hipie.training.data import collate
    from hipie.training.train import (
        FrozenBertCache,
        lr_factor,
        make_passes,
        optimizer_step,
        param_groups,
    )

    cfg: FinetuneConfig = loop_config["config"]
    training_set: TrainingSet = loop_config["training_set"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.num_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)  # denoising noise differs per worker
    log_path = Path(cfg.output) / LOG_FILE if rank == 0 else None

    # model: from the last checkpoint when Ray Train restarts us (or restores the run), else init
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model = build_hipie(checkpoint=folder)
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    else:
        model = build_initial_model(cfg.init, cfg.image_size)
    model.train()
    model.text_encoder.bert.requires_grad_(False)  # frozen text encoder: no dropout, memoized
    model.text_encoder.bert.eval()
    model.text_encoder.bert.forward = FrozenBertCache(model.text_encoder.bert)
    if cfg.freeze_backbone:
        model.image_encoder.requires_grad_(False)
        model.image_encoder.eval()
    image_size = model.config.test_size  # train at the scale the predictor will label at
    dataset = RowDataset(training_set, max_size=image_size)
    tcfg = _train_config(cfg)

    criterion = build_criterion(tcfg.criterion)
    wrapped = ray.train.torch.prepare_model(
        LossModule(model=model, criterion=criterion),
        parallel_strategy_kwargs={"find_unused_parameters": True},  # passes skip some heads
    )
    device = ray.train.torch.get_device()
    amp = cfg.amp and device.type == "cuda"
    groups = [g for g in param_groups(model, tcfg) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=tcfg))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    _log(log_path, {"event": "start", "step": step, "resumed": state is not None, "world": world})
    info = {
        "init": cfg.init,
        "things": list(training_set.things),
        "stuff": list(training_set.stuff),
        "parts": list(training_set.parts),
        "images": len(training_set),
        "image_size": image_size,
    }

    window: list[dict[str, float]] = []  # logs of the steps since the last report
    while step < cfg.steps:
        idx = shard_indices(step, rank=rank, world_size=world, batch_size=cfg.batch_size,
                            size=len(dataset), seed=cfg.seed)  # fmt: skip
        batch = collate([dataset[i] for i in idx], size_divisibility=32)
        # prompt order and label sampling: a function of the step (the same on every worker)
        passes = make_passes(batch, dataset, tcfg, random.Random(cfg.seed * 1_000_003 + step))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss, logs = wrapped(batch, passes)
        optimizer_step(loss, logs, step, wrapped, optimizer, scheduler, cfg.grad_clip)
        step += 1
        window.append(logs)
        _log(log_path, {"event": "step", "step": step, "loss": logs["loss"], "time": time.time()})
        save = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if not (save or step % cfg.report_every == 0):
            continue
        # every worker reports at the same steps (a report is a barrier across the workers)
        metrics = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
        metrics.update(step=step, lr=optimizer.param_groups[0]["lr"], steps_averaged=len(window))
        window = []
        if not save:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save(model, optimizer, scheduler, step, Path(tmp), info)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        _log(log_path, {"event": "checkpoint", "step": step})


# --------------------------------------------------------------------------- the driver
def run_finetune(config: FinetuneConfig, training_set: TrainingSet) -> FinetuneResult:
    """Fine-tune on ``training_set`` with Ray Train; the final model lands in
    ``<output>/checkpoint``. Ray must be initialised by the caller (``jobs.train`` does it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if len(training_set) == 0:
        raise ValueError("no training images: nothing reviewed, or no usable labels")
    out = Path(config.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = config.storage or str(out / "ray")
    if config.overwrite:
        if "://" not in storage:
            shutil.rmtree(Path(storage) / config.run_name, ignore_errors=True)
        (out / LOG_FILE).unlink(missing_ok=True)
    config = dataclasses.replace(config, output=str(out))
    vocabulary = training_set.vocabulary()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "training_set": training_set},
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("the run reported no checkpoint")
    final, tmp = out / "checkpoint", out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (out / "vocabulary.json").write_text(json.dumps(vocabulary.to_dict(), indent=2))
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if _is_number(v)}
    step = int(json.loads((final / INFO_FILE).read_text())["step"])
    return FinetuneResult(
        checkpoint=final,
        step=step,
        metrics=metrics,
        vocabulary=vocabulary,
        seconds=time.perf_counter() - start,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
