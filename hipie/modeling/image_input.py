"""Image preprocessing as the release's `HIPIEPredictor` + `HIPIE_IMG` do it (pure functions).

1. `resize_shortest_edge`: detectron2's `ResizeShortestEdge([S, S], max_size)` on the uint8 RGB
   image = PIL bilinear resize to `resized_hw(h, w, S, max_size)` (its exact rounding).
2. `normalize`: (x - PIXEL_MEAN) / PIXEL_STD in RGB order, on the float32 cast of the uint8 image.
3. `batch_images`: zero padding (after normalization) bottom/right to the largest image of the
   batch and then to a multiple of `size_divisibility`, with the padding mask (True = padding).

`size_divisibility` is the backbone's: 32 for the release's ViT, 0 for its detectron2 ResNet (the
release's thing branch asks the backbone, and a detectron2 ResNet reports 0, so R50 images are not
padded there; `ResNet.size_divisibility` / `ViT.size_divisibility` carry the values).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MIN_SIZE_TEST = 1024
MAX_SIZE_TEST = 2048


def resized_hw(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) of detectron2's ResizeShortestEdge.get_output_shape (round half up)."""
    size = short_edge * 1.0
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_shortest_edge(
    image: np.ndarray | torch.Tensor, short_edge: int = MIN_SIZE_TEST, max_size: int = MAX_SIZE_TEST
) -> torch.Tensor:
    """uint8 RGB image (H x W x 3 array, or 3 x H x W tensor) -> 3 x h x w uint8 tensor."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError("a tensor image must be 3 x H x W")
        image = image.permute(1, 2, 0).cpu().numpy()
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("expected an H x W x 3 uint8 RGB image")
    h, w = image.shape[:2]
    nh, nw = resized_hw(h, w, short_edge, max_size)
    out = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()


def normalize(
    image: torch.Tensor,
    mean: Sequence[float] = PIXEL_MEAN,
    std: Sequence[float] = PIXEL_STD,
) -> torch.Tensor:
    """3 x h x w (uint8 or float) -> float32 (x - mean) / std per channel."""
    x = image.to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def batch_images(
    images: Sequence[torch.Tensor], size_divisibility: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Normalized 3 x h_i x w_i images -> (B x 3 x H x W zero-padded, B x H x W bool padding mask,
    [(h_i, w_i)]). H, W = the largest h, w, rounded up to `size_divisibility` when it is > 1."""
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        d = size_divisibility
        h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
    first = images[0]
    out = torch.zeros((len(images), first.shape[0], h, w), dtype=first.dtype, device=first.device)
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for i, (x, (ih, iw)) in enumerate(zip(images, sizes)):
        out[i, :, :ih, :iw] = x
        mask[i, :ih, :iw] = False
    return out, mask, sizes


def preprocess(
    image: np.ndarray | torch.Tensor,
    short_edge: int = MIN_SIZE_TEST,
    max_size: int = MAX_SIZE_TEST,
    size_divisibility: int = 32,
) -> dict[str, torch.Tensor | tuple[int, int]]:
    """One uint8 RGB image -> {"image_uint8": 3 x h x w, "images": 1 x 3 x H x W normalized and
    padded, "mask": 1 x H x W (True = padding), "image_size": (h, w), "original_size": (H0, W0)}."""
    if isinstance(image, torch.Tensor):
        original = (int(image.shape[-2]), int(image.shape[-1]))
    else:
        original = (int(image.shape[0]), int(image.shape[1]))
    resized = resize_shortest_edge(image, short_edge, max_size)
    images, mask, sizes = batch_images([normalize(resized)], size_divisibility)
    return {
        "image_uint8": resized,
        "images": images,
        "mask": mask,
        "image_size": sizes[0],
        "original_size": original,
    }
