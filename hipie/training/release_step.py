"""One training step of the released architecture (`HipieRelease`) on our training samples.

A batch of `TrainSample`s is encoded once (backbone, thing input projections, the whole MaskDINO
stuff branch) and trained on the release's three kinds of pass, each with its own prompt:

- things + stuff: the vocabulary's things and stuff as one class prompt; things are the thing
  branch's targets, and every target (things and stuff) the stuff branch's and the two-stage
  proposals' (`ReleaseCriterion`);
- parts: the object-part classes ("robot head") and the things as one class prompt; a part is
  a *stuff* target of that pass, as the release's part pass prompts parts as stuff classes (its
  part masks come from the semantic map inside each instance), and its positive map also marks
  its object's label (`label_positive_map(also=...)`);
- referring: one expression per image, its thing the only target of the thing branch, scored
  against the pooled expression (the release adds no stuff-branch loss on grounding batches).

The losses of the passes are summed (x `PassWeights`) and back-propagated once. Boxes are
normalized by each image's own size, masks compared on the 1/4 grid (`ReleaseCriterion`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hipie.box_ops import box_xyxy_to_cxcywh, masks_to_boxes
from hipie.modeling.hipie_release import HipieRelease, ImageEncoding, Prompt
from hipie.modeling.maskdino_decoder import StuffPrediction
from hipie.modeling.stuff_branch import StuffBranch
from hipie.modeling.thing_branch import grounding_token
from hipie.training.data import TrainSample
from hipie.training.release_criterion import ReleaseCriterion, SetPrediction
from hipie.training.release_targets import ReleaseTargets, label_positive_map

__all__ = [
    "PassWeights",
    "part_targets",
    "pass_losses",
    "referring_targets",
    "stuff_predictions",
    "train_losses",
    "universal_targets",
]


@dataclass(frozen=True)
class PassWeights:
    universal: float = 1.0
    parts: float = 1.0
    referring: float = 1.0


def _boxes(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) cxcywh normalized by the image size (h, w)."""
    h, w = size
    xyxy = masks_to_boxes(masks).float() / torch.tensor([w, h, w, h], dtype=torch.float32)
    return box_xyxy_to_cxcywh(xyxy).reshape(-1, 4)


def _targets(
    masks: torch.Tensor,
    columns: list[int],
    is_thing: list[bool],
    prompt: Prompt,
    size: tuple[int, int],
    also: list[int] | None = None,
) -> ReleaseTargets:
    keep = masks.flatten(1).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)
    cols = torch.tensor(columns, dtype=torch.long)[keep]
    extra = None if also is None else torch.tensor(also, dtype=torch.long)[keep]
    num_tokens = prompt.tokens.shape[1]
    return ReleaseTargets(
        positive_map=label_positive_map(cols, prompt.positive_map, num_tokens, also=extra),
        boxes=_boxes(masks[keep], size),
        masks=masks[keep],
        is_thing=torch.tensor(is_thing, dtype=torch.bool)[keep],
        image_size=size,
    )


def universal_targets(sample: TrainSample, prompt: Prompt) -> ReleaseTargets:
    """The things and stuff of a sample for a things + stuff prompt (classes by name)."""
    col = {name: i for i, name in enumerate(prompt.class_names)}
    names = list(sample.thing_classes) + list(sample.stuff_classes)
    masks = torch.cat([sample.thing_masks, sample.stuff_masks])
    thing = [True] * len(sample.thing_classes) + [False] * len(sample.stuff_classes)
    return _targets(masks, [col[n] for n in names], thing, prompt, sample.size)


def part_targets(sample: TrainSample, prompt: Prompt) -> ReleaseTargets:
    """The parts (and subparts) of a sample for a part prompt: stuff targets whose positive map
    also marks their object's label when the prompt holds it."""
    col = {name: i for i, name in enumerate(prompt.class_names)}
    known = [i for i, n in enumerate(sample.part_classes) if n in col]
    owners = [sample.thing_classes[int(sample.part_parents[i])] for i in known]
    return _targets(
        sample.part_masks[known],
        [col[sample.part_classes[i]] for i in known],
        [False] * len(known),
        prompt,
        sample.size,
        also=[col.get(o, -1) for o in owners],
    )


def referring_targets(sample: TrainSample, thing: int | None, prompt: Prompt) -> ReleaseTargets:
    """The referred thing (index into the sample's things), or no target for None."""
    masks = sample.thing_masks[thing : thing + 1] if thing is not None else sample.thing_masks[:0]
    return ReleaseTargets(
        positive_map=torch.ones(len(masks), 1, dtype=torch.bool),
        boxes=_boxes(masks, sample.size),
        masks=masks,
        is_thing=torch.ones(len(masks), dtype=torch.bool),
        image_size=sample.size,
    )


def stuff_predictions(
    stuff: StuffBranch, enc: ImageEncoding, tokens: torch.Tensor
) -> tuple[list[SetPrediction], SetPrediction]:
    """The stuff branch's predictions of a training-mode encoding, scored against `tokens`:
    every decoder prediction (heads `cls_embed[0..L-1]`, the last `cls_embed[-1]`) and the
    two-stage proposals (`cls_embed[L]`, the head the release reserves for `interm_outputs`)."""
    dec = enc.stuff
    if dec.predictions is None or dec.proposals is None:
        raise ValueError("the image was encoded in eval mode: call model.train() first")
    heads = list(stuff.cls_embed[: len(dec.predictions) - 1]) + [stuff.cls_embed[-1]]

    def scored(head, p: StuffPrediction) -> SetPrediction:
        return SetPrediction(head(p.class_embed, tokens.to(p.class_embed.dtype)), p.boxes, p.masks)

    layers = [scored(h, p) for h, p in zip(heads, dec.predictions)]
    return layers, scored(stuff.cls_embed[len(dec.predictions) - 1], dec.proposals)


def pass_losses(
    model: HipieRelease,
    criterion: ReleaseCriterion,
    enc: ImageEncoding,
    prompt: Prompt,
    targets: Sequence[ReleaseTargets],
) -> dict[str, torch.Tensor]:
    """The release's losses of one pass on a training-mode encoding (see the module docstring)."""
    out = model.forward_pass(enc, prompt)
    batch = enc.srcs[0].shape[0]
    token_mask = prompt.token_mask.expand(batch, -1)
    if prompt.grounding:
        pooled = grounding_token(prompt.tokens.expand(batch, -1, -1), token_mask)
        return criterion(targets=targets, branch=model.thing, things=out.thing, class_tokens=pooled)
    layers, proposals = stuff_predictions(model.stuff, enc, out.thing.lang)
    return criterion(
        targets=targets,
        branch=model.thing,
        things=out.thing,
        stuff_layers=layers,
        stuff_proposals=proposals,
        token_mask=token_mask,
    )


def train_losses(
    model: HipieRelease,
    criterion: ReleaseCriterion,
    samples: Sequence[TrainSample],
    *,
    things: Sequence[str],
    stuff: Sequence[str],
    parts: Sequence[str] = (),
    rng: random.Random | None = None,
    weights: PassWeights = PassWeights(),
) -> dict[str, torch.Tensor]:
    """Losses of one batch over the three passes, "total" their weighted sum.

    The class order of each prompt is shuffled with `rng` (when given), so that no class learns
    a position. Keys are `<pass>/<loss name>`; "total" is what to back-propagate.
    """
    rng = rng or random.Random(0)
    enc = model.encode_image([s.image for s in samples])
    total = torch.zeros((), device=model.device)
    losses: dict[str, torch.Tensor] = {}

    def add(name: str, weight: float, values: dict[str, torch.Tensor]) -> None:
        nonlocal total
        total = total + weight * values["total"]
        losses.update({f"{name}/{k}": v.detach() for k, v in values.items()})

    names = list(things) + list(stuff)
    rng.shuffle(names)
    is_thing = {i + 1: n in set(things) for i, n in enumerate(names)}
    prompt = model.encode_classes(names, is_thing)
    add("universal", weights.universal, pass_losses(
        model, criterion, enc, prompt, [universal_targets(s, prompt) for s in samples]
    ))  # fmt: skip
    if parts and weights.parts:
        names = list(parts) + list(things)
        rng.shuffle(names)
        prompt = model.encode_classes(names, {i + 1: False for i in range(len(names))})
        add("parts", weights.parts, pass_losses(
            model, criterion, enc, prompt, [part_targets(s, prompt) for s in samples]
        ))  # fmt: skip
    if weights.referring and any(s.expressions for s in samples):
        picks = [rng.choice(s.expressions) if s.expressions else ("the object", None)
                 for s in samples]  # fmt: skip
        prompt = model.encode_expression([text for text, _ in picks])
        targets = [referring_targets(s, t, prompt) for s, (_, t) in zip(samples, picks)]
        add("referring", weights.referring, pass_losses(model, criterion, enc, prompt, targets))
    losses["total"] = total
    return losses
