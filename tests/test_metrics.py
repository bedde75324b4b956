"""Evaluation metrics against metrics.pt, hand-computed cases, and the distributed reduction."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.multiprocessing as mp

from conftest import load_reference
from segearthr1.evaluation.files import read_per_sample_csv, write_per_sample_csv
from segearthr1.evaluation.metrics import SegmentationMeter, sample_statistics

METRIC_TOL = dict(atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def fx():
    return load_reference("metrics.pt")


def _run(fx, chunk: int) -> tuple[SegmentationMeter, list]:
    meter = SegmentationMeter()
    n = fx["pred_masks"].shape[0]
    stats = [meter.update(fx["pred_masks"][i:i + chunk], fx["gt_masks"][i:i + chunk],
                          names=fx["case_kinds"][i:i + chunk]) for i in range(0, n, chunk)]
    return meter, stats


def _cat(stats, field):
    return torch.cat([getattr(s, field) for s in stats])


def test_per_sample_statistics_match_reference(fx):
    assert fx["meta"]["config"]["eval_batch_size"] == 5
    _, stats = _run(fx, 5)
    assert _cat(stats, "intersection").tolist() == fx["per_sample_intersection"]
    assert _cat(stats, "union").tolist() == fx["per_sample_union"]
    iou = _cat(stats, "iou")
    assert iou.dtype == torch.float64
    torch.testing.assert_close(iou, torch.tensor(fx["per_sample_iou"], dtype=torch.float64), **METRIC_TOL)
    torch.testing.assert_close(iou.float(), fx["per_sample_iou_f32"], atol=0, rtol=0)


def test_final_metrics_match_reference(fx):
    meter, _ = _run(fx, 5)
    m = meter.compute()
    assert m["num_samples"] == fx["count"] == 40
    assert meter.intersection_sum.tolist() == fx["intersection_sum"]
    assert meter.union_sum.tolist() == fx["union_sum"]
    torch.testing.assert_close(meter.iou_sum, torch.tensor(fx["giou_sum"], dtype=torch.float64), **METRIC_TOL)
    assert m["ciou"] == pytest.approx(fx["ciou"], abs=1e-12, rel=0)
    assert m["giou"] == pytest.approx(fx["giou"], abs=1e-12, rel=0)
    for t, value in fx["pr"].items():
        assert m[f"precision@{t}"] == pytest.approx(value, abs=1e-12, rel=0)
    assert all(isinstance(m[k], float) for k in m if k != "num_samples")


def test_summary_lines_identical_to_reference(fx):
    meter, _ = _run(fx, 5)
    assert meter.summary_lines() == fx["printed"]


def test_batching_does_not_change_results(fx):
    m5, s5 = _run(fx, 5)
    m40, s40 = _run(fx, 40)
    assert m5.compute() == m40.compute()
    assert m5.per_sample_rows() == m40.per_sample_rows()
    for field in ("intersection", "union", "iou"):
        assert torch.equal(_cat(s5, field), _cat(s40, field))


def test_per_sample_rows_and_csv(fx, tmp_path):
    meter, _ = _run(fx, 5)
    rows = meter.per_sample_rows()
    assert [r["name"] for r in rows] == fx["case_kinds"]
    assert [r["intersection"] for r in rows] == [x[1] for x in fx["per_sample_intersection"]]
    assert [r["union"] for r in rows] == [x[1] for x in fx["per_sample_union"]]
    path = tmp_path / "out" / "per_sample.csv"
    write_per_sample_csv(path, rows)  # the evaluation's writer: the meter's rows are its first columns
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0])[:4] == ["name", "intersection", "union", "iou"]
    assert [float(r["iou"]) for r in read] == [x[1] for x in fx["per_sample_iou"]]
    assert [int(r["union"]) for r in read] == [x[1] for x in fx["per_sample_union"]]
    assert [r["iou"] for r in read_per_sample_csv(path)] == [x[1] for x in fx["per_sample_iou"]]


def test_hand_computed_cases():
    gt = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    pred = torch.zeros(4, 4, 4, dtype=torch.bool)
    # 0: empty gt & empty pred -> IoU 1.0
    # 1: empty gt, 4 predicted pixels -> IoU 0
    pred[1, :2, :2] = True
    # 2: gt 8 px, pred 4 of them -> IoU 4 / (8 + 1e-5)
    gt[2, 0, :2] = 1
    pred[2, 0] = True
    # 3: gt 2 px plus an ignored row that the prediction covers: ignored pixels never count
    gt[3, 0, 0, :2] = 1
    gt[3, 0, 3] = 255
    pred[3, 0, :2] = True
    pred[3, 3] = True
    meter = SegmentationMeter()
    stats = meter.update(pred, gt)
    assert stats.intersection[:, 1].tolist() == [0, 0, 4, 2]
    assert stats.union[:, 1].tolist() == [0, 4, 8, 2]
    assert stats.iou[:, 1].tolist() == [1.0, 0.0, 4 / (8 + 1e-5), 2 / (2 + 1e-5)]
    assert stats.union[3, 0].item() == 16 - 4 - 2          # background ignores the 255 row as well
    m = meter.compute()
    assert m["giou"] == pytest.approx((1.0 + 0.0 + 4 / (8 + 1e-5) + 2 / (2 + 1e-5)) / 4, abs=1e-15)
    assert m["ciou"] == pytest.approx(6 / (14 + 1e-10), abs=1e-15)
    assert m["precision@0.5"] == 0.5                         # 4/8 - eps is not > 0.5
    assert m["precision@0.9"] == 0.5
    assert [r["name"] for r in meter.per_sample_rows()] == ["0", "1", "2", "3"]


def test_three_dim_gt_is_accepted(fx):
    a = sample_statistics(fx["pred_masks"][:5], fx["gt_masks"][:5])
    b = sample_statistics(fx["pred_masks"][:5], fx["gt_masks"][:5, 0])
    assert torch.equal(a.intersection, b.intersection) and torch.equal(a.union, b.union)


def test_errors():
    meter = SegmentationMeter()
    with pytest.raises(ValueError, match="no samples"):
        meter.compute()
    with pytest.raises(ValueError, match="does not match gt"):
        meter.update(torch.zeros(2, 8, 8), torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="names"):
        meter.update(torch.zeros(2, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.uint8), names=["a"])


def _meter_worker(rank: int, world: int, init: str, pred, gt, names, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = list(range(rank, pred.shape[0], world))  # strided shards, as the evaluation loop takes them
        meter = SegmentationMeter()
        for k in range(0, len(mine), 5):
            idx = mine[k:k + 5]
            meter.update(pred[idx], gt[idx], names=[names[i] for i in idx], extras=[{"index": i} for i in idx])
        meter.all_reduce()
        torch.save({"metrics": meter.compute(), "rows": meter.per_sample_rows(), "lines": meter.summary_lines(),
                    "I": meter.intersection_sum, "U": meter.union_sum}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes_equals_single_process(fx, tmp_path):
    """Counts and the re-summed gIoU are bit-identical to one process; rows come back in index order."""
    single, _ = _run(fx, 5)
    out = str(tmp_path / "meter")
    mp.spawn(_meter_worker, args=(2, f"file://{tmp_path}/store", fx["pred_masks"], fx["gt_masks"],
                                  fx["case_kinds"], out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["I"].tolist() == single.intersection_sum.tolist()
        assert got["U"].tolist() == single.union_sum.tolist()
        assert got["metrics"] == single.compute()
        assert got["lines"] == fx["printed"]
        assert [r["index"] for r in got["rows"]] == list(range(fx["pred_masks"].shape[0]))
        assert [{k: v for k, v in r.items() if k != "index"} for r in got["rows"]] == single.per_sample_rows()


def test_all_reduce_is_noop_without_process_group(fx):
    meter, _ = _run(fx, 40)
    before = meter.compute()
    meter.all_reduce()
    assert meter.compute() == before
