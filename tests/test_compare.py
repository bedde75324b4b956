"""`segearthr1 compare`: paired differences with known answers, identical runs, mismatched samples."""
from __future__ import annotations

import json

import numpy as np
import pytest

from segearthr1 import cli
from segearthr1.evaluation.files import write_per_sample_csv
from segearthr1.evaluation.compare import compare_runs

N = 120


def _write_run(path, iou, union=None, names=None, questions=None):
    """An evaluation output dir whose per-sample IoU is `iou` (intersection = iou * union)."""
    rng = np.random.default_rng(0)
    union = union if union is not None else rng.integers(100, 1000, len(iou))
    names = names or [f"img{i:03d}" for i in range(len(iou))]
    rows = []
    for i, (v, u) in enumerate(zip(iou, union)):
        inter = int(round(v * u))
        rows.append({"name": names[i], "intersection": inter, "union": int(u), "iou": inter / (u + 1e-5),
                     "index": i, "image_name": names[i], "question": (questions or {}).get(i, f"where is {i}?"),
                     "gt_pixels": int(u), "pred_pixels": inter, "answer": ""})
    path.mkdir(parents=True)
    write_per_sample_csv(path / "per_sample.csv", rows)
    (path / "metrics.json").write_text(json.dumps({"checkpoint": str(path)}))
    return path


@pytest.fixture
def base_iou():
    return np.random.default_rng(1).uniform(0.2, 0.7, N)


def _by_metric(result):
    return {c["metric"]: c for c in result["comparisons"]}


def test_known_difference_is_reported_with_a_ci_that_excludes_zero(tmp_path, base_iou):
    a = _write_run(tmp_path / "a", base_iou)
    noise = np.random.default_rng(2).normal(0, 0.02, N)
    b = _write_run(tmp_path / "b", np.clip(base_iou + 0.1 + noise, 0, 1))
    result = _by_metric(compare_runs([a, b], resamples=500, seed=0))
    giou = result["giou"]
    assert giou["difference"] == pytest.approx(giou["run_value"] - giou["baseline_value"])
    assert giou["difference"] == pytest.approx(0.1, abs=0.01)
    assert giou["ci95"][0] > 0.08 and giou["ci95"][1] < 0.12 and giou["excludes_zero"]
    assert result["ciou"]["excludes_zero"] and result["ciou"]["difference"] > 0.08
    assert giou["wins"] + giou["ties"] + giou["losses"] == N and giou["wins"] > 0.95 * N


def test_identical_runs_give_a_ci_containing_zero(tmp_path, base_iou):
    a = _write_run(tmp_path / "a", base_iou)
    b = _write_run(tmp_path / "b", base_iou)
    for c in compare_runs([a, b], resamples=300)["comparisons"]:
        assert c["difference"] == 0 and c["ci95"][0] <= 0 <= c["ci95"][1] and not c["excludes_zero"]
        assert (c["wins"], c["ties"], c["losses"]) == (0, N, 0)


def test_small_noisy_difference_is_not_significant(tmp_path, base_iou):
    a = _write_run(tmp_path / "a", base_iou)
    noise = np.random.default_rng(3).normal(0, 0.15, N)
    b = _write_run(tmp_path / "b", np.clip(base_iou + noise - noise.mean(), 0, 1))
    giou = _by_metric(compare_runs([a, b], resamples=500))["giou"]
    assert abs(giou["difference"]) < 0.01 and giou["ci95"][0] < 0 < giou["ci95"][1]


def test_runs_on_different_samples_are_refused_with_the_difference_named(tmp_path, base_iou):
    a = _write_run(tmp_path / "a", base_iou)
    names = [f"img{i:03d}" for i in range(N - 1)] + ["other_image"]
    b = _write_run(tmp_path / "b", base_iou, names=names)
    with pytest.raises(ValueError, match=r"img119.*other_image|other_image"):
        compare_runs([a, b])
    c = _write_run(tmp_path / "c", base_iou, questions={5: "a different question"})
    with pytest.raises(ValueError, match="different questions.*img005"):
        compare_runs([a, c])


def test_cli_prints_markdown_and_writes_json(tmp_path, base_iou, capsys):
    a = _write_run(tmp_path / "base", base_iou)
    b = _write_run(tmp_path / "better", np.clip(base_iou + 0.1, 0, 1))
    c = _write_run(tmp_path / "same", base_iou)
    out = tmp_path / "cmp.json"
    assert cli.main(["compare", str(a), str(b), str(c), "--markdown", "--output", str(out), "--resamples",
                     "200"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| baseline | run | metric |")
    assert "| base | better | giou |" in printed and "| base | same | giou |" in printed
    data = json.loads(out.read_text())
    assert data["baseline"] == "base" and [r["name"] for r in data["runs"]] == ["base", "better", "same"]
    assert data["bootstrap"]["resamples"] == 200 and data["num_samples"] == N
    assert {c["run"] for c in data["comparisons"]} == {"better", "same"}
    assert cli.main(["compare", str(a), str(tmp_path / "missing"), "--output", str(out)]) == 1
