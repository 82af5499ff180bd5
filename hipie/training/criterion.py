"""Training losses of HIPIE (Eq. 3, Sec. 3.5 and 3.7, App. A.3.2), DETR `SetCriterion` style.

For one text pass (a prompt and the ground truth that goes with it), per decoder output layer:

    L = λ_cls L_focal + λ_mask (λ_ce L_bce + λ_dice L_dice) + λ_box (λ_L1 L_L1 + λ_giou L_giou)

with λ_cls 2, λ_mask 5, λ_ce 1, λ_dice 1, λ_box 5, λ_L1 1, λ_giou 0.2.

- Thing decoder: simOTA many-to-one matching (`SimOTAMatcher`) against the pass's thing targets;
  all three losses. Its DINO denoising queries reconstruct their targets (class, box, mask);
  negative denoising queries must predict "no object".
- Stuff decoder: Hungarian one-to-one matching (`HungarianMatcher`) against the stuff targets
  AND the thing targets at once (Sec. 3.5: "we still match its predictions with things and
  compute the class and box losses"): a query matched with stuff gets class + mask losses, one
  matched with a thing gets class + box losses. Stuff masks never get a box loss.
- Parts (Sec. 3.7): a part target is positive for its "object-part" label ("robot head") AND for
  its instance label ("robot"), both present in the prompt. Focal loss is a sum over label
  columns, so the multi-hot focal loss is exactly `L_clsPart + L_clsThing` (reported apart).
- Every earlier decoder layer (`aux`) and the two-stage encoder proposals (`enc`) get the same
  losses with their own matching (Deformable DETR / DINO); the denoising layers too.

Normalization (DETR): classification sums the focal loss over queries and label columns and
divides by the number of matched queries in the batch; box and mask losses are summed over the
matched pairs and divided by the same count (of pairs that take that loss).

Masks: losses are computed on ALL pixels of the prediction's grid (1/4 of the padded input),
against ground-truth masks downsampled to that grid with area averaging (soft targets in [0, 1]);
no point sampling (deviation from Mask2Former/MaskDINO, which sample 12544 points: at the tiny
preset's 64 x 64 grid the full grid is cheaper and exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from hipie.modeling.outputs import DecoderOutput, HipieOutput
from hipie.training.losses import (
    box_l1_loss,
    dice_loss,
    giou_loss,
    mask_bce_loss,
    sigmoid_focal_loss,
)
from hipie.training.matcher import HungarianMatcher, MatchTarget, SimOTAMatcher

__all__ = [
    "CriterionConfig",
    "LossResult",
    "SegmentTargets",
    "SetCriterion",
    "box_l1_loss",
    "dice_loss",
    "giou_loss",
    "mask_bce_loss",
    "sigmoid_focal_loss",
]

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- containers
@dataclass(frozen=True)
class CriterionConfig:
    """Loss weights (App. A.3.2) and which outputs are supervised."""

    cls: float = 2.0  # λ_cls: focal classification
    mask: float = 5.0  # λ_mask: weight of the mask loss
    mask_bce: float = 1.0  # λ_ce: pixel-wise BCE inside the mask loss
    mask_dice: float = 1.0  # λ_dice: dice inside the mask loss
    box: float = 5.0  # λ_box: weight of the box loss
    box_l1: float = 1.0  # λ_L1 inside the box loss
    box_giou: float = 0.2  # λ_giou inside the box loss
    focal_alpha: float = 0.25  # focal loss α
    focal_gamma: float = 2.0  # focal loss γ
    stuff_matches_things: bool = True  # Sec. 3.5: stuff decoder also matched with things
    aux_layers: bool = True  # supervise every earlier decoder layer
    encoder_proposals: bool = True  # supervise the two-stage encoder proposals
    denoising: bool = True  # supervise the thing decoder's DINO denoising queries
    every_target_matched: bool = True  # give simOTA-unmatched targets their best free query


@dataclass(frozen=True)
class SegmentTargets:
    """Ground truth of one image for one text pass.

    labels: (T,) long, the column of each target's label in the pass's prompt ("robot head" for
        a part, "sky" for stuff, 0 for a referring expression).
    masks: (T, H, W) bool at the padded input resolution.
    boxes: (T, 4) normalized cxcywh boxes relative to the padded input.
    instance_labels: (T,) long column of the instance label ("robot") of each part, or None;
        -1 where a target has none. A part is positive for both columns (Sec. 3.7).
    """

    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    instance_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def multi_hot(self, num_labels: int) -> torch.Tensor:
        """(T, K) float targets: 1 at `labels` and at `instance_labels` (when >= 0)."""
        out = torch.zeros(len(self), num_labels, device=self.labels.device)
        out[torch.arange(len(self), device=out.device), self.labels] = 1.0
        if self.instance_labels is not None:
            has = self.instance_labels >= 0
            out[torch.arange(len(self), device=out.device)[has], self.instance_labels[has]] = 1.0
        return out

    def dn_targets(self) -> dict[str, torch.Tensor]:
        """What the thing decoder needs to build denoising queries: {"labels", "boxes"}."""
        return {"labels": self.labels, "boxes": self.boxes}

    def to(self, device: torch.device | str) -> SegmentTargets:
        inst = None if self.instance_labels is None else self.instance_labels.to(device)
        return SegmentTargets(self.labels.to(device), self.masks.to(device),
                              self.boxes.to(device), inst)  # fmt: skip


@dataclass(frozen=True)
class LossResult:
    """The total loss and its weighted parts.

    total: scalar tensor to back-propagate.
    terms: weighted contributions summed over layers, keyed "<decoder>/<term>" with decoder in
        things | stuff | things_dn and term in cls | cls_part | cls_thing | mask_bce |
        mask_dice | box_l1 | box_giou (detached scalars; they add up to `total`, except that
        cls_part + cls_thing repeat the part of cls they split).
    num_matched: matched queries of the final thing / stuff layer, for logging.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    num_matched: dict[str, int]


@dataclass(frozen=True)
class _Joint:
    """Targets of one image as one decoder sees them (stuff decoder: stuff + things).

    multi_hot: (T, K); masks: (T, h, w) float at prediction resolution; boxes: (T, 4);
    use_mask / use_box: (T,) bool, which losses a target takes.
    """

    multi_hot: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    use_mask: torch.Tensor
    use_box: torch.Tensor

    def __len__(self) -> int:
        return int(self.multi_hot.shape[0])


def _downsample(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, H, W) bool -> (T, h, w) float, area-averaged (soft targets)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    m = masks[:, None].float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = (
            F.adaptive_avg_pool2d(m, size)
            if (m.shape[-2] % size[0] == 0 and m.shape[-1] % size[1] == 0)
            else F.interpolate(m, size=size, mode="area")
        )
    return m[:, 0]


# --------------------------------------------------------------------------- criterion
class SetCriterion(nn.Module):
    """Matches decoder outputs with ground truth and computes Eq. (3) for one text pass.

    Call: `criterion(outputs, things=[...], stuff=[...], instance_columns=None)` with
    `outputs` a `HipieOutput` of the pass (either decoder may be None), `things`/`stuff` one
    `SegmentTargets` per image (stuff may be None), `instance_columns` an optional (K,) bool
    marking the instance-label columns of a part prompt (only to report cls_part / cls_thing).
    """

    def __init__(
        self,
        *,
        config: CriterionConfig,
        thing_matcher: SimOTAMatcher,
        stuff_matcher: HungarianMatcher,
    ) -> None:
        super().__init__()
        self.config = config
        self.thing_matcher = thing_matcher
        self.stuff_matcher = stuff_matcher

    # ------------------------------------------------------------------ matching
    @torch.no_grad()
    def match_things(self, out: DecoderOutput, targets: list[_Joint]) -> Pairs:
        """simOTA (many-to-one), then (optionally) one free query for each unmatched target."""
        match_targets = [MatchTarget(labels=t.multi_hot, boxes=t.boxes) for t in targets]
        pairs = self.thing_matcher(logits=out.logits, targets=match_targets, boxes=out.boxes)
        if not self.config.every_target_matched:
            return pairs
        fixed: Pairs = []
        for b, (pred, tgt) in enumerate(pairs):
            n = len(targets[b])
            missing = torch.ones(n, dtype=torch.bool)
            missing[tgt] = False
            free = torch.ones(out.logits.shape[1], dtype=torch.bool)
            free[pred] = False
            if missing.any() and free.any():
                # Deviation from YOLOX: a target whose candidate set is empty (a box no query
                # centre falls into) would get no gradient at all; give it its cheapest free query.
                miss_idx, free_idx = missing.nonzero()[:, 0], free.nonzero()[:, 0]
                sub = MatchTarget(
                    labels=targets[b].multi_hot[miss_idx], boxes=targets[b].boxes[miss_idx]
                )
                cost = self.stuff_matcher.cost_matrix(
                    logits=out.logits[b, free_idx.to(out.logits.device)],
                    target=sub,
                    boxes=out.boxes[b, free_idx.to(out.boxes.device)],
                )
                rows, cols = linear_sum_assignment(
                    torch.nan_to_num(cost.float().cpu(), nan=1e8).numpy()
                )
                pred = torch.cat([pred, free_idx[torch.as_tensor(rows, dtype=torch.long)]])
                tgt = torch.cat([tgt, miss_idx[torch.as_tensor(cols, dtype=torch.long)]])
            fixed.append((pred, tgt))
        return fixed

    @torch.no_grad()
    def match_stuff(self, out: DecoderOutput, targets: list[_Joint]) -> Pairs:
        """Hungarian over stuff targets (class + mask cost) and thing targets (class + box cost)."""
        pairs: Pairs = []
        m = self.stuff_matcher
        for b, t in enumerate(targets):
            if len(t) == 0 or out.logits.shape[1] == 0:
                pairs.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
                continue
            cost = torch.zeros(out.logits.shape[1], len(t), device=out.logits.device)
            sm, tm = t.use_mask, t.use_box
            if sm.any():
                cost[:, sm] = m.cost_matrix(
                    logits=out.logits[b],
                    masks=out.masks[b],
                    target=MatchTarget(labels=t.multi_hot[sm], masks=t.masks[sm]),
                ).float()
            if tm.any():
                cost[:, tm] = m.cost_matrix(
                    logits=out.logits[b],
                    boxes=out.boxes[b],
                    target=MatchTarget(labels=t.multi_hot[tm], boxes=t.boxes[tm]),
                ).float()
            cost = torch.nan_to_num(cost.cpu(), nan=1e8, posinf=1e8, neginf=-1e8)
            rows, cols = linear_sum_assignment(cost.numpy())
            pairs.append(
                (torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long))
            )
        return pairs

    @staticmethod
    def denoising_pairs(out: DecoderOutput) -> tuple[Pairs, torch.Tensor]:
        """Pairs of positive denoising queries and their targets, and the (B, N_dn) bool mask of
        the queries that take a class loss (positives and negatives, not padding)."""
        meta = out.dn_meta
        assert meta is not None
        pairs: Pairs = []
        for b in range(meta.targets.shape[0]):
            q = (meta.positive[b] & (meta.targets[b] >= 0)).nonzero()[:, 0]
            pairs.append((q.cpu(), meta.targets[b, q].cpu()))
        return pairs, meta.targets >= 0

    # ------------------------------------------------------------------ losses of one layer
    def layer_losses(
        self,
        out: DecoderOutput,
        targets: list[_Joint],
        pairs: Pairs,
        *,
        class_valid: torch.Tensor | None = None,
        instance_columns: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of one decoder layer.

        Args:
            out: logits (B, Q, K), masks (B, Q, h, w), boxes (B, Q, 4).
            targets: per image, at the layer's mask resolution.
            pairs: per image (pred_idx (M,), target_idx (M,)).
            class_valid: (B, Q) bool, queries that take a class loss (default all).
            instance_columns: (K,) bool; splits cls into cls_part / cls_thing for reporting.
        Returns:
            {"cls", ["cls_part", "cls_thing"], "mask_bce", "mask_dice", "box_l1", "box_giou"}.
        """
        cfg = self.config
        B, Q, K = out.logits.shape
        device = out.logits.device
        b_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(pairs)]).to(device)
        q_idx = torch.cat([p for p, _ in pairs]).to(device)
        num = max(int(q_idx.numel()), 1)

        # classification: focal over all (query, label) cells, matched cells take their targets
        cls_target = torch.zeros(B, Q, K, device=device)
        if q_idx.numel():
            cls_target[b_idx, q_idx] = torch.cat(
                [targets[b].multi_hot[t.to(device)] for b, (_, t) in enumerate(pairs)]
            )
        focal = sigmoid_focal_loss(
            out.logits, cls_target, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
        )
        if class_valid is not None:
            focal = focal * class_valid[..., None].float()
        losses = {"cls": cfg.cls * focal.sum() / num}
        if instance_columns is not None:
            inst = instance_columns.to(device)
            losses["cls_thing"] = cfg.cls * focal[..., inst].sum().detach() / num
            losses["cls_part"] = cfg.cls * focal[..., ~inst].sum().detach() / num

        def gather(field: str) -> torch.Tensor:
            return torch.cat(
                [getattr(targets[b], field)[t.to(device)] for b, (_, t) in enumerate(pairs)]
            )

        zero = out.logits.sum() * 0.0
        # masks: only pairs whose target takes a mask loss (not things matched by stuff queries)
        use_mask = (
            gather("use_mask") if q_idx.numel() else torch.zeros(0, dtype=torch.bool, device=device)
        )
        if use_mask.any() and out.masks.numel():
            pred = out.masks[b_idx[use_mask], q_idx[use_mask]].flatten(1)  # M x hw
            tgt = gather("masks")[use_mask].flatten(1)  # M x hw
            n = max(int(use_mask.sum()), 1)
            losses["mask_bce"] = cfg.mask * cfg.mask_bce * mask_bce_loss(pred, tgt).sum() / n
            losses["mask_dice"] = cfg.mask * cfg.mask_dice * dice_loss(pred, tgt).sum() / n
        else:
            losses["mask_bce"] = losses["mask_dice"] = zero
        # boxes: only pairs whose target takes a box loss (never stuff)
        use_box = (
            gather("use_box") if q_idx.numel() else torch.zeros(0, dtype=torch.bool, device=device)
        )
        if use_box.any():
            pred = out.boxes[b_idx[use_box], q_idx[use_box]]
            tgt = gather("boxes")[use_box]
            n = max(int(use_box.sum()), 1)
            losses["box_l1"] = cfg.box * cfg.box_l1 * box_l1_loss(pred, tgt).sum() / n
            losses["box_giou"] = cfg.box * cfg.box_giou * giou_loss(pred, tgt).sum() / n
        else:
            losses["box_l1"] = losses["box_giou"] = zero
        return losses

    # ------------------------------------------------------------------ whole pass
    @staticmethod
    def _joint(
        things: SegmentTargets | None,
        stuff: SegmentTargets | None,
        num_labels: int,
        size: tuple[int, int],
        device: torch.device,
    ) -> _Joint:
        """Concatenate stuff targets (mask loss, no box loss) and thing targets (mask and box loss)."""
        parts = []
        for t, mask, box in ((stuff, True, False), (things, True, True)):
            if t is None:
                continue
            t = t.to(device)
            n = len(t)
            parts.append(
                (
                    t.multi_hot(num_labels),
                    _downsample(t.masks, size),
                    t.boxes.float(),
                    torch.full((n,), mask, dtype=torch.bool, device=device),
                    torch.full((n,), box, dtype=torch.bool, device=device),
                )
            )
        if not parts:
            return _Joint(
                torch.zeros(0, num_labels, device=device),
                torch.zeros(0, *size, device=device),
                torch.zeros(0, 4, device=device),
                torch.zeros(0, dtype=torch.bool, device=device),
                torch.zeros(0, dtype=torch.bool, device=device),
            )
        return _Joint(*(torch.cat(x) for x in zip(*parts)))

    def forward(
        self,
        outputs: HipieOutput,
        *,
        things: list[SegmentTargets],
        stuff: list[SegmentTargets] | None = None,
        instance_columns: torch.Tensor | None = None,
    ) -> LossResult:
        """Loss of one text pass. See the class docstring."""
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        matched: dict[str, int] = {}
        total = None

        def add(prefix: str, losses: dict[str, torch.Tensor]) -> None:
            nonlocal total
            for key, value in losses.items():
                name = f"{prefix}/{key}"
                terms[name] = terms.get(name, 0.0) + value.detach()
                if key not in ("cls_part", "cls_thing"):
                    total = value if total is None else total + value

        def layers(out: DecoderOutput) -> list[DecoderOutput]:
            extra = list(out.aux) if cfg.aux_layers else []
            if cfg.encoder_proposals and out.enc is not None:
                extra.append(out.enc)
            return [out] + extra

        th = outputs.things
        if th is not None:
            K, device = th.logits.shape[-1], th.logits.device
            cache: dict[tuple[int, int], list[_Joint]] = {}

            def thing_targets(o: DecoderOutput) -> list[_Joint]:
                size = tuple(o.masks.shape[-2:]) if o.masks.numel() else (1, 1)
                if size not in cache:
                    cache[size] = [self._joint(t, None, K, size, device) for t in things]
                return cache[size]

            for i, o in enumerate(layers(th)):
                tg = thing_targets(o)
                pairs = self.match_things(o, tg)
                if i == 0:
                    matched["things"] = sum(int(p.numel()) for p, _ in pairs)
                add("things", self.layer_losses(o, tg, pairs, instance_columns=instance_columns))
            if cfg.denoising and th.dn is not None and th.dn_meta is not None:
                dn_layers = [th.dn] + (list(th.dn.aux) if cfg.aux_layers else [])
                for o in dn_layers:
                    o = DecoderOutput(
                        logits=o.logits,
                        masks=o.masks,
                        boxes=o.boxes,
                        embeddings=o.embeddings,
                        dn_meta=th.dn_meta,
                    )
                    pairs, valid = self.denoising_pairs(o)
                    add(
                        "things_dn",
                        self.layer_losses(
                            o,
                            thing_targets(o),
                            pairs,
                            class_valid=valid,
                            instance_columns=instance_columns,
                        ),
                    )
        st = outputs.stuff
        if st is not None:
            if stuff is None:
                raise ValueError("the stuff decoder ran but no stuff targets were given")
            K, device = st.logits.shape[-1], st.logits.device
            cache_s: dict[tuple[int, int], list[_Joint]] = {}
            for i, o in enumerate(layers(st)):
                size = tuple(o.masks.shape[-2:])
                if size not in cache_s:
                    with_things = things if cfg.stuff_matches_things else [None] * len(stuff)
                    cache_s[size] = [
                        self._joint(t, s, K, size, device) for t, s in zip(with_things, stuff)
                    ]
                    if (
                        cfg.stuff_matches_things
                    ):  # things matched by stuff queries: class + box only
                        cache_s[size] = [
                            _Joint(j.multi_hot, j.masks, j.boxes, ~j.use_box, j.use_box)
                            for j in cache_s[size]
                        ]
                tg = cache_s[size]
                pairs = self.match_stuff(o, tg)
                if i == 0:
                    matched["stuff"] = sum(int(p.numel()) for p, _ in pairs)
                add("stuff", self.layer_losses(o, tg, pairs))
        if total is None:
            raise ValueError("no decoder output to compute a loss on")
        return LossResult(total=total, terms=terms, num_matched=matched)


def build_criterion(config: CriterionConfig | None = None) -> SetCriterion:
    """The paper's criterion: simOTA for things, Hungarian for stuff, matching costs that follow
    the loss weights (class 2, mask BCE 5, dice 5, box L1 5, GIoU 1 = 5 x 0.2)."""
    config = config or CriterionConfig()
    hungarian = HungarianMatcher(
        cost_class=config.cls,
        cost_mask=config.mask * config.mask_bce,
        cost_dice=config.mask * config.mask_dice,
        cost_box=config.box * config.box_l1,
        cost_giou=config.box * config.box_giou,
        focal_alpha=config.focal_alpha,
        focal_gamma=config.focal_gamma,
    )
    simota = SimOTAMatcher(focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
    return SetCriterion(config=config, thing_matcher=simota, stuff_matcher=hungarian)
