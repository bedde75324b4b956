"""Mask losses: helper goldens, the full criterion against criterion.pt, the learned-query ablation."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import load_reference
from segearthr1.configuration import SegEarthR1Config
from segearthr1.losses import (MaskCriterion, batch_dice_loss, batch_sigmoid_ce_loss, calculate_uncertainty,
                               dice_loss, point_sample, reduce_num_masks, sigmoid_ce_loss,
                               uncertain_point_sampling)

LOSS_TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def fx():
    return load_reference("criterion.pt")


class Replay:
    """A `rand` stand-in returning recorded draws in order, checking each requested shape."""

    def __init__(self, draws):
        self.draws = list(draws)
        self.calls = 0

    def __call__(self, *shape, device=None, dtype=None):
        draw = self.draws[self.calls]
        assert tuple(shape) == tuple(draw.shape), (shape, tuple(draw.shape), self.calls)
        self.calls += 1
        return draw.to(device=device, dtype=dtype)


class PinnedPoints:
    """A `point_sampler` hook returning fixed coordinates, one tensor per loss call."""

    def __init__(self, coords):
        self.coords = list(coords)
        self.calls = 0

    def __call__(self, logits):
        c = self.coords[self.calls]
        assert c.shape[0] == logits.shape[0]
        self.calls += 1
        return c


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def test_point_sample_golden(fx):
    h = fx["helpers"]["point_sample"]
    assert h["align_corners"] is False
    torch.testing.assert_close(point_sample(h["input"], h["coords"]), h["output"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(point_sample(h["input"], h["coords_4d"]), h["output_4d"], atol=1e-6, rtol=1e-5)


def test_point_sample_rejects_bad_coords():
    with pytest.raises(ValueError, match="coords shape"):
        point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5, 3))


@pytest.mark.parametrize("name,fn", [("dice_loss", dice_loss), ("sigmoid_ce_loss", sigmoid_ce_loss)])
def test_per_mask_losses_golden(fx, name, fn):
    h = fx["helpers"][name]
    value = fn(h["logits"], h["labels"], h["num_masks"])
    torch.testing.assert_close(value, h["value"], **LOSS_TOL)
    torch.testing.assert_close(value, h["value_jit"], **LOSS_TOL)


@pytest.mark.parametrize("name,fn", [("batch_dice_loss", batch_dice_loss),
                                     ("batch_sigmoid_ce_loss", batch_sigmoid_ce_loss)])
def test_pairwise_costs_golden(fx, name, fn):
    h = fx["helpers"][name]
    value = fn(h["logits"], h["labels"])
    assert value.shape == (5, 4)
    torch.testing.assert_close(value, h["value"], **LOSS_TOL)


@pytest.mark.parametrize("fn", [batch_dice_loss, batch_sigmoid_ce_loss])
def test_pairwise_costs_broadcast_over_batch(fn):
    logits, labels = torch.randn(3, 5, 40), (torch.rand(3, 2, 40) > 0.5).float()
    batched = fn(logits, labels)
    assert batched.shape == (3, 5, 2)
    for b in range(3):
        torch.testing.assert_close(batched[b], fn(logits[b], labels[b]))


def test_pairwise_costs_agree_with_per_mask_losses():
    logits, labels = torch.randn(4, 60), (torch.rand(4, 60) > 0.5).float()
    diag_ce = batch_sigmoid_ce_loss(logits, labels).diagonal().sum()
    diag_dice = batch_dice_loss(logits, labels).diagonal().sum()
    torch.testing.assert_close(diag_ce, sigmoid_ce_loss(logits, labels, 1.0))
    torch.testing.assert_close(diag_dice, dice_loss(logits, labels, 1.0))


def test_calculate_uncertainty_golden(fx):
    h = fx["helpers"]["calculate_uncertainty"]
    torch.testing.assert_close(calculate_uncertainty(h["input"]), h["output"], atol=0, rtol=0)


def test_uncertain_point_sampling_golden(fx):
    h = fx["helpers"]["uncertain_point_sampling"]
    replay = Replay(h["rand_draws"])
    out = uncertain_point_sampling(h["coarse_logits"], h["num_points"], h["oversample_ratio"],
                                   h["importance_sample_ratio"], rand=replay)
    assert replay.calls == 2
    torch.testing.assert_close(out, h["output"], atol=0, rtol=0)


def test_uncertain_point_sampling_prefers_uncertain_points():
    # logits 0 in the left half, large elsewhere: every importance point must lie in the left half
    logits = torch.full((1, 1, 16, 16), 20.0)
    logits[..., :8] = 0.0
    coords = uncertain_point_sampling(logits, 64, 3.0, 0.5)
    assert coords.shape == (1, 64, 2)
    assert (coords[0, :32, 0] < 0.5).all()


def test_uncertain_point_sampling_rejects_multichannel():
    with pytest.raises(ValueError, match=r"\[N,1,h,w\]"):
        uncertain_point_sampling(torch.zeros(2, 3, 8, 8), 10, 3.0, 0.75)


# ---------------------------------------------------------------------------------------------
# full criterion vs the reference
# ---------------------------------------------------------------------------------------------
def _crit(hooks: dict | None = None, **loss) -> MaskCriterion:
    """The criterion of a config with these `loss` fields (the others: the reference's)."""
    return MaskCriterion.from_config(SegEarthR1Config(loss=loss), **(hooks or {}))


def _criterion(fx, **hooks) -> MaskCriterion:
    cfg = fx["meta"]["config"]
    return _crit(hooks, num_points=cfg["num_points"], oversample_ratio=cfg["oversample_ratio"],
                 importance_sample_ratio=cfg["importance_sample_ratio"], mask_weight=cfg["matcher"]["cost_mask"],
                 dice_weight=cfg["matcher"]["cost_dice"], class_weight=cfg["matcher"]["cost_class"])


def _check_against_reference(fx, losses):
    raw, weighted = fx["raw_losses"], fx["weighted_losses"]
    for ref_suffix, our_suffix in [("", ""), ("_0", "_0"), ("_1", "_1"), ("_2", "_2")]:
        for kind in ("mask", "dice"):
            torch.testing.assert_close(losses[f"loss_{kind}_raw{our_suffix}"], raw[f"loss_{kind}{ref_suffix}"],
                                       **LOSS_TOL)
            torch.testing.assert_close(5.0 * losses[f"loss_{kind}_raw{our_suffix}"],
                                       weighted[f"loss_{kind}{ref_suffix}"], **LOSS_TOL)
    torch.testing.assert_close(losses["loss_mask"], fx["loss_mask_total"], **LOSS_TOL)
    torch.testing.assert_close(losses["loss_dice"], fx["loss_dice_total"], **LOSS_TOL)
    assert "loss_seg_class" not in losses and fx["loss_SEG_class_total"] == 0.0
    assert all(fx["raw_losses"][k] is None for k in fx["raw_losses"] if "class" in k)


def test_criterion_with_pinned_points(fx):
    pinned = PinnedPoints(fx["point_coords_used"])
    crit = _criterion(fx, point_sampler=pinned)
    losses = crit(fx["pred_masks"], fx["aux_pred_masks"], fx["gt_masks"], fx["meta"]["config"]["num_masks"])
    assert pinned.calls == 4
    _check_against_reference(fx, losses)


def test_default_sampler_reproduces_reference_points(fx):
    """Replaying every recorded draw except the matcher's gives the reference's exact points."""
    roles = fx["rand_draw_roles"]
    draws = [d for d, r in zip(fx["rand_draws"], roles) if "matcher" not in r]
    assert len(draws) == 8
    replay = Replay(draws)
    crit = _criterion(fx, rand=replay)
    used = []

    def recording_sampler(logits):
        used.append(crit.sample_points(logits))
        return used[-1]

    crit.point_sampler = recording_sampler
    losses = crit(fx["pred_masks"], fx["aux_pred_masks"], fx["gt_masks"], 2.0)
    assert replay.calls == 8
    for mine, ref in zip(used, fx["point_coords_used"], strict=True):
        torch.testing.assert_close(mine, ref, atol=0, rtol=0)
    _check_against_reference(fx, losses)


def test_default_sampler_without_hook(fx):
    replay = Replay([d for d, r in zip(fx["rand_draws"], fx["rand_draw_roles"]) if "matcher" not in r])
    losses = _criterion(fx, rand=replay)(fx["pred_masks"], fx["aux_pred_masks"], fx["gt_masks"], 2.0)
    _check_against_reference(fx, losses)


def test_criterion_gradients_and_detached_raw_terms(fx):
    pred = fx["pred_masks"].clone().requires_grad_(True)
    aux = [a.clone().requires_grad_(True) for a in fx["aux_pred_masks"]]
    losses = _criterion(fx, point_sampler=PinnedPoints(fx["point_coords_used"]))(pred, aux, fx["gt_masks"], 2.0)
    assert all(not v.requires_grad for k, v in losses.items() if "_raw" in k)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    for t in [pred, *aux]:
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_criterion_bf16_predictions_compute_in_float32(fx):
    crit = _criterion(fx, point_sampler=PinnedPoints(fx["point_coords_used"]))
    losses = crit(fx["pred_masks"].bfloat16(), [a.bfloat16() for a in fx["aux_pred_masks"]], fx["gt_masks"], 2.0)
    assert losses["loss_mask"].dtype == torch.float32
    torch.testing.assert_close(losses["loss_mask"], fx["loss_mask_total"], atol=0.2, rtol=0.02)


def test_criterion_input_errors():
    crit = _crit(num_points=16)
    gt = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no pred_seg_logits"):
        crit(torch.zeros(2, 3, 8, 8), [], gt, 2.0)
    with pytest.raises(ValueError, match=r"aux_pred_masks\[0\]"):
        crit(torch.zeros(2, 1, 8, 8), [torch.zeros(2, 1, 4, 4)], gt, 2.0)
    with pytest.raises(ValueError, match="target_masks shape"):
        crit(torch.zeros(2, 1, 8, 8), [], torch.zeros(3, 1, 32, 32), 2.0)


def test_extreme_allowed_ratios_sample():
    """oversample_ratio 1 with every point by importance is allowed and samples all candidates."""
    crit = _crit(num_points=32, oversample_ratio=1.0, importance_sample_ratio=1.0)
    assert crit.sample_points(torch.randn(2, 1, 8, 8)).shape == (2, 32, 2)


# ---------------------------------------------------------------------------------------------
# learned-query ablation
# ---------------------------------------------------------------------------------------------
def _learned_query_case():
    """B=2, Q=3 queries; the target of sample b is exactly query `expected[b]`'s mask."""
    g = torch.Generator().manual_seed(3)
    shapes = (torch.rand(2, 3, 16, 16, generator=g) > 0.5).float()
    masks = 12.0 * (2 * shapes - 1)                     # confident logits of each query's shape
    expected = torch.tensor([2, 0])
    targets = shapes[torch.arange(2), expected].unsqueeze(1)
    targets = F.interpolate(targets, scale_factor=4, mode="nearest").to(torch.uint8)  # gt at 4x resolution
    seg_logits = torch.zeros(2, 3)
    return masks, seg_logits, targets, expected


def test_match_picks_the_query_equal_to_the_target():
    masks, seg_logits, targets, expected = _learned_query_case()
    crit = _crit(num_points=256)
    assert torch.equal(crit.match(masks, seg_logits, targets), expected)
    # when all queries predict the same mask, the [SEG] logit decides
    same = masks[:, :1].expand(-1, 3, -1, -1).clone()
    tgt = (same[:, :1] > 0).to(torch.uint8)
    logits = torch.tensor([[0.0, 0.0, 8.0], [0.0, 8.0, 0.0]])
    assert torch.equal(crit.match(same, logits, tgt), torch.tensor([2, 1]))


def test_learned_query_losses():
    masks, seg_logits, targets, expected = _learned_query_case()
    aux_masks, aux_logits = [masks.clone()], [seg_logits.clone().unsqueeze(-1)]  # [B,Q,1] accepted too
    coords = torch.rand(2, 64, 2)
    crit = _crit({"point_sampler": lambda logits: coords}, num_points=256)
    losses = crit(masks, aux_masks, targets, 2.0, pred_seg_logits=seg_logits, aux_pred_seg_logits=aux_logits)
    onehot = F.one_hot(expected, 3).float()
    raw_class = F.binary_cross_entropy_with_logits(seg_logits, onehot)
    torch.testing.assert_close(losses["loss_seg_class_raw"], raw_class)
    torch.testing.assert_close(losses["loss_seg_class_raw_0"], raw_class)
    torch.testing.assert_close(losses["loss_seg_class"], 2 * 2.0 * raw_class)
    # the mask losses are those of the matched query
    matched = masks[torch.arange(2), expected].unsqueeze(1)
    point_logits = point_sample(matched, coords).squeeze(1)
    point_labels = point_sample(targets.float(), coords).squeeze(1)
    for suffix in ("", "_0"):
        torch.testing.assert_close(losses[f"loss_mask_raw{suffix}"], sigmoid_ce_loss(point_logits, point_labels, 2.0))
        torch.testing.assert_close(losses[f"loss_dice_raw{suffix}"], dice_loss(point_logits, point_labels, 2.0))
    # the same masks with a wrong query everywhere give larger losses
    wrong = crit(masks[:, [1, 1, 1]], [], targets, 2.0, pred_seg_logits=seg_logits)
    assert wrong["loss_mask_raw"] > 2 * losses["loss_mask_raw"]


def test_learned_query_requires_aux_logits_per_aux_output():
    masks, seg_logits, targets, _ = _learned_query_case()
    with pytest.raises(ValueError, match="aux_pred_seg_logits"):
        _crit(num_points=16)(masks, [masks], targets, 2.0, pred_seg_logits=seg_logits)


# ---------------------------------------------------------------------------------------------
# num_masks normalisation
# ---------------------------------------------------------------------------------------------
def test_reduce_num_masks_single_process():
    assert reduce_num_masks(3, "cpu") == 3.0
    assert reduce_num_masks(0, "cpu") == 1.0


def _reduce_worker(rank: int, world: int, init: str, cases: list[list[int]], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save([reduce_num_masks(sizes[rank], "cpu") for sizes in cases], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_reduce_num_masks_distributed(tmp_path):
    """Batch sizes (1, 3) average to 2 on both ranks; (0, 1) averages to 0.5 and is clamped to 1."""
    out = str(tmp_path / "n")
    mp.spawn(_reduce_worker, args=(2, f"file://{tmp_path}/store", [[1, 3], [0, 1]], out), nprocs=2, join=True)
    assert [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)] == [[2.0, 1.0], [2.0, 1.0]]
