"""The release's ResNet backbone, as detectron2's `build_resnet_backbone` makes it.

HIPIE's R50 checkpoints (`r50_parts.pth`) hold a detectron2 ResNet with frozen batch norm in every
conv (`MODEL.RESNETS.NORM` FrozenBN, `STRIDE_IN_1X1` False: the stride sits on the 3x3 conv) that
returns res3, res4 and res5. Parameter and buffer names equal the release's suffixes after
`detr.detr.backbone.0.backbone.` (e.g. `stem.conv1.weight`, `res3.0.conv2.norm.running_var`).

The same module builds smaller variants: basic blocks (ResNet-18/34 layout) and narrower widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage (res2..res5) of the standard depths.
BLOCKS_PER_STAGE = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STAGE_STRIDES = {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers, nothing trains)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision/PyTorch BN checkpoints may carry a counter that frozen BN has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvNorm(nn.Conv2d):
    """A bias-free conv followed by its frozen norm, kept as the child `norm` (detectron2 naming)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.norm = FrozenBatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7 stride-2 conv + frozen BN + ReLU, then 3x3 stride-2 max pool (stride 4 in all)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64):
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


def _shortcut(cin: int, cout: int, stride: int) -> ConvNorm | None:
    return ConvNorm(cin, cout, 1, stride=stride) if cin != cout else None


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 with a projected shortcut when the width changes."""

    def __init__(
        self, cin: int, cout: int, bottleneck: int, stride: int, stride_in_1x1: bool = False
    ):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = _shortcut(cin, cout, stride)
        self.conv1 = ConvNorm(cin, bottleneck, 1, stride=s1)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, stride=s3, padding=1)
        self.conv3 = ConvNorm(bottleneck, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class BasicBlock(nn.Module):
    """Two 3x3 convs (the ResNet-18/34 block)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.shortcut = _shortcut(cin, cout, stride)
        self.conv1 = ConvNorm(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = ConvNorm(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


@dataclass(frozen=True)
class ResNetSpec:
    """Shape of a ResNet; the defaults are the release's R50 (`configs/training/r50_parts.yaml`).

    depth: 18/34 use basic blocks, 50/101/152 bottlenecks (detectron2's table).
    stem_channels: stem width (`STEM_OUT_CHANNELS`).
    res2_channels: output width of res2 (`RES2_OUT_CHANNELS`); doubles at each later stage. For
        basic blocks detectron2 requires it to equal the stem width (64).
    bottleneck_channels: inner width of res2's bottlenecks (`NUM_GROUPS * WIDTH_PER_GROUP`),
        doubling per stage like the output width.
    """

    depth: int = 50
    stem_channels: int = 64
    res2_channels: int = 256
    bottleneck_channels: int = 64
    stride_in_1x1: bool = False
    out_features: tuple[str, ...] = ("res3", "res4", "res5")
    in_channels: int = 3

    @classmethod
    def basic(cls, depth: int = 18, width: int = 64, **kw) -> ResNetSpec:
        """A ResNet-18/34-style spec at base width `width` (64 = standard)."""
        return cls(depth=depth, stem_channels=width, res2_channels=width, **kw)


class ResNet(nn.Module):
    """detectron2's ResNet: `stem`, then stages `res2`..`res5` (each an nn.Sequential of blocks).

    Stages after the last requested output are not built (as detectron2 does).
    forward(images: B x 3 x H x W, normalized) -> {name: B x C x ceil(H/s) x ceil(W/s)} for the
    names in `spec.out_features` (strides res3 8, res4 16, res5 32).
    """

    # The release pads a batch only to its largest image: a detectron2 ResNet reports no size
    # divisibility, so `nested_tensor_from_tensor_list(..., size_divisibility=0)` adds no padding
    # in the thing branch (its padding masks are all False for one image).
    size_divisibility = 0

    def __init__(self, spec: ResNetSpec | None = None):
        super().__init__()
        spec = spec or ResNetSpec()
        if spec.depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"unsupported ResNet depth {spec.depth}")
        basic = spec.depth in (18, 34)
        self.spec = spec
        self.stem = BasicStem(spec.in_channels, spec.stem_channels)
        last = max(int(name[3:]) for name in spec.out_features)
        cin, cout, mid = spec.stem_channels, spec.res2_channels, spec.bottleneck_channels
        self.out_channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.stage_names: list[str] = []
        for i, n_blocks in enumerate(BLOCKS_PER_STAGE[spec.depth]):
            name = f"res{i + 2}"
            if i + 2 > last:
                break
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                if basic:
                    blocks.append(BasicBlock(cin, cout, stride))
                else:
                    blocks.append(BottleneckBlock(cin, cout, mid, stride, spec.stride_in_1x1))
                cin = cout
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.out_channels[name] = cout
            self.strides[name] = STAGE_STRIDES[name]
            cout, mid = cout * 2, mid * 2
        self.out_channels = {k: self.out_channels[k] for k in spec.out_features}
        self.strides = {k: self.strides[k] for k in spec.out_features}

    @property
    def out_features(self) -> Sequence[str]:
        return self.spec.out_features

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(images)
        out = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.spec.out_features:
                out[name] = x
        return out
