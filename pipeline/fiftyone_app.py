"""How a HIPIE dataset looks in the FiftyOne App: colours by class, saved views, uncertainty first.

``setup_review(dataset, prefix=...)`` is run by the ingest (``pipeline.fiftyone_io.ingest_labels``,
so ``jobs.review``) and after ``dataset.apply_model(HipieModel(...))``. It

- stores ``<prefix>min_margin`` on every sample: the smallest top-1 minus top-2 score margin over
  the sample's masks (all four level fields; a mask with a single top-k score has margin top-1;
  masks without top-k, e.g. drawn by a reviewer, are left out). It is computed by MongoDB
  (``set_field(...).save()``), so no sample is loaded into Python, and indexed for sorting;
- sets the dataset's App colour scheme to colour by label value, with a colour per class that is
  distinct among the classes present (hues spread by the golden angle) and kept across ingests,
  the same in every level field, so classes differ at a glance;
- saves the views ``needs review`` (not reviewed, not errors, lowest ``min_margin`` first),
  ``errors`` (tag ``label-error``) and ``reviewed`` (tag ``reviewed``). For ``apply_model``
  fields the names carry the prefix: ``hipie: needs review``.
"""

from __future__ import annotations

import colorsys

import fiftyone as fo
from fiftyone import ViewField as F

LEVEL_NAMES = ("instances", "stuff", "parts", "subparts")  # the level fields, without prefix
REVIEWED_TAG = "reviewed"
ERROR_TAG = "label-error"
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
            dataset.match_tags([REVIEWED_TAG, ERROR_TAG], bool=False)
            .exists(margin)
            .sort_by(margin),
            "not reviewed yet, least certain mask (top-1 minus top-2 score) first",
        ),
        "errors": (dataset.match_tags(ERROR_TAG), "images the labeler could not process"),
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
    set_color_scheme(dataset, level_fields(dataset, prefix), vocabulary)
    return save_review_views(dataset, prefix)
