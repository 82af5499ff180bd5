"""Presets, `build_hipie` and checkpoints (a folder: model.safetensors + config.json + tokenizer/).

Checkpoints are read with safetensors only (no unpickling). The text encoder's architecture is
stored in config.json, so loading a checkpoint never needs the original BERT weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hipie.config import (
    MINILM,
    DecoderConfig,
    FusionConfig,
    HipieConfig,
    ImageEncoderConfig,
    PixelDecoderConfig,
    TextEncoderConfig,
)
from hipie.modeling.model import HipieModel

if TYPE_CHECKING:
    from hipie.modeling.hipie_release import HipieRelease

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEXT_BERT_PREFIX = "text_encoder.bert."  # state-dict keys of the BERT-family text encoder
BERT_BASE = "bert-base-uncased"


# ------------------------------------------------------------------------------- presets
def tiny_config() -> HipieConfig:
    """CPU-trainable toy model: small CNN, hidden 64, MiniLM text encoder, test size 320."""
    dec = dict(hidden_dim=64, num_heads=4, ffn_dim=256, num_levels=4, num_points=4)
    return HipieConfig(
        image_encoder=ImageEncoderConfig(kind="tiny", tiny_channels=(32, 64, 96, 128)),
        text_encoder=TextEncoderConfig(name_or_path=MINILM),
        fusion=FusionConfig(num_heads=4),
        pixel_decoder=PixelDecoderConfig(hidden_dim=64, num_heads=4, ffn_dim=256, num_layers=2),
        thing_decoder=DecoderConfig(
            num_queries=60, num_layers=3, dn_groups=3, max_dn_queries=90, **dec
        ),
        stuff_decoder=DecoderConfig(num_queries=30, num_layers=3, learned_content=False, **dec),
        test_size=320,
        name="tiny",
    )


def r50_config() -> HipieConfig:
    """HIPIE-R50 as in the public release: ResNet-50, BERT-base, hidden 256, 900/300 queries."""
    return HipieConfig(
        image_encoder=ImageEncoderConfig(kind="resnet50"),
        text_encoder=TextEncoderConfig(name_or_path=BERT_BASE),
        thing_decoder=DecoderConfig(num_queries=900, num_layers=6, dn_groups=10),
        stuff_decoder=DecoderConfig(num_queries=300, num_layers=9, learned_content=False),
        name="r50",
    )


def vit_h_config() -> HipieConfig:
    """HIPIE-ViT-H: ViT-H/16 (32 blocks, 1280-d, features of blocks 8/16/32), otherwise as R50."""
    return dataclasses.replace(
        r50_config(),
        image_encoder=ImageEncoderConfig(
            kind="vit",
            vit_embed_dim=1280,
            vit_depth=32,
            vit_num_heads=16,
            vit_patch_size=16,
            vit_out_blocks=(8, 16, 32),
        ),
        name="vit_h",
    )


PRESETS: dict[str, Callable[[], HipieConfig]] = {
    "tiny": tiny_config,
    "r50": r50_config,
    "vit_h": vit_h_config,
}


def random_bert_base_text_config() -> TextEncoderConfig:
    """A randomly initialized bert-base-uncased-shaped text encoder (768-d, 12 layers); offline."""
    return TextEncoderConfig(name_or_path=None, pretrained=False, bert_config={})


# ------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while building."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def _build_model(config: HipieConfig, *, load_text_weights: bool) -> HipieModel:
    from hipie.modeling.fusion import BiCrossAttentionFusion
    from hipie.modeling.image_encoder import ResNet50Encoder, TinyConvEncoder, ViTEncoder
    from hipie.modeling.pixel_decoder import PixelDecoder
    from hipie.modeling.stuff_decoder import StuffDecoder
    from hipie.modeling.text_encoder import build_text_encoder
    from hipie.modeling.thing_decoder import ThingDecoder

    ic = config.image_encoder
    if ic.kind == "tiny":
        image_encoder = TinyConvEncoder(channels=ic.tiny_channels)
    elif ic.kind == "resnet50":
        image_encoder = ResNet50Encoder()
    elif ic.kind == "vit":
        image_encoder = ViTEncoder(
            embed_dim=ic.vit_embed_dim,
            depth=ic.vit_depth,
            num_heads=ic.vit_num_heads,
            patch_size=ic.vit_patch_size,
            out_blocks=ic.vit_out_blocks,
            pretrain_size=ic.vit_pretrain_size,
        )
    else:
        raise ValueError(f"unknown image encoder kind {ic.kind!r}")
    pc = config.pixel_decoder
    D = pc.hidden_dim
    pixel_decoder = PixelDecoder(
        in_channels=image_encoder.out_channels,
        dim=D,
        num_heads=pc.num_heads,
        ffn_dim=pc.ffn_dim,
        num_layers=pc.num_layers,
        num_levels=pc.num_levels,
        num_points=pc.num_points,
        dropout=pc.dropout,
    )
    with _quiet_transformers():
        text_encoder = build_text_encoder(
            config.text_encoder, hidden_dim=D, load_weights=load_text_weights
        )
    fc = config.fusion
    fusion = (
        BiCrossAttentionFusion(
            dim=D, num_heads=fc.num_heads, layer_scale_init=fc.layer_scale_init, dropout=fc.dropout
        )
        if fc.enabled
        else None
    )

    def dec_kwargs(dc: DecoderConfig) -> dict:
        if dc.hidden_dim != D:
            raise ValueError("decoders must share the pixel decoder's hidden size")
        return dict(
            dim=D,
            num_heads=dc.num_heads,
            ffn_dim=dc.ffn_dim,
            num_layers=dc.num_layers,
            num_levels=dc.num_levels,
            num_points=dc.num_points,
            num_queries=dc.num_queries,
            dropout=dc.dropout,
        )

    tc = config.thing_decoder
    thing_decoder = ThingDecoder(
        dn_groups=tc.dn_groups,
        dn_label_noise=tc.dn_label_noise,
        dn_box_noise=tc.dn_box_noise,
        max_dn_queries=tc.max_dn_queries,
        **dec_kwargs(tc),
    )
    stuff_decoder = StuffDecoder(**dec_kwargs(config.stuff_decoder))
    return HipieModel(
        config=config,
        image_encoder=image_encoder,
        pixel_decoder=pixel_decoder,
        text_encoder=text_encoder,
        fusion=fusion,
        thing_decoder=thing_decoder,
        stuff_decoder=stuff_decoder,
    )


def _checkpoint_dir(checkpoint: str | Path) -> Path:
    if str(checkpoint) in PRESETS and not Path(checkpoint).is_dir():
        path = WEIGHTS_DIR / str(checkpoint)  # shipped weights, e.g. checkpoint="tiny"
    else:
        path = Path(checkpoint)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no HIPIE checkpoint at {path} (need model.safetensors and config.json)"
            + (
                " -- the shipped weights have not been trained yet"
                if path.parent == WEIGHTS_DIR
                else ""
            )
        )
    return path


def _is_release_spec(checkpoint: str | Path) -> bool:
    """A release checkpoint: a `.pth` / `.pt` file, or a hub `owner/repo/file.pth` (not a folder)."""
    return str(checkpoint).endswith((".pth", ".pt")) and not Path(checkpoint).is_dir()


def build_hipie(
    preset_or_config: str | HipieConfig = "tiny",
    checkpoint: str | None = None,
    *,
    text_encoder: str | None = None,
) -> HipieModel | HipieRelease:
    """Build a HIPIE model in eval mode.

    Args:
        preset_or_config: "tiny", "r50", "vit_h", or a `HipieConfig`.
        checkpoint: a checkpoint folder (from `save_checkpoint`), or a preset name for the shipped
            weights in `hipie/weights/<name>/`. The checkpoint's own config.json is used.
            The released architecture (`HipieRelease`) comes from a release checkpoint (a `.pth`
            file, or a Hugging Face `owner/repo/file.pth`), a folder that `python -m hipie.convert`
            wrote, or "random:r50" /
            "random:vit_h" (random weights, random BERT, offline); "random:<preset>" builds our
            preset with random weights.
        text_encoder: override the text encoder (hub name or local folder with weights).
    """
    if checkpoint is not None and str(checkpoint).startswith("random:"):
        from hipie.release_build import RELEASE_PRESETS, release_model

        name = str(checkpoint).split(":", 1)[1]
        if name in RELEASE_PRESETS:
            return release_model(name)
        return build_hipie(name, text_encoder=text_encoder)
    if checkpoint is not None and _is_release_spec(checkpoint):
        from hipie.release_build import load_release_checkpoint

        return load_release_checkpoint(checkpoint)
    if checkpoint is not None:
        from hipie.release_build import is_release_folder, load_release_folder

        if is_release_folder(checkpoint):  # written by `python -m hipie.convert`
            return load_release_folder(checkpoint)
    if checkpoint is not None:
        path = _checkpoint_dir(checkpoint)
        config = HipieConfig.from_dict(json.loads((path / "config.json").read_text()))
        if (path / "tokenizer").is_dir():
            config = dataclasses.replace(
                config,
                text_encoder=dataclasses.replace(
                    config.text_encoder, tokenizer=str(path / "tokenizer")
                ),
            )
        # A checkpoint without BERT weights (saved with include_text_encoder=False) takes them
        # from the pretrained text encoder its config names.
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
        has_bert = any(k.startswith(TEXT_BERT_PREFIX) for k in state)
        model = _build_model(config, load_text_weights=not has_bert)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if has_bert or not k.startswith(TEXT_BERT_PREFIX)]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not fit its config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return model.eval()
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_config!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[preset_or_config]()
    else:
        config = preset_or_config
    if text_encoder is not None:
        config = dataclasses.replace(
            config,
            text_encoder=dataclasses.replace(
                config.text_encoder, name_or_path=text_encoder, pretrained=True, bert_config=None
            ),
        )
    return _build_model(config, load_text_weights=True).eval()


def save_checkpoint(
    model: HipieModel, path_dir: str | Path, *, include_text_encoder: bool = True
) -> Path:
    """Write `model.safetensors`, `config.json` and `tokenizer/` into `path_dir` (created).

    With ``include_text_encoder=False`` the BERT weights are left out and the config keeps
    pointing at the pretrained text encoder (e.g. the offline MiniLM), which is loaded from there
    again; use it when the text encoder was frozen during training, so that a checkpoint does not
    carry a copy of weights that are installed anyway (the shipped tiny model stays a few MB).
    """
    from safetensors.torch import save_file

    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if include_text_encoder:
        bert_config = {
            k: v
            for k, v in model.text_encoder.bert.config.to_dict().items()
            if not k.startswith("_")
            and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")
        }
        text = dataclasses.replace(
            model.config.text_encoder, pretrained=False, bert_config=bert_config, tokenizer=None
        )
    else:
        if not model.config.text_encoder.pretrained:
            raise ValueError("a randomly initialised text encoder must be saved with the model")
        state = {k: v for k, v in state.items() if not k.startswith(TEXT_BERT_PREFIX)}
        text = model.config.text_encoder
    config = dataclasses.replace(model.config, text_encoder=text)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    model.text_encoder.tokenizer.save_pretrained(str(path / "tokenizer"))
    return path


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per top-level component and in total."""
    counts = {
        name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
