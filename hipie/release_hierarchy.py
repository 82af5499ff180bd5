"""The released HIPIE behind the predictor API the labeler uses (`hierarchy_batch`, the SAM vote).

`ReleaseHierarchyPredictor(model)` wraps a `HipieRelease` in a `ReleasePredictor` and returns the
`hipie.segments.Segments` the rest of the product consumes
(`pipeline.labeling.labeler.segments_to_masks`, `vote_from_hierarchy`). Per image, one encoding serves both passes, as in the release's demo:

1. the things + stuff pass: the release's top-k instances with a score above the display
   threshold (`ReleaseThresholds.score_threshold`, 0.5 as the demo), level "instance", and the
   stuff segments of the release's panoptic merge, level "stuff";
2. the part pass: "<thing> <part>" prompts (the vocabulary's `thing_parts` compositions), every
   prompt a stuff class; `sem_seg.argmax(0)` inside each kept instance whose class is the prompt's
   thing, kept above `part_min_area` pixels (`hipie.postprocess_release.part_instance_masks`),
   level "part" with that instance as parent; fine parts are grouped into coarse parts
   (`hipie.hierarchy.group_parts`; a grouped fine part becomes a "subpart" of its group).

Class distributions (`Segments.probs`, over the joint vocabulary things + stuff + part prompts +
coarse part labels; every row sums to 1):

- instance: the release's panoptic class probabilities of the instance's query,
  softmax(sigmoid(class logits) / 0.06) (the row the release feeds its semantic map and panoptic
  merge), restricted to the thing columns and renormalised. (The release's instance score,
  sqrt(sigmoid(cls) * sigmoid(iou)), normalised over classes, would be sqrt(sigmoid(cls)) up to a
  constant: nearly flat over the vocabulary, so it is kept as the `score` only.) The label and
  score are the release's top-k pair; one query can appear twice with two classes, as in the
  release, so a row's argmax can differ from its label;
- stuff: the release's semantic map (C, H, W) (= sum over queries of the panoptic probabilities
  times sigmoid(mask)), restricted to the stuff columns, normalised per pixel and averaged over
  the segment's pixels; the label is the panoptic merge's class, the score its probability;
- part: the part pass's semantic map, restricted to the parent thing's part prompts, normalised
  per pixel and averaged over the part mask; the label is the argmax part class of those pixels,
  the score its probability;
- coarse part: one-hot on its label, score = the best score of its fine parts.

With `clip=MaskClip(...)` the detection passes use the CLIP ensemble of `vit_h_cloud`
(`hipie.clip_release`); `precision="bf16"` runs the network under bf16 autocast.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hipie.box_ops import masks_to_boxes
from hipie.clip_release import DEMO_SETTINGS, ClipEnsembleSettings, MaskClip
from hipie.hierarchy import DEFAULT_PART_GROUPS, compose_part_prompts, group_parts
from hipie.modeling.hipie_release import HipieRelease, ImageEncoding, Prompt
from hipie.postprocess_release import (
    DEMO_INSTANCE_THRESHOLD,
    PART_MIN_AREA,
    ReleaseResult,
    keep_above,
    part_instance_masks,
)
from hipie.release_predictor import ReleasePredictor
from hipie.segments import Segments
from hipie.vote_policy import vote_onto_masks

__all__ = [
    "ReleaseHierarchyConfig",
    "ReleaseHierarchyPredictor",
    "ReleaseThresholds",
    "object_segments",
    "pooled_distribution",
    "with_parts",
]


@dataclass(frozen=True)
class ReleaseThresholds:
    """The labeler's thresholds on top of the release's own post-processing."""

    # Display threshold: release top-k instances with a score above it are kept (the demo's 0.5).
    # Named as the old family's panoptic score threshold, so callers set both the same way.
    score_threshold: float = DEMO_INSTANCE_THRESHOLD
    # A part inside an instance is kept when larger than this many pixels (the demo's 100).
    part_min_area: int = PART_MIN_AREA


@dataclass(frozen=True)
class ReleaseHierarchyConfig:
    """What `pipeline.review.model` reads and replaces (`config.postprocess`)."""

    postprocess: ReleaseThresholds = field(default_factory=ReleaseThresholds)
    min_size: int = 1024  # shortest edge at inference (the release's INPUT.MIN_SIZE_TEST)
    max_size: int = 2048
    # The longer side callers may shrink images to before the predictor sees them (the old
    # family's test size). None: images come at their own size, and the release resizes them
    # itself and returns its masks at that size, as it does.
    test_size: int | None = None


def pooled_distribution(
    sem_seg: torch.Tensor, mask: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """(C,) the per-pixel class distribution of `sem_seg` (C, H, W) over the allowed `columns`
    (C,) bool, averaged over the pixels of `mask` (H, W) bool; zeros for an empty mask."""
    pixels = sem_seg[:, mask].float() * columns[:, None]
    if pixels.shape[1] == 0:
        return torch.zeros(sem_seg.shape[0], device=sem_seg.device)
    pixels = pixels / pixels.sum(0, keepdim=True).clamp_min(1e-12)
    dist = pixels.mean(1)
    total = dist.sum()
    return dist / total if total > 0 else dist


class ReleaseHierarchyPredictor:
    """The labeler's predictor for a `HipieRelease` (see the module docstring).

    Args:
        model: the released architecture (`hipie.release_build`).
        device: where to run; default: the model's device.
        min_size, max_size: the release's test resize (default: the preset's, 1024 / 2048).
        postprocess: thresholds (`ReleaseThresholds`).
        vote_max_side: passed to `hipie.vote` for dense masks (None = exact).
        clip: a `hipie.clip_release.MaskClip` for the release's CLIP ensemble (`vit_h_cloud`),
            or None; clip_settings: its alpha / beta / temperature (the demo's by default).
        precision: "fp32", or "bf16" (the network under bf16 autocast; post-processing fp32).
        text_cache_size: number of prompts (vocabularies) whose BERT features are kept.
    """

    def __init__(
        self,
        model: HipieRelease,
        *,
        device: str | torch.device | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        postprocess: ReleaseThresholds | None = None,
        vote_max_side: int | None = None,
        clip: MaskClip | None = None,
        clip_settings: ClipEnsembleSettings = DEMO_SETTINGS,
        precision: str = "fp32",
        text_cache_size: int = 8,
    ) -> None:
        if clip is not None and not isinstance(clip, MaskClip):
            raise TypeError(
                f"a release model takes a hipie.clip_release.MaskClip as clip, not {type(clip)}"
            )
        if device is not None:
            model = model.to(device)
            if clip is not None:
                clip.to(device)
        self.release = ReleasePredictor(
            model,
            min_size=min_size,
            max_size=max_size,
            clip=clip,
            clip_settings=clip_settings,
            precision=precision,
        )
        self.model = self.release.model
        self.device = self.model.device
        self.config = ReleaseHierarchyConfig(
            postprocess=postprocess or ReleaseThresholds(),
            min_size=self.release.min_size,
            max_size=self.release.max_size,
        )
        self.vote_max_side = vote_max_side
        self.text_cache_size = text_cache_size
        self._prompts: OrderedDict[tuple, Prompt] = OrderedDict()

    # ------------------------------------------------------------------------------ plumbing
    def prompt(self, names: Sequence[str], num_things: int) -> Prompt:
        """The cached prompt of `names` (the first `num_things` of them things)."""
        key = (tuple(names), num_things)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        is_thing = {i + 1: i < num_things for i in range(len(names))}
        with torch.no_grad():
            prompt = self.model.encode_classes(list(names), is_thing)
        self._prompts[key] = prompt
        while len(self._prompts) > self.text_cache_size:
            self._prompts.popitem(last=False)
        return prompt

    def _encode(self, image) -> tuple[ImageEncoding, tuple[int, int]]:
        if hasattr(image, "convert"):  # PIL.Image
            image = image.convert("RGB")
        return self.release.encode(np.asarray(image))

    # ------------------------------------------------------------------------------ tasks
    def panoptic_batch(
        self, images: Sequence, things: Sequence[str], stuff: Sequence[str]
    ) -> list[Segments]:
        """Per image: the instances above the display threshold and the panoptic stuff."""
        things, stuff = list(things), list(stuff)
        if not things and not stuff:
            raise ValueError("empty vocabulary: give at least one thing or stuff label")
        out = []
        for image in images:
            enc, size = self._encode(image)
            det = self.release.run(enc, self.prompt(things + stuff, len(things)), size)
            out.append(object_segments(det, things, stuff, self.config.postprocess.score_threshold))
        return out

    def panoptic(self, image, things: Sequence[str], stuff: Sequence[str]) -> Segments:
        return self.panoptic_batch([image], things, stuff)[0]

    def instance(self, image, things: Sequence[str]) -> Segments:
        """A things-only pass: the release's top-k instances, no display threshold (for AP)."""
        things = list(things)
        enc, size = self._encode(image)
        det = self.release.run(enc, self.prompt(things, len(things)), size)
        return object_segments(det, things, [], 0.0)

    def parts(self, image, part_vocabulary: Sequence[str]) -> Segments:
        """The release's part pass on its own: every "<thing> <part>" prompt a stuff class, its
        panoptic segments as level "part" (semantic part segmentation, not per instance)."""
        prompts = list(part_vocabulary)
        enc, size = self._encode(image)
        det = self.release.run(enc, self.prompt(prompts, 0), size)
        segments = object_segments(det, [], prompts, 1.0)
        return dataclasses.replace(segments, level=["part"] * len(segments))

    def refer(self, image, expression: str) -> Segments:
        """The release's grounding top-1 as one segment labelled with the expression."""
        enc, size = self._encode(image)
        with torch.no_grad():
            prompt = self.model.encode_expression([expression])
        inst = self.release.run(enc, prompt, size).instances
        n, dev = len(inst), inst.masks.device
        return Segments(
            masks=inst.masks,
            boxes=inst.boxes.float(),
            labels=[expression] * n,
            label_ids=torch.zeros(n, dtype=torch.long, device=dev),
            scores=inst.scores.float(),
            probs=torch.ones(n, 1, device=dev),
            is_thing=torch.ones(n, dtype=torch.bool, device=dev),
            parents=torch.full((n,), -1, dtype=torch.long, device=dev),
            level=["instance"] * n,
            vocabulary=[expression],
        )

    def hierarchy_batch(
        self,
        images: Sequence,
        things: Sequence[str],
        stuff: Sequence[str],
        parts: Sequence[str],
        *,
        thing_parts: Mapping[str, Sequence[str]] | None = None,
        part_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Segments]:
        """Both passes on one encoding per image (see the module docstring).

        `thing_parts` (thing -> its parts) limits the prompts to those compositions (None: every
        thing x part); `part_groups` (coarse -> fine parts) forms the coarse level (None:
        `hipie.hierarchy.DEFAULT_PART_GROUPS`, {}: none). Returns per image: the instances and
        stuff, then the fine parts, then the coarse parts; `parents` link subpart -> coarse part
        -> instance.
        """
        things, stuff, parts = list(things), list(stuff), list(parts)
        if not parts:
            raise ValueError("empty part vocabulary")
        if not things:
            raise ValueError("the part pass needs things: give at least one thing label")
        owners, prompts = [], []
        for t, thing in enumerate(things):
            mine = compose_part_prompts([thing], parts, allowed=thing_parts)
            owners += [t] * len(mine)
            prompts += mine
        if not prompts:
            raise ValueError("thing_parts gives none of these things a part")
        groups = DEFAULT_PART_GROUPS if part_groups is None else part_groups
        out = []
        for image in images:
            enc, size = self._encode(image)
            det = self.release.run(enc, self.prompt(things + stuff, len(things)), size)
            part = self.release.run(enc, self.prompt(prompts, 0), size)
            objects = object_segments(det, things, stuff, self.config.postprocess.score_threshold)
            out.append(
                with_parts(
                    objects, part, prompts, owners, groups, self.config.postprocess.part_min_area
                )
            )
        return out

    def hierarchy(
        self,
        image,
        things: Sequence[str],
        stuff: Sequence[str],
        parts: Sequence[str],
        *,
        thing_parts: Mapping[str, Sequence[str]] | None = None,
        part_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> Segments:
        return self.hierarchy_batch(
            [image], things, stuff, parts, thing_parts=thing_parts, part_groups=part_groups
        )[0]

    def vote_from_hierarchy(self, h: Segments, sam, things: Sequence[str], **options) -> Segments:
        """Eq. 5 onto class-agnostic masks: `hipie.vote_policy.vote_onto_masks`, as for our own
        predictor (`options`: `hipie_rles`, `method`)."""
        return vote_onto_masks(h, sam, things, vote_max_side=self.vote_max_side, **options)


def object_segments(
    det: ReleaseResult, things: list[str], stuff: list[str], score_threshold: float
) -> Segments:
    """A things + stuff pass of the release as `Segments`: the instances with a score above
    `score_threshold`, then the panoptic merge's stuff segments (probs: module docstring)."""
    vocabulary = things + stuff
    C, T = len(vocabulary), len(things)
    dev = det.panoptic_probs.device
    thing_cols = torch.arange(C, device=dev) < T
    inst = keep_above(det.instances, score_threshold)
    # the instance's row of the panoptic probs: its query's place among the NMS-kept queries
    keep = det.selection.nms_keep.to(dev)
    rows = (keep[None, :] == inst.query_index.to(dev)[:, None]).int().argmax(1)
    inst_probs = det.panoptic_probs[rows] * thing_cols
    inst_probs = inst_probs / inst_probs.sum(1, keepdim=True).clamp_min(1e-12)

    stuff_segments = [s for s in det.segments_info if not s["isthing"]]
    stuff_masks = det.panoptic_seg[None] == torch.tensor(
        [s["id"] for s in stuff_segments], dtype=det.panoptic_seg.dtype, device=dev
    ).view(-1, 1, 1)
    stuff_probs = torch.zeros(len(stuff_segments), C, device=dev)
    for k, m in enumerate(stuff_masks):
        stuff_probs[k] = pooled_distribution(det.sem_seg, m, ~thing_cols)
    stuff_ids = [s["category_id"] for s in stuff_segments]
    stuff_scores = stuff_probs[torch.arange(len(stuff_ids)), stuff_ids]

    n_i, n_s = len(inst), len(stuff_segments)
    label_ids = torch.cat([inst.classes.to(dev), torch.tensor(stuff_ids, device=dev).long()])
    return Segments(
        masks=torch.cat([inst.masks.to(dev), stuff_masks]),
        boxes=torch.cat([inst.boxes.float().to(dev), masks_to_boxes(stuff_masks).float()]),
        labels=[vocabulary[i] for i in label_ids.tolist()],
        label_ids=label_ids,
        scores=torch.cat([inst.scores.float().to(dev), stuff_scores.float()]),
        probs=torch.cat([inst_probs, stuff_probs]).float(),
        is_thing=torch.arange(n_i + n_s, device=dev) < n_i,
        parents=torch.full((n_i + n_s,), -1, dtype=torch.long, device=dev),
        level=["instance"] * n_i + ["stuff"] * n_s,
        vocabulary=vocabulary,
    )


def with_parts(
    objects: Segments,
    part: ReleaseResult,
    prompts: list[str],
    owners: list[int],
    groups: Mapping[str, Sequence[str]],
    part_min_area: int = PART_MIN_AREA,
) -> Segments:
    """`objects` + the demo's part masks inside its instances + the coarse groups of those.

    `part` is the part pass (every prompt a stuff class), `prompts` its "<thing> <part>" names,
    `owners[j]` the index of prompt j's thing in the things of `objects` (its first columns)."""
    dev = objects.probs.device
    inst_idx = [i for i, lv in enumerate(objects.level) if lv == "instance"]
    # the demo matches a part's object word to the instance's class name; names of things can
    # have spaces ("potted plant"), so both sides are given as the thing's index instead
    inst_keys = [str(int(objects.label_ids[i])) for i in inst_idx]
    prompt_keys = [f"{o} {p}" for o, p in zip(owners, prompts)]
    found = part_instance_masks(
        part.sem_seg.argmax(0),
        objects.masks[inst_idx] if inst_idx else objects.masks[:0],
        inst_keys,
        prompt_keys,
        min_area=part_min_area,
    )
    owner_t = torch.tensor(owners, device=dev)
    P = len(found)
    part_masks = torch.stack([f.mask for f in found]) if P else objects.masks[:0]
    part_probs = torch.zeros(P, len(prompts), device=dev)
    part_parent = torch.full((P,), -1, dtype=torch.long, device=dev)
    for j, f in enumerate(found):
        parent = inst_idx[f.instance]
        columns = owner_t == int(objects.label_ids[parent])
        part_probs[j] = pooled_distribution(part.sem_seg, f.mask, columns)
        part_parent[j] = parent
    part_ids = [f.part_class for f in found]
    part_labels = [prompts[k] for k in part_ids]
    part_scores = part_probs[torch.arange(P), part_ids] if P else torch.zeros(0, device=dev)

    grouped = group_parts(part_masks, part_labels, part_parent, groups)
    G = len(grouped.labels)
    n0 = len(objects)
    vocab = objects.vocabulary + prompts
    vocab += [c for c in dict.fromkeys(grouped.labels) if c not in vocab]
    off = len(objects.vocabulary)
    probs = torch.zeros(n0 + P + G, len(vocab), device=dev)
    probs[:n0, :off] = objects.probs
    probs[n0 : n0 + P, off : off + len(prompts)] = part_probs
    group_ids = torch.tensor([vocab.index(c) for c in grouped.labels], device=dev).long()
    probs[n0 + P + torch.arange(G, device=dev), group_ids] = 1.0
    parents = torch.cat([objects.parents, part_parent, grouped.parents.to(dev)])
    levels = list(objects.level) + ["part"] * (P + G)
    for g, children in enumerate(grouped.children):
        for c in children:
            parents[n0 + c] = n0 + P + g
            levels[n0 + c] = "subpart"
    group_scores = torch.stack([part_scores[c].max() for c in grouped.children]) if G else None
    group_masks = grouped.masks.to(dev) if G else objects.masks[:0]
    label_ids = torch.cat(
        [objects.label_ids, torch.tensor(part_ids, device=dev).long() + off, group_ids]
    )
    return dataclasses.replace(
        objects,
        masks=torch.cat([objects.masks, part_masks, group_masks]),
        boxes=torch.cat(
            [objects.boxes, masks_to_boxes(part_masks).float(), masks_to_boxes(group_masks)]
        ),
        labels=objects.labels + part_labels + list(grouped.labels),
        label_ids=label_ids,
        scores=torch.cat(
            [objects.scores, part_scores] + ([group_scores] if group_scores is not None else [])
        ),
        probs=probs,
        is_thing=torch.cat([objects.is_thing, torch.ones(P + G, dtype=torch.bool, device=dev)]),
        parents=parents,
        level=levels,
        vocabulary=vocab,
    )
