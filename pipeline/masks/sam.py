"""Class-agnostic masks from SAM: a batched automatic mask generator.

``BatchedMaskGenerator`` gives the masks of segment-anything's ``SamAutomaticMaskGenerator``
(same point grid, same crops, same thresholds, same NMS, same records) with the same weights and
parameters, and spends its time differently:

- The stock generator runs the image encoder once per image (and crop), prompts 64 points at a
  time, upsamples every prompt's 3 masks to the full image size before any filter, and encodes
  an RLE of every mask that passes the score filters (a Python loop over all masks of a batch,
  with a device sync per mask) before NMS throws most of them away.
- Here the image encoder runs on batches of images (and crops); points are prompted in batches of
  ``points_per_batch``; the predicted-IoU filter runs on the low-resolution (256 x 256) logits
  before any upsampling; the stability score and the box of each remaining mask come from its
  full-size logits computed chunk by chunk and reduced at once (counts and row/column maxima:
  no full-size mask is kept); NMS runs on the boxes on the device; only the masks that survive
  everything are upsampled again and run-length encoded, all of them at once on the device.

Crop layers (``crop_n_layers > 0``) and ``min_mask_region_area`` are supported with the stock's
semantics (the latter runs OpenCV on the CPU, as the stock does). The remaining cost is the
exact stability score: every mask that passes the predicted-IoU filter is still upsampled to full
size once (chunked, never stored); on a CPU that dominates, on a GPU it is memory-bound. The
mask decoder does the same work per prompt as the stock's (each prompt runs SAM's two-way
transformer over all 4096 image tokens), so where few masks pass the filters the decoder and the
encoder bound the speed-up, and bf16 autocast (below) is what buys more.

Where results can differ from the stock generator (all floating point, none by design):

- The image encoder on a batch of B > 1 images, and the mask decoder on a batch of
  ``points_per_batch`` prompts instead of 64, may pick other kernels (other summation orders),
  so logits can differ in their last bits; a pixel whose full-size logit lies within that noise
  of the mask threshold (0) or of the stability cut-offs (+-1) can flip, and a mask whose score
  lies within it of ``pred_iou_thresh`` / ``stability_score_thresh``, or whose box IoU lies within
  it of an NMS threshold, can be kept by one and dropped by the other. With ``points_per_batch=64``
  and one image per call the arithmetic is the stock's op for op.
- The full-size logits are the stock's two bilinear interpolations (to 1024 x 1024, crop of the
  padding, to the image size); the first one only computes the rows/columns that survive the
  crop (plus one), which gives the same values (same scale factor 1/4, same source pixels).
- ``autocast_dtype="bfloat16"`` runs encoder and decoder under bf16 autocast (meant for CUDA,
  where it is several times faster; it works on CPU too): no longer the stock's numbers, masks
  agree approximately (``bench/amg_speed.py --autocast bfloat16`` measures how well).
- Records are ``pipeline.masks.sam_json.SamMask``: ``bbox`` is the stock's ``[x0, y0, x1 - x0, y1 - y0]``
  with inclusive ``x1, y1`` (one less than pycocotools' ``toBbox`` width/height); ``point_coords``
  and ``crop_box`` of the stock records are not kept. The order of the masks is the stock's
  (NMS order, best score first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    build_all_layer_point_grids,
    generate_crop_boxes,
    remove_small_regions,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import batched_nms

from pipeline.masks.amg import (
    AmgConfig,
    Candidates,
    Crop,
    box_from_profiles,
    count_above,
    encode_rles,
    near_crop_edge,
)
from pipeline.masks.sam_json import SamMask

# Elements (float32) of full-size logits materialized at once while computing stability/boxes.
_MAX_UPSAMPLE_ELEMENTS = 2**27


# ---------------------------------------------------------------------------------------------
# The generator


class BatchedMaskGenerator:
    """SAM's automatic mask generator, batched over images and points and kept on the device.

    Same parameters and semantics as ``segment_anything.SamAutomaticMaskGenerator`` (minus
    ``point_grids`` and ``output_mode``: records always carry COCO RLEs), plus
    ``points_per_batch`` (default 256), ``image_batch_size`` and ``autocast_dtype``.
    """

    def __init__(
        self,
        sam: Sam,
        *,
        points_per_side: int = 32,
        points_per_batch: int = 256,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
        image_batch_size: int = 8,
        autocast_dtype: str | None = None,
    ) -> None:
        self.config = AmgConfig(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            min_mask_region_area=min_mask_region_area,
            image_batch_size=image_batch_size,
            autocast_dtype=autocast_dtype,
        )
        if points_per_side < 1 or points_per_batch < 1 or image_batch_size < 1:
            raise ValueError("points_per_side, points_per_batch and image_batch_size must be >= 1")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError("autocast_dtype must be None, 'bfloat16' or 'float16'")
        self.sam = sam.eval()
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        # One (P_l, 2) grid in [0, 1] per crop layer, the stock's.
        self.point_grids = build_all_layer_point_grids(
            points_per_side, crop_n_layers, crop_n_points_downscale_factor
        )

    @property
    def device(self) -> torch.device:
        return self.sam.device

    # -- public API ----------------------------------------------------------------------------

    def generate(self, image: np.ndarray) -> list[SamMask]:
        """Masks of one RGB image ((H, W, 3) uint8), as ``generate_batch([image])[0]``."""
        return self.generate_batch([image])[0]

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray]) -> list[list[SamMask]]:
        """Masks of each RGB image ((H_i, W_i, 3) uint8; sizes may differ).

        Returns:
            One list per image of ``SamMask`` records (COCO RLE with str counts, XYWH bbox,
            area, predicted_iou, stability_score), best first, as the stock generator orders
            them.
        """
        for i, image in enumerate(images):
            if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
                raise ValueError(f"image {i}: expected an (H, W, 3) array, got {_describe(image)}")
            if image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected uint8 pixels, got {image.dtype}")
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(f"image {i}: empty image of shape {image.shape}")
        crops: list[Crop] = []
        for i, image in enumerate(images):
            boxes, layers = generate_crop_boxes(
                image.shape[:2], self.config.crop_n_layers, self.config.crop_overlap_ratio
            )
            crops += [Crop(i, tuple(b), layer) for b, layer in zip(boxes, layers)]

        per_crop: list[Candidates] = []
        bs = self.config.image_batch_size
        for start in range(0, len(crops), bs):
            chunk = crops[start : start + bs]
            embeddings = self._encode([_crop_pixels(images[c.image_index], c.box) for c in chunk])
            for crop, embedding in zip(chunk, embeddings):
                orig_size = images[crop.image_index].shape[:2]
                per_crop.append(self._process_crop(embedding, crop, orig_size))

        results = []
        for i, image in enumerate(images):
            idx = [k for k, c in enumerate(crops) if c.image_index == i]
            results.append(
                self._finish_image(
                    image.shape[:2], [crops[k] for k in idx], [per_crop[k] for k in idx]
                )
            )
        return results

    # -- stages -----------------------------------------------------------------------------------

    def _autocast(self):
        """Autocast context of the encoder and decoder (disabled unless ``autocast_dtype``)."""
        dtype = self.config.autocast_dtype
        return torch.autocast(
            device_type=self.device.type,
            dtype=getattr(torch, dtype) if dtype else torch.bfloat16,
            enabled=dtype is not None,
        )

    def _encode(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """Image embeddings of RGB arrays: (B, C, 64, 64), float32.

        Each array is resized with the stock's ``ResizeLongestSide.apply_image`` (PIL) so the
        encoder sees the stock's pixels; normalization and padding are ``Sam.preprocess``.
        """
        batch = []
        for arr in pixels:
            resized = self.transform.apply_image(arr)
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
            batch.append(self.sam.preprocess(x[None])[0])  # (3, S, S)
        with self._autocast():
            features = self.sam.image_encoder(torch.stack(batch))  # (B, C, 64, 64)
        return features.float()

    def _process_crop(
        self, embedding: torch.Tensor, crop: Crop, orig_size: tuple[int, int]
    ) -> Candidates:
        """Prompt the crop's point grid, filter by scores and edges, NMS within the crop.

        Args:
            embedding: (C, 64, 64) image embedding of the crop.
        Returns:
            The crop's candidates after NMS, boxes in crop coordinates, best score first.
        """
        cfg = self.config
        x0, y0, x1, y1 = crop.box
        crop_size = (y1 - y0, x1 - x0)
        input_size = self.transform.get_preprocess_shape(*crop_size, self.transform.target_length)
        # Prompt points as the stock computes them: float64 pixels, then the resize transform.
        points = self.point_grids[crop.layer] * np.array(crop_size)[None, ::-1]
        coords = self.transform.apply_coords(points, crop_size)  # (P, 2) float64
        image_pe = self.sam.prompt_encoder.get_dense_pe()

        parts = []
        for start in range(0, len(coords), cfg.points_per_batch):
            pts = torch.as_tensor(coords[start : start + cfg.points_per_batch], device=self.device)
            labels = torch.ones(len(pts), dtype=torch.int, device=self.device)
            # The prompt encoder stays in float32 (in bf16 its Fourier features of the point
            # coordinates would lose most of their precision); it is cheap anyway.
            sparse, dense = self.sam.prompt_encoder(
                points=(pts[:, None, :], labels[:, None]), boxes=None, masks=None
            )
            with self._autocast():
                logits, iou_preds = self.sam.mask_decoder(
                    image_embeddings=embedding[None],
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=True,
                )  # (n, 3, 256, 256), (n, 3)
            logits = logits.float().flatten(0, 1)  # (3n, 256, 256), point-major like the stock
            iou_preds = iou_preds.float().flatten(0, 1)  # (3n,)
            if cfg.pred_iou_thresh > 0.0:
                keep = iou_preds > cfg.pred_iou_thresh
                logits, iou_preds = logits[keep], iou_preds[keep]
            stability, boxes = self._stability_and_boxes(logits, input_size, crop_size)
            cand = Candidates(logits=logits, iou_preds=iou_preds, stability=stability, boxes=boxes)
            if cfg.stability_score_thresh > 0.0:
                cand = cand.filter(cand.stability >= cfg.stability_score_thresh)
            near = near_crop_edge(cand.boxes, crop.box, (0, 0, orig_size[1], orig_size[0]))
            parts.append(cand.filter(~near))

        cand = Candidates.cat(parts, self.device)
        keep = batched_nms(
            cand.boxes.float(),
            cand.iou_preds,
            torch.zeros_like(cand.iou_preds, dtype=torch.long),
            iou_threshold=cfg.box_nms_thresh,
        )
        return cand.filter(keep)

    def _full_logits(
        self, logits: torch.Tensor, input_size: tuple[int, int], crop_size: tuple[int, int]
    ) -> torch.Tensor:
        """Full-size logits of low-res ones, as ``Sam.postprocess_masks`` computes them.

        Args:
            logits: (M, 256, 256) low-res logits.
            input_size: (h, w) of the resized crop inside the padded 1024 x 1024 input.
            crop_size: (H, W) of the crop in image pixels.
        Returns:
            (M, H, W) float32 logits.
        """
        size = self.sam.image_encoder.img_size
        low = logits.shape[-1]
        scale = size // low  # 4: the first interpolation's factor
        # Only the low-res rows/columns that the padding crop keeps (plus one for the right-hand
        # neighbour): same scale factor, same source pixels, hence the same values.
        rows = min(low, math.ceil(input_size[0] / scale) + 1)
        cols = min(low, math.ceil(input_size[1] / scale) + 1)
        x = logits[:, None, :rows, :cols]  # (M, 1, rows, cols)
        x = F.interpolate(x, (rows * scale, cols * scale), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        x = F.interpolate(x, crop_size, mode="bilinear", align_corners=False)
        return x[:, 0]  # (M, H, W)

    def _stability_and_boxes(
        self, logits: torch.Tensor, input_size: tuple[int, int], crop_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stability score (M,) and XYXY box (M, 4) long of each mask's full-size logits,
        computed in chunks; boxes are [0, 0, 0, 0] for empty masks, as the stock's."""
        threshold = self.sam.mask_threshold
        offset = self.config.stability_score_offset
        h, w = crop_size
        chunk = max(1, _MAX_UPSAMPLE_ELEMENTS // (h * w))
        stability, boxes = [], []
        rows_idx = torch.arange(h, device=logits.device)
        cols_idx = torch.arange(w, device=logits.device)
        for start in range(0, len(logits), chunk):
            full = self._full_logits(logits[start : start + chunk], input_size, crop_size)
            inter = count_above(full, threshold + offset)
            union = count_above(full, threshold - offset)
            stability.append(inter / union)
            # A row (column) holds a mask pixel iff its maximum logit exceeds the threshold.
            in_rows = full.amax(dim=-1) > threshold  # (m, H)
            in_cols = full.amax(dim=-2) > threshold  # (m, W)
            boxes.append(box_from_profiles(in_rows, in_cols, rows_idx, cols_idx))
        if not stability:
            return torch.zeros(0, device=logits.device), torch.zeros(
                0, 4, dtype=torch.long, device=logits.device
            )
        return torch.cat(stability), torch.cat(boxes)

    def _finish_image(
        self, orig_size: tuple[int, int], crops: list[Crop], per_crop: list[Candidates]
    ) -> list[SamMask]:
        """NMS between crops, masks of the survivors at full size, small-region cleanup, RLE."""
        cfg = self.config
        crop_ids = torch.cat(
            [torch.full((len(c.iou_preds),), k, device=self.device) for k, c in enumerate(per_crop)]
        )
        offsets = torch.tensor([[c.box[0], c.box[1]] * 2 for c in crops], device=self.device)
        cand = Candidates.cat(per_crop, self.device)
        cand.boxes = cand.boxes + offsets[crop_ids]  # image coordinates
        if len(crops) > 1:
            # Prefer masks from smaller crops, as the stock does.
            areas = torch.tensor(
                [(c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) for c in crops], device=self.device
            )
            keep = batched_nms(
                cand.boxes.float(),
                1 / areas[crop_ids],
                torch.zeros_like(crop_ids),
                iou_threshold=cfg.crop_nms_thresh,
            )
            cand, crop_ids = cand.filter(keep), crop_ids[keep]
        if len(cand.iou_preds) == 0:
            return []

        masks = self._image_masks(cand, crop_ids, crops, orig_size)  # (K, H, W) bool
        boxes = cand.boxes
        if cfg.min_mask_region_area > 0:
            masks, boxes, keep = self._remove_small_regions(masks, boxes)
            cand = cand.filter(keep)
        rles = encode_rles(masks)
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        xywh = xywh.tolist()
        ious, stabs = cand.iou_preds.tolist(), cand.stability.tolist()
        return [
            SamMask(
                rle=rle,
                bbox=tuple(float(v) for v in box),
                area=area,
                predicted_iou=iou,
                stability_score=stab,
            )
            for (rle, area), box, iou, stab in zip(rles, xywh, ious, stabs)
        ]

    def _image_masks(
        self,
        cand: Candidates,
        crop_ids: torch.Tensor,
        crops: list[Crop],
        orig_size: tuple[int, int],
    ) -> torch.Tensor:
        """Binary masks (K, H, W) bool at image size, each placed in its crop."""
        height, width = orig_size
        masks = torch.zeros(
            len(cand.iou_preds), height, width, dtype=torch.bool, device=self.device
        )
        for k, crop in enumerate(crops):
            (sel,) = torch.nonzero(crop_ids == k, as_tuple=True)
            if len(sel) == 0:
                continue
            x0, y0, x1, y1 = crop.box
            crop_size = (y1 - y0, x1 - x0)
            input_size = self.transform.get_preprocess_shape(
                *crop_size, self.transform.target_length
            )
            chunk = max(1, _MAX_UPSAMPLE_ELEMENTS // (crop_size[0] * crop_size[1]))
            for start in range(0, len(sel), chunk):
                idx = sel[start : start + chunk]
                full = self._full_logits(cand.logits[idx], input_size, crop_size)
                masks[idx, y0:y1, x0:x1] = full > self.sam.mask_threshold
        return masks

    def _remove_small_regions(
        self, masks: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stock's ``postprocess_small_regions``: fill holes and drop islands smaller than
        ``min_mask_region_area`` (OpenCV, on the CPU, per mask), then NMS preferring unchanged
        masks. Returns the kept masks (K', H, W), their boxes (K', 4) and the kept indices."""
        cfg = self.config
        dense = masks.cpu().numpy()
        new_masks, scores = [], []
        for mask in dense:
            mask, changed_holes = remove_small_regions(mask, cfg.min_mask_region_area, mode="holes")
            mask, changed_islands = remove_small_regions(
                mask, cfg.min_mask_region_area, mode="islands"
            )
            new_masks.append(mask)
            scores.append(float(not (changed_holes or changed_islands)))
        new = torch.as_tensor(np.stack(new_masks), device=self.device)
        h_idx = torch.arange(new.shape[1], device=self.device)
        w_idx = torch.arange(new.shape[2], device=self.device)
        new_boxes = box_from_profiles(new.any(dim=-1), new.any(dim=-2), h_idx, w_idx)
        score_t = torch.tensor(scores, device=self.device)
        keep = batched_nms(
            new_boxes.float(),
            score_t,
            torch.zeros(len(scores), dtype=torch.long, device=self.device),
            iou_threshold=max(cfg.box_nms_thresh, cfg.crop_nms_thresh),
        )
        # The stock keeps the old mask and box of unchanged masks (they are equal anyway).
        changed = score_t[keep] == 0.0
        out_boxes = torch.where(changed[:, None], new_boxes[keep], boxes[keep])
        return new[keep], out_boxes, keep


# ---------------------------------------------------------------------------------------------
# Helpers


def _crop_pixels(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1, :]


def _describe(obj: object) -> str:
    if isinstance(obj, np.ndarray):
        return f"array of shape {obj.shape}"
    return type(obj).__name__
