"""Vocabularies: the shipped defaults against the COCO file, user YAML/text files, hashing."""

from __future__ import annotations

import hashlib
import json
import pickle

import fsspec
import pytest

from pipeline.vocabulary import (
    Vocabulary,
    VocabularyError,
    coco_category_ids,
    load_vocabulary,
    merge,
    parse_text,
)


def test_shipped_coco_panoptic_matches_the_categories_file(coco_sample):
    cats = json.loads((coco_sample / "panoptic_coco_categories.json").read_text())
    vocab = load_vocabulary("coco_panoptic")
    things = [c for c in cats if c["isthing"]]
    stuff = [c for c in cats if not c["isthing"]]
    assert (len(vocab.things), len(vocab.stuff), len(vocab.parts)) == (80, 53, 0)
    assert list(vocab.things) == [c["name"] for c in things]  # thing names are readable already
    # Each stuff category keeps its order; its original name is its label or a synonym of it.
    for cat, label in zip(stuff, vocab.stuff, strict=True):
        assert cat["name"] == label or cat["name"] in vocab.synonyms_of(label)
        assert vocab.canonical(cat["name"]) == label
    ids = coco_category_ids()
    assert [ids[label] for label in vocab.labels] == [c["id"] for c in things + stuff]


def test_readable_stuff_labels():
    vocab = load_vocabulary("coco_panoptic")
    assert vocab.canonical("wall-other-merged") == "wall"
    assert vocab.canonical("WALL-BRICK") == "brick wall"
    assert vocab.canonical("sky-other-merged") == "sky"
    assert vocab.canonical("clouds") == "sky"  # a COCO-Stuff class merged into sky
    assert vocab.canonical("door-stuff") == "door"
    assert vocab.canonical("unicorn") is None
    assert vocab.is_thing("person") and not vocab.is_thing("wall")
    with pytest.raises(KeyError):
        vocab.is_thing("head")
    assert not any("-" in label for label in vocab.stuff)  # no "-merged" / "-other" left


def test_default_is_coco_plus_parts():
    vocab = load_vocabulary()
    assert vocab == load_vocabulary("default")
    coco = load_vocabulary("coco_panoptic")
    assert (vocab.things, vocab.stuff) == (coco.things, coco.stuff)
    for part in ("head", "torso", "arm", "leg", "hand", "foot", "tail", "wing", "beak",
                 "wheel", "window", "door", "license plate", "headlight", "mirror"):  # fmt: skip
        assert part in vocab.parts
    groups = dict(vocab.part_groups)
    assert groups["leg"] == ("upper leg", "lower leg", "foot", "paw", "hoof")
    assert {"ear", "eye", "nose", "mouth", "hair"} <= set(groups["head"])
    assert set(groups) == {"head", "arm", "leg", "body"}
    assert vocab.canonical("number plate") == "license plate"
    # "door" and "mirror" are both stuff (COCO) and parts: things/stuff win in canonical().
    assert vocab.canonical("mirror-stuff") == "mirror" and "mirror" in vocab.stuff


def test_hash_is_sha256_of_the_canonical_json():
    vocab = Vocabulary.from_lists(things=["cat", "dog"], stuff=["sky"], synonyms={"sky": ["air"]})
    expected_json = (
        '{"part_groups":{},"parts":[],"stuff":["sky"],"synonyms":{"sky":["air"]},'
        '"things":["cat","dog"]}'
    )
    assert vocab.to_json() == expected_json
    assert vocab.hash == hashlib.sha256(expected_json.encode()).hexdigest()
    # Class order is meaningful (class indices); synonym insertion order is not.
    assert Vocabulary.from_lists(things=["dog", "cat"], stuff=["sky"]).hash != vocab.hash
    a = Vocabulary.from_lists(things=["a", "b"], synonyms={"b": ["y"], "a": ["x"]})
    b = Vocabulary.from_lists(things=["a", "b"], synonyms={"a": ["x"], "b": ["y"]})
    assert a == b and a.hash == b.hash
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    assert pickle.loads(pickle.dumps(vocab)) == vocab
    default = load_vocabulary()
    assert Vocabulary.from_json(default.to_json()).hash == default.hash


def test_user_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "things:\n"
        "  - person\n"
        "  - {car: [automobile, auto]}\n"
        "  - 7\n"  # YAML reads it as an int: still the class "7"
        "stuff: [sky, road]\n"
        "parts: [head, ear, eye, wheel]\n"
        "synonyms:\n"
        "  road: [street]\n"
        "part_groups:\n"
        "  head: [ear, eye]\n"
    )
    vocab = load_vocabulary(path)
    assert vocab.things == ("person", "car", "7")
    assert vocab.stuff == ("sky", "road")
    assert vocab.parts == ("head", "ear", "eye", "wheel")
    assert vocab.synonyms == (("car", ("automobile", "auto")), ("road", ("street",)))
    assert vocab.part_groups == (("head", ("ear", "eye")),)
    assert vocab.labels == ("person", "car", "7", "sky", "road")


def test_user_text_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(
        "# my classes\n"
        "person\n"
        "dog   # a comment\n"
        "\n"
        "[stuff]\n"
        "sky: clouds, heaven\n"
        "[PARTS]\n"
        "head\n"
        "ear\n"
        "[part_groups]\n"
        "head: ear\n"
    )
    vocab = load_vocabulary(str(path))
    assert vocab == Vocabulary.from_lists(
        things=["person", "dog"],
        stuff=["sky"],
        parts=["head", "ear"],
        synonyms={"sky": ["clouds", "heaven"]},
        part_groups={"head": ["ear"]},
    )
    assert parse_text("cat\ndog\n").things == ("cat", "dog")  # no header: things


def test_load_through_fsspec():
    with fsspec.open("memory://vocabs/v.yaml", "wt") as f:
        f.write("things: [cat]\nstuff: [grass]\n")
    vocab = load_vocabulary("memory://vocabs/v.yaml")
    assert (vocab.things, vocab.stuff) == (("cat",), ("grass",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("things: [cat, dog]\nstuff: [Cat]\n", "more than once"),
        ("things: [cat]\nthing: [dog]\n", "unknown vocabulary keys"),
        ("things: [cat]\nsynonyms: {dog: [hound]}\n", "not a class"),
        ("things: [cat, dog]\nsynonyms: {cat: [dog]}\n", "class of its own"),
        ("things: [cat, dog]\nsynonyms: {cat: [pet], dog: [pet]}\n", "both"),
        ("parts: [head]\npart_groups: {head: [ear]}\n", "not in parts"),
        ("things: cat\n", "must be a list"),
        ("things: ['  ']\n", "invalid class name"),
        ("things: []\n", "at least one class"),
        ("things: [cat\n", "invalid YAML"),
        ("things: [robot]\nparts: [head]\nthing_parts: {robto: [head]}", "'robto' is not one"),
        ("things: [robot]\nparts: [head]\nthing_parts: {robot: [hand]}", "'hand' is not in parts"),
        ("things: [robot]\nparts: [head]\nthing_parts: [robot]", "thing_parts must be a mapping"),
    ],
)
def test_invalid_yaml_vocabularies(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(VocabularyError, match=message) as info:
        load_vocabulary(path)
    assert str(path) in str(info.value)


def test_invalid_text_section(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("cat\n[objects]\ndog\n")
    with pytest.raises(VocabularyError, match=r"line 2: unknown section \[objects\]"):
        load_vocabulary(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vocabulary(tmp_path / "nope.yaml")


def test_merge_drops_duplicates_first_wins():
    a = Vocabulary.from_lists(things=["cat"], stuff=["sky"], synonyms={"sky": ["air"]})
    b = Vocabulary.from_lists(things=["sky", "dog"], parts=["tail"])
    merged = merge(a, b)
    assert merged.things == ("cat", "dog")  # "sky" stays stuff, as in the first vocabulary
    assert merged.stuff == ("sky",)
    assert merged.parts == ("tail",)
    assert merged.synonyms_of("sky") == ("air",)


def test_shipped_part_groups_match_the_model_hierarchy():
    hierarchy = pytest.importorskip("hipie.hierarchy")
    assert dict(load_vocabulary("parts").part_groups) == hierarchy.DEFAULT_PART_GROUPS


def test_thing_parts_limit_the_part_prompts(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(
        "things: [robot, tree, rock]\nparts: [head, arm, crown]\n"
        "thing_parts: {tree: [crown], robot: [head, arm, head]}\n"
    )
    vocab = load_vocabulary(path)
    assert vocab.thing_parts == (("robot", ("head", "arm")), ("tree", ("crown",)))
    assert vocab.parts_of("robot") == ("head", "arm") and vocab.parts_of("rock") == ()
    # parts order, thing-major; "rock" (not listed) gets none, "robot crown" is never asked for
    assert vocab.part_prompts() == ["robot head", "robot arm", "tree crown"]
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    text = tmp_path / "v.txt"
    text.write_text("robot\ntree\nrock\n[parts]\nhead\narm\ncrown\n"
                    "[thing_parts]\ntree: crown\nrobot: head, arm\n")  # fmt: skip
    assert load_vocabulary(text) == vocab
    unrestricted = Vocabulary.from_lists(things=vocab.things, parts=vocab.parts)
    assert len(unrestricted.part_prompts()) == 9 and unrestricted.parts_of("rock") == vocab.parts
    assert unrestricted.hash != vocab.hash
    # vocabularies without thing_parts keep their earlier canonical JSON (and hash)
    assert "thing_parts" not in json.loads(unrestricted.to_json())
    assert Vocabulary.from_lists(parts=["head"]).part_prompts() == ["head"]


def test_shipped_thing_parts():
    vocab = load_vocabulary()
    prompts = vocab.part_prompts()
    assert {"person head", "person hand", "dog paw", "car wheel", "bicycle chainwheel",
            "bottle bottle cap", "potted plant pot", "tv screen"} <= set(prompts)  # fmt: skip
    for absent in ("banana head", "car head", "person wheel", "dog hand", "tv paw"):
        assert absent not in prompts
    assert len(prompts) < len(vocab.things) * len(vocab.parts) / 10
    parts = load_vocabulary("parts")  # no things: the lists are kept for a later merge
    assert dict(parts.thing_parts)["dog"] == dict(vocab.thing_parts)["dog"]
    # merged with things the lists do not name: they are dropped, so every part is asked for
    mine = merge(Vocabulary.from_lists(things=["robot"]), parts)
    assert mine.thing_parts == () and len(mine.part_prompts()) == len(parts.parts)
    synthetic = load_vocabulary("synthetic")
    from hipie.synthetic.scene import PART_CLASSES

    assert sorted(synthetic.part_prompts()) == sorted(PART_CLASSES)
