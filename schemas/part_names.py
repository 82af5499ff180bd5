"""Object-part class names of the label contract: "<thing> <part>" (Sec. 3.7).

A part's class is named by its object and the part ("dog head"; "potted plant pot"). The labeler
writes part and subpart labels in this form, export names COCO categories this way, and review,
fine-tuning and the model's part prompts read them back. Thing names may have several words, so a
label is split at the longest thing name that prefixes it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["join_part", "part_class", "split_part_label", "strip_thing"]


def join_part(thing: str, part: str) -> str:
    """The object-part class of ``part`` of ``thing``: "dog", "head" -> "dog head"."""
    return f"{thing} {part}"


def part_class(label: str, thing: str) -> str:
    """``label`` as an object-part class of ``thing``; a label that already names the thing
    ("dog head" of a dog) is kept as it is, a bare part ("head") is joined to it."""
    return label if label.startswith(f"{thing} ") else join_part(thing, label)


def strip_thing(label: str, thing: str) -> str:
    """The part of an object-part class of ``thing`` ("dog head" -> "head"); other labels as
    they are."""
    prefix = f"{thing} "
    return label[len(prefix) :] if label.startswith(prefix) and len(label) > len(prefix) else label


def split_part_label(label: str, things: Sequence[str]) -> tuple[str, str]:
    """Split an object-part class into (thing, part), the inverse of `join_part`.

    The longest thing name that prefixes the label (followed by a space) wins, so multi-word
    things split correctly ("potted plant pot" -> ("potted plant", "pot")).

    Returns:
        ``(thing, part)``, or ``("", label)`` when no thing prefixes the label.
    """
    for thing in sorted(things, key=len, reverse=True):
        if label.startswith(f"{thing} ") and len(label) > len(thing) + 1:
            return thing, label[len(thing) + 1 :]
    return "", label
