"""Training examples for fine-tuning: reviewed schema-v1 rows (+ their images) as HIPIE targets.

A `TrainingSet` holds the ok rows to train on and the class vocabulary taken from their labels
(new class names are welcome: the text encoder is open-vocabulary). Rows come from

- a FiftyOne dataset (`training_set_from_dataset`: the reviewers' current values of the samples
  with a tag, default ``reviewed``, read back with `pipeline.review.read.read_rows`),
- label Parquet files (`training_set_from_labels`), or
- a COCO instances JSON (`training_set_from_coco`), e.g. the one `python -m jobs.export` writes,
  whose categories carry ``level`` and whose annotations carry ``hipie_mask_id`` /
  ``hipie_parent_id`` (a plain COCO file: every category is a thing, or stuff when ``isthing`` 0).

`RowDataset` turns a row into the `hipie.training.data.TrainSample` the training loop already
knows: instances are things, stuff is stuff, parts and subparts are "object-part" classes
("robot head") with the index of their instance, so a part supervises both its part label and
its instance label (Sec. 3.7, `hipie.training.data.part_targets`). Parts without an instance
above them, and masks labeled "other" or left empty, are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import schemas
from schemas import rle as rle_utils
from schemas.part_names import part_class, split_part_label, strip_thing

__all__ = [
    "TrainingSet",
    "RowDataset",
    "row_to_sample",
    "rows_from_coco",
    "training_set_from_coco",
    "training_set_from_dataset",
    "training_set_from_labels",
    "training_set_from_rows",
]

UNLABELED = ("", "other")  # labels that supervise nothing


# --------------------------------------------------------------------------- vocabulary


def _usable(mask: dict) -> bool:
    return mask["label"] not in UNLABELED and int(mask["area"] or 0) > 0


@dataclass(frozen=True)
class TrainingSet:
    """Rows to fine-tune on and their classes.

    rows: ok schema-v1 rows; ``uri`` of each is where its image is read (local path, file://,
        fsspec URI or ``tar://<tar>#<member>``).
    things, stuff: instance and stuff labels, in order of first appearance.
    parts: "object-part" classes of the parts and subparts ("robot head"), first appearance.
    """

    rows: tuple[dict, ...]
    things: tuple[str, ...]
    stuff: tuple[str, ...]
    parts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def vocabulary(self):
        """A labeling vocabulary (`pipeline.vocabulary.Vocabulary`) for these classes: part names
        without their object ("head"), since the labeler composes "<thing> <part>" itself."""
        from pipeline.vocabulary import Vocabulary

        short = [split_part_label(name, self.things)[1] for name in self.parts]
        return Vocabulary.from_lists(
            things=self.things, stuff=self.stuff, parts=list(dict.fromkeys(short))
        )


def training_set_from_rows(
    rows: Sequence[dict],
    *,
    image_ids: Collection[str] | None = None,
    uris: Mapping[str, str] | None = None,
) -> TrainingSet:
    """Keep the ok rows (of ``image_ids`` when given) that hold a usable mask; take their classes.

    Args:
        rows: schema-v1 rows.
        image_ids: train on these images only (e.g. the reviewed ones).
        uris: image_id -> where to read the image instead of the row's ``uri`` (e.g. the local
            file FiftyOne shows).
    """
    kept: list[dict] = []
    things: dict[str, None] = {}
    stuff: dict[str, None] = {}
    parts: dict[str, None] = {}
    for row in rows:
        if row["status"] != "ok" or (image_ids is not None and row["image_id"] not in image_ids):
            continue
        by_id = {m["mask_id"]: m for m in row["masks"]}
        useful = False
        for m in row["masks"]:
            if not _usable(m):
                continue
            if m["level"] == "instance":
                things.setdefault(m["label"])
            elif m["level"] == "stuff":
                stuff.setdefault(m["label"])
            else:
                inst = schemas.instance_of(m, by_id)
                if inst is None or not _usable(inst):
                    continue
                parts.setdefault(part_class(m["label"], inst["label"]))
            useful = True
        if useful:
            row = dict(row)
            if uris is not None and row["image_id"] in uris:
                row["uri"] = uris[row["image_id"]]
            kept.append(row)
    return TrainingSet(
        rows=tuple(kept), things=tuple(things), stuff=tuple(stuff), parts=tuple(parts)
    )


def training_set_from_dataset(
    name: str, *, tag: str | None = "reviewed", label_field: str | None = None
) -> TrainingSet:
    """The samples of FiftyOne dataset ``name`` tagged ``tag`` (all samples when None), with the
    reviewers' current labels; images are read from the samples' local files (samples whose
    image could not be materialized at ingest, tagged ``media-error``, are left out).
    ``label_field``: the ``apply_model`` labels to read (``pipeline.review.read.read_rows``;
    None: the ingest's fields if any, else the one ``apply_model`` run)."""
    import fiftyone as fo

    from pipeline.review.fields import MEDIA_ERROR_TAG
    from pipeline.review.read import image_paths, read_rows

    dataset = fo.load_dataset(name)
    view = dataset.match_tags(tag) if tag else dataset
    view = view.match_tags(MEDIA_ERROR_TAG, bool=False)  # no image to train on
    rows, _ = read_rows(view, label_field=label_field)
    return training_set_from_rows(rows, uris=image_paths(view))


def training_set_from_labels(labels: str | os.PathLike) -> TrainingSet:
    """Every ok row of the label Parquet files under ``labels``."""
    from pipeline.export.formats import rows_from_labels

    rows, _ = rows_from_labels(labels)
    return training_set_from_rows(rows)


def rows_from_coco(json_path: str | os.PathLike, images_dir: str | os.PathLike) -> list[dict]:
    """A COCO instances JSON (RLE or polygon segmentations) as schema-v1 rows.

    Levels come from the categories' ``level`` (else ``isthing`` 0 means stuff, anything else an
    instance); parents from ``hipie_parent_id`` -> ``hipie_mask_id`` (as ``jobs.export`` writes
    them). Crowd annotations are skipped.
    """
    from hipie.training.data import decode_segmentation

    data = json.loads(Path(json_path).read_text())
    cats = {int(c["id"]): c for c in data["categories"]}
    anns: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            anns.setdefault(int(ann["image_id"]), []).append(ann)
    rows = []
    for info in data["images"]:
        h, w = int(info["height"]), int(info["width"])
        masks = []
        for k, ann in enumerate(anns.get(int(info["id"]), [])):
            cat = cats[int(ann["category_id"])]
            level = cat.get("level") or ("stuff" if cat.get("isthing", 1) == 0 else "instance")
            label = cat["name"]
            if level in ("part", "subpart") and cat.get("supercategory"):
                label = strip_thing(label, cat["supercategory"])  # export wrote "<object> <part>"
            mask = decode_segmentation(ann["segmentation"], h, w)
            parent = ann.get("hipie_parent_id")
            masks.append(
                schemas.make_mask(
                    mask_id=int(ann.get("hipie_mask_id", k)),
                    rle=rle_utils.encode(mask),
                    level=level,
                    label=label,
                    score=float(ann.get("score", 1.0)),
                    parent_id=None if parent is None else int(parent),
                    origin="hipie",
                )
            )
        rows.append(
            schemas.make_ok_row(
                image_id=str(info.get("hipie_image_id", info["id"])),
                uri=str(Path(images_dir) / info["file_name"]),
                shard=Path(json_path).name,
                width=w,
                height=h,
                masks=masks,
                model="coco",
                vocabulary_hash="",
            )
        )
    return rows


def training_set_from_coco(
    json_path: str | os.PathLike, images_dir: str | os.PathLike
) -> TrainingSet:
    """The images of a COCO instances JSON (see `rows_from_coco`)."""
    return training_set_from_rows(rows_from_coco(json_path, images_dir))


# --------------------------------------------------------------------------- samples
def row_to_sample(row: dict, image: np.ndarray, *, image_id: int = 0):
    """One row and its (H, W, 3) uint8 RGB image -> `hipie.training.data.TrainSample`.

    Masks smaller or larger than the image (a row of another size) raise ValueError.
    """
    from hipie.training.data import TrainSample

    h, w = image.shape[:2]
    by_id = {m["mask_id"]: m for m in row["masks"]}
    things, thing_names, thing_index = [], [], {}
    stuff, stuff_names = [], []
    for m in row["masks"]:
        if not _usable(m) or m["level"] not in ("instance", "stuff"):
            continue
        dense = rle_utils.decode(m["rle"])
        if dense.shape != (h, w):
            raise ValueError(f"image {row['image_id']}: mask {dense.shape} vs image {(h, w)}")
        if m["level"] == "instance":
            thing_index[m["mask_id"]] = len(things)
            things.append(dense)
            thing_names.append(m["label"])
        else:
            stuff.append(dense)
            stuff_names.append(m["label"])
    parts, part_names, parents = [], [], []
    for m in row["masks"]:
        if not _usable(m) or m["level"] not in ("part", "subpart"):
            continue
        inst = schemas.instance_of(m, by_id)
        if inst is None or inst["mask_id"] not in thing_index:
            continue
        parts.append(rle_utils.decode(m["rle"]))
        part_names.append(part_class(m["label"], inst["label"]))
        parents.append(thing_index[inst["mask_id"]])

    def stack(masks: list[np.ndarray]) -> torch.Tensor:  # (N, H, W) bool
        if not masks:
            return torch.zeros(0, h, w, dtype=torch.bool)
        return torch.from_numpy(np.stack(masks).astype(bool))

    return TrainSample(
        image=torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous(),
        thing_masks=stack(things),
        thing_classes=tuple(thing_names),
        stuff_masks=stack(stuff),
        stuff_classes=tuple(stuff_names),
        part_masks=stack(parts),
        part_classes=tuple(part_names),
        part_parents=torch.tensor(parents, dtype=torch.long),
        image_id=image_id,
    )


class RowDataset(Dataset):
    """A `TrainingSet` as a map-style dataset of `TrainSample`s (images read on access).

    Exposes ``thing_classes``, ``stuff_classes`` and ``part_classes`` as
    `hipie.training.train.make_passes` expects them.

    Args:
        training_set: the rows and classes.
        max_size: resize so that the longer side is this (None = keep).
    """

    def __init__(self, training_set: TrainingSet, *, max_size: int | None = None) -> None:
        self.rows = training_set.rows
        self.thing_classes = training_set.things
        self.stuff_classes = training_set.stuff
        self.part_classes = training_set.parts
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        from hipie.training.data import resize_sample
        from pipeline.sources.decode import decode_image
        from pipeline.sources.reading import read_uri

        row = self.rows[index]
        image = decode_image(read_uri(row["uri"]))
        sample = row_to_sample(row, image, image_id=index)
        return resize_sample(sample, self.max_size) if self.max_size else sample
