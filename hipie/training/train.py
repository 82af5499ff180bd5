"""The training loop of HIPIE: `train(TrainConfig(...))`, read top to bottom.

One step = one batch of images, encoded ONCE by the image encoder, then decoded in up to three
text passes that share those features (as inference does, DESIGN.md):

1. panoptic: prompt = thing + stuff labels; thing decoder vs things (simOTA), stuff decoder vs
   stuff (Hungarian, no box loss) and vs things (class + box, Sec. 3.5);
2. parts: prompt = "object-part" labels (+ instance labels); thing decoder vs parts and subparts,
   each positive for its part label and its instance label (L_clsPart + L_clsThing, Sec. 3.7);
3. referring: prompt = one expression per image; thing decoder vs the referred thing, scored by
   the [CLS] embedding.

The loss is the sum over passes of Eq. (3) (`hipie.training.criterion`). AdamW (lr 1e-4, wd
0.01, backbone x 0.1), linear warm-up then x0.1 drops at fractions of the schedule (App. A.3.3),
bf16 autocast on CUDA, gradient clipping, periodic evaluation, checkpoint + resume, a tqdm bar and
a PNG of the curves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hipie.synthetic.generator import SceneConfig, SceneGenerator
from hipie.training.config_files import config_from_dict, read_config_file
from hipie.training.criterion import CriterionConfig, SetCriterion, build_criterion
from hipie.training.data import (
    Batch,
    CocoInstancesDataset,
    CocoPanopticDataset,
    PassTargets,
    SyntheticDataset,
    collate,
    panoptic_targets,
    part_targets,
    referring_targets,
    resize_sample,
    sample_from_scene,
)
from schemas.part_names import join_part, split_part_label

__all__ = ["TrainConfig", "TrainResult", "evaluate_synthetic", "load_config", "train"]

STATE_FILE = "trainer_state.pt"
FRESH_SCENES = 2**31 - 1  # "infinite" synthetic set: scene k of the run is generator scene k


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Paths are strings so that the config round-trips through JSON/YAML."""

    # --- model
    preset: str = "tiny"  # hipie.build preset to start from
    init_checkpoint: str | None = None  # start from these weights instead (a checkpoint folder)
    train_text_encoder: bool = False  # fine-tune the BERT (at lr x backbone_lr_mult); else frozen
    # --- data
    data: str = "synthetic"  # "synthetic" | "coco_panoptic" | "coco_instances"
    scene: SceneConfig = field(default_factory=SceneConfig)  # synthetic scene settings
    num_scenes: int | None = None  # synthetic training pool size; None = a fresh scene per sample
    coco_json: str | None = None  # panoptic or instances JSON
    coco_images: str | None = None  # image folder
    coco_panoptic_dir: str | None = None  # panoptic PNG folder
    coco_parts_json: str | None = None  # optional parts.json (write_coco_panoptic layout)
    coco_referring_json: str | None = None  # optional referring.json
    max_size: int | None = None  # resize images to this longer side (tiny: its test size 320)
    num_workers: int = 0  # DataLoader worker processes
    fixed_batch: bool = False  # reuse the first batch every step (overfitting check)
    # --- text passes
    passes: tuple[str, ...] = ("panoptic", "parts", "referring")  # text passes per step
    pass_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # loss weight of each pass
    shuffle_prompts: bool = True  # random label order per step (prompts are open-vocabulary)
    prompt_orders: int = 0  # >0: draw label orders from this many fixed ones (lets the frozen
    #   text encoder's cache hit); 0: a fresh order every step
    part_instance_prob: float = 1.0  # chance a part prompt also lists instance labels (Sec. 3.7)
    part_distractors: int = 0  # absent "thing part" combinations added to a part prompt
    criterion: CriterionConfig = field(default_factory=CriterionConfig)  # loss weights
    # --- optimization (App. A.3.2-A.3.3)
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # images per step
    lr: float = 1e-4  # AdamW base learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    backbone_lr_mult: float = 0.1  # lr factor of the image encoder (and a trained text encoder)
    warmup_steps: int = 50  # linear warm-up from 0.001 x lr
    lr_drops: tuple[float, ...] = (0.9,)  # fractions of `steps` where lr is multiplied by 0.1
    lr_drop_factor: float = 0.1  # factor of each drop
    grad_clip: float = 0.1  # max global gradient norm (DINO / UNINEXT); 0 = off
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    num_threads: int | None = None  # torch CPU threads (None = torch default)
    seed: int = 0  # seeds scenes, prompt shuffling and torch
    # --- bookkeeping
    out_dir: str = "runs/hipie"  # checkpoint, history.json, training.png
    log_every: int = 10  # progress bar / history interval (steps)
    eval_every: int = 500  # evaluation interval (steps); 0 = only at the end
    eval_scenes: int = 8  # held-out synthetic scenes per evaluation
    checkpoint_every: int = 500  # checkpoint interval (steps); the last step always saves
    resume: bool = False  # continue from out_dir/checkpoint if it exists
    progress: bool = True  # show a tqdm bar

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict` (lists become tuples; nested scene/criterion dicts)."""
        return config_from_dict(cls, data, {"scene": SceneConfig, "criterion": CriterionConfig})


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a .json or .yaml/.yml file, with keyword overrides (None = keep)."""
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data)


@dataclass(frozen=True)
class TrainResult:
    """What a run leaves behind.

    checkpoint: folder with model.safetensors, config.json, tokenizer/, trainer_state.pt.
    step: steps done.
    history: logged curves ({"step", "loss", "lr", "eval_step", "val_loss", metrics...}).
    steps_per_second: measured over this call's steps.
    """

    checkpoint: Path
    step: int
    history: dict[str, list[float]]
    steps_per_second: float


# --------------------------------------------------------------------------- data
class StepBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for steps `start .. steps - 1`, a pure function of the step (so
    a resumed run sees the same batches). With `shuffle`, the pool is reshuffled each epoch;
    without, sample k of the run is index k mod size (fresh synthetic scenes in order)."""

    def __init__(
        self,
        *,
        size: int,
        batch_size: int,
        start: int,
        steps: int,
        seed: int,
        shuffle: bool = True,
        fixed: bool = False,
    ) -> None:
        self.size, self.batch_size, self.start, self.steps = size, batch_size, start, steps
        self.seed, self.shuffle, self.fixed = seed, shuffle, fixed

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def indices(self, step: int) -> list[int]:
        if self.fixed:
            step = 0
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, self.size)
            if not self.shuffle:
                out.append(pos)
                continue
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            out.append(int(order[pos]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.indices(step)


def build_dataset(cfg: TrainConfig) -> Dataset:
    """The training set named by the config (exposes thing/stuff/part_classes)."""
    if cfg.data == "synthetic":
        length = cfg.num_scenes or FRESH_SCENES
        return SyntheticDataset(
            config=cfg.scene, seed=cfg.seed, length=length, max_size=cfg.max_size
        )
    if cfg.data == "coco_panoptic":
        return CocoPanopticDataset(
            json_path=cfg.coco_json,
            png_dir=cfg.coco_panoptic_dir,
            image_dir=cfg.coco_images,
            parts_json=cfg.coco_parts_json,
            referring_json=cfg.coco_referring_json,
            max_size=cfg.max_size,
        )
    if cfg.data == "coco_instances":
        return CocoInstancesDataset(
            json_path=cfg.coco_json, image_dir=cfg.coco_images, max_size=cfg.max_size
        )
    raise ValueError(f"unknown data {cfg.data!r}")


def make_passes(
    batch: Batch, dataset: Dataset, cfg: TrainConfig, rng: random.Random
) -> list[tuple[PassTargets, float]]:
    """The text passes of one step with their loss weights (skipping passes without labels)."""
    shuffle = None
    if cfg.shuffle_prompts:  # a fresh order, or one of `prompt_orders` fixed ones
        shuffle = random.Random(rng.randrange(cfg.prompt_orders)) if cfg.prompt_orders else rng
    out = []
    for name, weight in zip(cfg.passes, cfg.pass_weights, strict=True):
        if name == "panoptic" and (dataset.thing_classes or dataset.stuff_classes):
            out.append(
                (
                    panoptic_targets(
                        batch, dataset.thing_classes, dataset.stuff_classes, rng=shuffle
                    ),
                    weight,
                )
            )
        elif name == "parts" and dataset.part_classes:
            with_inst = rng.random() < cfg.part_instance_prob
            extra = _distractors(dataset, cfg.part_distractors, shuffle or rng)
            part = part_targets(batch, dataset.part_classes, dataset.thing_classes, rng=shuffle,
                                with_instances=with_inst, distractors=extra)  # fmt: skip
            out.append((part, weight))
        elif name == "referring" and any(s.expressions for s in batch.samples):
            out.append((referring_targets(batch, rng), weight))
        elif name not in ("panoptic", "parts", "referring"):
            raise ValueError(f"unknown pass {name!r}")
    return out


def _distractors(dataset: Dataset, k: int, rng: random.Random) -> list[str]:
    """`k` "thing part" labels that are not part classes (a thing with another thing's part)."""
    if k <= 0:
        return []
    things, part_set = list(dataset.thing_classes), set(dataset.part_classes)
    names = sorted({part for thing, part in (split_part_label(label, things) for label in part_set)
                    if thing})  # fmt: skip
    pool = [join_part(t, n) for t in things for n in names if join_part(t, n) not in part_set]
    return rng.sample(pool, min(k, len(pool)))


# --------------------------------------------------------------------------- model pieces
class FrozenBertCache:
    """Memoizes a FROZEN BERT's output per token sequence (exact: the encoder is in eval mode
    without gradients, and a sequence's features do not depend on the padding of its batch).

    Installed over the module's `forward` (an instance attribute, so the state dict and
    checkpoints are untouched); `TextEncoder` keeps doing its own tokenizing, windowing,
    projection (trained) and label pooling. Oldest entries are dropped past `max_entries`.
    """

    def __init__(self, bert: torch.nn.Module, *, max_entries: int = 4096) -> None:
        self.forward = bert.forward
        self.max_entries = max_entries
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        from types import SimpleNamespace

        rows = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]
        todo = [i for i, r in enumerate(rows) if r not in self.cache]
        self.hits += len(rows) - len(todo)
        self.misses += len(todo)
        if todo:
            feats = self.forward(
                input_ids=input_ids[todo], attention_mask=attention_mask[todo], **kwargs
            ).last_hidden_state
            for j, i in enumerate(todo):
                self.cache[rows[i]] = feats[j, : len(rows[i])].clone()
            while len(self.cache) > self.max_entries:
                self.cache.pop(next(iter(self.cache)))
        B, T = input_ids.shape
        first = self.cache[rows[0]]
        out = first.new_zeros(B, T, first.shape[-1])
        for i, r in enumerate(rows):
            out[i, : len(r)] = self.cache[r]
        return SimpleNamespace(last_hidden_state=out)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: backbone (image encoder, trained BERT) at lr x mult, the rest at lr."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith("image_encoder.") or name.startswith("text_encoder.bert.")
        (backbone if is_backbone else rest).append(p)
    return [
        {"params": rest, "lr": cfg.lr, "name": "default"},
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"},
    ]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then x factor after each drop."""
    warm = min(1.0, 0.001 + (1 - 0.001) * step / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    drops = sum(step >= int(frac * cfg.steps) for frac in cfg.lr_drops)
    return warm * cfg.lr_drop_factor**drops


def step_loss(
    model,
    criterion: SetCriterion,
    batch: Batch,
    passes: list[tuple[PassTargets, float]],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Encode the images once, decode every text pass, sum the weighted pass losses."""
    images = model.normalize(batch.images.to(device))
    B, _, H, W = images.shape
    sizes = batch.image_sizes.to(device)
    rows = torch.arange(H, device=device)[None, :, None] >= sizes[:, 0, None, None]
    cols = torch.arange(W, device=device)[None, None, :] >= sizes[:, 1, None, None]
    feats = model.encode_image(images, rows | cols)  # shared by every pass
    total, logs = None, {}
    for targets, weight in passes:
        things = [t.to(device) for t in targets.things]
        stuff = None if targets.stuff is None else [t.to(device) for t in targets.stuff]
        text = model.encode_text(list(targets.prompt), expression=targets.expression)
        out = model.decode(
            feats,
            text,
            things=True,
            stuff=stuff is not None,
            targets=[t.dn_targets() for t in things],
        )
        res = criterion(out, things=things, stuff=stuff, instance_columns=targets.instance_columns)
        name = "referring" if targets.expression else ("panoptic" if stuff is not None else "parts")
        logs[f"loss_{name}"] = float(res.total.detach())
        for key, value in res.terms.items():
            logs[f"{name}/{key}"] = float(value)
        total = weight * res.total if total is None else total + weight * res.total
    if total is None:
        raise ValueError("no text pass applies to this batch")
    logs["loss"] = float(total.detach())
    return total, logs


def optimizer_step(loss, logs, step: int, model, optimizer, scheduler, grad_clip: float) -> None:
    """Backward, gradient clipping (norm `grad_clip`, off at 0), one optimizer and one schedule
    step; a non-finite loss raises FloatingPointError naming the step and its logs."""
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"non-finite loss at step {step}: {logs}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


# --------------------------------------------------------------------------- evaluation
def _predictor_class():
    try:
        from hipie.predictor import HipiePredictor
    except ImportError:
        return None
    return HipiePredictor


def evaluate_synthetic(model, scenes: list) -> dict[str, float]:
    """PQ, part mIoU (mIoU_PartS) and referring oIoU of `model` on synthetic scenes, through
    `HipiePredictor` and the same scoring as `python -m hipie.evaluate synthetic`
    (`hipie.evaluation.benchmark.evaluate_scenes`).

    Returns {} when the predictor is not available; a task whose evaluation fails is left out
    (the run goes on).
    """
    from hipie.evaluation.benchmark import evaluate_scenes

    Predictor = _predictor_class()
    if Predictor is None or not scenes:
        return {}
    predictor = Predictor(model)
    read = {
        "panoptic": ("pq", lambda r: r["panoptic"]["All"]["pq"]),
        "parts": ("part_miou", lambda r: r["parts"]["miou_parts"]),
        "referring": ("oiou", lambda r: r["referring"]["oiou"]),
    }
    out: dict[str, float] = {}
    for task, (key, value) in read.items():
        try:
            out[key] = float(value(evaluate_scenes(predictor, scenes, tasks=(task,))))
        except Exception as err:  # noqa: BLE001 - evaluation must not kill a training run
            print(f"[eval] {task} failed: {err!r}")
    return out


@torch.no_grad()
def validation_loss(
    model, criterion, batches: list[Batch], dataset, cfg: TrainConfig, device: torch.device
) -> float:
    """Mean loss on fixed held-out batches (train mode for the decoders' training outputs, no
    gradient; the same prompts every time)."""
    losses = []
    with torch.random.fork_rng(devices=[]):  # denoising noise: the same every evaluation
        torch.manual_seed(0)
        for i, batch in enumerate(batches):
            passes = make_passes(batch, dataset, cfg, random.Random(i))
            with _autocast(device, cfg):
                loss, _ = step_loss(model, criterion, batch, passes, device)
            losses.append(float(loss))
    return float(np.mean(losses)) if losses else float("nan")


def _autocast(device: torch.device, cfg: TrainConfig):
    enabled = cfg.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------- checkpoints
def save_training_checkpoint(
    out_dir: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    cfg,
    history: dict,
    save_model: Callable[[Any, Path], Any] | None = None,
) -> Path:
    """Write `out_dir/checkpoint/` atomically: the model (`save_model(model, folder)`, default
    hipie.save_checkpoint) + trainer_state.pt (optimizer, scheduler, step, config, history, torch
    RNG: tensors and plain containers only, loadable with weights_only=True)."""
    if save_model is None:
        from hipie.build import save_checkpoint as save_model

    final, tmp = out_dir / "checkpoint", out_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": json.dumps(cfg.to_dict()),
        "history": json.dumps(history),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / STATE_FILE)
    old = out_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def plot_history(history: dict[str, list[float]], path: Path) -> None:
    """Loss (log scale) and evaluation metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history.get("step"):
        ax1.plot(history["step"], history["loss"], label="train loss", lw=1)
    if history.get("eval_step"):
        ax1.plot(history["eval_step"], history["val_loss"], "o-", label="val loss")
        for key in ("pq", "part_miou", "oiou"):
            if history.get(key):
                ax2.plot(history["eval_step"][-len(history[key]) :], history[key], "o-", label=key)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.legend()
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.set_title("held-out synthetic scenes")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> TrainResult:
    """Train HIPIE as `cfg` says; returns where the checkpoint is and the curves."""
    from tqdm.auto import tqdm

    from hipie.build import build_hipie

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    torch.manual_seed(cfg.seed)
    ckpt_dir = out_dir / "checkpoint"
    resuming = cfg.resume and (ckpt_dir / STATE_FILE).is_file()

    # data: training set, and fixed held-out scenes (another seed) for evaluation, so that the
    # curves compare like with like
    dataset = build_dataset(cfg)
    collate_fn = functools.partial(collate, size_divisibility=32)
    eval_scenes, eval_batches = [], []
    if cfg.data == "synthetic" and cfg.eval_scenes > 0:
        eval_gen = SceneGenerator(cfg.scene, seed=cfg.seed + 10_007)
        eval_scenes = [eval_gen.scene(i) for i in range(cfg.eval_scenes)]
        samples = [sample_from_scene(s) for s in eval_scenes]
        if cfg.max_size:
            samples = [resize_sample(s, cfg.max_size) for s in samples]
        eval_batches = [
            collate_fn(samples[i : i + cfg.batch_size])
            for i in range(0, len(samples), cfg.batch_size)
        ]

    # model: a preset (MiniLM text encoder loaded offline) or a checkpoint; train mode
    if resuming:
        model = build_hipie(checkpoint=str(ckpt_dir))
    elif cfg.init_checkpoint:
        model = build_hipie(checkpoint=cfg.init_checkpoint)
    else:
        model = build_hipie(cfg.preset)
    model.to(device).train()
    if not cfg.train_text_encoder:  # frozen BERT: no gradient, no dropout, outputs memoized
        model.text_encoder.bert.requires_grad_(False)
        model.text_encoder.bert.eval()
        model.text_encoder.bert.forward = FrozenBertCache(model.text_encoder.bert)
    criterion = build_criterion(cfg.criterion)

    # optimizer and schedule: AdamW, backbone at lr x backbone_lr_mult (paper 0.1), warm-up,
    # then x0.1 drops
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))
    step = 0
    history: dict[str, list[float]] = {
        "step": [],
        "loss": [],
        "lr": [],
        "eval_step": [],
        "val_loss": [],
    }
    if resuming:
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        history = json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])

    sampler = StepBatchSampler(
        size=len(dataset),
        batch_size=cfg.batch_size,
        start=step,
        steps=cfg.steps,
        seed=cfg.seed,
        fixed=cfg.fixed_batch,
        shuffle=not (cfg.data == "synthetic" and cfg.num_scenes is None),
    )
    # its own generator: a DataLoader iterator would otherwise draw from the global RNG that
    # the denoising noise uses, and a resumed run would not continue the same stream
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    def evaluate() -> None:
        model.eval()  # the predictor runs inference
        metrics = evaluate_synthetic(model, eval_scenes)
        model.train()
        if not cfg.train_text_encoder:
            model.text_encoder.bert.eval()
        history["eval_step"].append(step)
        history["val_loss"].append(
            validation_loss(model, criterion, eval_batches, dataset, cfg, device)
        )
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        bar.write(
            f"[eval] step {step}: val_loss {history['val_loss'][-1]:.3f} "
            + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        )

    def checkpoint() -> Path:
        path = save_training_checkpoint(out_dir, model, optimizer, scheduler, step, cfg, history)
        (out_dir / "history.json").write_text(json.dumps(history))
        plot_history(history, out_dir / "training.png")
        return path

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, dynamic_ncols=True)
    start_step, t0 = step, time.perf_counter()
    running = None
    for batch in loader:
        # prompts and the referring expression picked are a function of the step (resumable)
        passes = make_passes(batch, dataset, cfg, random.Random(cfg.seed * 1_000_003 + step))
        with _autocast(device, cfg):
            loss, logs = step_loss(model, criterion, batch, passes, device)
        optimizer_step(loss, logs, step, model, optimizer, scheduler, cfg.grad_clip)
        step += 1
        bar.update(1)

        running = logs["loss"] if running is None else 0.9 * running + 0.1 * logs["loss"]
        if step % cfg.log_every == 0 or step == cfg.steps or cfg.fixed_batch:
            history["step"].append(step)
            history["loss"].append(logs["loss"])
            history["lr"].append(optimizer.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evaluate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            checkpoint()
    elapsed = time.perf_counter() - t0
    if step > start_step or not (ckpt_dir / STATE_FILE).is_file():
        if eval_batches and step > start_step:
            evaluate()
        path = checkpoint()
    else:
        path = ckpt_dir
    bar.close()
    sps = (step - start_step) / elapsed if elapsed > 0 and step > start_step else 0.0
    return TrainResult(checkpoint=path, step=step, history=history, steps_per_second=sps)
