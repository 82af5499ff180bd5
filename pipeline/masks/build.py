"""SAM models for the automatic mask generator: segment-anything's registry ("vit_h", "vit_l",
"vit_b") with their released weights, plus a small random "tiny" SAM of the real layout for tests
and benchmarks (``build_sam``).
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)


def _build_tiny_sam(checkpoint: str | None = None) -> Sam:
    """A small SAM for tests and benchmarks: the real layout (1024 input, 16 px patches, 64 x 64
    embeddings, 256 x 256 low-res masks, 3 multimask outputs) with a 2-block, 64-d encoder
    (windowed attention only) and a 32-d decoder. Random weights are deterministic (seed 0); the hypernetwork output is scaled so
    that random masks have logits beyond the +-1 stability cut-offs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dim = 32
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=2,
                embed_dim=64,
                img_size=1024,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=2,
                patch_size=16,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=(),
                window_size=14,
                out_chans=dim,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(64, 64),
                input_image_size=(1024, 1024),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=128, num_heads=2),
                transformer_dim=dim,
                iou_head_depth=3,
                iou_head_hidden_dim=32,
            ),
        )
        with torch.no_grad():
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(200.0)
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()


# Model types: segment-anything's registry ("default", "vit_h", "vit_l", "vit_b") plus "tiny".
SAM_BUILDERS = {**sam_model_registry, "tiny": _build_tiny_sam}


def build_sam(model_type: str, checkpoint: str | None, device: str | torch.device = "cpu") -> Sam:
    """Build a SAM model in eval mode on ``device``.

    Args:
        model_type: "vit_h", "vit_l", "vit_b" (segment-anything's registry) or "tiny" (a small
            random SAM for tests and benchmarks).
        checkpoint: path of a segment-anything state dict (``sam_vit_h_4b8939.pth``...), or None
            for random weights.
        device: where the model lives.
    """
    if model_type not in SAM_BUILDERS:
        raise ValueError(
            f"unknown SAM model type {model_type!r}; choose from {sorted(SAM_BUILDERS)}"
        )
    sam = SAM_BUILDERS[model_type](checkpoint=checkpoint)
    return sam.to(device).eval()
