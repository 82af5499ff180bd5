"""HIPIE as a FiftyOne model: ``dataset.apply_model(HipieModel(...), label_field="hipie")``.

    import fiftyone as fo
    from pipeline.review.model import HipieModel

    model = HipieModel(checkpoint="tiny", vocabulary="synthetic", score_threshold=0.3)
    dataset.apply_model(model, label_field="hipie", batch_size=8)
    # with class-agnostic masks (SA-1B's, or SAM's from FiftyOne's SAM integration) in a
    # Detections field, HIPIE votes its classes onto them (Eq. 5):
    dataset.apply_model(model, label_field="hipie", batch_size=8, prompt_field="sam")

Fields written (``label_field`` is a prefix, as FiftyOne names the fields of a dict of labels):
``hipie_instances``, ``hipie_stuff``, ``hipie_parts``, ``hipie_subparts`` (the same detections,
attributes, top-k and ``parent_id`` links as ``jobs.review`` writes, plus ``instance_label`` on
parts and subparts), ``hipie_label_run`` (model | vocabulary hash | time) and ``hipie_label_error``
(for an image that failed; the sample is tagged ``label-error``). When ``apply_model`` returns, the
model (a context manager, which ``apply_model`` enters) stores ``hipie_min_margin``, the App's
colour scheme and the saved views ``hipie: needs review``, ``hipie: errors``, ``hipie: reviewed``
(``pipeline.review.app``).

The labeling itself is ``pipeline.labeling.labeler.Labeler`` (the Ray job's code: hierarchy pass,
vote, replace classes) and the conversion is ``pipeline.review.ingest.row_labels`` (the ingest's code).
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from types import SimpleNamespace

import fiftyone as fo
import fiftyone.core.models as fom
import numpy as np

import schemas
from hipie.config import PostprocessConfig
from pipeline.labeling.labeler import Labeler
from pipeline.review import app, fields, ingest, read
from pipeline.vocabulary import Vocabulary, load_vocabulary
from schemas import rle as rle_utils

logger = logging.getLogger(__name__)
THRESHOLDS = tuple(f.name for f in dataclasses.fields(PostprocessConfig))


class HipieModel(fom.Model, fom.SamplesMixin):
    """HIPIE hierarchical labels for ``apply_model`` (see the module docstring).

    Args:
        checkpoint: ``tiny`` (shipped), a checkpoint folder, or ``random:<preset>``.
        vocabulary: a ``Vocabulary``, a shipped name (``synthetic``, ``coco_panoptic``, ...), a
            file path, or None for the default (COCO panoptic + shipped parts).
        device: ``cuda``, ``cpu``, or None (the GPU when there is one).
        topk: labels and scores kept per mask.
        replace_classes: classes whose masks HIPIE's replace in the vote (App. A.8.2).
        clip: ``MODEL:PRETRAINED`` for the CLIP ensemble (Eq. 4), or None.
        **thresholds: any of ``hipie.config.PostprocessConfig``'s fields: ``score_threshold``,
            ``mask_threshold``, ``overlap_threshold``, ``nms_iou``, ``max_detections``,
            ``detection_min_score``.
    """

    def __init__(
        self,
        checkpoint: str = "tiny",
        vocabulary: Vocabulary | str | None = None,
        *,
        device: str | None = None,
        topk: int = 3,
        replace_classes: tuple[str, ...] = ("person", "bird"),
        clip: str | None = None,
        **thresholds: float,
    ) -> None:
        fom.SamplesMixin.__init__(self)
        unknown = set(thresholds) - set(THRESHOLDS)
        if unknown:
            raise TypeError(f"unknown thresholds {sorted(unknown)}; known: {list(THRESHOLDS)}")
        import torch

        from pipeline.labeling.config import LabelJobConfig

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no GPU")
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = load_vocabulary(vocabulary)
        self.vocabulary = vocabulary
        self.labeler = Labeler(
            LabelJobConfig(
                inputs=(),
                output="",
                vocabulary_json=vocabulary.to_json(),
                checkpoint=checkpoint,
                clip=clip,
                replace_classes=tuple(replace_classes),
                gpus_per_actor=1.0 if device == "cuda" else 0.0,
                topk=topk,
            )
        )
        predictor = self.labeler.predictor
        if thresholds:
            post = dataclasses.replace(predictor.config.postprocess, **thresholds)
            predictor.config = dataclasses.replace(predictor.config, postprocess=post)
        self.config = SimpleNamespace(thresholds=dataclasses.asdict(predictor.config.postprocess))
        self._run = None
        self._dataset = None
        self._sample_ids: list[str] = []
        self._failed_ids: list[str] = []
        self._sizes: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------ fiftyone.Model API
    @property
    def media_type(self) -> str:
        return "image"

    @property
    def has_logits(self) -> bool:
        return False

    @property
    def ragged_batches(self) -> bool:
        return False  # images of any size go to predict_all as a list (no DataLoader, no stacking)

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self) -> bool:
        return False

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        pass

    @property
    def device(self) -> str:
        return self.labeler.device

    def __enter__(self):
        stamp = datetime.now(timezone.utc)
        self._labeled_at = stamp
        self._run = fields.run_id(
            {
                "model": self.labeler.model,
                "vocabulary_hash": self.vocabulary.hash,
                "labeled_at": stamp,
            }
        )
        self._dataset, self._sample_ids, self._failed_ids, self._sizes = None, [], [], {}
        return self

    def __exit__(self, *args) -> None:
        if self._dataset is not None and self._sample_ids:
            try:
                self.finish(self._dataset, self._sample_ids)
            finally:
                self._dataset, self._sample_ids = None, []
        self._run = None

    def predict(self, arg: np.ndarray, sample=None) -> dict:
        return self.predict_all([arg], samples=None if sample is None else [sample])[0]

    def predict_all(self, args, samples=None) -> list[dict]:
        """Labels of a batch of HWC uint8 images (``samples``: their FiftyOne samples)."""
        if self._run is None:  # called outside apply_model
            self.__enter__()
        images = [_rgb(np.asarray(a)) for a in args]
        prompts = self._prompt_masks(images, samples)
        try:
            labeled = self.labeler.label_images(images, prompts)
            failures = [None] * len(images)
        except Exception:  # noqa: BLE001 - one bad image costs its sample, not the batch
            labeled, failures = [], []
            for image, prompt in zip(images, prompts):
                try:
                    labeled.extend(self.labeler.label_images([image], [prompt]))
                    failures.append(None)
                except Exception as exc:  # noqa: BLE001
                    labeled.append([])
                    failures.append(f"labeling failed: {type(exc).__name__}: {exc}")
                    logger.warning("HIPIE failed on an image: %s", failures[-1])
        out = []
        for k, (image, masks, failure) in enumerate(zip(images, labeled, failures)):
            sample = samples[k] if samples is not None else None
            out.append(self._labels(image, masks, failure, sample))
            if sample is not None:
                self._dataset = sample.dataset if self._dataset is None else self._dataset
                self._sample_ids.append(sample.id)
                self._sizes[sample.id] = (image.shape[1], image.shape[0])
                if failure:
                    self._failed_ids.append(sample.id)
        return out

    # ------------------------------------------------------------------ helpers
    def _prompt_masks(self, images: list[np.ndarray], samples) -> list[list[dict] | None]:
        """The class-agnostic masks of each image from the ``prompt_field`` (None without)."""
        field = self.needs_fields.get("prompt_field") if self.needs_fields else None
        if not field or samples is None:
            return [None] * len(images)
        out = []
        for image, sample in zip(images, samples):
            value = sample.get_field(field) if sample.has_field(field) else None
            out.append(detections_to_sam(value, image.shape[1], image.shape[0]))
        return out

    def _labels(self, image: np.ndarray, masks: list[dict], failure, sample) -> dict:
        height, width = image.shape[:2]
        common = dict(
            image_id=sample.id if sample is not None else "",
            uri=sample.filepath if sample is not None else "",
            shard="",
            width=width,
            height=height,
            model=self.labeler.model,
            vocabulary_hash=self.vocabulary.hash,
            labeled_at=self._labeled_at,
        )
        if failure:
            row = schemas.make_error_row(error=failure, **common)
        else:
            row = schemas.make_ok_row(masks=masks, **common)
        labels: dict = dict(ingest.row_labels(row))
        labels["label_run"] = self._run
        if failure:  # a None would leave FiftyOne no type to declare; finish() clears old errors
            labels["label_error"] = failure
        return labels

    def finish(self, dataset: fo.Dataset, sample_ids: list[str]) -> None:
        """After ``apply_model``: tag failures, expose attributes, margins, colours, views."""
        prefix = self._prefix(dataset, sample_ids[0])
        if prefix is None:
            return
        view = dataset.select(sample_ids)
        failed = set(self._failed_ids)
        error_field = f"{prefix}label_error"
        if error_field not in dataset.get_field_schema():
            dataset.add_sample_field(error_field, fo.StringField)
        fine = view.exclude(list(failed)) if failed else view
        fine.set_field(error_field, None).save(error_field)  # an earlier run's error is gone
        fine.untag_samples(fields.ERROR_TAG)
        if failed:
            dataset.select(list(failed)).tag_samples(fields.ERROR_TAG)
        sizes = {i: self._sizes[i] for i in view.exists("metadata", bool=False).values("id")}
        if sizes:  # image sizes, known from the decoded images (no second read of the files)
            metadata = {i: fo.ImageMetadata(width=w, height=h) for i, (w, h) in sizes.items()}
            dataset.set_values("metadata", metadata, key_field="id")
        dataset.add_dynamic_sample_fields()
        vocabularies = dict(dataset.info.get("vocabularies", {}))
        if self.vocabulary.hash not in vocabularies:
            vocabularies[self.vocabulary.hash] = self.vocabulary.to_dict()
            dataset.info["vocabularies"] = vocabularies
            dataset.save()
        classes = list(self.vocabulary.labels) + list(self.vocabulary.parts)
        app.setup_review(dataset, prefix=prefix, samples=view, vocabulary=classes)

    def _prefix(self, dataset: fo.Dataset, sample_id: str) -> str | None:
        """The ``label_field`` prefix ``apply_model`` used: the field holding this run's id."""
        names = [n for n in dataset.get_field_schema() if n.endswith("_label_run")]
        if not names:
            return None
        values = dataset.select(sample_id).values(names)
        for name, value in zip(names, values):
            if value and value[0] == self._run:
                return name[: -len("label_run")]
        return None


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def detections_to_sam(value, width: int, height: int) -> list[dict] | None:
    """Class-agnostic mask records (the labeler's SA-1B/SAM format) from a ``Detections`` field.

    Each detection with a mask becomes one record (its box-cropped mask pasted into the image);
    ``predicted_iou`` / ``stability_score`` (SA-1B's names) or ``sam_iou`` / ``sam_stability``
    (ours) are kept when the detection has them. None when there is no field or no mask.
    """
    if value is None:
        return None
    if not isinstance(value, fo.Detections):
        raise TypeError(f"prompt_field must hold fo.Detections with masks, got {type(value)}")
    records = []
    for det in value.detections:
        if det.mask is None:
            continue
        dense = read.full_mask(det, width, height)
        if not dense.any():
            continue
        rle = rle_utils.encode(dense)
        records.append(
            {
                "rle": rle,
                "bbox": [float(v) for v in rle_utils.bbox(rle)],
                "area": int(dense.sum()),
                "predicted_iou": _number(det, "predicted_iou", "sam_iou"),
                "stability_score": _number(det, "stability_score", "sam_stability"),
            }
        )
    return records or None


def _number(det: fo.Detection, *names: str) -> float | None:
    for name in names:
        value = det.get_attribute_value(name, None)
        if value is not None:
            return float(value)
    return None
