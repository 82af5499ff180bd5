"""The "<thing> <part>" naming of the label contract, with multi-word things."""

from __future__ import annotations

from schemas.part_names import join_part, part_class, split_part_label, strip_thing

THINGS = ["potted plant", "plant", "dog"]


def test_split_takes_the_longest_thing_that_prefixes_the_label():
    assert split_part_label("potted plant pot", THINGS) == ("potted plant", "pot")
    assert split_part_label("plant leaf", THINGS) == ("plant", "leaf")
    assert split_part_label("dog upper leg", THINGS) == ("dog", "upper leg")
    assert split_part_label("wheel", THINGS) == ("", "wheel")
    assert split_part_label("dog", THINGS) == ("", "dog")  # a thing name alone is no part
    assert split_part_label("dogma leg", THINGS) == ("", "dogma leg")  # a word, not a prefix


def test_join_and_split_are_inverse():
    for thing in THINGS:
        for part in ("pot", "upper leg", "leaf"):
            assert split_part_label(join_part(thing, part), THINGS) == (thing, part)


def test_part_class_and_strip_thing_round_trip():
    assert part_class("head", "dog") == "dog head"
    assert part_class("dog head", "dog") == "dog head"  # the labeler's composed form is kept
    assert part_class("pot", "potted plant") == "potted plant pot"
    assert strip_thing("potted plant pot", "potted plant") == "pot"
    assert strip_thing("pot", "potted plant") == "pot"
    assert strip_thing("dog", "dog") == "dog"
    for label in ("head", "upper leg"):
        assert strip_thing(part_class(label, "potted plant"), "potted plant") == label
