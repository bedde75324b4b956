"""metrics.json beyond the reference protocol: every question, original resolution, empty-target
breakdown, per-image averages and bootstrap intervals, each recomputed independently from the saved
files; the non-finite warning; report.html rendered in headless Chromium."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from model_utils import tiny_model, trained_tokenizer
from segearthr1 import evaluate as ev
from segearthr1.evaluation.files import read_mask_png, read_per_sample_csv
from segearthr1.evaluation.loop import evaluate_model
from segearthr1.data.synthetic import generate
from segearthr1.evaluation import breakdown
from segearthr1.evaluation.bootstrap import metric_intervals
from segearthr1.evaluation.metrics import foreground_counts, foreground_iou, sample_statistics
from segearthr1.weights.pretrained import save_pretrained

RESAMPLES = 200


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One CLI evaluation (every question, original resolution, report) on generated EarthReason data."""
    root = tmp_path_factory.mktemp("xdata")
    generate(root, datasets=("EarthReason",), n_train=1, n_val=4, n_test=1, seed=13, min_size=40, max_size=90,
             absent_fraction=0.4)
    ckpt = tmp_path_factory.mktemp("xckpt") / "tiny"
    save_pretrained(tiny_model(seed=3).eval(), trained_tokenizer(), ckpt)
    out = tmp_path_factory.mktemp("xrun") / "out"
    code = ev.main(["--model_path", str(ckpt), "--data_path", str(root), "--dataset_type", "EarthReason",
                    "--question_sampling", "all", "--output_dir", str(out), "--num_workers", "0", "--device", "cpu",
                    "--bootstrap_resamples", str(RESAMPLES), "--seed", "7", "--num_gallery", "2"])
    assert code == 0
    return SimpleNamespace(out=out, root=root, ckpt=ckpt)


def _original_gt(root: Path, stem: str) -> np.ndarray:
    """The original-resolution target straight from the files: label != 0, empty if the answer list is."""
    split = root / "rs_reason_seg" / "RSReasonSeg" / "val"
    label = cv2.imread(str(split / "labels" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) != 0
    answers = json.loads((split / "QAs" / f"{stem}.json").read_text())["answer"]
    return label & bool(answers)


def _iou(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, float]:
    inter, union = int((pred & gt).sum()), int((pred | gt).sum())
    return inter, union, (1.0 if union == 0 else inter / (union + 1e-5))


def test_every_question_and_per_image_means(run_dir):
    metrics = json.loads((run_dir.out / "metrics.json").read_text())
    rows = read_per_sample_csv(run_dir.out / "per_sample.csv")
    split = run_dir.root / "rs_reason_seg" / "RSReasonSeg" / "val"
    n_questions = sum(len(json.loads(p.read_text())["questions"]) for p in (split / "QAs").glob("*.json"))
    assert metrics["num_samples"] == len(rows) == n_questions
    assert {r["question"] for r in rows} == {q for p in (split / "QAs").glob("*.json")
                                             for q in json.loads(p.read_text())["questions"]}
    assert metrics["giou"] == pytest.approx(np.mean([r["iou"] for r in rows]), abs=1e-12)
    assert metrics["letterboxed"]["giou"] == metrics["giou"]  # same masks, same formula
    per_image = {}
    for r in rows:
        per_image.setdefault(r["image_name"], []).append(r["iou"])
    block = metrics["letterboxed"]["per_image"]
    assert block["num_images"] == len(per_image) == 4
    assert block["giou"] == pytest.approx(np.mean([np.mean(v) for v in per_image.values()]), abs=1e-12)
    assert metrics["protocols"]["reference"].startswith("top-level")


def test_original_resolution_metrics_match_saved_masks(run_dir):
    metrics = json.loads((run_dir.out / "metrics.json").read_text())
    rows = read_per_sample_csv(run_dir.out / "per_sample.csv")
    inter_sum = union_sum = 0
    ious = []
    for r in rows:
        pred = read_mask_png(run_dir.out / "predictions_original" / f"{r['name']}.png")
        gt = _original_gt(run_dir.root, r["image_name"])
        assert pred.shape == gt.shape  # mapped back to the image's own size
        inter, union, iou = _iou(pred, gt)
        assert (inter, union) == (r["orig_intersection"], r["orig_union"])
        inter_sum, union_sum = inter_sum + inter, union_sum + union
        ious.append(iou)
    orig = metrics["original_resolution"]
    assert orig["giou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert orig["ciou"] == pytest.approx(inter_sum / (union_sum + 1e-10), abs=1e-12)
    assert orig["precision@0.5"] == pytest.approx(np.mean(np.array(ious) > 0.5), abs=1e-12)


def test_empty_target_breakdown_and_intervals_match_independent_computation(run_dir):
    metrics = json.loads((run_dir.out / "metrics.json").read_text())
    rows = read_per_sample_csv(run_dir.out / "per_sample.csv")
    for key, prefix, pred_dir in (("letterboxed", "", "predictions"), ("original_resolution", "orig_",
                                                                          "predictions_original")):
        empty = np.array([r[f"{prefix}gt_pixels"] == 0 for r in rows])
        predicted = np.array([read_mask_png(run_dir.out / pred_dir / f"{r['name']}.png").any() for r in rows])
        iou = np.array([r[f"{prefix}iou"] for r in rows])
        et = metrics[key]["empty_target"]
        assert 0 < empty.sum() < len(rows)  # both groups present in the generated data
        assert et["empty"]["num_samples"] == empty.sum()
        assert et["false_alarm_rate"] == pytest.approx((empty & predicted).sum() / empty.sum())
        assert et["miss_rate"] == pytest.approx((~empty & ~predicted).sum() / (~empty).sum())
        assert et["empty"]["giou"] == pytest.approx(np.mean(np.where(predicted[empty], 0.0, 1.0)))
        assert et["target"]["giou"] == pytest.approx(iou[~empty].mean(), abs=1e-12)
        # the documented bootstrap recipe, written out independently
        rng = np.random.default_rng(7)
        idx = rng.integers(0, len(rows), size=(RESAMPLES, len(rows)))
        inter = np.array([r[f"{prefix}intersection"] for r in rows], dtype=np.float64)
        union = np.array([r[f"{prefix}union"] for r in rows], dtype=np.float64)
        giou_lo_hi = np.percentile(iou[idx].mean(1), [2.5, 97.5])
        ciou_lo_hi = np.percentile(inter[idx].sum(1) / (union[idx].sum(1) + 1e-10), [2.5, 97.5])
        assert metrics[key]["ci95"]["giou"] == pytest.approx(list(giou_lo_hi), abs=1e-12)
        assert metrics[key]["ci95"]["ciou"] == pytest.approx(list(ciou_lo_hi), abs=1e-12)
        assert metrics[key]["ci95"]["giou"][0] <= metrics[key]["giou"] <= metrics[key]["ci95"]["giou"][1]
    assert metrics["bootstrap"] == {**metrics["bootstrap"], "resamples": RESAMPLES, "seed": 7, "confidence": 0.95}


def test_breakdown_on_known_rows():
    # 2 targets (one hit, one missed), 2 empty targets (one false alarm, one correctly empty)
    iou, inter, union = [0.5, 0.0, 0.0, 1.0], [10, 0, 0, 0], [20, 8, 5, 0]
    gt_pixels, pred_pixels = [15, 8, 0, 0], [15, 0, 5, 0]
    et = breakdown.empty_target_breakdown(iou, inter, union, gt_pixels, pred_pixels)
    assert et["confusion"] == {"target_predicted": 1, "target_missed": 1, "empty_false_alarm": 1, "empty_correct": 1}
    assert et["false_alarm_rate"] == 0.5 and et["miss_rate"] == 0.5
    assert et["target"]["giou"] == 0.25 and et["target"]["ciou"] == pytest.approx(10 / 28)
    assert et["empty"]["giou"] == 0.5 and et["empty"]["ciou"] == 0.0
    per_image = breakdown.per_image_metrics(iou, inter, union, ["a", "a", "b", "b"])
    assert per_image["num_images"] == 2 and per_image["giou"] == pytest.approx((0.25 + 0.5) / 2)
    no_empty = breakdown.empty_target_breakdown([0.5], [1], [2], [1], [1])
    assert no_empty["false_alarm_rate"] is None and no_empty["empty"]["giou"] is None


def test_fast_foreground_counts_equal_the_reference_statistics():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        pred = torch.rand(37, 53, generator=gen) > 0.5
        gt = torch.randint(0, 2, (37, 53), generator=gen, dtype=torch.uint8)
        gt[torch.rand(37, 53, generator=gen) > 0.9] = 255
        stats = sample_statistics(pred[None].float(), gt[None])
        inter, union, gt_n, pred_n = foreground_counts(pred, gt)
        assert (inter, union) == (int(stats.intersection[0, 1]), int(stats.union[0, 1]))
        assert foreground_iou(inter, union) == float(stats.iou[0, 1])
        assert gt_n == int((gt == 1).sum()) and pred_n == int((pred & (gt != 255)).sum())
    assert foreground_iou(0, 0) == 1.0


def test_bootstrap_interval_is_seeded_and_blockwise_stable(monkeypatch):
    rng = np.random.default_rng(0)
    iou = rng.random(300)
    inter, union = rng.integers(0, 50, 300), rng.integers(50, 100, 300)
    first = metric_intervals(iou, inter, union, resamples=500, seed=3)
    monkeypatch.setattr("segearthr1.evaluation.bootstrap._BLOCK_ELEMENTS", 1000)  # many small blocks
    assert metric_intervals(iou, inter, union, resamples=500, seed=3) == first
    assert metric_intervals(iou, inter, union, resamples=500, seed=4) != first
    assert first["giou"][0] < iou.mean() < first["giou"][1]


# --- non-finite logits -----------------------------------------------------------------------------------
class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def predict(self, images, **unused):
        logits = torch.full(images.shape[:1] + images.shape[-2:], float("nan"))
        return SimpleNamespace(mask_logits=logits, masks=logits > 0)


class _Tiny(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def sample_name(self, i):
        return f"s{i}"

    def __getitem__(self, i):
        return {"images": torch.zeros(3, 8, 8), "masks": torch.ones(1, 8, 8, dtype=torch.uint8),
                "dataset_type": "refer_seg", "question": "q", "image_name": f"s{i}"}


def test_non_finite_logits_are_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="segearthr1.evaluation.loop"):
        result = evaluate_model(_NaNModel(), _Tiny(), pad_token_id=0)
    assert result.metrics["giou"] == 0.0
    messages = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(messages) == 2 and "s0" in messages[0] and "s1" in messages[1]


# --- report.html in a real browser -----------------------------------------------------------------------
def _chrome_or_skip():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless browser test skipped: Debian's `chromium` and `chromium-driver` are not installed "
                    "(apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,2000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    report = run_dir.out / "report.html"
    text = report.read_text()
    assert "src='data:image/png;base64," in text and "http" not in text.replace("http-equiv", "")  # self-contained
    for label in ("best samples", "median samples", "worst samples", "empty-target confusion", "P@t curve",
                  "IoU histogram", "question:"):
        assert label in text
    browser = _chrome_or_skip()
    try:
        browser.get(report.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        shot = tmp_path / "report.png"
        browser.save_screenshot(str(shot))
        title = browser.title
    finally:
        browser.quit()
    assert "EarthReason" in title
    assert len(images) == 3 + 3 * 2  # histogram, P@t, confusion + 3 galleries of 2
    broken = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert not broken, f"images that did not load: {broken}"
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.std() > 10  # not a blank page
