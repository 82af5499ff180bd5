"""How labels are laid out in a FiftyOne dataset: the level fields, the tags, run ids, versions.

Shared by the ingest (``pipeline.review.ingest``), the App setup (``pipeline.review.app``), the
read-back (``pipeline.review.read``) and the FiftyOne model (``pipeline.review.model``); it
imports none of them, so the review modules import one way only.
"""

from __future__ import annotations

from datetime import datetime

LEVEL_FIELDS = {"instance": "instances", "part": "parts", "subpart": "subparts", "stuff": "stuff"}
FIELD_LEVELS = {field: level for level, field in LEVEL_FIELDS.items()}
REVIEWED_TAG = "reviewed"
ERROR_TAG = "label-error"
MEDIA_ERROR_TAG = "media-error"  # the image cannot be shown; ``media_error`` says why
RUN_SEPARATOR = " | "


def run_id(row: dict) -> str:
    """The labeling run of a row: model, vocabulary hash and labeling time."""
    labeled_at = row.get("labeled_at")
    stamp = labeled_at.isoformat() if isinstance(labeled_at, datetime) else str(labeled_at or "")
    return RUN_SEPARATOR.join([row.get("model") or "", row.get("vocabulary_hash") or "", stamp])


def parse_run_id(run: str) -> tuple[str, str, datetime | None]:
    """(model, vocabulary_hash, labeled_at) of a run id made by ``run_id``."""
    model, vocabulary_hash, stamp = run.rsplit(RUN_SEPARATOR, 2)
    return model, vocabulary_hash, datetime.fromisoformat(stamp) if stamp else None


def version_suffix(version: int) -> str:
    """Field name suffix of a label version: "" for 1, "_v<n>" after."""
    if version < 1:
        raise ValueError(f"versions start at 1, got {version}")
    return "" if version == 1 else f"_v{version}"
