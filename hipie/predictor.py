"""HipiePredictor: images in, typed per-image results out (every task of the paper).

Pre-processing: the longer image side is resized to `config.test_size`, the image is zero-padded
(after normalization) to a `test_size x test_size` square (a multiple of 32), so every image of a
batch has the same input shape and batched results equal per-image results. Masks are cropped
to the valid region and upsampled back to the original image size.

Sharing: the image encoder (backbone + pixel decoder) runs once per image and serves every text
pass (things+stuff, parts); text features are cached per vocabulary (LRU), not recomputed per image.

Part prompts (`hierarchy`, `vote`): instance and part names are concatenated ("dog head"), as in
training (Sec. 3.7, `hipie.hierarchy.compose_part_prompts`); part segments keep the composed
label. `parts()` uses the part vocabulary exactly as given (plain or composed names).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hipie import postprocess as pp
from hipie.box_ops import masks_to_boxes
from hipie.config import PostprocessConfig
from hipie.modeling.model import HipieModel
from hipie.modeling.pixel_decoder import ImageFeatures
from hipie.modeling.text_encoder import TextFeatures
from hipie.segments import Segments, SemanticMap

__all__ = ["HipiePredictor", "Segments", "SemanticMap"]


@dataclass(frozen=True)
class _ImageInfo:
    height: int  # original size
    width: int
    resized_h: int  # size inside the padded square
    resized_w: int
    padded: int  # side of the padded square


def _to_rgb_array(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of size {image.shape[:2]}")
    return image


def _resize_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) bool/long maps -> (N, *size), nearest neighbour; N may be 0."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[0] == 0:
        return maps.new_zeros(0, *size)
    out = F.interpolate(maps[None].float(), size=size, mode="nearest")[0]
    return out.to(maps.dtype)


class HipiePredictor:
    """Run a `HipieModel` on RGB images (np.ndarray (H, W, 3) uint8 or PIL.Image).

    Args:
        model: the model (put in eval mode here).
        device: where to run; default: the model's device.
        clip: optional `hipie.clip_ensemble.ClipMaskClassifier`; when given, segment class
            probabilities are ensembled with mask-pooled CLIP probabilities (Eq. 4).
        seen_classes: classes seen in training (lambda 0.2; others 0.45) for the CLIP ensemble.
        text_cache_size: number of vocabularies whose text features are kept.
        vote_max_side: passed to `hipie.vote.vote` for dense masks (None = exact).
        postprocess: thresholds; default: the model config's.
        precision: "fp32" or "bf16" (autocast of the image encoder and decoders; post-processing
            always runs in fp32).
    """

    def __init__(
        self,
        model: HipieModel,
        *,
        device: str | torch.device | None = None,
        clip=None,
        seen_classes: Sequence[str] = (),
        text_cache_size: int = 16,
        vote_max_side: int | None = None,
        postprocess: PostprocessConfig | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = self.model.device
        self.clip = clip
        self.seen_classes = set(seen_classes)
        self.config = model.config
        if postprocess is not None:
            self.config = dataclasses.replace(self.config, postprocess=postprocess)
        self.text_cache_size = text_cache_size
        self.vote_max_side = vote_max_side
        self._text_cache: OrderedDict[tuple, TextFeatures] = OrderedDict()

    # ------------------------------------------------------------------ shared plumbing
    def text_features(self, labels: Sequence[str], *, expression: bool = False) -> TextFeatures:
        """Cached text features of one vocabulary (or one expression)."""
        key = (expression, tuple(labels))
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        if not expression and len(labels) == 0:
            raise ValueError("empty vocabulary: give at least one label")
        with torch.inference_mode():
            feats = self.model.encode_text(list(labels), expression=expression)
        self._text_cache[key] = feats
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return feats

    def _prepare(
        self, images: Sequence
    ) -> tuple[torch.Tensor, torch.Tensor, list[_ImageInfo], list[np.ndarray]]:
        """Resize, normalize and pad -> (B, 3, S, S), padding mask (B, S, S), infos, arrays."""
        if len(images) == 0:
            raise ValueError("no images given")
        size = self.config.test_size
        padded = int(
            math.ceil(size / self.config.size_divisibility) * self.config.size_divisibility
        )
        arrays = [_to_rgb_array(im) for im in images]
        batch = torch.zeros(len(arrays), 3, padded, padded, device=self.device)
        pad_mask = torch.ones(len(arrays), padded, padded, dtype=torch.bool, device=self.device)
        infos = []
        for i, arr in enumerate(arrays):
            H, W = arr.shape[:2]
            scale = size / max(H, W)
            rh, rw = max(1, round(H * scale)), max(1, round(W * scale))
            x = (
                torch.from_numpy(np.array(arr, copy=True))
                .to(self.device)
                .permute(2, 0, 1)[None]
                .float()
            )
            if (rh, rw) != (H, W):
                x = F.interpolate(
                    x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True
                )
            batch[i, :, :rh, :rw] = self.model.normalize(x)[0]
            pad_mask[i, :rh, :rw] = False
            infos.append(_ImageInfo(H, W, rh, rw, padded))
        return batch, pad_mask, infos, arrays

    def _encode(self, images: Sequence) -> tuple[ImageFeatures, list[_ImageInfo], list[np.ndarray]]:
        batch, pad_mask, infos, arrays = self._prepare(images)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(batch, pad_mask)
        return feats, infos, arrays

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )

    def _decode(self, feats: ImageFeatures, text: TextFeatures, *, things: bool, stuff: bool):
        with torch.inference_mode(), self._autocast():
            return self.model.decode(feats, text, things=things, stuff=stuff)

    @staticmethod
    def _valid(info: _ImageInfo, mask_hw: tuple[int, int], device) -> torch.Tensor:
        """(h, w) bool: the non-padded region at mask resolution."""
        h, w = mask_hw
        ys = torch.arange(h, device=device)[:, None] < math.ceil(info.resized_h * h / info.padded)
        xs = torch.arange(w, device=device)[None, :] < math.ceil(info.resized_w * w / info.padded)
        return ys & xs

    @staticmethod
    def _upsample(
        mask_logits: torch.Tensor, info: _ImageInfo, size: tuple[int, int]
    ) -> torch.Tensor:
        """(N, h, w) logits at 1/4 of the padded input -> (N, *size) logits of the image region."""
        if mask_logits.shape[0] == 0:
            return mask_logits.new_zeros(0, *size)
        x = F.interpolate(
            mask_logits[None].float(),
            size=(info.padded, info.padded),
            mode="bilinear",
            align_corners=False,
        )[0, :, : info.resized_h, : info.resized_w]
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        return x

    @staticmethod
    def _boxes_to_pixels(boxes: torch.Tensor, info: _ImageInfo) -> torch.Tensor:
        """(N, 4) normalized xyxy of the padded square -> original-image pixel xyxy."""
        sx = info.padded * info.width / info.resized_w
        sy = info.padded * info.height / info.resized_h
        scale = boxes.new_tensor([sx, sy, sx, sy])
        out = boxes.float() * scale
        limit = boxes.new_tensor([info.width, info.height, info.width, info.height]).float()
        return torch.minimum(out.clamp(min=0), limit)

    def _mask_threshold_logit(self) -> float:
        p = self.config.postprocess.mask_threshold
        return math.log(p / (1 - p))

    def _segments(
        self,
        cands: pp.Candidates,
        info: _ImageInfo,
        vocabulary: list[str],
        level: str,
        masks: torch.Tensor | None = None,
    ) -> Segments:
        """Candidates -> Segments in original coordinates (masks upsampled unless given)."""
        if masks is None:
            masks = self._upsample(cands.mask_logits, info, (info.height, info.width))
            masks = masks > self._mask_threshold_logit()
        n = len(cands)
        boxes = self._boxes_to_pixels(cands.boxes, info)
        return Segments(
            masks=masks,
            boxes=boxes,
            labels=[vocabulary[i] for i in cands.label_ids.tolist()],
            label_ids=cands.label_ids.clone(),
            scores=cands.scores.float(),
            probs=cands.probs.float(),
            is_thing=cands.is_thing.clone(),
            parents=torch.full((n,), -1, dtype=torch.long, device=masks.device),
            level=[
                level if level != "auto" else ("instance" if t else "stuff")
                for t in cands.is_thing.tolist()
            ],
            vocabulary=list(vocabulary),
        )

    def _clip(self, seg: Segments, image: np.ndarray) -> Segments:
        """Eq. 4 ensemble of the segments' probs with CLIP's (only when a classifier is set)."""
        if self.clip is None or len(seg) == 0 or seg.masks.numel() == 0:
            return seg
        from hipie.clip_ensemble import class_lambdas, ensemble

        p_clip = self.clip.probs(image, seg.masks, seg.vocabulary).to(seg.probs.device)
        lam = class_lambdas(seg.vocabulary, self.seen_classes).to(seg.probs.device)
        probs = ensemble(seg.probs, p_clip, lam)
        # a segment keeps its kind (thing or stuff): only columns it could have are allowed
        probs = torch.where(seg.probs > 0, probs, 0.0)
        probs = probs / probs.sum(1, keepdim=True).clamp(min=1e-12)
        ids = probs.argmax(1)
        return Segments(
            seg.masks,
            seg.boxes,
            [seg.vocabulary[i] for i in ids.tolist()],
            ids,
            seg.scores,
            probs,
            seg.is_thing,
            seg.parents,
            seg.level,
            seg.vocabulary,
            seg.rles,
        )

    # ------------------------------------------------------------------ things-only tasks
    def _thing_task(
        self, images, vocabulary: Sequence[str], level: str, feats=None, infos=None, arrays=None
    ) -> list[Segments]:
        vocabulary = list(vocabulary)
        text = self.text_features(vocabulary)
        if feats is None:
            feats, infos, arrays = self._encode(images)
        out = self._decode(feats, text, things=True, stuff=False).things
        columns = torch.arange(len(vocabulary), device=self.device)
        results = []
        for b, info in enumerate(infos):
            valid = self._valid(info, out.masks.shape[-2:], self.device)
            cands = pp.thing_candidates(
                out.logits[b],
                out.masks[b],
                out.boxes[b],
                columns,
                len(vocabulary),
                valid,
                self.config.postprocess,
            )
            seg = self._segments(cands, info, vocabulary, level)
            results.append(self._clip(seg, arrays[b]))
        return results

    def instance_batch(self, images: Sequence, vocabulary: Sequence[str]) -> list[Segments]:
        """Open-vocabulary instance segmentation (thing decoder, box-IoU NMS)."""
        return self._thing_task(images, vocabulary, "instance")

    def instance(self, image, vocabulary: Sequence[str]) -> Segments:
        return self.instance_batch([image], vocabulary)[0]

    def detect_batch(self, images: Sequence, vocabulary: Sequence[str]) -> list[Segments]:
        """Open-vocabulary detection: as `instance`; `boxes` come from the box head."""
        return self._thing_task(images, vocabulary, "instance")

    def detect(self, image, vocabulary: Sequence[str]) -> Segments:
        return self.detect_batch([image], vocabulary)[0]

    def parts_batch(self, images: Sequence, part_vocabulary: Sequence[str]) -> list[Segments]:
        """Part segmentation with the part vocabulary as given (level "part")."""
        return self._thing_task(images, part_vocabulary, "part")

    def parts(self, image, part_vocabulary: Sequence[str]) -> Segments:
        return self.parts_batch([image], part_vocabulary)[0]

    # ------------------------------------------------------------------ semantic
    def semantic_batch(self, images: Sequence, vocabulary: Sequence[str]) -> list[SemanticMap]:
        """Semantic segmentation: all thing and stuff queries vote per pixel and class."""
        vocabulary = list(vocabulary)
        text = self.text_features(vocabulary)
        feats, infos, _ = self._encode(images)
        out = self._decode(feats, text, things=True, stuff=True)
        columns = torch.arange(len(vocabulary), device=self.device)
        results = []
        for b, info in enumerate(infos):
            scores = pp.semantic_scores(out.things.logits[b], out.things.masks[b], columns)
            scores = scores + pp.semantic_scores(out.stuff.logits[b], out.stuff.masks[b], columns)
            # argmax at the resized resolution, then nearest-neighbour to the original size
            up = self._upsample(scores, info, (info.resized_h, info.resized_w))
            label = _resize_nearest(up.argmax(0)[None], (info.height, info.width))[0]
            results.append(SemanticMap(label_map=label.long(), labels=vocabulary))
        return results

    def semantic(self, image, vocabulary: Sequence[str]) -> SemanticMap:
        return self.semantic_batch([image], vocabulary)[0]

    # ------------------------------------------------------------------ panoptic
    def _panoptic(
        self, feats, infos, arrays, things: list[str], stuff: list[str]
    ) -> list[Segments]:
        vocabulary = things + stuff
        text = self.text_features(vocabulary)
        out = self._decode(feats, text, things=bool(things), stuff=bool(stuff))
        C = len(vocabulary)
        thing_cols = torch.arange(len(things), device=self.device)
        stuff_cols = torch.arange(len(things), C, device=self.device)
        cfg = self.config.postprocess
        results = []
        for b, info in enumerate(infos):
            parts = []
            ref = out.things if out.things is not None else out.stuff
            valid = self._valid(info, ref.masks.shape[-2:], self.device)
            if things:
                t = out.things
                parts.append(
                    pp.thing_candidates(
                        t.logits[b], t.masks[b], t.boxes[b], thing_cols, C, valid, cfg
                    )
                )
            if stuff:
                s = out.stuff
                parts.append(
                    pp.stuff_candidates(
                        s.logits[b], s.masks[b], s.boxes[b], stuff_cols, C, valid, cfg
                    )
                )
            cands = pp.Candidates.cat(parts)
            probs = self._upsample(
                cands.mask_logits, info, (info.resized_h, info.resized_w)
            ).sigmoid()
            merged = pp.panoptic_merge(cands, probs, cfg)
            kept = cands.index(merged.keep)
            masks = _resize_nearest(merged.masks, (info.height, info.width))
            seg = self._segments(kept, info, vocabulary, "auto", masks=masks)
            if (~kept.is_thing).any():  # stuff boxes = the bbox of the merged mask
                boxes = seg.boxes.clone()
                stuff_idx = torch.nonzero(~kept.is_thing).flatten()
                boxes[stuff_idx] = masks_to_boxes(masks[stuff_idx]).float().to(boxes.device)
                seg = Segments(
                    seg.masks,
                    boxes,
                    seg.labels,
                    seg.label_ids,
                    seg.scores,
                    seg.probs,
                    seg.is_thing,
                    seg.parents,
                    seg.level,
                    seg.vocabulary,
                )
            results.append(self._clip(seg, arrays[b]))
        return results

    def panoptic_batch(
        self, images: Sequence, things: Sequence[str], stuff: Sequence[str]
    ) -> list[Segments]:
        """Panoptic segmentation: things (fused, thing decoder) + stuff (unfused, stuff decoder)."""
        things, stuff = list(things), list(stuff)
        if not things and not stuff:
            raise ValueError("empty vocabulary: give at least one thing or stuff label")
        feats, infos, arrays = self._encode(images)
        return self._panoptic(feats, infos, arrays, things, stuff)

    def panoptic(self, image, things: Sequence[str], stuff: Sequence[str]) -> Segments:
        return self.panoptic_batch([image], things, stuff)[0]

    # ------------------------------------------------------------------ referring
    def refer_batch(self, images: Sequence, expressions: Sequence[str] | str) -> list[Segments]:
        """Referring segmentation: one segment per image, the best query for the [CLS] token."""
        if isinstance(expressions, str):
            expressions = [expressions] * len(images)
        if len(expressions) != len(images):
            raise ValueError("give one expression per image")
        if any(not str(e).strip() for e in expressions):
            raise ValueError("empty referring expression")
        feats, infos, arrays = self._encode(images)
        results = []
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(expressions):
            groups.setdefault(str(e), []).append(i)
        by_index: dict[int, Segments] = {}
        for expr, idx in groups.items():
            text = self.text_features([expr], expression=True)
            sub = feats.select(idx)
            out = self._decode(sub, text, things=True, stuff=False).things
            for j, i in enumerate(idx):
                info = infos[i]
                valid = self._valid(info, out.masks.shape[-2:], self.device)
                cands = pp.referring_candidate(
                    out.logits[j], out.masks[j], out.boxes[j], valid, self.config.postprocess
                )
                by_index[i] = self._segments(cands, info, [expr], "instance")
        results = [by_index[i] for i in range(len(images))]
        return results

    def refer(self, image, expression: str) -> Segments:
        return self.refer_batch([image], [expression])[0]

    # ------------------------------------------------------------------ hierarchy
    def hierarchy_batch(
        self,
        images: Sequence,
        things: Sequence[str],
        stuff: Sequence[str],
        parts: Sequence[str],
        *,
        thing_parts: Mapping[str, Sequence[str]] | None = None,
        part_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Segments]:
        """Two passes on one image encoding (objects, then "<thing> <part>" prompts), parts
        assigned to instances and grouped into coarse parts (Sec. 3.7, Fig. 5).

        `thing_parts` (thing -> its parts) limits the part prompts to those compositions (things
        it does not list get no parts); None asks for every thing x part composition.
        `part_groups` (coarse part -> its fine parts) forms the coarse level; None uses
        `hipie.hierarchy.DEFAULT_PART_GROUPS`, {} forms no groups.

        Returns per image: the panoptic segments (level instance/stuff), then the fine parts
        (level "subpart" when a coarse group holds them, else "part"), then the coarse groups
        (level "part"); `parents` link subpart -> coarse part -> instance.
        """
        from hipie.hierarchy import DEFAULT_PART_GROUPS, compose_part_prompts

        things, stuff, parts = list(things), list(stuff), list(parts)
        if not parts:
            raise ValueError("empty part vocabulary")
        if not things and not stuff:
            raise ValueError("empty vocabulary: give at least one thing or stuff label")
        part_prompts = compose_part_prompts(things, parts, allowed=thing_parts) if things else parts
        if not part_prompts:
            raise ValueError("thing_parts gives none of these things a part")
        feats, infos, arrays = self._encode(images)
        panoptic = self._panoptic(feats, infos, arrays, things, stuff)
        part_segs = self._thing_task(None, part_prompts, "part", feats, infos, arrays)
        # parts obey the panoptic score threshold (instance/detect keep top-k for AP evaluation)
        part_segs = [
            q.filter(q.scores >= self.config.postprocess.score_threshold) for q in part_segs
        ]
        groups = DEFAULT_PART_GROUPS if part_groups is None else part_groups
        return [self._combine(p, q, groups, things) for p, q in zip(panoptic, part_segs)]

    def hierarchy(
        self,
        image,
        things: Sequence[str],
        stuff: Sequence[str],
        parts: Sequence[str],
        *,
        thing_parts: Mapping[str, Sequence[str]] | None = None,
        part_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> Segments:
        return self.hierarchy_batch(
            [image], things, stuff, parts, thing_parts=thing_parts, part_groups=part_groups
        )[0]

    @staticmethod
    def _combine(
        pan: Segments,
        part: Segments,
        part_groups: Mapping[str, Sequence[str]],
        things: Sequence[str],
    ) -> Segments:
        """Panoptic + parts (+ coarse groups) into one Segments with a joint vocabulary."""
        from hipie.hierarchy import assign_parents, group_parts

        n0, P = len(pan), len(part)
        thing_idx = torch.nonzero(pan.is_thing).flatten()
        instance_masks = pan.masks[thing_idx]
        parent_local = assign_parents(part.masks, instance_masks)  # (P,) into thing_idx
        if len(thing_idx) and P:
            part_parent = torch.where(
                parent_local >= 0,
                thing_idx[parent_local.clamp(min=0)],
                torch.full_like(parent_local, -1),
            )
        else:
            part_parent = torch.full((P,), -1, dtype=torch.long, device=pan.scores.device)
        part, part_parent = HipiePredictor._follow_parents(part, part_parent, pan, things)
        grouped = group_parts(part.masks, part.labels, part_parent, part_groups)
        G = len(grouped.labels)
        coarse = [lbl for lbl in dict.fromkeys(grouped.labels)]
        vocab = pan.vocabulary + part.vocabulary + [c for c in coarse if c not in part.vocabulary]
        C = len(vocab)
        off = len(pan.vocabulary)
        dev = pan.scores.device

        probs = torch.zeros(n0 + P + G, C, device=dev)
        probs[:n0, :off] = pan.probs
        probs[n0 : n0 + P, off : off + len(part.vocabulary)] = part.probs
        group_ids = torch.tensor(
            [vocab.index(lbl) for lbl in grouped.labels], dtype=torch.long, device=dev
        )
        if G:
            probs[n0 + P + torch.arange(G, device=dev), group_ids] = 1.0
        parents = torch.cat([pan.parents, part_parent.to(dev), grouped.parents.to(dev)])
        levels = list(pan.level) + ["part"] * P + ["part"] * G
        for g, children in enumerate(grouped.children):
            for c in children:
                parents[n0 + c] = n0 + P + g
                levels[n0 + c] = "subpart"
        group_scores = (
            torch.stack([part.scores[c].max() for c in grouped.children])
            if G
            else torch.zeros(0, device=dev)
        )
        group_masks = grouped.masks if G else pan.masks.new_zeros(0, *pan.masks.shape[1:])
        group_boxes = masks_to_boxes(group_masks).float() if G else torch.zeros(0, 4, device=dev)
        return Segments(
            masks=torch.cat([pan.masks, part.masks, group_masks]),
            boxes=torch.cat([pan.boxes, part.boxes, group_boxes.to(dev)]),
            labels=pan.labels + part.labels + list(grouped.labels),
            label_ids=torch.cat([pan.label_ids, part.label_ids + off, group_ids]),
            scores=torch.cat([pan.scores, part.scores, group_scores]),
            probs=probs,
            is_thing=torch.cat([pan.is_thing, torch.ones(P + G, dtype=torch.bool, device=dev)]),
            parents=parents,
            level=levels,
            vocabulary=vocab,
        )

    # ------------------------------------------------------------------ SAM vote
    def vote_batch(
        self,
        images: Sequence,
        sam_masks: Sequence,
        things: Sequence[str],
        stuff: Sequence[str],
        parts: Sequence[str],
        **hierarchy_options,
    ) -> list[Segments]:
        """Class-aware labels for class-agnostic SAM masks (Sec. 3.8, Eq. 5).

        `hierarchy_options` (`thing_parts`, `part_groups`) go to `hierarchy_batch`.

        Per image, HIPIE's hierarchy runs first; each SAM mask then gets two votes (Eq. 5):
        one over the object vocabulary (things + stuff) from the panoptic segments and one over
        the composed part prompts from the fine part segments. A SAM mask is an "instance" when
        it matches a thing segment (IoU >= 0.5); a "part" when it lies inside an instance
        (`assign_parents`) and got part votes, its parent being the SAM instance mask that holds
        it; otherwise "instance" or "stuff" by its object label.

        Args:
            sam_masks: per image, dense (S, H, W) bool tensor or a list of S COCO RLEs.
        Returns:
            Segments aligned with the SAM masks (same order).
        """
        if len(sam_masks) != len(images):
            raise ValueError("give one SAM mask set per image")
        hier = self.hierarchy_batch(images, things, stuff, parts, **hierarchy_options)
        return [self.vote_from_hierarchy(h, sam, things) for h, sam in zip(hier, sam_masks)]

    def vote_from_hierarchy(
        self,
        h: Segments,
        sam,
        things: Sequence[str],
        *,
        hipie_rles: Sequence[dict] | None = None,
        method: str = "auto",
    ) -> Segments:
        """Eq. 5 onto class-agnostic masks: `hipie.vote_policy.vote_onto_masks` with this
        predictor's `vote_max_side`."""
        from hipie.vote_policy import vote_onto_masks

        return vote_onto_masks(
            h, sam, things, hipie_rles=hipie_rles, method=method, vote_max_side=self.vote_max_side
        )

    @staticmethod
    def _follow_parents(
        part: Segments, parents: torch.Tensor, pan: Segments, things: Sequence[str]
    ) -> tuple[Segments, torch.Tensor]:
        """HIPIE's own parts under their instances follow `hipie.hierarchy.restrict_to_parent_parts`
        (a part in an instance labeled X is one of X's parts). Returns (parts, parents), new."""
        from hipie.hierarchy import parent_part_columns, restrict_to_parent_parts

        rows = [i for i in range(len(part)) if int(parents[i]) >= 0]
        if not rows:
            return part, parents
        allowed = parent_part_columns(
            part.vocabulary, things, [pan.labels[int(parents[i])] for i in rows], part.probs.device
        )
        index = torch.tensor(rows, dtype=torch.long, device=part.probs.device)
        sub_probs, sub_scores, sub_labels, keep = restrict_to_parent_parts(
            part.probs[index], part.scores[index], part.label_ids[index], allowed
        )
        probs, scores = part.probs.clone(), part.scores.clone()
        label_ids, parents = part.label_ids.clone(), parents.clone()
        probs[index], scores[index], label_ids[index] = sub_probs, sub_scores, sub_labels
        parents[index[~keep]] = -1
        labels = [part.vocabulary[int(k)] if k >= 0 else "" for k in label_ids.tolist()]
        part = dataclasses.replace(
            part, labels=labels, label_ids=label_ids, scores=scores, probs=probs
        )
        return part, parents

    def vote(
        self,
        image,
        sam_masks,
        things: Sequence[str],
        stuff: Sequence[str],
        parts: Sequence[str],
        **hierarchy_options,
    ) -> Segments:
        return self.vote_batch([image], [sam_masks], things, stuff, parts, **hierarchy_options)[0]
