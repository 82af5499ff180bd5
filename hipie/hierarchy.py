"""Hierarchical segmentation: parts to instances, fine parts to coarse parts (Sec. 3.7, Fig. 5).

HIPIE runs two passes on one image, one with the object vocabulary and one with the part
vocabulary, whose labels are instance and part names concatenated ("dog head", Sec. 3.7). The
two outputs are combined here:

- `assign_parents`: each part goes to the instance that holds the largest fraction of the
  part's area (-1 when that fraction is below ``min_fraction``);
- `group_parts`: the fine parts of one instance that belong to one coarse group become a coarse
  part (their union), e.g. ears + eyes + nose + mouth + hair -> "head".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pycocotools import mask as mask_utils

from hipie.vote import MaskSet, _as_rles, intersection_areas, mask_areas
from schemas.part_names import join_part, split_part_label

__all__ = [
    "DEFAULT_PART_GROUPS",
    "GroupedParts",
    "assign_parents",
    "compose_part_prompts",
    "group_parts",
    "parents_from_intersections",
]

# Coarse part -> fine parts, in the spirit of Pascal-Panoptic-Parts / Pascal-Part: the fine parts
# of persons, animals, birds and vehicles, grouped into the coarse parts that contain them. A fine
# part name belongs to at most one group.
DEFAULT_PART_GROUPS: dict[str, tuple[str, ...]] = {
    "head": ("ear", "eye", "eyebrow", "nose", "mouth", "hair", "muzzle", "beak", "horn"),
    "arm": ("upper arm", "lower arm", "hand"),
    "leg": ("upper leg", "lower leg", "foot", "paw", "hoof"),
    "body": ("door", "window", "mirror", "headlight", "license plate", "roof"),
}


@dataclass(frozen=True)
class GroupedParts:
    """G coarse parts, each the union of fine parts of one instance."""

    masks: torch.Tensor | list[dict]  # (G, H, W) bool, or G COCO RLEs when the parts were RLEs
    labels: list[str]  # G coarse labels, e.g. "dog head" for fine labels "dog ear", "dog eye"
    parents: torch.Tensor  # (G,) long instance index of each coarse part (as in `parents` input)
    children: list[list[int]]  # G lists of indices into the fine parts, ascending


def assign_parents(
    part_masks: MaskSet,
    instance_masks: MaskSet,
    *,
    min_fraction: float = 0.5,
    max_side: int | None = None,
) -> torch.Tensor:
    """Assign each part to the instance it lies in.

    Args:
        part_masks: P part masks, dense ``(P, H, W) bool`` or a list of P COCO RLEs.
        instance_masks: I instance masks of the same image, dense ``(I, H, W) bool`` or I RLEs.
        min_fraction: the smallest fraction of a part's area that its parent must hold.
        max_side: see `hipie.vote.intersection_areas` (dense masks only).

    Returns:
        ``(P,)`` long: the index of the instance holding the largest fraction of each part, or -1
        when that fraction is below ``min_fraction`` (also for empty parts and when I == 0). Ties
        go to the lower instance index.
    """
    inter = intersection_areas(part_masks, instance_masks, max_side=max_side)  # (P, I)
    if inter.shape[1] == 0:
        return torch.full((inter.shape[0],), -1, dtype=torch.long, device=inter.device)
    areas = mask_areas(part_masks).to(inter.device)  # (P,)
    return parents_from_intersections(inter, areas, min_fraction=min_fraction)


def parents_from_intersections(
    inter: torch.Tensor, areas: torch.Tensor, *, min_fraction: float = 0.5
) -> torch.Tensor:
    """`assign_parents` from intersection areas ``(P, I)`` and part areas ``(P,)``."""
    num_parts, num_instances = inter.shape
    if num_instances == 0:
        return torch.full((num_parts,), -1, dtype=torch.long, device=inter.device)
    fraction = inter / areas.clamp_min(1.0)[:, None]  # (P, I)
    best_fraction, best = fraction.max(dim=1)  # (P,), (P,)
    ok = (areas > 0) & (best_fraction >= min_fraction) & (best_fraction > 0)
    return torch.where(ok, best, torch.full_like(best, -1))


def group_parts(
    part_masks: MaskSet,
    part_labels: Sequence[str],
    parents: torch.Tensor,
    groups: Mapping[str, Sequence[str]] = DEFAULT_PART_GROUPS,
) -> GroupedParts:
    """Group fine parts into coarse parts per instance (Sec. 3.7, "layers of hierarchy").

    A fine part label matches a group's fine part name ``f`` when it equals ``f`` or ends with
    ``" " + f`` ("dog ear" matches "ear"; the longest matching name wins, so "left upper arm"
    matches "upper arm"). The coarse label replaces the matched name by the group name
    ("dog ear" -> "dog head"; side words are kept, "left ear" -> "left head"). Parts of one instance (same parent) and one group, with the same
    label prefix, become one coarse part: the union of their masks. Parts without a parent
    (-1) and parts matching no group are not grouped: a coarse part needs an instance to belong to.

    Args:
        part_masks: P fine part masks, dense ``(P, H, W) bool`` or a list of P COCO RLEs.
        part_labels: P fine part labels.
        parents: ``(P,)`` long instance index of each part, -1 for none (see `assign_parents`).
        groups: coarse part -> its fine part names.

    Returns:
        `GroupedParts`, in order of first appearance of each (instance, coarse label).
    """
    if len(part_labels) != len(part_masks) or parents.shape[0] != len(part_masks):
        raise ValueError("part_masks, part_labels and parents must have the same length")
    fine_to_coarse: dict[str, str] = {}
    for coarse, fines in groups.items():
        for fine in fines:
            fine_to_coarse.setdefault(fine, coarse)
    names_longest_first = sorted(fine_to_coarse, key=len, reverse=True)

    members_of: dict[tuple[int, str], list[int]] = {}  # insertion-ordered
    for index, (label, parent) in enumerate(zip(part_labels, parents.tolist())):
        if parent < 0:
            continue
        coarse_label = _coarse_label(label, names_longest_first, fine_to_coarse)
        if coarse_label is None:
            continue
        members_of.setdefault((int(parent), coarse_label), []).append(index)
    keys = list(members_of)
    children = list(members_of.values())

    group_parents = torch.tensor([k[0] for k in keys], dtype=torch.long, device=parents.device)
    labels = [k[1] for k in keys]
    if isinstance(part_masks, torch.Tensor):
        height, width = part_masks.shape[1:]
        masks = torch.zeros(len(keys), height, width, dtype=torch.bool, device=part_masks.device)
        for g, members in enumerate(children):
            masks[g] = part_masks[members].any(dim=0)
        return GroupedParts(masks=masks, labels=labels, parents=group_parents, children=children)
    rles = _as_rles(part_masks)
    merged = [mask_utils.merge([rles[i] for i in members], intersect=0) for members in children]
    for rle in merged:
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode("ascii")
    return GroupedParts(masks=merged, labels=labels, parents=group_parents, children=children)


def compose_part_prompts(
    things: Sequence[str],
    parts: Sequence[str],
    *,
    allowed: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Part-pass labels: instance and part names concatenated (Sec. 3.7), e.g. "dog head".

    Args:
        things: thing class names, e.g. ("person", "dog").
        parts: part names, e.g. ("head", "leg").
        allowed: optional thing -> parts it can have; things missing from it get no parts.
            Without it every thing gets every part.

    Returns:
        ``"<thing> <part>"`` labels, thing-major, in input order.
    """
    prompts = []
    for thing in things:
        thing_parts = (
            parts if allowed is None else [p for p in parts if p in allowed.get(thing, ())]
        )
        prompts.extend(join_part(thing, part) for part in thing_parts)
    return prompts


def _coarse_label(
    label: str, names_longest_first: Sequence[str], fine_to_coarse: Mapping[str, str]
) -> str | None:
    """The coarse label for a fine label ("dog ear" -> "dog head"), None if in no group."""
    for fine in names_longest_first:
        if label == fine:
            return fine_to_coarse[fine]
        if label.endswith(" " + fine):
            return label[: -len(fine)] + fine_to_coarse[fine]
    return None


def restrict_to_parent_parts(
    probs: torch.Tensor, scores: torch.Tensor, label_ids: torch.Tensor, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one rule for a part lying in an instance labeled X (Sec. 3.7 pairs each part with the
    instance holding it): it can only be one of X's parts.

    Each part's class distribution is restricted to X's part columns (`allowed`) and renormalized;
    its label becomes the best of them and its score is scaled by that class's share of the old
    label's probability (the score it would have had with that class; unchanged when its label
    already is one of X's parts). A part with no probability on X's parts keeps everything and is
    reported in `keep` as False: the caller cuts its parent link (no "car body" under a bird).
    HIPIE's own parts and parts voted onto SAM masks both go through here.

    Args:
        probs: (P, C) class distributions; scores: (P,); label_ids: (P,) long, the current labels;
        allowed: (P, C) bool, the columns that are parts of each part's parent instance's class.
    Returns:
        (probs, scores, label_ids, keep), new tensors.
    """
    restricted = torch.where(allowed, probs, torch.zeros_like(probs))
    total = restricted.sum(1)
    keep = total > 0
    best = restricted.argmax(1)
    old_p = probs.gather(1, label_ids.clamp(min=0)[:, None])[:, 0]
    new_p = probs.gather(1, best[:, None])[:, 0]
    factor = new_p / old_p.clamp(min=1e-12)
    return (
        torch.where(keep[:, None], restricted / total.clamp_min(1e-30)[:, None], probs),
        torch.where(keep, scores * factor.to(scores.dtype), scores),
        torch.where(keep, best, label_ids),
        keep,
    )


def parent_part_columns(
    vocabulary: Sequence[str], things: Sequence[str], parent_things: Sequence[str], device
) -> torch.Tensor:
    """(N, C) bool: for each of N parts, the `vocabulary` columns that are parts of its parent
    thing (`parent_things[n]`), i.e. the labels "<thing> <part>" of that thing."""
    ids = {thing: k for k, thing in enumerate(dict.fromkeys(parent_things))}
    owner = [ids.get(split_part_label(name, things)[0], -1) for name in vocabulary]
    columns = torch.tensor(owner, dtype=torch.long, device=device)
    rows = torch.tensor([ids[t] for t in parent_things], dtype=torch.long, device=device)
    return columns[None, :] == rows[:, None]
