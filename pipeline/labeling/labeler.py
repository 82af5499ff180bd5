"""The Ray labeler: a callable class that labels batches of decoded images with HIPIE.

``__init__`` builds HIPIE (and the optional CLIP model and SAM) once per actor; ``__call__``
takes a batch of rows from ``pipeline.labeling.transform.decode_record`` and returns schema-v1
rows as an Arrow table (plus the end-marker columns that the job's driver uses to close shards).

Per image:
1. HIPIE's hierarchy on one image encoding: the things+stuff pass and the part pass (Sec. 3.7).
2. Class-agnostic masks: the image's SA-1B masks when the source has them, else SAM's automatic
   mask generator when a SAM checkpoint is configured, else none.
3. With masks: the vote (Eq. 5) gives each mask class probabilities, a level and a parent; for the
   ``replace_classes`` (e.g. person, bird) HIPIE's own masks and parts replace SAM's (App. A.8.2).
   Without masks: HIPIE's hierarchy is the output.
A failure on one image becomes that image's ``error`` row; the batch goes on.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

import schemas
from pipeline.labeling.config import COUNT, END, LabelJobConfig
from pipeline.masks.sam_json import unpack_sam_masks

ROW_SCHEMA = schemas.LABELS_V1.append(pa.field(END, pa.bool_())).append(pa.field(COUNT, pa.int64()))


def model_name(checkpoint: str) -> str:
    """How the provenance column names the model."""
    return f"hipie:{checkpoint}"


def load_model(checkpoint: str):
    """``tiny`` (shipped weights), ``random:<preset>`` (untrained, for benchmarks; ``random:r50``
    and ``random:vit_h`` are the released architecture), a folder, or a released checkpoint
    (``r50_parts.pth``, or a Hugging Face ``owner/repo/file.pth``): see ``hipie.build_hipie``."""
    from hipie import build_hipie

    return build_hipie(checkpoint=checkpoint)


def model_input_side(checkpoint: str) -> int | None:
    """The model's test size (longer image side) for ``checkpoint``, read from its config only;
    None when it cannot be told without loading the model (the decode task then ships images at
    their own size and the labeler resizes them)."""
    from hipie.build import PRESETS, _checkpoint_dir
    from hipie.config import HipieConfig
    from hipie.release_build import RELEASE_PRESETS

    try:
        if checkpoint.startswith("random:"):
            name = checkpoint.split(":", 1)[1]
            if name in RELEASE_PRESETS:  # the released architecture resizes the shortest edge
                return None
            return int(PRESETS[name]().test_size)
        config = json.loads((_checkpoint_dir(checkpoint) / "config.json").read_text())
        return int(HipieConfig.from_dict(config).test_size)
    except (OSError, KeyError, ValueError, TypeError):  # another kind of checkpoint
        return None


def make_predictor(
    model, *, device: str | None, clip=None, precision: str = "fp32", test_size: int | None = None
):
    """The predictor of the model's family: ``ReleaseHierarchyPredictor`` for a ``HipieRelease``
    (``test_size`` = its shortest edge), else ``HipiePredictor`` (``test_size`` = longer side)."""
    if is_release(model):
        from hipie.release_hierarchy import ReleaseHierarchyPredictor

        return ReleaseHierarchyPredictor(
            model, device=device, clip=clip, precision=precision, min_size=test_size
        )
    from hipie import HipiePredictor

    predictor = HipiePredictor(model, device=device, clip=clip, precision=precision)
    if test_size:
        predictor.config = dataclasses.replace(predictor.config, test_size=test_size)
    return predictor


def is_release(model) -> bool:
    """Whether ``model`` is the released architecture (``hipie.modeling.hipie_release``)."""
    from hipie.modeling.hipie_release import HipieRelease

    return isinstance(model, HipieRelease)


def load_clip(spec: str | None, device: str, *, release: bool = False):
    """``MODEL:PRETRAINED`` (an open_clip name and a tag or local file) or None.

    For the released architecture: the release's mask-token CLIP (``hipie.clip_release.MaskClip``;
    ``vit_h_cloud`` uses ``ViT-L-14-336:openai``); else our family's ``ClipMaskClassifier``.
    """
    if not spec:
        return None
    name, _, pretrained = spec.partition(":")
    if release:
        import open_clip

        from hipie.clip_release import MaskClip

        model = open_clip.create_model(name, pretrained=pretrained or None, device=device)
        return MaskClip(model)
    from hipie.clip_ensemble import ClipMaskClassifier

    return ClipMaskClassifier(model_name=name, pretrained=pretrained or None, device=device)


def segments_to_masks(
    seg, *, topk: int, sam_records=None, encoded=None, image_size=None
) -> list[dict]:
    """A predictor ``Segments`` as schema mask structs (mask ids = positions).

    RLEs, boxes and areas: the SAM records' (``sam_records``), else ``encoded`` (a
    `hipie.rle_torch.EncodedMasks` of the segments' masks), else the masks encoded here, at
    ``image_size`` (H, W) when the masks are at the model's smaller resolution (nearest
    upsampling, straight to the RLE).
    """
    n = len(seg)
    if n == 0:
        return []
    boxes = areas = None
    if seg.rles is not None:
        rles = seg.rles
    else:
        if encoded is None:
            from hipie import rle_torch

            encoded = rle_torch.encode(seg.masks.detach(), image_size)
        rles, boxes, areas = encoded.rles, encoded.bboxes, encoded.areas
    probs = seg.probs.detach().float().cpu()
    k = min(topk, probs.shape[1]) if probs.ndim == 2 else 0
    top_scores, top_ids = probs.topk(k, dim=1) if k else (None, None)
    parents = seg.parents.tolist()
    scores = seg.scores.detach().float().cpu().clamp(0, 1).tolist()
    out = []
    for i in range(n):
        labels, values = [], []
        if k:
            for s, j in zip(top_scores[i].tolist(), top_ids[i].tolist()):
                if s > 0:
                    labels.append(seg.vocabulary[j])
                    values.append(min(max(s, 0.0), 1.0))
        sam = sam_records[i] if sam_records is not None else None
        label = seg.labels[i] or "other"
        out.append(
            schemas.make_mask(
                mask_id=i,
                rle=rles[i],
                level=seg.level[i],
                label=label,
                score=scores[i] if seg.labels[i] else 0.0,
                origin="sam" if sam_records is not None else "hipie",
                topk_labels=labels,
                topk_scores=values,
                parent_id=parents[i] if parents[i] >= 0 else None,
                sam_iou=None if sam is None else sam.get("predicted_iou"),
                sam_stability=None if sam is None else sam.get("stability_score"),
                bbox=sam.get("bbox") if sam is not None else boxes[i] if boxes else None,
                area=sam.get("area") if sam is not None else areas[i] if areas else None,
            )
        )
    return out


def replace_classes(sam_masks: list[dict], hier_masks: list[dict], classes: set[str]) -> list[dict]:
    """App. A.8.2: HIPIE's masks (and their parts) replace SAM's for ``classes``.

    SAM masks labeled with one of ``classes`` are dropped with every mask below them; HIPIE's
    instances of those classes are added with their parts and subparts. Mask ids are renumbered
    and parent links remapped.
    """
    if not classes:
        return sam_masks

    def object_label(m: dict, by_id: dict) -> str | None:
        if m["level"] == "instance":
            return m["label"]
        instance = schemas.instance_of(m, by_id)
        return None if instance is None else instance["label"]

    sam_by_id = {m["mask_id"]: m for m in sam_masks}
    hier_by_id = {m["mask_id"]: m for m in hier_masks}
    kept = [m for m in sam_masks if object_label(m, sam_by_id) not in classes]
    added = [
        m for m in hier_masks if m["level"] != "stuff" and object_label(m, hier_by_id) in classes
    ]
    result, new_ids = [], {}
    for source, masks in (("sam", kept), ("hipie", added)):
        for m in masks:
            new_ids[(source, m["mask_id"])] = len(result)
            result.append(dict(m))
    for r, (source, m) in zip(result, [("sam", m) for m in kept] + [("hipie", m) for m in added]):
        r["mask_id"] = new_ids[(source, m["mask_id"])]
        r["parent_id"] = (
            new_ids.get((source, m["parent_id"])) if m["parent_id"] is not None else None
        )
    return result


def _image_size(batch: dict, i: int, image: np.ndarray) -> tuple[int, int]:
    """Image i's own (height, width): the decode task's, else the array's."""
    if "height" in batch and int(batch["height"][i]) > 0:
        return int(batch["height"][i]), int(batch["width"][i])
    return image.shape[0], image.shape[1]


class Labeler:
    """Ray Data callable class: decoded images in, schema-v1 rows out (see module docstring)."""

    def __init__(self, config: LabelJobConfig) -> None:
        import torch

        use_gpu = config.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        self.config = config
        vocabulary = config.vocabulary
        self.things = list(vocabulary.things)
        self.stuff = list(vocabulary.stuff)
        self.parts = list(vocabulary.parts)
        # thing -> its parts, or None for every composition; no part pass when it leaves none
        self.thing_parts = dict(vocabulary.thing_parts) or None
        self.part_groups = dict(vocabulary.part_groups)  # {}: no coarse level
        if not vocabulary.part_prompts():
            self.parts = []
        self.vocabulary_hash = vocabulary.hash
        self.model = model_name(config.checkpoint)
        self.replace = set(config.replace_classes)
        model = load_model(config.checkpoint)
        self.predictor = make_predictor(
            model,
            device=self.device,
            clip=load_clip(config.clip, self.device, release=is_release(model)),
            precision="bf16" if use_gpu else "fp32",  # bf16 pays on GPUs, not on CPUs
            test_size=config.test_size,
        )
        self.sam = None
        if config.sam_checkpoint:
            from pipeline.masks.build import build_sam
            from pipeline.masks.sam import BatchedMaskGenerator

            self.sam = BatchedMaskGenerator(
                build_sam(config.sam_model_type, config.sam_checkpoint, self.device)
            )

    def _hierarchy(self, images: list[np.ndarray]):
        if self.parts:
            return self.predictor.hierarchy_batch(
                images,
                self.things,
                self.stuff,
                self.parts,
                thing_parts=self.thing_parts,
                part_groups=self.part_groups,
            )
        return self.predictor.panoptic_batch(images, self.things, self.stuff)

    def label_images(
        self,
        images: list[np.ndarray],
        sam_lists: list[list[dict] | None],
        sizes: list[tuple[int, int]] | None = None,
    ):
        """Mask structs per image; ``sam_lists[i]`` is the image's class-agnostic masks or None.

        ``sizes[i]`` is image i's own (height, width) when ``images[i]`` was resized for the model
        (by the decode task); the labels refer to that size. Default: the arrays' sizes.
        HIPIE sees each image at its test size and its masks stay at that resolution: each is
        RLE-encoded once, straight to the image size, for the rows and the vote alike.
        """
        from hipie import rle_torch
        from pipeline.sources.decode import resize_to_model

        sizes = list(sizes) if sizes is not None else [im.shape[:2] for im in images]
        if self.sam is not None:
            missing = [i for i, s in enumerate(sam_lists) if s is None]
            if missing:
                if any(images[i].shape[:2] != tuple(sizes[i]) for i in missing):
                    raise ValueError("SAM needs the images at their own size")
                generated = self.sam.generate_batch([images[i] for i in missing])
                for i, masks in zip(missing, generated):
                    sam_lists[i] = [
                        {
                            "rle": m.rle,
                            "bbox": list(m.bbox),
                            "area": m.area,
                            "predicted_iou": m.predicted_iou,
                            "stability_score": m.stability_score,
                        }
                        for m in masks
                    ]
        # Our predictor takes the longer side to its test size, so images go in at that size;
        # the released architecture resizes the shortest edge itself (min_size / max_size, as
        # released), so its images go in at their own size.
        side = getattr(self.predictor.config, "test_size", None)
        hierarchies = self._hierarchy([resize_to_model(im, side) for im in images])
        results = []
        for h, sam, size in zip(hierarchies, sam_lists, sizes):
            encoded = rle_torch.encode(h.masks, tuple(size))
            hier_masks = segments_to_masks(h, topk=self.config.topk, encoded=encoded)
            if not sam:
                results.append(hier_masks)
                continue
            voted = self.predictor.vote_from_hierarchy(
                h, [s["rle"] for s in sam], self.things, hipie_rles=encoded.rles
            )
            sam_masks = segments_to_masks(voted, topk=self.config.topk, sam_records=sam)
            results.append(replace_classes(sam_masks, hier_masks, self.replace))
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["shard"])
        now = datetime.now(timezone.utc)
        rows: list[dict | None] = [None] * n
        todo = []
        for i in range(n):
            common = {
                "image_id": str(batch["image_id"][i]),
                "uri": str(batch["uri"][i]),
                "shard": str(batch["shard"][i]),
            }
            if batch[END][i]:
                row = schemas.make_error_row(**common, error="end of shard", labeled_at=now)
                rows[i] = {**row, END: True, COUNT: int(batch[COUNT][i])}
            elif batch["error"][i]:
                row = schemas.make_error_row(
                    **common,
                    error=str(batch["error"][i]),
                    model=self.model,
                    vocabulary_hash=self.vocabulary_hash,
                    labeled_at=now,
                )
                rows[i] = {**row, END: False, COUNT: 0}
            else:
                todo.append(i)
        if todo:
            images = [np.asarray(batch["image"][i]) for i in todo]
            sizes = [_image_size(batch, i, images[j]) for j, i in enumerate(todo)]
            sams = [
                unpack_sam_masks(batch["sam_counts"][i], batch["sam_meta"][i], *size)
                if "sam_counts" in batch
                else None
                for i, size in zip(todo, sizes)
            ]
            try:
                labeled = self.label_images(images, sams, sizes)
                failures = [None] * len(todo)
            except Exception:  # noqa: BLE001 - retry one by one so one bad image costs one row
                labeled, failures = [], []
                for img, sam, size in zip(images, sams, sizes):
                    try:
                        labeled.extend(self.label_images([img], [sam], [size]))
                        failures.append(None)
                    except Exception as exc:  # noqa: BLE001
                        labeled.append([])
                        failures.append(f"labeling failed: {type(exc).__name__}: {exc}")
                        traceback.print_exc()
            for i, (h, w), masks, failure in zip(todo, sizes, labeled, failures):
                common = {
                    "image_id": str(batch["image_id"][i]),
                    "uri": str(batch["uri"][i]),
                    "shard": str(batch["shard"][i]),
                    "width": w,
                    "height": h,
                    "model": self.model,
                    "vocabulary_hash": self.vocabulary_hash,
                    "labeled_at": now,
                }
                if failure:
                    row = schemas.make_error_row(**common, error=failure)
                else:
                    row = schemas.make_ok_row(**common, masks=masks)
                rows[i] = {**row, END: False, COUNT: 0}
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
