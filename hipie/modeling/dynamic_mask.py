"""The thing branch's CondInst-style mask branch as released.

`MaskFeatureHead` (the release's `MaskHeadSmallConv`, no norms) turns the encoder memory of the
three finest levels (strides 8, 16, 32) into an 8-channel map at stride 8: a top-down pass of
3x3 convs (`lay3` at stride 32, `lay4` at 16, `jia_dcn` at 8, each adding the finer level after a
nearest upsampling), then `lay1` (256 -> 64) and `lay2` (64 -> 8), all followed by ReLU.

Each query's `controller` output (169 numbers) is a tiny per-instance network of 1x1 convs:
(8 features + 2 relative coordinates) -> 8 -> 8 -> 1 with ReLUs. The relative coordinates are
the query's reference point minus each feature pixel's centre, in *input-image pixels* (not
normalized; the release keeps `relative_coords / scale` commented out). Logits at stride 8 are
upsampled x2 with `aligned_bilinear` to stride 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_CHANNELS = 8  # channels of the mask features and of the dynamic convs
NUM_DYNAMIC_LAYERS = 3


def dynamic_layout(channels: int = MASK_CHANNELS, num_layers: int = NUM_DYNAMIC_LAYERS):
    """(weight sizes, bias sizes) of the dynamic convs; the controller emits weights then biases."""
    weights, biases = [], []
    for i in range(num_layers):
        c_in = channels + 2 if i == 0 else channels
        c_out = 1 if i == num_layers - 1 else channels
        weights.append(c_in * c_out)
        biases.append(c_out)
    return weights, biases


def num_dynamic_params(channels: int = MASK_CHANNELS, num_layers: int = NUM_DYNAMIC_LAYERS) -> int:
    weights, biases = dynamic_layout(channels, num_layers)
    return sum(weights) + sum(biases)


class MaskFeatureHead(nn.Module):
    """Top-down conv head over encoder levels (strides 8, 16, 32) -> (B, 8, H/8, W/8)."""

    def __init__(self, dim: int = 256, out_channels: int = MASK_CHANNELS):
        super().__init__()
        self.lay1 = nn.Conv2d(dim, dim // 4, 3, padding=1)
        self.lay2 = nn.Conv2d(dim // 4, out_channels, 3, padding=1)
        self.lay3 = nn.Conv2d(dim, dim, 3, padding=1)
        self.lay4 = nn.Conv2d(dim, dim, 3, padding=1)
        self.jia_dcn = nn.Conv2d(dim, dim, 3, padding=1)  # a plain conv despite its name

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: [stride 8, stride 16, stride 32] maps, each (B, dim, h, w)."""
        x = F.relu(self.lay3(feats[2]))
        x = feats[1] + F.interpolate(x, size=feats[1].shape[-2:], mode="nearest")
        x = F.relu(self.lay4(x))
        x = feats[0] + F.interpolate(x, size=feats[0].shape[-2:], mode="nearest")
        x = F.relu(self.jia_dcn(x))
        x = F.relu(self.lay1(x))
        return F.relu(self.lay2(x))


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """CondInst's upsampling of (N, C, H, W) by an integer factor, aligned to pixel corners."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    oh, ow = factor * h + 1, factor * w + 1
    x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : oh - 1, : ow - 1]


def pixel_centres(h: int, w: int, stride: int, device: torch.device) -> torch.Tensor:
    """(h * w, 2) (x, y) image-pixel centres of a stride-`stride` map, row-major."""
    xs = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=device)
    ys = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=1) + stride // 2


def dynamic_mask_logits(
    mask_feats: torch.Tensor,
    params: torch.Tensor,
    centres: torch.Tensor,
    *,
    feat_stride: int = 8,
    out_stride: int = 4,
    channels: int = MASK_CHANNELS,
) -> torch.Tensor:
    """Run each instance's dynamic network on one image's mask features.

    Args:
        mask_feats: (C, H, W) features at `feat_stride`.
        params: (K, P) controller outputs of K instances.
        centres: (K, 2) instance reference points (x, y) in input-image pixels.
    Returns:
        (K, H * f, W * f) mask logits at `out_stride`, f = feat_stride // out_stride.
    """
    c, h, w = mask_feats.shape
    k = params.shape[0]
    weight_sizes, bias_sizes = dynamic_layout(channels)
    splits = list(torch.split(params, weight_sizes + bias_sizes, dim=1))
    n = len(weight_sizes)
    weights, biases = splits[:n], splits[n:]

    locs = pixel_centres(h, w, feat_stride, mask_feats.device)  # HW x 2
    rel = (centres[:, None, :] - locs[None]).transpose(1, 2)  # K x 2 x HW
    feats = mask_feats.reshape(1, c, h * w).expand(k, -1, -1)
    x = torch.cat([rel.to(mask_feats.dtype), feats], dim=1)  # K x (2 + C) x HW
    for i, (wt, bs) in enumerate(zip(weights, biases)):
        c_out = bs.shape[1]
        x = torch.bmm(wt.reshape(k, c_out, -1), x) + bs[:, :, None]
        if i < n - 1:
            x = F.relu(x)
    logits = x.reshape(k, 1, h, w)
    return aligned_bilinear(logits, feat_stride // out_stride)[:, 0]
