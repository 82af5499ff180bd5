"""Training the released architecture (`HipieRelease`) on the synthetic scenes.

`train_release(cfg)` builds a release preset (our `tiny` by default) or loads a checkpoint,
freezes its text encoder, and optimizes the release's losses of the three passes
(`hipie.training.release_step.train_losses`) on a fresh synthetic batch every step: AdamW, the
backbone at lr x `backbone_lr_mult` (App. A.3.3: 0.1), linear warm-up, x0.1 drops, gradient
clipping (the release's 0.1). Checkpoints are our release folders (`save_release_folder`) plus
`trainer_state.pt` (optimizer, step, history: tensors and plain containers, read back with
`weights_only=True`), written atomically; `resume` continues a run where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hipie.release_build import load_release_folder, release_model, save_release_folder
from hipie.synthetic.generator import SceneConfig, SceneGenerator
from hipie.synthetic.scene import PART_CLASSES, STUFF_CLASSES, THING_CLASSES
from hipie.training.config_files import config_from_dict
from hipie.training.data import sample_from_scene
from hipie.training.release_criterion import ReleaseCriterion
from hipie.training.release_step import PassWeights, train_losses
from hipie.training.train import STATE_FILE, lr_factor, save_training_checkpoint

__all__ = ["ReleaseTrainConfig", "ReleaseTrainResult", "train_release"]

BACKBONE_PREFIXES = ("backbone.",)


@dataclass(frozen=True)
class ReleaseTrainConfig:
    """A training run of the released architecture (JSON round-trip through `to_dict`)."""

    architecture: str = "release"  # tells `python -m hipie.train` which loop runs the config
    preset: str = "tiny"  # release preset to start from
    init_checkpoint: str | None = None  # or a release folder to start from
    scene: SceneConfig = field(default_factory=SceneConfig)  # synthetic scene settings
    pass_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # universal, parts, referring
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    backbone_lr_mult: float = 0.1
    warmup_steps: int = 50
    lr_drops: tuple[float, ...] = (0.9,)
    lr_drop_factor: float = 0.1
    grad_clip: float = 0.1
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    out_dir: str = "runs/hipie_release"
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReleaseTrainConfig:
        return config_from_dict(cls, data, {"scene": SceneConfig})


@dataclass
class ReleaseTrainResult:
    checkpoint: Path
    step: int
    steps_per_second: float
    history: dict[str, list[float]]


def _param_groups(model: torch.nn.Module, cfg: ReleaseTrainConfig) -> list[dict[str, Any]]:
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith(BACKBONE_PREFIXES) else rest).append(p)
    return [
        {"params": rest, "lr": cfg.lr},
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult},
    ]


def _save(out_dir: Path, model, optimizer, scheduler, step: int, cfg, history) -> Path:
    """`out_dir/checkpoint/` (a release folder + trainer state, replaced atomically), and
    `history.json`, readable while a run goes on."""
    source = f"hipie.training.release_train step {step}"
    path = save_training_checkpoint(
        out_dir, model, optimizer, scheduler, step, cfg, history,
        save_model=lambda m, folder: save_release_folder(m, folder, source=source),
    )  # fmt: skip
    (out_dir / "history.json").write_text(json.dumps(history))
    return path


def train_release(cfg: ReleaseTrainConfig) -> ReleaseTrainResult:
    """Train as `cfg` says; returns the checkpoint folder and the loss curve."""
    from tqdm.auto import tqdm

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed)
    ckpt = out_dir / "checkpoint"
    resuming = cfg.resume and (ckpt / STATE_FILE).is_file()
    if resuming or cfg.init_checkpoint:
        model = load_release_folder(ckpt if resuming else cfg.init_checkpoint)
    else:
        model = release_model(cfg.preset)
    model.to(device).train()
    model.text.requires_grad_(False)  # frozen text encoder (its dropout off too)
    model.text.eval()
    criterion = ReleaseCriterion()
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))
    step, history = 0, {"step": [], "loss": [], "lr": []}
    if resuming:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])

    generator = SceneGenerator(cfg.scene, seed=cfg.seed)
    weights = PassWeights(*cfg.pass_weights)
    vocab = dict(things=THING_CLASSES, stuff=STUFF_CLASSES, parts=PART_CLASSES)
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, dynamic_ncols=True)
    start, t0 = step, time.perf_counter()
    while step < cfg.steps:
        # the batch and the prompts are a function of the step: a resumed run continues alike
        first = step * cfg.batch_size
        samples = [sample_from_scene(generator.scene(first + i)) for i in range(cfg.batch_size)]
        rng = random.Random(cfg.seed * 1_000_003 + step)
        losses = train_losses(model, criterion, samples, rng=rng, weights=weights, **vocab)
        loss = losses["total"]
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            history["step"].append(step)
            history["loss"].append(float(loss.detach()))
            history["lr"].append(optimizer.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save(out_dir, model, optimizer, scheduler, step, cfg, history)
    elapsed = time.perf_counter() - t0
    bar.close()
    path = _save(out_dir, model, optimizer, scheduler, step, cfg, history) if step > start else ckpt
    sps = (step - start) / elapsed if step > start and elapsed > 0 else 0.0
    return ReleaseTrainResult(path, step, sps, history)
