"""Label vocabularies: the classes a labeling run asks HIPIE for.

A vocabulary has three sections: ``things`` (countable objects, labeled as instances), ``stuff``
(amorphous regions: sky, road, ...) and ``parts`` (object parts, labeled in the part pass), plus
optional ``synonyms`` (other names of a label, e.g. COCO's original "wall-other-merged" for
"wall"), ``part_groups`` (coarse part -> the finer parts it is made of, for the subpart
level) and ``thing_parts`` (thing -> the parts it has). Without ``thing_parts`` the part pass
asks for every thing x part composition ("car head" included); with it, only the listed ones, and
things it does not list get no parts (as in Pascal-Panoptic-Parts, where a bottle has a cap and a
banana has no parts). The order of each section is part of the vocabulary (it fixes class indices), so it is
part of the hash.

Shipped defaults live in ``pipeline/vocabularies/``: ``coco_panoptic`` (the 133 COCO-panoptic
categories, 80 things + 53 stuff), ``parts`` (a Pascal-Panoptic-Parts style part list, with
each thing's parts) and ``synthetic`` (the classes of the generated scenes the shipped ``tiny``
model was trained on). ``load_vocabulary()`` with no argument returns the first two together.

Users write their own as YAML::

    things: [person, dog, {car: [automobile]}]   # a one-key mapping gives inline synonyms
    stuff: [sky, road]
    parts: [head, wheel]
    synonyms: {road: [street]}
    part_groups: {head: [ear, eye]}
    thing_parts: {person: [head, ear, eye], car: [wheel]}

or as plain text, one class per line, ``#`` comments, optional section headers (lines before any
header are things) and optional synonyms after a colon::

    person
    dog
    [stuff]
    sky: clouds, heaven
    [parts]
    head
    [part_groups]
    head: ear, eye
    [thing_parts]
    person: head, ear, eye
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import yaml

VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabularies"
SHIPPED = ("coco_panoptic", "parts")
SECTIONS = ("things", "stuff", "parts")
_TEXT_SECTIONS = ("things", "stuff", "parts", "synonyms", "part_groups", "thing_parts")
# Keys a vocabulary YAML may hold besides the sections: informational, not part of the hash.
_EXTRA_KEYS = ("name", "description", "coco_ids")

Pairs = tuple[tuple[str, tuple[str, ...]], ...]


class VocabularyError(ValueError):
    """A vocabulary file or definition is malformed (the message says where and why)."""


@dataclass(frozen=True, kw_only=True)
class Vocabulary:
    """The classes of a labeling run. Immutable, hashable and picklable (ships to Ray workers)."""

    things: tuple[str, ...]  # countable object classes, labeled per instance
    stuff: tuple[str, ...] = ()  # amorphous region classes (sky, road, ...)
    parts: tuple[str, ...] = ()  # part classes for the part pass (coarse and fine)
    synonyms: Pairs = ()  # (label, other names) pairs, sorted by label
    part_groups: Pairs = ()  # (coarse part, its finer parts) pairs, sorted by coarse part
    thing_parts: Pairs = ()  # (thing, the parts it has) pairs, sorted by thing; () = all parts

    def __post_init__(self) -> None:
        for section in SECTIONS:
            names = getattr(self, section)
            if isinstance(names, str) or not isinstance(names, tuple):
                raise VocabularyError(f"{section} must be a tuple of names, got {names!r}")
            for name in names:
                _check_name(name, section)
        _check_unique(self.things + self.stuff, "things and stuff")
        _check_unique(self.parts, "parts")
        if not (self.things or self.stuff or self.parts):
            raise VocabularyError("a vocabulary needs at least one class")
        labels = set(self.things) | set(self.stuff) | set(self.parts)
        keys = [label for label, _ in self.synonyms]
        if keys != sorted(set(keys)):
            raise VocabularyError("synonyms must be unique (label, names) pairs sorted by label")
        for label, names in self.synonyms:
            if label not in labels:
                raise VocabularyError(f"synonyms given for {label!r}, which is not a class")
            for name in names:
                _check_name(name, f"synonyms of {label!r}")
                if name in labels:
                    raise VocabularyError(
                        f"{name!r} is a class of its own and cannot be a synonym of {label!r}"
                    )
        seen: dict[str, str] = {}
        for label, names in self.synonyms:
            for name in names:
                if name.casefold() in seen and seen[name.casefold()] != label:
                    raise VocabularyError(
                        f"synonym {name!r} given for both {seen[name.casefold()]!r} and {label!r}"
                    )
                seen[name.casefold()] = label
        coarse_parts = [coarse for coarse, _ in self.part_groups]
        if coarse_parts != sorted(set(coarse_parts)):
            raise VocabularyError("part_groups must be unique (part, parts) pairs sorted by part")
        parts = set(self.parts)
        for coarse, fine in self.part_groups:
            for name in (coarse, *fine):
                if name not in parts:
                    raise VocabularyError(f"part group {coarse!r}: {name!r} is not in parts")
            if coarse in fine:
                raise VocabularyError(f"part group {coarse!r} contains itself")
        keys = [thing for thing, _ in self.thing_parts]
        if keys != sorted(set(keys)):
            raise VocabularyError("thing_parts must be unique (thing, parts) pairs sorted by thing")
        things = set(self.things)
        for thing, names in self.thing_parts:
            _check_name(thing, "thing_parts")
            # a part-only vocabulary (e.g. the shipped `parts`, merged with things later) may
            # name things it does not hold; one with things may not (a typo would silently
            # leave that thing without parts)
            if things and thing not in things:
                raise VocabularyError(f"thing_parts: {thing!r} is not one of the things")
            for name in names:
                if name not in parts:
                    raise VocabularyError(f"thing_parts of {thing!r}: {name!r} is not in parts")

    @property
    def labels(self) -> tuple[str, ...]:
        """Things then stuff: the label space of the object (things + stuff) pass."""
        return self.things + self.stuff

    def is_thing(self, label: str) -> bool:
        """True for a thing class, False for stuff; KeyError for anything else."""
        if label in self.things:
            return True
        if label in self.stuff:
            return False
        raise KeyError(label)

    def parts_of(self, thing: str) -> tuple[str, ...]:
        """The parts the part pass asks for on ``thing`` (all parts when ``thing_parts`` is
        empty; none for a thing it does not list)."""
        if not self.thing_parts:
            return self.parts
        return dict(self.thing_parts).get(thing, ())

    def part_prompts(self) -> list[str]:
        """The part pass's labels: "<thing> <part>" for every thing and each of its parts
        (Sec. 3.7), thing-major; the bare part names when there are no things."""
        from hipie.hierarchy import compose_part_prompts

        if not self.things:
            return list(self.parts)
        allowed = dict(self.thing_parts) if self.thing_parts else None
        return compose_part_prompts(self.things, self.parts, allowed=allowed)

    def synonyms_of(self, label: str) -> tuple[str, ...]:
        """Other names of ``label`` (empty when it has none)."""
        return dict(self.synonyms).get(label, ())

    def canonical(self, name: str) -> str | None:
        """The class that ``name`` (a class or one of its synonyms, any case) stands for.

        Things and stuff are searched before parts (a name like "door" may be both a stuff class
        and a part). None when nothing matches.
        """
        key = name.strip().casefold()
        for label in self.things + self.stuff + self.parts:
            if label.casefold() == key:
                return label
        for label, names in self.synonyms:
            if any(n.casefold() == key for n in names):
                return label
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form; ``Vocabulary.from_dict(v.to_dict()) == v``."""
        return {
            "things": list(self.things),
            "stuff": list(self.stuff),
            "parts": list(self.parts),
            "synonyms": {label: list(names) for label, names in self.synonyms},
            "part_groups": {coarse: list(fine) for coarse, fine in self.part_groups},
            # only when given, so vocabularies without it keep the hash they always had
            **(
                {"thing_parts": {t: list(p) for t, p in self.thing_parts}}
                if self.thing_parts
                else {}
            ),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces, UTF-8 kept): the input of ``hash``."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def hash(self) -> str:
        """sha256 hex digest of ``to_json()``: equal vocabularies give equal hashes everywhere."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        """Build from the YAML/JSON form (see the module docstring for the accepted shapes)."""
        if not isinstance(data, Mapping):
            raise VocabularyError(f"a vocabulary must be a mapping, got {type(data).__name__}")
        unknown = set(data) - set(_TEXT_SECTIONS) - set(_EXTRA_KEYS)
        if unknown:
            raise VocabularyError(
                f"unknown vocabulary keys {sorted(unknown)}; expected {list(_TEXT_SECTIONS)}"
            )
        sections: dict[str, list[str]] = {}
        synonyms: dict[str, list[str]] = {}
        for section in SECTIONS:
            sections[section] = []
            items = data.get(section) or []
            if isinstance(items, str) or not isinstance(items, Sequence):
                raise VocabularyError(f"{section} must be a list, got {items!r}")
            for item in items:
                if isinstance(item, Mapping):  # {label: [synonyms]}
                    if len(item) != 1:
                        raise VocabularyError(f"{section}: expected one-key mapping, got {item!r}")
                    ((label, names),) = item.items()
                    sections[section].append(_as_name(label, section))
                    synonyms.setdefault(str(label).strip(), []).extend(_as_names(names, label))
                else:
                    sections[section].append(_as_name(item, section))
        for label, names in _as_mapping(data.get("synonyms"), "synonyms").items():
            synonyms.setdefault(label, []).extend(_as_names(names, label))
        groups = _as_mapping(data.get("part_groups"), "part_groups")
        thing_parts = _as_mapping(data.get("thing_parts"), "thing_parts")
        return cls.from_lists(
            things=sections["things"],
            stuff=sections["stuff"],
            parts=sections["parts"],
            synonyms=synonyms,
            part_groups={k: _as_names(v, k) for k, v in groups.items()},
            thing_parts={k: _as_names(v, k) for k, v in thing_parts.items()},
        )

    @classmethod
    def from_lists(
        cls,
        *,
        things: Iterable[str] = (),
        stuff: Iterable[str] = (),
        parts: Iterable[str] = (),
        synonyms: Mapping[str, Iterable[str]] | None = None,
        part_groups: Mapping[str, Iterable[str]] | None = None,
        thing_parts: Mapping[str, Iterable[str]] | None = None,
    ) -> Vocabulary:
        """Build from plain lists (e.g. ``--things a b --stuff c``); names are stripped."""
        syn = {
            label.strip(): tuple(dict.fromkeys(n.strip() for n in names))
            for label, names in (synonyms or {}).items()
        }
        return cls(
            things=tuple(n.strip() for n in things),
            stuff=tuple(n.strip() for n in stuff),
            parts=tuple(n.strip() for n in parts),
            synonyms=tuple(sorted((k, v) for k, v in syn.items() if v)),
            part_groups=tuple(
                sorted(
                    (k.strip(), tuple(n.strip() for n in v)) for k, v in (part_groups or {}).items()
                )
            ),
            thing_parts=tuple(
                sorted(
                    (k.strip(), tuple(dict.fromkeys(n.strip() for n in v)))
                    for k, v in (thing_parts or {}).items()
                )
            ),
        )

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        """Inverse of ``to_json`` (e.g. the vocabulary stored in a Parquet file's metadata)."""
        return cls.from_dict(json.loads(text))


def merge(*vocabularies: Vocabulary) -> Vocabulary:
    """Concatenate sections (first occurrence wins; duplicates across inputs are dropped)."""
    things: dict[str, None] = {}
    stuff: dict[str, None] = {}
    parts: dict[str, None] = {}
    synonyms: dict[str, list[str]] = {}
    groups: dict[str, tuple[str, ...]] = {}
    thing_parts: dict[str, tuple[str, ...]] = {}
    for vocab in vocabularies:
        for label in vocab.things:
            if label not in stuff:
                things.setdefault(label)
        for label in vocab.stuff:
            if label not in things:
                stuff.setdefault(label)
        for label in vocab.parts:
            parts.setdefault(label)
        for label, names in vocab.synonyms:
            synonyms.setdefault(label, []).extend(names)
        for coarse, fine in vocab.part_groups:
            groups.setdefault(coarse, fine)
        for thing, names in vocab.thing_parts:
            thing_parts.setdefault(thing, names)
    if things:  # lists for things the merged vocabulary does not hold are dropped
        thing_parts = {t: p for t, p in thing_parts.items() if t in things}
    return Vocabulary.from_lists(
        things=things,
        stuff=stuff,
        parts=parts,
        synonyms=synonyms,
        part_groups=groups,
        thing_parts=thing_parts,
    )


def load_vocabulary(source: str | Path | None = None) -> Vocabulary:
    """Load a vocabulary.

    Args:
        source: None or "default" for the shipped COCO-panoptic things/stuff plus the shipped
            parts; a shipped name ("coco_panoptic", "parts", "synthetic"); or a path / fsspec URI of a
            ``.yaml``/``.yml``/``.json`` file or of a plain text file (any other suffix).
    Raises:
        VocabularyError: the file is malformed or defines an invalid vocabulary.
        FileNotFoundError: no such file and no shipped vocabulary of that name.
    """
    if source is None or str(source) == "default":
        return merge(*(load_vocabulary(name) for name in SHIPPED))
    text_source = str(source)
    shipped = VOCABULARY_DIR / f"{text_source}.yaml"
    if text_source.isidentifier() and shipped.is_file() and not Path(text_source).exists():
        path: str = str(shipped)
    else:
        path = text_source
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    suffix = Path(path.split("?")[0]).suffix.lower()
    try:
        if suffix in (".yaml", ".yml", ".json"):
            return Vocabulary.from_dict(yaml.safe_load(text) or {})
        return parse_text(text)
    except VocabularyError as e:
        raise VocabularyError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise VocabularyError(f"{path}: invalid YAML: {e}") from None


def parse_text(text: str) -> Vocabulary:
    """Parse the plain-text format (see the module docstring)."""
    data: dict[str, Any] = {name: [] for name in SECTIONS}
    data["synonyms"] = {}
    data["part_groups"] = {}
    data["thing_parts"] = {}
    section = "things"
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            if section not in _TEXT_SECTIONS:
                raise VocabularyError(
                    f"line {lineno}: unknown section [{section}]; expected one of "
                    + ", ".join(f"[{s}]" for s in _TEXT_SECTIONS)
                )
            continue
        label, _, rest = line.partition(":")
        label = label.strip()
        names = [n.strip() for n in rest.split(",") if n.strip()]
        if not label:
            raise VocabularyError(f"line {lineno}: empty class name in {raw!r}")
        if section in SECTIONS:
            data[section].append(label)
            if names:
                data["synonyms"].setdefault(label, []).extend(names)
        else:
            data[section].setdefault(label, []).extend(names)
    return Vocabulary.from_dict(data)


def coco_category_ids() -> dict[str, int]:
    """Readable COCO-panoptic label -> COCO category id, from the shipped ``coco_panoptic``."""
    data = yaml.safe_load((VOCABULARY_DIR / "coco_panoptic.yaml").read_text(encoding="utf-8"))
    ids = data["coco_ids"]
    return {
        **dict(zip(data["things"], ids["things"], strict=True)),
        **dict(zip(data["stuff"], ids["stuff"], strict=True)),
    }


def _check_name(name: object, where: str) -> None:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise VocabularyError(f"{where}: invalid class name {name!r}")
    if "\n" in name or len(name) > 200:
        raise VocabularyError(f"{where}: invalid class name {name[:40]!r}")


def _check_unique(names: Sequence[str], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        key = name.casefold()
        if key in seen:
            raise VocabularyError(f"{name!r} appears more than once in {where}")
        seen.add(key)


def _as_name(value: object, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # YAML turns a class named "1" into an int
    if not isinstance(value, str):
        raise VocabularyError(f"{where}: invalid class name {value!r}")
    return value.strip()


def _as_names(values: object, label: object) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence):
        raise VocabularyError(f"names of {label!r} must be a list, got {values!r}")
    return [_as_name(v, f"names of {label!r}") for v in values]


def _as_mapping(value: object, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise VocabularyError(f"{where} must be a mapping, got {value!r}")
    return {_as_name(k, where): v for k, v in value.items()}
