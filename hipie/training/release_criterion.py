"""Training losses of the released HIPIE architecture (Eq. 3, App. A.3.2, as the release codes them).

Where the release's training differs from the paper, this follows the release:

Thing branch (`DDETRSegmUniDN.coco_forward` + `DINOCriterion`, weights from
`configs/training/r50_parts.yaml` over `hipie/config.py`):
- "fg" group (FINAL_FG_WEIGHT 1): on every decoder layer, the two-stage queries (background rows
  dropped) are matched with the *thing* targets by simOTA (`release_simota`, re-run per layer);
  token focal loss against the targets' positive maps over the prompt's real tokens, x2
  (CLASS_WEIGHT); box L1 x5 (L1_WEIGHT) and 1 - GIoU x2 (GIOU_WEIGHT, the paper says 5 x 0.2);
  the IoU branch: BCE of the IoU logit against the (detached) IoU of the matched box with its
  target, mean over pairs, x1 (`loss_boxiou` is not in the release's weight dict); masks of the
  matched queries from the CondInst head of that layer, *focal* loss (not BCE) averaged over
  pixels x5 (MASK_WEIGHT) and dice x5 (DICE_WEIGHT). Sums are divided by the number of matched
  queries (`MODEL.OTA`: `num_boxes = len(matches)`).
- "gt" group (FINAL_GT_WEIGHT 1, 0 for a batch with no thing): the two-stage encoder proposals,
  every encoder token, are matched one-to-one with *all* targets (things and stuff, binary class:
  `STILL_CLS_FOR_ENCODER`) by class 2 + L1 5 + GIoU 2 (`SET_COST_*`); focal x2, and on the pairs
  whose target is a thing, L1 x5 and GIoU x2 (`PANOPTIC_BOX_LOSS`); no mask loss.
- The "bg" group (background queries matched with stuff) has FINAL_BG_WEIGHT 0: dropped.
- Not here (first version): the DINO denoising queries (the release decodes noised copies of all
  targets in the "gt" group, with class, box and mask losses). Inference never uses them and
  `ThingTransformer` has no denoising path yet.

Stuff branch (MaskDINO `SetCriterion` as `mask_dino_criterion`, weights from
`configs/mask_dino/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml`, x MASKDINO.LOSS_WEIGHT 1), on
detection batches only (the release adds no MaskDINO loss on grounding batches):
- every prediction (the initial one, each decoder layer, the two-stage "interm" proposals) is
  matched one-to-one with *all* targets (things and stuff) by class 4 + mask BCE 5 + dice 5 +
  L1 5 + GIoU 2; token focal x4, mask BCE x5, dice x5, L1 x5, GIoU x2, each divided by the number
  of targets. The release computes the box loss on stuff targets too (`PANO_BOX_LOSS` off), which
  the paper says it disables; `StuffLossWeights.box_on_stuff` keeps the release's choice.
- Not here: the MaskDINO denoising queries (`DN: seg`), as above.

Masks (deviation): the release compares masks at 12544 points (uncertain points with randomness
for the losses, uniform random points for matching); we use every pixel of the 1/4 grid, targets
sampled at its pixel centres as the release's `get_target_masks` does (offset 2, stride 4).
Normalizers are not all-reduced over processes (the release averages them over GPUs).

Loss names are the release's: `loss_ce`, `loss_bbox`, `loss_giou`, `loss_boxiou`, `loss_mask`,
`loss_dice`; suffix `_{i}` for earlier decoder layer i, `_enc` for the thing proposals,
`_interm` for the stuff proposals, then `_maskdino` for the stuff branch. Values are weighted.

Use (one detection batch):

    out = branch(srcs, pad_masks, tokens, token_mask)
    losses = ReleaseCriterion()(
        targets=targets, branch=branch, things=out, token_mask=token_mask,
        stuff_layers=[SetPrediction(logits, boxes, masks) for each stuff prediction],
        stuff_proposals=SetPrediction(...),  # the stuff branch's two-stage proposals
    )
    losses["total"].backward()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hipie.box_ops import box_cxcywh_to_xyxy, box_iou
from hipie.modeling.thing_branch import ThingBranch, ThingOutputs
from hipie.training.losses import (
    box_l1_loss,
    dice_loss,
    giou_loss,
    mask_bce_loss,
    sigmoid_focal_loss,
)
from hipie.training.release_matching import HungarianCosts, release_hungarian, release_simota
from hipie.training.release_targets import ReleaseTargets, label_positive_map, masks_on_grid

__all__ = [
    "ReleaseCriterion",
    "ReleaseTargets",
    "SetPrediction",
    "StuffLossWeights",
    "ThingLossWeights",
    "label_positive_map",
    "masks_on_grid",
]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ThingLossWeights:
    cls: float = 2.0  # MODEL.DDETRS.CLASS_WEIGHT
    box_l1: float = 5.0  # MODEL.DDETRS.L1_WEIGHT
    giou: float = 2.0  # MODEL.DDETRS.GIOU_WEIGHT
    box_iou: float = 1.0  # loss_boxiou, outside the weight dict
    mask: float = 5.0  # MODEL.DDETRS.MASK_WEIGHT (r50_parts.yaml; 2.0 in config.py)
    dice: float = 5.0  # MODEL.DDETRS.DICE_WEIGHT
    fg: float = 1.0  # MODEL.DDETRS.FINAL_FG_WEIGHT: matched two-stage queries
    proposals: float = 1.0  # MODEL.DDETRS.FINAL_GT_WEIGHT (r50_parts.yaml; 0.5 in config.py)
    proposal_costs: HungarianCosts = HungarianCosts(cls=2.0, box_l1=5.0, giou=2.0)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass(frozen=True)
class StuffLossWeights:
    cls: float = 4.0  # MaskDINO.CLASS_WEIGHT
    mask: float = 5.0  # MaskDINO.MASK_WEIGHT (BCE)
    dice: float = 5.0  # MaskDINO.DICE_WEIGHT
    box_l1: float = 5.0  # MaskDINO.BOX_WEIGHT
    giou: float = 2.0  # MaskDINO.GIOU_WEIGHT
    branch: float = 1.0  # MODEL.MASKDINO.LOSS_WEIGHT
    box_on_stuff: bool = True  # PANO_BOX_LOSS off: stuff targets take the box loss too
    costs: HungarianCosts = HungarianCosts(cls=4.0, box_l1=5.0, giou=2.0, mask_bce=5.0, dice=5.0)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class SetPrediction:
    """One prediction set of the stuff branch (a decoder layer or the two-stage proposals)."""

    token_logits: torch.Tensor  # (B, Q, T)
    boxes: torch.Tensor  # (B, Q, 4) cxcywh
    masks: torch.Tensor  # (B, Q, h, w) logits on the 1/4 grid of the padded input


def _token_focal(
    logits: torch.Tensor,
    pairs: Sequence[Pair],
    positive: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """Sum of the token focal loss over (B, Q, T): matched queries take their positive map."""
    target = torch.zeros_like(logits, dtype=torch.float32)
    for b, (pred, tgt) in enumerate(pairs):
        if pred.numel():
            target[b, pred.to(logits.device)] = positive[b][tgt].to(target)
    loss = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma)
    if token_mask is not None:
        loss = loss * (token_mask[:, None, :] > 0).to(loss)
    return loss.sum()


def _gather(pairs: Sequence[Pair], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate values[b][target_idx] over the batch."""
    return torch.cat([values[b][tgt.to(values[b].device)] for b, (_, tgt) in enumerate(pairs)])


def _gather_pred(pairs: Sequence[Pair], pred: torch.Tensor) -> torch.Tensor:
    """Concatenate pred[b, pred_idx] over the batch; pred is (B, Q, ...)."""
    return torch.cat([pred[b, p.to(pred.device)] for b, (p, _) in enumerate(pairs)])


class ReleaseCriterion(nn.Module):
    """The release's training losses on `ThingBranch` and stuff-branch outputs.

    `criterion(branch=..., things=..., targets=..., stuff_layers=..., token_mask=...)` returns a
    dict of weighted named losses plus "total" (see the module docstring for the names).
    """

    def __init__(
        self,
        thing: ThingLossWeights | None = None,
        stuff: StuffLossWeights | None = None,
        mask_stride: int = 4,
    ) -> None:
        super().__init__()
        self.thing = thing or ThingLossWeights()
        self.stuff = stuff or StuffLossWeights()
        self.mask_stride = mask_stride

    # ------------------------------------------------------------------ thing branch
    def thing_layer(
        self,
        branch: ThingBranch,
        outputs: ThingOutputs,
        things: Sequence[ReleaseTargets],
        grids: Sequence[torch.Tensor],
        layer: int,
        class_tokens: torch.Tensor,
        token_mask: torch.Tensor | None,
    ) -> tuple[dict[str, torch.Tensor], list[Pair]]:
        """Losses of one decoder layer (not x the group weight) and its simOTA pairs."""
        nb = outputs.num_background
        logits, boxes, iou_logits = branch.layer_heads(
            outputs.hidden, outputs.init_reference, outputs.inter_references, class_tokens, layer
        )
        logits, boxes, iou_logits = logits[:, nb:], boxes[:, nb:], iou_logits[:, nb:]
        pairs = [
            release_simota(logits[b], boxes[b], t.positive_map.to(logits.device), t.boxes)
            for b, t in enumerate(things)
        ]
        masks = [
            branch.mask_logits(outputs, pred.to(boxes.device) + nb, t.image_size, b, layer=layer)
            if pred.numel()
            else boxes.new_zeros((0, *grids[b].shape[-2:]))
            for b, ((pred, _), t) in enumerate(zip(pairs, things))
        ]
        losses = self.matched_query_losses(
            logits, boxes, iou_logits, masks, pairs, things, grids, token_mask
        )
        return losses, pairs

    def matched_query_losses(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        iou_logits: torch.Tensor,
        masks: Sequence[torch.Tensor],
        pairs: Sequence[Pair],
        things: Sequence[ReleaseTargets],
        grids: Sequence[torch.Tensor],
        token_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The release's `loss_labelsVL`, `loss_boxes` (with `loss_boxiou`) and `loss_masks` of
        one layer, weighted (not x the group weight).

        logits (B, Q, T), boxes (B, Q, 4), iou_logits (B, Q) of the two-stage queries; masks[b]
        (K_b, h, w) logits of image b's matched queries in `pairs[b]` order; grids[b] the target
        masks of `things[b]` on the same grid.
        """
        w = self.thing
        num = sum(int(p.numel()) for p, _ in pairs)
        if num == 0:
            zero = logits.sum() * 0.0 + boxes.sum() * 0.0 + iou_logits.sum() * 0.0
            names = ("loss_ce", "loss_bbox", "loss_giou", "loss_boxiou", "loss_mask", "loss_dice")
            return {k: zero for k in names}
        positive = [t.positive_map.float() for t in things]
        ce = _token_focal(logits, pairs, positive, token_mask, w.focal_alpha, w.focal_gamma)
        pred_boxes = _gather_pred(pairs, boxes)
        tgt_boxes = _gather(pairs, [t.boxes.to(boxes) for t in things])
        with torch.no_grad():
            iou = torch.diag(box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        iou_loss = F.binary_cross_entropy_with_logits(_gather_pred(pairs, iou_logits), iou)
        pred_masks = torch.cat([m.flatten(1) for m in masks])
        tgt_masks = _gather(pairs, list(grids)).to(pred_masks).flatten(1)
        focal = sigmoid_focal_loss(pred_masks, tgt_masks, alpha=w.focal_alpha, gamma=w.focal_gamma)
        return {
            "loss_ce": w.cls * ce / num,
            "loss_bbox": w.box_l1 * box_l1_loss(pred_boxes, tgt_boxes).sum() / num,
            "loss_giou": w.giou * giou_loss(pred_boxes, tgt_boxes).sum() / num,
            "loss_boxiou": w.box_iou * iou_loss,
            "loss_mask": w.mask * focal.mean(1).sum() / num,
            "loss_dice": w.dice * dice_loss(pred_masks, tgt_masks).sum() / num,
        }

    def proposal_losses(
        self, enc_class: torch.Tensor, enc_boxes: torch.Tensor, targets: Sequence[ReleaseTargets]
    ) -> dict[str, torch.Tensor]:
        """Two-stage proposals (B, S) scores, (B, S, 4) boxes vs all targets (binary class),
        weighted (not x the group weight)."""
        w = self.thing
        logits = enc_class[..., None]  # B x S x 1
        boxes = enc_boxes
        ones = [torch.ones(len(t), 1, device=logits.device) for t in targets]
        pairs = [
            release_hungarian(
                w.proposal_costs, logits[b], ones[b], boxes=boxes[b], target_boxes=t.boxes
            )
            for b, t in enumerate(targets)
        ]
        num = max(sum(int(p.numel()) for p, _ in pairs), 1)
        ce = _token_focal(logits, pairs, ones, None, w.focal_alpha, w.focal_gamma)
        zero = boxes.sum() * 0.0
        losses = {"loss_ce_enc": w.cls * ce / num, "loss_bbox_enc": zero, "loss_giou_enc": zero}
        if any(p.numel() for p, _ in pairs):
            thing = _gather(pairs, [t.is_thing.to(boxes.device) for t in targets])
            if thing.any():
                pred = _gather_pred(pairs, boxes)[thing]
                tgt = _gather(pairs, [t.boxes.to(boxes) for t in targets])[thing]
                n = int(thing.sum())
                losses["loss_bbox_enc"] = w.box_l1 * box_l1_loss(pred, tgt).sum() / n
                losses["loss_giou_enc"] = w.giou * giou_loss(pred, tgt).sum() / n
        return losses

    def thing_losses(
        self,
        branch: ThingBranch,
        outputs: ThingOutputs,
        targets: Sequence[ReleaseTargets],
        *,
        token_mask: torch.Tensor | None = None,
        class_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of the thing branch, weighted (groups included).

        Args:
            branch: the `ThingBranch` that made `outputs` (its heads are applied per layer).
            outputs: `branch(...)`'s result for the batch.
            targets: one `ReleaseTargets` per image (things and stuff; stuff only enters the
                proposal losses).
            token_mask: (B, T), nonzero at the prompt's real tokens (focal loss over them only);
                None for grounding.
            class_tokens: what the queries were scored against (default the fused text tokens;
                grounding: `grounding_token(...)`).
        """
        tokens = outputs.lang if class_tokens is None else class_tokens
        things = [t.subset(t.is_thing.bool()) for t in targets]
        hf, wf = outputs.mask_features.shape[-2:]
        up = branch.mask_feat_stride // branch.mask_out_stride
        grid = (hf * up, wf * up)
        grids = [masks_on_grid(t.masks, grid, self.mask_stride) for t in things]
        num_layers = outputs.hidden.shape[0]
        losses: dict[str, torch.Tensor] = {}
        for layer in range(num_layers):
            layer_losses, _ = self.thing_layer(
                branch, outputs, things, grids, layer, tokens, token_mask
            )
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            losses.update({k + suffix: self.thing.fg * v for k, v in layer_losses.items()})
        has_thing = any(len(t) for t in things)
        group = self.thing.proposals if has_thing else 0.0
        proposals = self.proposal_losses(outputs.enc_class, outputs.enc_boxes, targets)
        losses.update({k: group * v for k, v in proposals.items()})
        return losses

    # ------------------------------------------------------------------ stuff branch
    def stuff_set(
        self,
        pred: SetPrediction,
        targets: Sequence[ReleaseTargets],
        grids: Sequence[torch.Tensor],
        token_mask: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one stuff-branch prediction set against all targets (not x branch weight)."""
        w = self.stuff
        logits, boxes, masks = pred.token_logits, pred.boxes, pred.masks
        positive = [t.positive_map.float().to(logits.device) for t in targets]
        pairs = [
            release_hungarian(
                w.costs,
                logits[b],
                positive[b],
                boxes=boxes[b],
                target_boxes=t.boxes.to(boxes),
                masks=masks[b],
                target_masks=grids[b].to(masks),
            )
            for b, t in enumerate(targets)
        ]
        num = max(sum(len(t) for t in targets), 1)  # MaskDINO: number of targets, not pairs
        ce = _token_focal(logits, pairs, positive, token_mask, w.focal_alpha, w.focal_gamma)
        zero = boxes.sum() * 0.0 + masks.sum() * 0.0
        losses = {"loss_ce": w.cls * ce / num}
        if not any(p.numel() for p, _ in pairs):
            losses.update(loss_mask=zero, loss_dice=zero, loss_bbox=zero, loss_giou=zero)
            return losses
        pm = _gather_pred(pairs, masks).flatten(1)
        tm = _gather(pairs, list(grids)).to(pm).flatten(1)
        losses["loss_mask"] = w.mask * mask_bce_loss(pm, tm).sum() / num
        losses["loss_dice"] = w.dice * dice_loss(pm, tm).sum() / num
        pb = _gather_pred(pairs, boxes)
        tb = _gather(pairs, [t.boxes.to(boxes) for t in targets])
        if not w.box_on_stuff:
            keep = _gather(pairs, [t.is_thing.bool().to(boxes.device) for t in targets])
            pb, tb = pb[keep], tb[keep]
        losses["loss_bbox"] = w.box_l1 * box_l1_loss(pb, tb).sum() / num + zero
        losses["loss_giou"] = w.giou * giou_loss(pb, tb).sum() / num + zero
        return losses

    def stuff_losses(
        self,
        layers: Sequence[SetPrediction],
        targets: Sequence[ReleaseTargets],
        *,
        token_mask: torch.Tensor | None = None,
        proposals: SetPrediction | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of the stuff branch, weighted, named `..._maskdino`.

        Args:
            layers: the predictions in decoder order (the initial one, then each layer); the last
                one is the branch's output.
            targets: all targets per image (things and stuff).
            proposals: the two-stage proposals with their masks (`interm_outputs`), or None.
        """
        grid = tuple(layers[-1].masks.shape[-2:])
        grids = [masks_on_grid(t.masks, grid, self.mask_stride) for t in targets]
        named = [("" if i == len(layers) - 1 else f"_{i}", p) for i, p in enumerate(layers)]
        if proposals is not None:
            named.append(("_interm", proposals))
        losses: dict[str, torch.Tensor] = {}
        for suffix, pred in named:
            for k, v in self.stuff_set(pred, targets, grids, token_mask).items():
                losses[f"{k}{suffix}_maskdino"] = self.stuff.branch * v
        return losses

    # ------------------------------------------------------------------ both
    def forward(
        self,
        *,
        targets: Sequence[ReleaseTargets],
        branch: ThingBranch | None = None,
        things: ThingOutputs | None = None,
        stuff_layers: Sequence[SetPrediction] | None = None,
        stuff_proposals: SetPrediction | None = None,
        token_mask: torch.Tensor | None = None,
        class_tokens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All losses of one batch and prompt, plus "total" (their sum).

        Grounding batches pass no stuff predictions (the release trains only the thing branch on
        them) and `class_tokens = grounding_token(...)`, `token_mask=None`.
        """
        losses: dict[str, torch.Tensor] = {}
        if things is not None:
            if branch is None:
                raise ValueError("thing losses need the ThingBranch that made the outputs")
            losses.update(
                self.thing_losses(
                    branch, things, targets, token_mask=token_mask, class_tokens=class_tokens
                )
            )
        if stuff_layers:
            losses.update(
                self.stuff_losses(
                    stuff_layers, targets, token_mask=token_mask, proposals=stuff_proposals
                )
            )
        if not losses:
            raise ValueError("no outputs to compute a loss on")
        losses["total"] = torch.stack([v.float() for v in losses.values()]).sum()
        return losses
