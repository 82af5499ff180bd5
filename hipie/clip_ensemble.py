"""Open-vocabulary CLIP ensemble (Sec. 3.6, Eq. 4), following ODISE.

For a mask with HIPIE class probabilities ``p_model`` and mask-pooled CLIP probabilities
``p_clip`` over the test classes:

    p_final  ∝  p_model^λ · p_clip^(1-λ)                                                 (Eq. 4)

with λ per class: 0.2 for classes seen in training, 0.45 for novel ones (App. A.3.2).
Convention here: λ = 1 means the model alone (CLIP off). The paper writes "λ = 0.0 ... do not use
CLIP" for closed-set evaluation, which contradicts its own Eq. 4; we follow Eq. 4.

`ClipMaskClassifier` computes ``p_clip``: the image is resized to CLIP's input size, the visual
tower gives dense per-patch features projected into the joint embedding space, these are averaged
inside each mask (masks area-downsampled to the patch grid), L2-normalized and compared with the
text features of the labels (prompted "a photo of a {label}.", cached per label list), times
CLIP's logit scale, softmax over the labels.

Dense features, per tower type (documented deviations: the paper says only "MaskPooling"):
- ViT: the patch tokens of the last block after the final layer norm (``ln_post``) and the output
  projection (``proj``), i.e. what the class token gets, applied to every patch token (as in
  MaskCLIP's baseline; CLIP's last-layer patch tokens localize less well than its class token).
- ModifiedResNet (RN50 etc.): the last stage's feature map through the attention pool's value and
  output projections at every location (MaskCLIP's trick), skipping its query/key attention.
Other towers (timm, attention-pooled ViTs) raise NotImplementedError.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ClipMaskClassifier", "class_lambdas", "ensemble"]


def ensemble(
    p_model: torch.Tensor, p_clip: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """Geometric ensemble of model and CLIP probabilities (Eq. 4), renormalized per row.

    Args:
        p_model: ``(N, C)`` class probabilities from HIPIE.
        p_clip: ``(N, C)`` class probabilities from CLIP.
        lam: the model's weight λ, a float or a ``(C,)`` tensor (per class; see `class_lambdas`).
            λ = 1: model only; λ = 0: CLIP only. ``0^0`` counts as 1, so a zero probability from
            a source with weight 0 does not veto a class.

    Returns:
        ``(N, C)`` float32 probabilities; rows sum to 1, or are all zero when every class has
        zero probability under a source with positive weight.
    """
    p_model = p_model.to(torch.float32)
    p_clip = p_clip.to(p_model)
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=p_model.device)
    log_p = torch.xlogy(lam_t, p_model) + torch.xlogy(1.0 - lam_t, p_clip)  # (N, C)
    row_max = log_p.max(dim=1, keepdim=True).values if log_p.shape[1] else log_p[:, :1]
    finite = torch.isfinite(row_max)  # (N, 1)
    weights = torch.exp(log_p - torch.where(finite, row_max, 0.0))
    out = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.where(finite, out, 0.0)


def class_lambdas(
    labels: Sequence[str],
    seen: Sequence[str] | set[str],
    lam_seen: float = 0.2,
    lam_novel: float = 0.45,
) -> torch.Tensor:
    """Per-class λ for Eq. 4 (App. A.3.2: 0.2 for classes seen in training, 0.45 for novel).

    Args:
        labels: the C test class names.
        seen: class names seen in training.

    Returns:
        ``(C,)`` float32.
    """
    seen_set = set(seen)
    return torch.tensor(
        [lam_seen if label in seen_set else lam_novel for label in labels], dtype=torch.float32
    )


class ClipMaskClassifier:
    """Mask-pooled CLIP class probabilities (the ``p_clip`` of Eq. 4).

    Args (keyword-only):
        model_name: open_clip architecture ("ViT-B-16", "RN50", ...) or a schema name
            ("local-dir:/path", "hf-hub:org/repo").
        pretrained: open_clip weights tag or a local checkpoint file; None = random weights
            (tests; nothing is downloaded).
        device: torch device to run on.
        template: prompt for each label, with ``{}`` for the label.
        cache_size: how many label lists keep their text features cached.
    """

    def __init__(
        self,
        *,
        model_name: str,
        pretrained: str | None,
        device: str | torch.device = "cpu",
        template: str = "a photo of a {}.",
        cache_size: int = 16,
    ) -> None:
        import open_clip  # heavy import, only when a classifier is built

        self.device = torch.device(device)
        self.model = open_clip.create_model(model_name, pretrained=pretrained, device=self.device)
        self.model.eval().requires_grad_(False)  # inference only
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.template = template
        self.cache_size = cache_size
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.input_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_features(self, labels: Sequence[str]) -> torch.Tensor:
        """``(C, D)`` L2-normalized text features of the prompted labels, cached per label list.

        A cache hit returns the very same tensor object.
        """
        key = tuple(labels)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        tokens = self.tokenizer([self.template.format(label) for label in key]).to(self.device)
        features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (C, D)
        self._text_cache[key] = features
        while len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        return features

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB ``(H, W, 3)`` uint8 -> ``(1, 3, h, w)`` normalized CLIP input at ``input_size``.

        The image is resized (not cropped) so that every mask pixel maps into the input; the
        aspect ratio is not kept.
        """
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        x = x.permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=True)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """``(gh, gw, D)`` per-patch features in CLIP's joint space (not normalized)."""
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        visual = self.model.visual
        x = self.preprocess(image)  # (1, 3, h, w)
        if isinstance(visual, VisionTransformer) and visual.attn_pool is None:
            out = visual.forward_intermediates(
                x, indices=1, normalize_intermediates=True, intermediates_only=True
            )
            fmap = out["image_intermediates"][-1][0].permute(1, 2, 0)  # (gh, gw, width)
            if visual.proj is not None:
                fmap = fmap @ visual.proj  # (gh, gw, D)
            return fmap.float()
        if isinstance(visual, ModifiedResNet):
            out = visual.forward_intermediates(x, indices=1, intermediates_only=True)
            fmap = out["image_intermediates"][-1][0].permute(1, 2, 0)  # (gh, gw, C_res)
            pool = visual.attnpool
            return pool.c_proj(pool.v_proj(fmap)).float()  # (gh, gw, D)
        raise NotImplementedError(f"dense CLIP features for {type(visual).__name__}")

    @torch.no_grad()
    def probs(self, image: np.ndarray, masks: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        """Mask-pooled CLIP class probabilities.

        Args:
            image: RGB ``(H, W, 3)`` uint8.
            masks: ``(N, H, W)`` bool masks on the image.
            labels: the C class names.

        Returns:
            ``(N, C)`` float32 on ``device``; rows sum to 1 (uniform for empty masks).
        """
        if masks.dim() != 3 or tuple(masks.shape[1:]) != tuple(image.shape[:2]):
            raise ValueError(f"masks {tuple(masks.shape)} do not match image {image.shape}")
        num_masks, num_labels = masks.shape[0], len(labels)
        if num_masks == 0 or num_labels == 0:
            return torch.zeros(num_masks, num_labels, dtype=torch.float32, device=self.device)
        fmap = self.dense_features(image)  # (gh, gw, D)
        grid_h, grid_w, dim = fmap.shape
        weights = _mask_weights(masks.to(self.device), (grid_h, grid_w))  # (N, gh * gw)
        area = weights.sum(dim=1, keepdim=True)  # (N, 1)
        pooled = (weights @ fmap.reshape(grid_h * grid_w, dim)) / area.clamp_min(1e-12)  # (N, D)
        pooled = F.normalize(pooled, dim=-1)
        text = self.text_features(labels)  # (C, D)
        logits = self.model.logit_scale.exp().float() * pooled @ text.T  # (N, C)
        probs = logits.softmax(dim=-1)
        uniform = torch.full_like(probs, 1.0 / num_labels)
        return torch.where(area > 0, probs, uniform)


def _mask_weights(masks: torch.Tensor, grid: tuple[int, int], *, chunk: int = 8) -> torch.Tensor:
    """Fraction of each patch-grid cell covered by each mask.

    Args:
        masks: ``(N, H, W)`` bool.
        grid: ``(gh, gw)``.

    Returns:
        ``(N, gh * gw)`` float32 in [0, 1].
    """
    num = masks.shape[0]
    out = torch.empty(num, grid[0] * grid[1], dtype=torch.float32, device=masks.device)
    for start in range(0, num, chunk):  # chunks bound the full-resolution float temporaries
        part = masks[start : start + chunk, None].float()  # (n, 1, H, W)
        out[start : start + chunk] = F.adaptive_avg_pool2d(part, grid).flatten(1)
    return out
