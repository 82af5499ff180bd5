"""How a HIPIE dataset looks in the FiftyOne App: colours by class, saved views, uncertainty first.

``setup_review(dataset, prefix=...)`` is run by the ingest
(``pipeline.review.ingest.ingest_labels``, so ``jobs.review``) and after
``dataset.apply_model(HipieModel(...))``. It

- stores ``<prefix>min_margin`` on every sample: the smallest top-1 minus top-2 score margin over
  the sample's masks (all four level fields; a mask with a single top-k score has margin top-1;
  masks without top-k, e.g. drawn by a reviewer, are left out). It is computed by MongoDB
  (``set_field(...).save()``), so no sample is loaded into Python, and indexed for sorting;
- sets the dataset's App colour scheme to colour by label value, with a colour per class that is
  distinct among the classes present (hues spread by the golden angle) and kept across ingests,
  the same in every level field, so classes differ at a glance;
- refreshes ``instance_label`` on parts and subparts from their instance's current label
  (``refresh_instance_labels``, following ``parent_id``), so a reviewer's rename of an instance
  reaches its parts in the sidebar filters;
- saves the views ``needs review`` (not reviewed, no label or media error, lowest ``min_margin``
  first), ``errors`` (tag ``label-error`` or ``media-error``) and ``reviewed`` (tag
  ``reviewed``). For ``apply_model`` fields the names carry the prefix: ``hipie: needs review``.

``refresh_review(dataset)`` runs ``setup_review`` for every label field of a dataset (the
ingest's and each ``apply_model`` run's); ``jobs.review --dataset NAME`` without ``--labels``
runs it.
"""

from __future__ import annotations

import colorsys
import re
from itertools import zip_longest

import fiftyone as fo
from fiftyone import ViewField as F

from pipeline.review.fields import ERROR_TAG, MEDIA_ERROR_TAG, REVIEWED_TAG
from pipeline.review.read import label_prefixes

LEVEL_NAMES = ("instances", "stuff", "parts", "subparts")  # the level fields, without prefix
MARGIN_FIELD = "min_margin"
VIEW_NAMES = ("needs review", "errors", "reviewed")


def color_pool(n: int = 24) -> list[str]:
    """``n`` hex colours, hues spread by the golden angle, alternating two brightness levels."""
    colours = []
    for i in range(n):
        hue = (i * 0.381966) % 1.0
        value = 1.0 if i % 2 == 0 else 0.8
        r, g, b = colorsys.hsv_to_rgb(hue, 0.9, value)
        colours.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return colours


def mask_margin() -> fo.core.expressions.ViewExpression:
    """Expression (inside ``detections.map``): top-1 minus top-2 score of a mask, or null."""
    scores = F("topk_scores").if_null([])
    return (scores.length() > 1).if_else(
        scores[0] - scores[1], (scores.length() == 1).if_else(scores[0], None)
    )


def margin_expression(fields: list[str]) -> fo.core.expressions.ViewExpression:
    """The smallest mask margin over the Detections ``fields`` of a sample (null without masks)."""
    per_field = [F(f"{name}.detections").if_null([]).map(mask_margin()) for name in fields]
    return per_field[0].extend(*per_field[1:]).min()


def level_fields(collection, prefix: str = "") -> list[str]:
    """The level fields ``<prefix><level>`` that ``collection`` has."""
    schema = collection.get_field_schema()
    return [f"{prefix}{name}" for name in LEVEL_NAMES if f"{prefix}{name}" in schema]


def store_min_margin(collection, prefix: str = "") -> str:
    """Write ``<prefix>min_margin`` for the samples of ``collection`` (server side); its name."""
    field = f"{prefix}{MARGIN_FIELD}"
    fields = level_fields(collection, prefix)
    dataset = collection._dataset
    if not fields:
        return field
    if field not in dataset.get_field_schema():
        dataset.add_sample_field(field, fo.FloatField)
    collection.set_field(field, margin_expression(fields)).save(field)
    if field not in dataset.list_indexes():
        dataset.create_index(field)
    return field


def class_colors(
    dataset: fo.Dataset, fields: list[str], vocabulary: list[str] = (), old: dict | None = None
) -> dict[str, str]:
    """A colour per class, distinct among the classes present in ``fields``.

    Classes keep the colour ``old`` gave them unless another present class has it; the others take
    the next unused colours of ``color_pool``'s sequence (present classes first, in sorted order,
    then the rest of ``vocabulary``, which may share colours).
    """
    old = old or {}
    present: set[str] = set()
    for name in fields:
        present.update(v for v in dataset.distinct(f"{name}.detections.label") if v)
    colors: dict[str, str] = {}
    for label in sorted(present):
        if old.get(label) and old[label] not in colors.values():
            colors[label] = old[label]
    taken = set(colors.values())
    free = [c for c in color_pool(len(present) + len(taken) + 24) if c not in taken]
    for label in sorted(present - set(colors)):
        colors[label] = free.pop(0)
    rest = [label for label in dict.fromkeys(vocabulary) if label not in colors]
    for k, label in enumerate(rest):
        colors[label] = old.get(label) or free[k % len(free)]
    return colors


def set_color_scheme(dataset: fo.Dataset, fields: list[str], vocabulary: list[str] = ()) -> None:
    """Colour by label value, with the same colour for a class in every level field."""
    scheme = dataset.app_config.color_scheme
    specs = list(scheme.fields or []) if scheme is not None else []
    old = {
        v["value"]: v["color"]
        for f in specs
        if f.get("path") in fields
        for v in f.get("valueColors") or []
    }
    colors = class_colors(dataset, fields, vocabulary, old)
    value_colors = [{"value": label, "color": color} for label, color in colors.items()]
    specs = [f for f in specs if f.get("path") not in set(fields)]
    specs += [
        {"path": name, "colorByAttribute": "label", "valueColors": value_colors} for name in fields
    ]
    dataset.app_config.color_scheme = fo.ColorScheme(
        color_by="value", color_pool=color_pool(), fields=specs, opacity=0.6
    )
    dataset.save()


def view_name(name: str, prefix: str = "") -> str:
    """Saved view name: ``needs review`` for ingested fields, ``hipie: needs review`` for
    ``apply_model(..., label_field="hipie")``."""
    return f"{prefix.rstrip('_')}: {name}" if prefix else name


def save_review_views(dataset: fo.Dataset, prefix: str = "") -> dict[str, str]:
    """The saved views ``needs review``, ``errors`` and ``reviewed``; {name: slug}."""
    margin = f"{prefix}{MARGIN_FIELD}"
    views = {
        "needs review": (
            dataset.match_tags([REVIEWED_TAG, ERROR_TAG, MEDIA_ERROR_TAG], bool=False)
            .exists(margin)
            .sort_by(margin),
            "not reviewed yet, least certain mask (top-1 minus top-2 score) first",
        ),
        "errors": (
            dataset.match_tags([ERROR_TAG, MEDIA_ERROR_TAG]),
            "images the labeler could not process or that cannot be shown",
        ),
        "reviewed": (dataset.match_tags(REVIEWED_TAG), "samples tagged reviewed"),
    }
    out = {}
    for name, (view, description) in views.items():
        full = view_name(name, prefix)
        dataset.save_view(full, view, description=description, overwrite=True)
        out[full] = _slug(dataset, full)
    return out


def _slug(dataset: fo.Dataset, name: str) -> str:
    return next(v.slug for v in dataset._doc.saved_views if v.name == name)


def setup_review(
    dataset: fo.Dataset, *, prefix: str = "", samples=None, vocabulary: list[str] = ()
) -> dict[str, str]:
    """Margins (for ``samples``, default all), colour scheme and saved views of the level fields
    ``<prefix>instances`` ...; returns the saved views {name: slug}."""
    store_min_margin(dataset if samples is None else samples, prefix)
    for suffix in version_suffixes(dataset, prefix):
        refresh_instance_labels(dataset if samples is None else samples, prefix, suffix)
    set_color_scheme(dataset, level_fields(dataset, prefix), vocabulary)
    return save_review_views(dataset, prefix)


def version_suffixes(dataset: fo.Dataset, prefix: str = "") -> list[str]:
    """The label versions' field suffixes (``""``, ``"_v2"``, ...) present for ``prefix``."""
    schema = dataset.get_field_schema()
    head = f"{prefix}instances"
    found = [name[len(head) :] for name in schema if name.startswith(head)]
    return sorted(s for s in found if s == "" or re.fullmatch(r"_v\d+", s))


def refresh_instance_labels(collection, prefix: str = "", suffix: str = "") -> int:
    """Set ``instance_label`` on the parts and subparts of ``collection`` to the current label of
    the instance above them (following ``parent_id``: part -> instance, subpart -> part ->
    instance); None when that instance is gone. Bulk reads and writes; returns how many values
    changed."""
    schema = collection.get_field_schema()
    inst, parts, subs = (f"{prefix}{n}{suffix}" for n in ("instances", "parts", "subparts"))
    if inst not in schema or parts not in schema:
        return 0
    has_subs = subs in schema
    paths = [f"{inst}.detections.id", f"{inst}.detections.label"]
    paths += [f"{parts}.detections.{a}" for a in ("id", "parent_id", "instance_label")]
    if has_subs:
        paths += [f"{subs}.detections.{a}" for a in ("parent_id", "instance_label")]
    columns = collection.values(paths)
    ids = collection.values("id")
    part_values, sub_values, changed = {}, {}, 0
    for s, sample_id in enumerate(ids):
        labels = dict(zip(columns[0][s] or [], columns[1][s] or []))
        part_ids, part_parents, old = (columns[k][s] or [] for k in (2, 3, 4))
        new = [labels.get(p) for p in part_parents]
        of_part = dict(zip(part_ids, new))
        if new != list(old):
            part_values[sample_id] = new
            changed += sum(a != b for a, b in zip_longest(new, old))
        if has_subs and columns[5][s]:
            new_sub = [of_part.get(p, labels.get(p)) for p in columns[5][s]]
            old_sub = list(columns[6][s] or [])
            if new_sub != old_sub:
                sub_values[sample_id] = new_sub
                changed += sum(a != b for a, b in zip_longest(new_sub, old_sub))
    dataset = collection._dataset
    if part_values:
        dataset.set_values(f"{parts}.detections.instance_label", part_values, key_field="id")
    if sub_values:
        dataset.set_values(f"{subs}.detections.instance_label", sub_values, key_field="id")
    return changed


def refresh_review(dataset: fo.Dataset) -> dict[str, str]:
    """``setup_review`` for every label field of ``dataset`` (ingested and ``apply_model``),
    after reviewers' edits: margins, ``instance_label``, colours (renamed classes get one), saved
    views. Returns the saved views {name: slug}."""
    classes = [
        c
        for v in dataset.info.get("vocabularies", {}).values()
        for k in ("things", "stuff", "parts")
        for c in v.get(k, [])
    ]
    views: dict[str, str] = {}
    for prefix in label_prefixes(dataset):
        views.update(setup_review(dataset, prefix=prefix, vocabulary=classes))
    return views
