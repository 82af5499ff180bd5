"""Training data: synthetic scenes and COCO-format files -> samples -> batches -> loss targets.

A `TrainSample` is one image with hierarchical ground truth in original image coordinates
(things, stuff, parts with their instance, referring expressions). Two sources make them:

- `SyntheticDataset`: scenes of `hipie.synthetic.generator.SceneGenerator` (scene i of a seed);
- `CocoPanopticDataset` (panoptic JSON + PNGs, optional `parts.json` / `referring.json` in the
  layout `write_coco_panoptic` writes) and `CocoInstancesDataset` (instances JSON, RLE or
  polygon segmentations: things only).

`collate` pads a list of samples into a `Batch`; `panoptic_targets`, `part_targets` and
`referring_targets` turn a batch into the `SegmentTargets` of one text pass (label columns index
the prompt that goes with them: `prompt + ["other"]` as the text encoder builds it).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from hipie.box_ops import box_xyxy_to_cxcywh, masks_to_boxes
from hipie.synthetic.generator import (
    PART_CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    Scene,
    SceneConfig,
    SceneGenerator,
)
from hipie.training.criterion import SegmentTargets
from schemas import rle as rle_utils

__all__ = [
    "Batch",
    "CocoInstancesDataset",
    "CocoPanopticDataset",
    "PassTargets",
    "SyntheticDataset",
    "TrainSample",
    "collate",
    "decode_segmentation",
    "panoptic_targets",
    "part_targets",
    "referring_targets",
    "resize_sample",
    "sample_from_scene",
]


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class TrainSample:
    """One training image and its ground truth, in image coordinates.

    image: (3, H, W) uint8 RGB.
    thing_masks: (N, H, W) bool; thing_classes: N class names.
    stuff_masks: (S, H, W) bool; stuff_classes: S class names.
    part_masks: (P, H, W) bool (parts and subparts; a part contains its subparts);
        part_classes: P "object-part" names ("robot head"); part_parents: (P,) long index of the
        thing each part (or subpart) belongs to.
    expressions: (text, thing index) pairs, each text true of exactly that thing.
    """

    image: torch.Tensor
    thing_masks: torch.Tensor
    thing_classes: tuple[str, ...]
    stuff_masks: torch.Tensor
    stuff_classes: tuple[str, ...]
    part_masks: torch.Tensor
    part_classes: tuple[str, ...]
    part_parents: torch.Tensor
    expressions: tuple[tuple[str, int], ...] = ()
    image_id: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.image.shape[1]), int(self.image.shape[2])


def _stack(masks: Sequence[np.ndarray], h: int, w: int) -> torch.Tensor:
    if len(masks) == 0:
        return torch.zeros(0, h, w, dtype=torch.bool)
    return torch.from_numpy(np.stack([np.asarray(m, dtype=bool) for m in masks]))


def sample_from_scene(scene: Scene) -> TrainSample:
    """A synthetic `Scene` -> `TrainSample` (subparts point to the thing of their part)."""
    h, w = scene.height, scene.width
    things = [s for s in scene.segments if s.isthing]
    stuff = [s for s in scene.segments if not s.isthing]
    thing_index = {s.id: i for i, s in enumerate(things)}
    part_by_id = {p.id: p for p in scene.parts}

    def owner(part) -> int:
        while part.parent_id not in thing_index:
            part = part_by_id[part.parent_id]
        return thing_index[part.parent_id]

    return TrainSample(
        image=torch.from_numpy(np.ascontiguousarray(scene.image)).permute(2, 0, 1).contiguous(),
        thing_masks=_stack([s.mask for s in things], h, w),
        thing_classes=tuple(s.category for s in things),
        stuff_masks=_stack([s.mask for s in stuff], h, w),
        stuff_classes=tuple(s.category for s in stuff),
        part_masks=_stack([p.mask for p in scene.parts], h, w),
        part_classes=tuple(p.name for p in scene.parts),
        part_parents=torch.tensor([owner(p) for p in scene.parts], dtype=torch.long),
        expressions=tuple(
            (text, thing_index[sid]) for text, sid in scene.expressions if sid in thing_index
        ),
        image_id=scene.image_id,
    )


def resize_sample(sample: TrainSample, max_size: int) -> TrainSample:
    """Scale so that the longer side is `max_size` (bilinear image, nearest masks)."""
    h, w = sample.size
    scale = max_size / max(h, w)
    if scale == 1.0:
        return sample
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(
        sample.image[None].float(),
        size=(nh, nw),
        mode="bilinear",
        align_corners=False,
        antialias=scale < 1,
    )[0]
    image = image.round().clamp(0, 255).to(torch.uint8)

    def masks(m: torch.Tensor) -> torch.Tensor:
        if m.shape[0] == 0:
            return torch.zeros(0, nh, nw, dtype=torch.bool)
        return F.interpolate(m[:, None].float(), size=(nh, nw), mode="nearest")[:, 0] > 0.5

    return TrainSample(image=image, thing_masks=masks(sample.thing_masks),
                       thing_classes=sample.thing_classes, stuff_masks=masks(sample.stuff_masks),
                       stuff_classes=sample.stuff_classes, part_masks=masks(sample.part_masks),
                       part_classes=sample.part_classes, part_parents=sample.part_parents,
                       expressions=sample.expressions, image_id=sample.image_id)  # fmt: skip


# --------------------------------------------------------------------------- datasets
class SyntheticDataset(Dataset):
    """Scenes `start .. start + length - 1` of a seeded `SceneGenerator` as `TrainSample`s,
    resized so that the longer side is `max_size` when given (e.g. the model's test size, so
    that training sees objects at the scale `HipiePredictor` will show them).

    Class lists (the training vocabularies): `thing_classes`, `stuff_classes`, `part_classes`.
    """

    thing_classes: tuple[str, ...] = THING_CLASSES
    stuff_classes: tuple[str, ...] = STUFF_CLASSES
    part_classes: tuple[str, ...] = PART_CLASSES

    def __init__(
        self,
        *,
        config: SceneConfig,
        seed: int,
        length: int,
        start: int = 0,
        max_size: int | None = None,
    ) -> None:
        self.generator = SceneGenerator(config, seed=seed)
        self.length, self.start, self.max_size = length, start, max_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TrainSample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        sample = sample_from_scene(self.generator.scene(self.start + index))
        return resize_sample(sample, self.max_size) if self.max_size else sample


def _load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def decode_segmentation(segm, h: int, w: int) -> np.ndarray:
    """COCO polygon list, uncompressed or compressed RLE -> (H, W) bool."""
    return rle_utils.decode(rle_utils.from_segmentation(segm, h, w))


class CocoPanopticDataset(Dataset):
    """COCO-panoptic files (JSON + PNG folder + image folder) as `TrainSample`s.

    Args:
        json_path: panoptic JSON (`annotations` with `file_name` + `segments_info`; `images`).
        png_dir: folder of the panoptic PNGs (ids = R + 256 G + 256^2 B).
        image_dir: folder of the images (`images[*].file_name`).
        categories: category list (`id`, `name`, `isthing`); default the JSON's own.
        parts_json: optional part annotations as `write_coco_panoptic` writes them (`parent_id`
            = the thing segment id or, for subparts, the part's `part_id`).
        referring_json: optional {"refs": [{image_id, segment_id, expression}]}.
        max_size: resize so that the longer side is this (None = keep).
    Crowd segments are left out.
    """

    def __init__(
        self,
        *,
        json_path: str | Path,
        png_dir: str | Path,
        image_dir: str | Path,
        categories: Sequence[dict] | None = None,
        parts_json: str | Path | None = None,
        referring_json: str | Path | None = None,
        max_size: int | None = None,
    ) -> None:
        data = json.loads(Path(json_path).read_text())
        cats = list(categories) if categories is not None else data["categories"]
        self.categories = {int(c["id"]): c for c in cats}
        self.thing_classes = tuple(c["name"] for c in cats if c["isthing"])
        self.stuff_classes = tuple(c["name"] for c in cats if not c["isthing"])
        self.images = {int(im["id"]): im for im in data["images"]}
        self.annotations = list(data["annotations"])
        self.png_dir, self.image_dir, self.max_size = Path(png_dir), Path(image_dir), max_size
        self.parts: dict[int, list[dict]] = {}
        self.part_names: dict[int, str] = {}
        self.part_classes: tuple[str, ...] = ()
        if parts_json is not None:
            pdata = json.loads(Path(parts_json).read_text())
            self.part_names = {int(c["id"]): c["name"] for c in pdata["categories"]}
            self.part_classes = tuple(c["name"] for c in pdata["categories"])
            for ann in pdata["annotations"]:
                self.parts.setdefault(int(ann["image_id"]), []).append(ann)
        self.refs: dict[int, list[dict]] = {}
        if referring_json is not None:
            for ref in json.loads(Path(referring_json).read_text())["refs"]:
                self.refs.setdefault(int(ref["image_id"]), []).append(ref)

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> TrainSample:
        from hipie.evaluation.metrics import rgb_to_id

        ann = self.annotations[index]
        image_id = int(ann["image_id"])
        info = self.images[image_id]
        image = _load_rgb(self.image_dir / info["file_name"])
        h, w = image.shape[1:]
        with Image.open(self.png_dir / ann["file_name"]) as png:
            ids = rgb_to_id(np.asarray(png.convert("RGB")))
        things, thing_names, thing_index, stuff, stuff_names = [], [], {}, [], []
        for seg in ann["segments_info"]:
            if seg.get("iscrowd", 0):
                continue
            cat = self.categories[int(seg["category_id"])]
            mask = ids == int(seg["id"])
            if not mask.any():
                continue
            if cat["isthing"]:
                thing_index[int(seg["id"])] = len(things)
                things.append(mask)
                thing_names.append(cat["name"])
            else:
                stuff.append(mask)
                stuff_names.append(cat["name"])
        parts, part_names, parents = [], [], []
        anns = self.parts.get(image_id, [])
        by_part_id = {int(a.get("part_id", -1)): a for a in anns}
        for a in anns:
            owner = a
            while (
                int(owner["parent_id"]) not in thing_index and int(owner["parent_id"]) in by_part_id
            ):
                owner = by_part_id[int(owner["parent_id"])]
            if int(owner["parent_id"]) not in thing_index:
                continue
            parts.append(decode_segmentation(a["segmentation"], h, w))
            part_names.append(self.part_names[int(a["category_id"])])
            parents.append(thing_index[int(owner["parent_id"])])
        exprs = tuple(
            (r["expression"], thing_index[int(r["segment_id"])])
            for r in self.refs.get(image_id, [])
            if int(r["segment_id"]) in thing_index
        )
        sample = TrainSample(
            image=image, thing_masks=_stack(things, h, w), thing_classes=tuple(thing_names),
            stuff_masks=_stack(stuff, h, w), stuff_classes=tuple(stuff_names),
            part_masks=_stack(parts, h, w), part_classes=tuple(part_names),
            part_parents=torch.tensor(parents, dtype=torch.long), expressions=exprs,
            image_id=image_id,
        )  # fmt: skip
        return resize_sample(sample, self.max_size) if self.max_size else sample


class CocoInstancesDataset(Dataset):
    """COCO instances JSON (polygons or RLE) + image folder as `TrainSample`s (things only).

    Crowd annotations are left out; images without annotations are kept (all negatives).
    """

    def __init__(
        self, *, json_path: str | Path, image_dir: str | Path, max_size: int | None = None
    ) -> None:
        data = json.loads(Path(json_path).read_text())
        self.categories = {int(c["id"]): c for c in data["categories"]}
        self.thing_classes = tuple(c["name"] for c in data["categories"])
        self.stuff_classes: tuple[str, ...] = ()
        self.part_classes: tuple[str, ...] = ()
        self.images = list(data["images"])
        self.anns: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            self.anns.setdefault(int(ann["image_id"]), []).append(ann)
        self.image_dir, self.max_size = Path(image_dir), max_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> TrainSample:
        info = self.images[index]
        image = _load_rgb(self.image_dir / info["file_name"])
        h, w = image.shape[1:]
        masks, names = [], []
        for ann in self.anns.get(int(info["id"]), []):
            if ann.get("iscrowd", 0):
                continue
            mask = decode_segmentation(ann["segmentation"], h, w)
            if mask.any():
                masks.append(mask)
                names.append(self.categories[int(ann["category_id"])]["name"])
        empty = torch.zeros(0, h, w, dtype=torch.bool)
        sample = TrainSample(
            image=image,
            thing_masks=_stack(masks, h, w),
            thing_classes=tuple(names),
            stuff_masks=empty,
            stuff_classes=(),
            part_masks=empty,
            part_classes=(),
            part_parents=torch.zeros(0, dtype=torch.long),
            image_id=int(info["id"]),
        )
        return resize_sample(sample, self.max_size) if self.max_size else sample


# --------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """Samples padded to one size.

    images: (B, 3, H, W) float RGB in 0-255, zero-padded at the bottom/right to multiples of
        `size_divisibility`.
    image_sizes: (B, 2) long valid (height, width) of each image.
    samples: the B samples (masks unpadded, in image coordinates).
    """

    images: torch.Tensor
    image_sizes: torch.Tensor
    samples: tuple[TrainSample, ...] = field(default_factory=tuple)

    @property
    def padded_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])


def collate(samples: Sequence[TrainSample], *, size_divisibility: int = 32) -> Batch:
    """Pad a list of samples into a `Batch` (a `DataLoader` collate_fn via functools.partial)."""
    d = size_divisibility
    H = max(s.size[0] for s in samples)
    W = max(s.size[1] for s in samples)
    H, W = (H + d - 1) // d * d, (W + d - 1) // d * d
    images = torch.zeros(len(samples), 3, H, W)
    for i, s in enumerate(samples):
        h, w = s.size
        images[i, :, :h, :w] = s.image.float()
    sizes = torch.tensor([s.size for s in samples], dtype=torch.long)
    return Batch(images=images, image_sizes=sizes, samples=tuple(samples))


def _targets(
    masks: torch.Tensor,
    labels: list[int],
    padded: tuple[int, int],
    instance_labels: list[int] | None = None,
) -> SegmentTargets:
    """(T, h, w) masks -> SegmentTargets with masks padded to `padded` and normalized boxes."""
    H, W = padded
    T, h, w = masks.shape
    full = torch.zeros(T, H, W, dtype=torch.bool)
    full[:, :h, :w] = masks
    xyxy = masks_to_boxes(masks) / torch.tensor([W, H, W, H], dtype=torch.float32)
    return SegmentTargets(
        labels=torch.tensor(labels, dtype=torch.long),
        masks=full,
        boxes=box_xyxy_to_cxcywh(xyxy).reshape(T, 4),
        instance_labels=None
        if instance_labels is None
        else torch.tensor(instance_labels, dtype=torch.long),
    )


@dataclass(frozen=True)
class PassTargets:
    """One text pass of a batch: its prompt and its ground truth.

    prompt: the labels (the text encoder appends "other"); for referring, one expression per
        image (`expression=True`).
    things: per image, targets of the thing decoder (things, parts, or the referred thing).
    stuff: per image, stuff targets of the stuff decoder, or None (stuff decoder not run).
    instance_columns: (K,) bool, instance-label columns of a part prompt, else None.
    expression: whether `prompt` holds referring expressions.
    """

    prompt: tuple[str, ...]
    things: list[SegmentTargets]
    stuff: list[SegmentTargets] | None = None
    instance_columns: torch.Tensor | None = None
    expression: bool = False


def panoptic_targets(
    batch: Batch, things: Sequence[str], stuff: Sequence[str], *, rng: random.Random | None = None
) -> PassTargets:
    """Things + stuff pass: prompt = things then stuff (shuffled when `rng` is given)."""
    prompt = list(things) + list(stuff)
    if rng is not None:
        rng.shuffle(prompt)
    col = {name: i for i, name in enumerate(prompt)}
    padded = batch.padded_size
    thing_t = [
        _targets(s.thing_masks, [col[c] for c in s.thing_classes], padded) for s in batch.samples
    ]
    stuff_t = [
        _targets(s.stuff_masks, [col[c] for c in s.stuff_classes], padded) for s in batch.samples
    ]
    return PassTargets(prompt=tuple(prompt), things=thing_t, stuff=stuff_t if stuff else None)


def part_targets(
    batch: Batch,
    parts: Sequence[str],
    things: Sequence[str],
    *,
    rng: random.Random | None = None,
    with_instances: bool = True,
    distractors: Sequence[str] = (),
) -> PassTargets:
    """Part pass (Sec. 3.7): prompt = part labels (+ instance labels) (+ distractors); each part
    is positive for its "object-part" label and, when `with_instances`, for its instance label
    too. `distractors` are extra labels that nothing is positive for (e.g. "car eye": inference
    composes every thing with every part name, `hipie.hierarchy.compose_part_prompts`)."""
    prompt = list(parts) + (list(things) if with_instances else []) + list(distractors)
    if rng is not None:
        rng.shuffle(prompt)
    col = {name: i for i, name in enumerate(prompt)}
    padded = batch.padded_size
    out = []
    for s in batch.samples:
        inst = [col[s.thing_classes[int(p)]] for p in s.part_parents] if with_instances else None
        out.append(_targets(s.part_masks, [col[c] for c in s.part_classes], padded, inst))
    inst_cols = None
    if with_instances:
        thing_set = set(things)
        inst_cols = torch.tensor([name in thing_set for name in prompt] + [False])  # + "other"
    return PassTargets(prompt=tuple(prompt), things=out, instance_columns=inst_cols)


def referring_targets(batch: Batch, rng: random.Random) -> PassTargets:
    """Referring pass: one random expression per image; its thing is the only target (column 0,
    the [CLS] embedding). An image without expressions gets "the object" and no target."""
    padded = batch.padded_size
    texts, out = [], []
    for s in batch.samples:
        if s.expressions:
            text, idx = rng.choice(list(s.expressions))
            texts.append(text)
            out.append(_targets(s.thing_masks[idx : idx + 1], [0], padded))
        else:
            texts.append("the object")
            out.append(_targets(s.thing_masks[:0], [], padded))
    return PassTargets(prompt=tuple(texts), things=out, expression=True)
