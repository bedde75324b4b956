"""tools/quickstart_report.py: baselines on generated data and the re-check of metrics.json against the
saved prediction PNGs (the quickstart's printed numbers must be the ones its files give)."""
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from segearthr1.data.synthetic import generate
from segearthr1.data.transforms import letterbox_mask

SIZE = 32
REPO = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("quickstart_report", REPO / "tools" / "quickstart_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs_data")
    generate(root, datasets=("EarthReason",), n_train=0, n_val=10, n_test=0, seed=3, min_size=40, max_size=64,
             absent_fraction=0.3)
    return root


def _val_dir(root: Path) -> Path:
    return root / "rs_reason_seg" / "RSReasonSeg" / "val"


def _write_run(tmp_path: Path, root: Path, predict, giou_offset: float = 0.0) -> Path:
    """Write predictions/<stem>.png from predict(letterboxed label) and a metrics.json next to them with
    the DESIGN.md §2.8 values of those predictions (gIoU shifted by `giou_offset`)."""
    pred_dir = tmp_path / "eval" / "predictions"
    pred_dir.mkdir(parents=True)
    labels = sorted((_val_dir(root) / "labels").glob("*.png"))
    ious, inter, union = [], 0, 0
    for label in labels:
        gt, _ = letterbox_mask((cv2.imread(str(label), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8), SIZE)
        gt = gt[0].numpy() > 0
        pred = predict(gt)
        cv2.imwrite(str(pred_dir / label.name), pred.astype(np.uint8) * 255)
        i, u = int((pred & gt).sum()), int((pred | gt).sum())
        ious.append(i / (u + 1e-5) if u else 1.0)
        inter, union = inter + i, union + u
    metrics = {"giou": float(np.mean(ious)) + giou_offset, "ciou": inter / (union + 1e-10),
               "num_samples": len(labels), "image_size": SIZE, "config": {}}
    path = tmp_path / "eval" / "metrics.json"
    path.write_text(json.dumps(metrics), encoding="utf-8")
    return path


def _absent_fraction(root: Path) -> float:
    qas = [json.loads(p.read_text()) for p in sorted((_val_dir(root) / "QAs").glob("*.json"))]
    return sum(not qa["target"]["present"] for qa in qas) / len(qas)


def test_perfect_predictions_learned_and_baselines(tmp_path, data_root):
    tool = _load_tool()
    metrics = _write_run(tmp_path, data_root, lambda gt: gt)
    report = tmp_path / "report.json"
    assert tool.main(["--data_path", str(data_root), "--metrics", str(metrics), "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["learned"] is True
    absent = _absent_fraction(data_root)
    assert 0 < absent < 1
    # predicting nothing scores 1 exactly on the absent targets and 0 elsewhere
    assert result["baselines"]["empty"]["giou"] == pytest.approx(absent, abs=1e-6)
    assert result["baselines"]["empty"]["ciou"] == 0.0
    assert 0 < result["baselines"]["union"]["giou"] < 1


def test_empty_predictions_did_not_learn(tmp_path, data_root):
    tool = _load_tool()
    metrics = _write_run(tmp_path, data_root, lambda gt: np.zeros_like(gt))
    assert tool.main(["--data_path", str(data_root), "--metrics", str(metrics)]) == 1


def test_metrics_that_disagree_with_saved_predictions_are_an_error(tmp_path, data_root, capsys):
    tool = _load_tool()
    metrics = _write_run(tmp_path, data_root, lambda gt: gt, giou_offset=-0.03)
    assert tool.main(["--data_path", str(data_root), "--metrics", str(metrics)]) == 2
    assert "disagrees with the saved predictions" in capsys.readouterr().err
    # skipping the check falls back to the numbers in metrics.json
    assert tool.main(["--data_path", str(data_root), "--metrics", str(metrics), "--predictions", "none"]) == 0


def test_missing_prediction_is_named(tmp_path, data_root, capsys):
    tool = _load_tool()
    metrics = _write_run(tmp_path, data_root, lambda gt: gt)
    victim = sorted((metrics.parent / "predictions").glob("*.png"))[4]
    victim.unlink()
    assert tool.main(["--data_path", str(data_root), "--metrics", str(metrics)]) == 2
    assert victim.name in capsys.readouterr().err
