"""Point-sampled mask losses with deep supervision (DESIGN.md §2.7).

Mask2Former-style: the BCE and Dice losses are evaluated at a few thousand points instead of every
pixel. Most points are the ones where the prediction is least certain (|logit| smallest), which
concentrates the gradient on boundaries and costs a fraction of a dense loss at 1024².

The default model has ONE query (the [SEG] description embedding) and one target per sample, so
Hungarian matching is trivially (query 0, target 0) and is skipped. The learned-query ablation
(`use_seg_query`, Q queries with [SEG]-logit scoring) matches each target to one of Q queries first.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DependencyNotFoundError

if TYPE_CHECKING:
    from .configuration import SegEarthR1Config

logger = logging.getLogger(__name__)

RandFn = Callable[..., Tensor]
PointSampler = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def point_sample(input: Tensor, coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly sample `input` [N,C,H,W] at normalised (x, y) coordinates in [0,1].

    `coords` is [N,P,2] (returns [N,C,P]) or [N,h,w,2] (returns [N,C,h,w]). Points outside the image
    read zeros (zero padding). Normalised coordinates let a 256² prediction and a 1024² ground truth
    be sampled at the same physical locations.
    """
    if coords.dim() not in (3, 4) or coords.shape[-1] != 2:
        raise ValueError(f"point_sample: coords shape {tuple(coords.shape)} is not [N,P,2] or [N,h,w,2]; "
                         "pass (x, y) pairs in the last dimension")
    squeeze = coords.dim() == 3
    grid = 2.0 * coords.to(input.dtype) - 1.0
    if squeeze:
        grid = grid.unsqueeze(2)
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return out.squeeze(3) if squeeze else out


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a binary logit: −|logit| (largest where the prediction is closest to 0.5)."""
    return -logits.abs()


def uncertain_point_sampling(logits: Tensor, num_points: int, oversample_ratio: float,
                             importance_sample_ratio: float, rand: RandFn = torch.rand) -> Tensor:
    """Pick `num_points` (x, y) points per mask, biased towards uncertain logits.

    Draws N × int(num_points·oversample_ratio) uniform candidates, keeps the
    k = int(importance_sample_ratio·num_points) most uncertain ones (top-k of −|logit|) and appends
    num_points − k fresh uniform points. `logits` is [N,1,h,w]; returns [N,num_points,2].
    The ratios follow `LossConfig`'s rule (oversample_ratio >= 1, importance_sample_ratio in [0, 1]),
    checked there once. Every uniform draw goes through `rand(*shape, device=..., dtype=...)`, so
    tests can inject the reference's recorded draws.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"uncertain_point_sampling: logits shape {tuple(logits.shape)} is not [N,1,h,w]; "
                         "select one mask channel per sample first")
    n = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    kw = dict(device=logits.device, dtype=torch.float32)
    candidates = rand(n, num_candidates, 2, **kw)
    uncertainty = calculate_uncertainty(point_sample(logits, candidates))[:, 0, :]  # [N, candidates]
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    coords = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, rand(n, num_random, 2, **kw)], dim=1)
    return coords


def sigmoid_ce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """BCE-with-logits averaged over points, summed over masks, divided by num_masks. [M,P] → scalar."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Soft Dice with +1 smoothing, 1 − (2Σpt + 1)/(Σp + Σt + 1), summed over masks / num_masks."""
    p = logits.sigmoid().flatten(1)
    numerator = 2 * (p * labels).sum(-1)
    denominator = p.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def batch_sigmoid_ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Pairwise mean BCE between every prediction [...,N,P] and every target [...,M,P] → [...,N,M].

    Matching cost: written as two matrix products instead of an [N,M,P] tensor.
    """
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = torch.einsum("...nc,...mc->...nm", pos, labels) + torch.einsum("...nc,...mc->...nm", neg, 1 - labels)
    return loss / logits.shape[-1]


def batch_dice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Pairwise Dice (+1 smoothing) between predictions [...,N,P] and targets [...,M,P] → [...,N,M]."""
    p = logits.sigmoid()
    numerator = 2 * torch.einsum("...nc,...mc->...nm", p, labels)
    denominator = p.sum(-1).unsqueeze(-1) + labels.sum(-1).unsqueeze(-2)
    return 1 - (numerator + 1) / (denominator + 1)


def reduce_num_masks(batch_size: int, device: torch.device | str) -> float:
    """Number of masks used to normalise the losses: averaged over processes, clamped ≥ 1.

    Every process then divides by the same value, so the loss scale does not depend on how the
    global batch is split. `device` must suit the process group's backend (CUDA for NCCL).
    """
    n = torch.tensor(float(batch_size), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n.item()), 1.0)


# ----------------------------------------------------------------------------------------------
# criterion
# ----------------------------------------------------------------------------------------------
class MaskCriterion(nn.Module):
    """Mask BCE + Dice losses on the final and every auxiliary prediction.

    forward(...) returns a dict:
      * ``loss_mask``, ``loss_dice`` — weighted sums over final + aux outputs
        (Σ mask_weight·raw, Σ dice_weight·raw); these carry the gradient.
      * ``loss_seg_class`` — learned-query ablation only: Σ class_weight·raw over outputs.
      * ``loss_mask_raw``, ``loss_dice_raw`` (final output) and ``loss_mask_raw_{i}``,
        ``loss_dice_raw_{i}`` (aux output i, i.e. the reference's suffix ``_i``), plus
        ``loss_seg_class_raw[_i]`` in the ablation — unweighted and *detached*, for logging only.

    Point selection is `sample_points` (uncertainty sampling with `self.rand`); pass `point_sampler`
    (same signature: logits [N,1,h,w] → coords [N,P,2]) to replace it, e.g. to pin the points.

    Single-query path: the reference calls a Hungarian matcher that, with one query and one target,
    always returns (0, 0) but consumes 2 random draws per sample. We skip it; the only observable
    difference is the RNG stream (pin the points through the hook for exact parity).
    Losses are computed in float32 whatever the prediction dtype (bf16 training).
    """

    def __init__(self, *, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                 mask_weight: float, dice_weight: float, class_weight: float,
                 point_sampler: PointSampler | None = None, rand: RandFn | None = None) -> None:
        """Numbers from `LossConfig` (which checks them); `point_sampler`/`rand` are optional test hooks."""
        super().__init__()
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.class_weight = class_weight
        self.point_sampler = point_sampler
        self.rand: RandFn = rand if rand is not None else torch.rand

    @classmethod
    def from_config(cls, config: SegEarthR1Config, **hooks) -> MaskCriterion:
        """The criterion `config.loss` describes; `hooks` = point_sampler / rand (tests, parity checks)."""
        lc = config.loss
        return cls(num_points=lc.num_points, oversample_ratio=lc.oversample_ratio,
                   importance_sample_ratio=lc.importance_sample_ratio, mask_weight=lc.mask_weight,
                   dice_weight=lc.dice_weight, class_weight=lc.class_weight, **hooks)

    # -- point selection -------------------------------------------------------------------
    @torch.no_grad()
    def sample_points(self, logits: Tensor) -> Tensor:
        """Default point selection: uncertainty sampling on `logits` [N,1,h,w] → coords [N,P,2]."""
        return uncertain_point_sampling(logits, self.num_points, self.oversample_ratio,
                                        self.importance_sample_ratio, rand=self.rand)

    def _points(self, logits: Tensor) -> Tensor:
        sampler = self.point_sampler if self.point_sampler is not None else self.sample_points
        with torch.no_grad():
            return sampler(logits.detach())

    # -- per-output losses ----------------------------------------------------------------
    def _mask_losses(self, logits: Tensor, targets: Tensor, num_masks: float) -> tuple[Tensor, Tensor]:
        """BCE and Dice of one output: logits [B,1,h,w], targets float [B,1,H,W] (any resolution)."""
        coords = self._points(logits)
        point_logits = point_sample(logits, coords).squeeze(1)
        with torch.no_grad():
            point_labels = point_sample(targets, coords).squeeze(1)
        return sigmoid_ce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    @torch.no_grad()
    def match(self, pred_masks: Tensor, pred_seg_logits: Tensor, target_masks: Tensor) -> Tensor:
        """Learned-query ablation: Hungarian-match the single target of each sample to one of Q queries.

        cost = class_weight·(−sigmoid(seg logit)) + mask_weight·BCE + dice_weight·Dice, the mask costs
        at `num_points` uniform points per sample (one [B,P,2] draw via `self.rand`).
        pred_masks [B,Q,h,w], pred_seg_logits [B,Q], target_masks [B,1,H,W] → matched query [B] long.
        """
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as e:
            raise DependencyNotFoundError(what="MaskCriterion.match needs scipy for Hungarian matching",
                                          hint="pip install scipy") from e
        b = pred_masks.shape[0]
        coords = self.rand(b, self.num_points, 2, device=pred_masks.device, dtype=torch.float32)
        out = point_sample(pred_masks.float(), coords)          # [B,Q,P]
        tgt = point_sample(target_masks.float(), coords)        # [B,1,P]
        cost = (self.class_weight * -pred_seg_logits.float().sigmoid().unsqueeze(-1)
                + self.mask_weight * batch_sigmoid_ce_loss(out, tgt)
                + self.dice_weight * batch_dice_loss(out, tgt))  # [B,Q,1]
        rows = [int(linear_sum_assignment(c)[0][0]) for c in cost.cpu().numpy()]
        return torch.tensor(rows, dtype=torch.long, device=pred_masks.device)

    # -- forward --------------------------------------------------------------------------
    def forward(self, pred_masks: Tensor, aux_pred_masks: Sequence[Tensor], target_masks: Tensor,
                num_masks: float, pred_seg_logits: Tensor | None = None,
                aux_pred_seg_logits: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """Losses of the final prediction and every aux prediction (aux i ↔ key suffix ``_i``).

        pred_masks [B,1,h,w] logits (or [B,Q,h,w] with pred_seg_logits [B,Q] for learned queries),
        aux_pred_masks list of the same shape, target_masks [B,1,H,W] {0,1} (uint8/bool/float),
        num_masks from `reduce_num_masks`.
        """
        outputs = [pred_masks, *aux_pred_masks]
        targets = self._check_inputs(outputs, target_masks)
        seg_logits = self._check_seg_logits(outputs, pred_seg_logits, aux_pred_seg_logits)
        b = pred_masks.shape[0]
        losses: dict[str, Tensor] = {}
        total_mask = total_dice = total_class = None
        for i, masks in enumerate(outputs):
            suffix = "" if i == 0 else f"_{i - 1}"
            masks = masks.float()
            if seg_logits is not None:
                logits = seg_logits[i].float()
                matched = self.match(masks, logits, targets)
                masks = masks[torch.arange(b, device=masks.device), matched].unsqueeze(1)
                onehot = F.one_hot(matched, logits.shape[1]).to(logits.dtype)
                loss_class = F.binary_cross_entropy_with_logits(logits, onehot)
                losses[f"loss_seg_class_raw{suffix}"] = loss_class.detach()
                total_class = _add(total_class, self.class_weight * loss_class)
            loss_mask, loss_dice = self._mask_losses(masks, targets, num_masks)
            losses[f"loss_mask_raw{suffix}"] = loss_mask.detach()
            losses[f"loss_dice_raw{suffix}"] = loss_dice.detach()
            total_mask = _add(total_mask, self.mask_weight * loss_mask)
            total_dice = _add(total_dice, self.dice_weight * loss_dice)
        losses["loss_mask"] = total_mask
        losses["loss_dice"] = total_dice
        if total_class is not None:
            losses["loss_seg_class"] = total_class
        return losses

    @staticmethod
    def _check_inputs(outputs: list[Tensor], target_masks: Tensor) -> Tensor:
        shape = tuple(outputs[0].shape)
        if len(shape) != 4:
            raise ValueError(f"MaskCriterion: pred_masks shape {shape} is not [B,Q,h,w]")
        for i, o in enumerate(outputs[1:]):
            if tuple(o.shape) != shape:
                raise ValueError(f"MaskCriterion: aux_pred_masks[{i}] shape {tuple(o.shape)} differs from "
                                 f"pred_masks {shape}; every decoder layer must predict the same shape")
        if target_masks.dim() == 3:
            target_masks = target_masks.unsqueeze(1)
        if target_masks.dim() != 4 or target_masks.shape[1] != 1 or target_masks.shape[0] != shape[0]:
            raise ValueError(f"MaskCriterion: target_masks shape {tuple(target_masks.shape)} is not "
                             f"[{shape[0]},1,H,W]; pass one {{0,1}} mask per sample")
        return target_masks.float()

    @staticmethod
    def _check_seg_logits(outputs: list[Tensor], pred_seg_logits: Tensor | None,
                          aux_pred_seg_logits: Sequence[Tensor] | None) -> list[Tensor] | None:
        b, q = outputs[0].shape[:2]
        if pred_seg_logits is None:
            if q != 1:
                raise ValueError(f"MaskCriterion: pred_masks has {q} queries but no pred_seg_logits; "
                                 "pass [B,Q] [SEG] logits for the learned-query ablation or a single query")
            return None
        logits = [pred_seg_logits, *(aux_pred_seg_logits or [])]
        if len(logits) != len(outputs):
            raise ValueError(f"MaskCriterion: got {len(logits) - 1} aux_pred_seg_logits for "
                             f"{len(outputs) - 1} aux_pred_masks; pass one per aux output")
        logits = [x.squeeze(-1) if x.dim() == 3 and x.shape[-1] == 1 else x for x in logits]
        for i, x in enumerate(logits):
            if tuple(x.shape) != (b, q):
                raise ValueError(f"MaskCriterion: seg logits #{i} shape {tuple(x.shape)} is not [{b},{q}] "
                                 "(one logit per query)")
        return logits


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value
