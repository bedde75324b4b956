"""Evaluation entry point: reference metric values, CLI outputs, distributed == single process,
reference-release loading, and clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import load_reference
from model_utils import tiny_model, trained_tokenizer
from segearthr1 import evaluate as ev
from segearthr1.evaluation.files import read_mask_png, read_per_sample_csv
from segearthr1.evaluation.loop import evaluate_model
from segearthr1.evaluation.samples import sample_ids, shard_indices
from segearthr1.data.earthreason import EarthReasonDataset
from segearthr1.data.refsegrs import RefSegRSDataset
from segearthr1.data.synthetic import generate
from segearthr1.errors import CheckpointNotFoundError, DatasetNotFoundError
from segearthr1.evaluation.metrics import SegmentationMeter
from segearthr1.weights.export import export_reference_release
from segearthr1.weights.pretrained import save_pretrained
from segearthr1.weights.reference_config import write_mask_config_yaml

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("giou", "ciou", "precision@0.5", "precision@0.6", "precision@0.7", "precision@0.8",
               "precision@0.9", "num_samples")
JSON_KEYS = set(METRIC_KEYS) | {"checkpoint", "mask_config", "config", "dataset", "data_path", "data_split",
                                "question_sampling", "world_size", "timestamp", "segearthr1_version"}


# --- known predictions -> reference values ---------------------------------------------------------
class _FixtureDataset(torch.utils.data.Dataset):
    """metrics.pt pairs as samples: gt as the mask (incl. 255), the case index carried along."""

    def __init__(self, fx):
        self.gt = fx["gt_masks"]
        self.kinds = fx["case_kinds"]

    def __len__(self):
        return self.gt.shape[0]

    def sample_name(self, i):
        return f"case{i:02d}"

    def __getitem__(self, i):
        return {"images": torch.zeros(3, 96, 96), "masks": self.gt[i].to(torch.uint8), "dataset_type": "refer_seg",
                "question": self.kinds[i], "image_name": self.sample_name(i), "case_index": i}


class _FixedPredictions(nn.Module):
    """A 'model' whose predict returns the recorded reference predictions of the batch's cases."""

    def __init__(self, preds):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.preds = preds

    def predict(self, images, case_index, **unused):
        return SimpleNamespace(masks=self.preds[list(case_index)] > 0.5)


@pytest.mark.parametrize("batch_size", [5, 3])
def test_known_predictions_give_reference_metrics(tmp_path, batch_size):
    fx = load_reference("metrics.pt")
    result = evaluate_model(_FixedPredictions(fx["pred_masks"]), _FixtureDataset(fx), pad_token_id=0,
                               batch_size=batch_size, prediction_dir=tmp_path / "pred")
    m = result.metrics
    assert m["num_samples"] == fx["count"] == 40
    assert m["ciou"] == pytest.approx(fx["ciou"], abs=1e-12, rel=0)
    assert m["giou"] == pytest.approx(fx["giou"], abs=1e-12, rel=0)
    for t, v in fx["pr"].items():
        assert m[f"precision@{t}"] == pytest.approx(v, abs=1e-12, rel=0)
    assert result.summary_lines == fx["printed"]
    assert [r["intersection"] for r in result.rows] == [i[1] for i in fx["per_sample_intersection"]]
    assert [r["union"] for r in result.rows] == [u[1] for u in fx["per_sample_union"]]
    assert [r["name"] for r in result.rows] == [f"case{i:02d}" for i in range(40)]
    # saved PNGs are the predictions themselves
    saved = torch.from_numpy(read_mask_png(tmp_path / "pred" / "case07.png"))
    assert torch.equal(saved, fx["pred_masks"][7] > 0.5)


def test_sample_ids_are_unique_and_suffixed_for_repeats():
    class Names:
        names = ["a", "b", "a", "c", "a", "b"]

        def __len__(self):
            return len(self.names)

        def sample_name(self, i):
            return self.names[i]

    assert sample_ids(Names()) == ["a__q0", "b__q0", "a__q1", "c", "a__q2", "b__q1"]
    assert shard_indices(range(7), 1, 3) == [1, 4]


def test_every_flag_is_documented():
    parser = ev.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no --help text"


# --- end to end on generated data -------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    generate(root, datasets=("EarthReason", "RefSegRS"), n_train=1, n_val=3, n_test=1, seed=5, min_size=32,
             max_size=64, absent_fraction=0.3)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(tiny_model(seed=1).eval(), trained_tokenizer(), path)
    return path


def _eval_sh(args, env_extra, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env_extra}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eval.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _cli_args(checkpoint, out, vis=None):
    args = ["--model_path", str(checkpoint), "--dataset_type", "EarthReason", "--data_split", "val",
            "--question_sampling", "all", "--output_dir", str(out), "--batch_size", "2", "--num_workers", "0",
            "--device", "cpu"]
    return args + (["--vis_path", str(vis), "--num_vis", "4"] if vis else [])


@pytest.fixture(scope="module")
def single_run(data_root, checkpoint, tmp_path_factory):
    """scripts/eval.sh with NGPUS=1 and the data root from SEGEARTH_DATA (no --data_path)."""
    work = tmp_path_factory.mktemp("single")
    proc = _eval_sh(_cli_args(checkpoint, work / "out", work / "vis"), {"SEGEARTH_DATA": str(data_root),
                                                                         "NGPUS": "1"}, work)
    return work, proc.stdout + proc.stderr


def test_cli_writes_outputs_that_recompute_to_the_same_metrics(single_run, data_root, checkpoint):
    work, log = single_run
    out = work / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert JSON_KEYS <= set(metrics)
    assert metrics["dataset"] == "EarthReason" and metrics["data_split"] == "val"
    assert metrics["question_sampling"] == "all" and metrics["world_size"] == 1
    assert metrics["config"]["image_size"] == 64 and metrics["checkpoint"] == str(checkpoint.resolve())
    rows = read_per_sample_csv(out / "per_sample.csv")
    assert len(rows) == metrics["num_samples"] > 3  # several questions per image
    assert [r["index"] for r in rows] == list(range(len(rows)))
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names) and all("__q" in n for n in names)
    assert sorted(p.stem for p in (out / "predictions").glob("*.png")) == sorted(names)
    assert len(list((work / "vis").glob("*.png"))) == 4
    # the two reference summary lines and where the files went are logged
    assert f"ciou: {metrics['ciou']:.4f}, giou: {metrics['giou']:.4f}" in log
    assert "IoU Thresholds: @0.5:" in log and str(out / "metrics.json") in log

    # independent recomputation: saved PNGs + the dataset's own letterboxed ground truth
    gt_ds = EarthReasonDataset(data_root, "val", None, image_size=64, question_sampling="all")
    meter = SegmentationMeter()
    for i, r in enumerate(rows):
        pred = torch.from_numpy(read_mask_png(out / "predictions" / f"{r['name']}.png"))
        stats = meter.update(pred[None], gt_ds[i]["masks"][None])
        assert (int(stats.intersection[0, 1]), int(stats.union[0, 1])) == (r["intersection"], r["union"])
    recomputed = meter.compute()
    for key in METRIC_KEYS:
        assert recomputed[key] == metrics[key], key


def test_distributed_matches_single_process(single_run, data_root, checkpoint, tmp_path):
    work, _ = single_run
    _eval_sh(_cli_args(checkpoint, tmp_path / "out", tmp_path / "vis"), {"SEGEARTH_DATA": str(data_root),
                                                                        "NGPUS": "2"}, tmp_path)
    single = json.loads((work / "out" / "metrics.json").read_text())
    multi = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert multi["world_size"] == 2
    for key in METRIC_KEYS:
        assert multi[key] == single[key], key
    assert (tmp_path / "out" / "per_sample.csv").read_bytes() == (work / "out" / "per_sample.csv").read_bytes()
    single_preds = sorted((work / "out" / "predictions").glob("*.png"))
    multi_preds = sorted((tmp_path / "out" / "predictions").glob("*.png"))
    assert [p.name for p in multi_preds] == [p.name for p in single_preds]
    assert all((read_mask_png(a) == read_mask_png(b)).all() for a, b in zip(single_preds, multi_preds))
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == sorted(
        p.name for p in (work / "vis").glob("*.png"))


# --- reference release ------------------------------------------------------------------------------
def test_reference_release_loads_with_mask_config_and_image_size(data_root, tmp_path):
    # the reference hard-codes the description projector (512-d) and the pixel decoder FFN (1024)
    model = tiny_model(seed=2, description_projector={},
                       pixel_decoder=dict(conv_dim=32, mask_dim=32, num_heads=2, num_encoder_layers=1)).eval()
    tokenizer = trained_tokenizer()
    release = export_reference_release(model, tokenizer, tmp_path / "release")
    mask_yaml = write_mask_config_yaml(model.config, tmp_path / "mask.yaml")
    args = ev.parse_args(["--model_path", str(release), "--mask_config", str(mask_yaml), "--image_size", "64",
                          "--base_data_path", str(data_root), "--dataset_type", "RefSegRS", "--data_split", "val",
                          "--version", "llava_phi", "--eval_batch_size", "2", "--dataloader_num_workers", "0",
                          "--output_dir", str(tmp_path / "out"), "--no-save_predictions", "--device", "cpu"])
    result = ev.run(args)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mask_config"] == str(mask_yaml.resolve()) and metrics["image_size"] == 64
    assert not (tmp_path / "out" / "predictions").exists()
    # same numbers as evaluating the in-memory model that was exported
    dataset = RefSegRSDataset(data_root, "val", tokenizer, image_size=64, train=False)
    direct = evaluate_model(model, dataset, tokenizer.pad_token_id, batch_size=3)
    assert direct.metrics == result.metrics
    assert [r["iou"] for r in direct.rows] == [r["iou"] for r in read_per_sample_csv(tmp_path / "out" /
                                                                                          "per_sample.csv")]


# --- errors -----------------------------------------------------------------------------------------
def test_clear_errors(data_root, checkpoint, tmp_path, capsys):
    base = ["--dataset_type", "EarthReason", "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        ev.run(ev.parse_args(["--model_path", str(tmp_path / "nope"), "--data_path", str(data_root), *base]))
    with pytest.raises(DatasetNotFoundError, match="EarthReason"):
        ev.run(ev.parse_args(["--model_path", str(checkpoint), "--data_path", str(tmp_path / "nodata"), *base]))
    with pytest.raises(SystemExit):
        ev.parse_args(["--model_path", str(checkpoint), "--dataset_type", "COCO"])
    assert "invalid choice: 'COCO'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only for reference releases"):
        ev.run(ev.parse_args(["--model_path", str(checkpoint), "--data_path", str(data_root), "--image_size", "128",
                              *base]))


def test_truncated_weights_and_long_questions(data_root, checkpoint, tmp_path, capfd, monkeypatch):
    """A truncated model.safetensors is a one-line error naming the file (exit 1); a question longer than
    the LLM's positions is truncated with a warning naming the sample, and evaluation goes on (with glibc's
    allocator tuned once the model has loaded, runtime.tune_cpu_allocator)."""
    import shutil

    from segearthr1 import runtime

    tuned = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator_for", lambda device, what: tuned.append((str(device), what)))

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    base = ["--dataset_type", "EarthReason", "--data_path", str(data_root), "--data_split", "val", "--device", "cpu",
            "--num_workers", "0", "--batch_size", "2"]
    assert ev.main(["--model_path", str(broken), "--output_dir", str(tmp_path / "out1"), *base]) == 1
    err = capfd.readouterr().err
    assert "CheckpointCorruptedError" in err and "model.safetensors is truncated" in err and "Traceback" not in err
    assert tuned == []  # the weights never loaded

    long_data = tmp_path / "longdata"
    shutil.copytree(data_root, long_data)
    qa_dir = long_data / "rs_reason_seg" / "RSReasonSeg" / "val" / "QAs"
    qa_file = sorted(qa_dir.glob("*.json"))[0]
    qa = json.loads(qa_file.read_text())
    qa["questions"] = ["where is the red square " * 300]
    qa_file.write_text(json.dumps(qa))
    base[base.index("--data_path") + 1] = str(long_data)
    assert ev.main(["--model_path", str(checkpoint), "--output_dir", str(tmp_path / "out2"), *base]) == 0
    assert tuned == [("cpu", "evaluation")]
    warnings = [line for line in capfd.readouterr().err.splitlines() if "WARNING" in line and qa_file.stem in line]
    assert any("truncat" in line for line in warnings), warnings


# --- a run config's eval:/data: sections --------------------------------------------------------------
def test_run_config_eval_section_gives_the_defaults(tmp_path):
    """configs/tiny.yaml's eval: {batch_size: 8, num_vis: 8} and data: section fill the flags left out;
    flags given on the command line win; without --config the old defaults hold."""
    from segearthr1.config_io import dump_yaml
    from segearthr1.training.args import resolve_run_config

    args = ev.parse_args(["--model_path", "m", "--config", str(REPO / "configs" / "tiny.yaml")])
    assert (args.batch_size, args.num_vis) == (8, 8)
    assert (args.dataset_type, args.data_split, args.question_sampling) == ("EarthReason", "val", "random")
    explicit = ev.parse_args(["--model_path", "m", "--config", str(REPO / "configs" / "tiny.yaml"),
                              "--batch_size", "2", "--num_vis", "0", "--question_sampling", "first",
                              "--dataset_type", "rrsisd", "--data_split", "test"])
    assert (explicit.batch_size, explicit.num_vis, explicit.question_sampling) == (2, 0, "first")
    assert (explicit.dataset_type, explicit.data_split) == ("RRSIS-D", "test")
    plain = ev.parse_args(["--model_path", "m"])
    assert (plain.batch_size, plain.num_vis, plain.dataset_type, plain.data_split) == (1, 20, "RRSIS-D", "val")
    assert plain.question_sampling == "first" and plain.data_path is None

    # the resolved_config.yaml a training run saves works the same way; eval.split wins over data.eval_split
    config, _ = resolve_run_config(REPO / "configs" / "tiny.yaml", ["eval.split=test", "eval.batch_size=3"])
    saved = tmp_path / "resolved_config.yaml"
    saved.write_text(dump_yaml(config), encoding="utf-8")
    args = ev.parse_args(["--model_path", "m", "--config", str(saved)])
    assert (args.batch_size, args.num_vis, args.data_split) == (3, 8, "test")
    with pytest.raises(ValueError, match="eval.batch_sise"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\neval: {{batch_sise: 4}}\n", encoding="utf-8")
        ev.parse_args(["--model_path", "m", "--config", str(bad)])


def test_run_config_values_reach_the_evaluation(data_root, checkpoint, tmp_path, monkeypatch):
    """End to end: the batch size and overlay count of configs/tiny.yaml's eval: section are what the
    evaluation loop is called with, and the run config is named in metrics.json."""
    from segearthr1.evaluation import run as run_module

    seen = {}

    def recording(*a, **kw):
        seen.update(kw)
        return evaluate_model(*a, **kw)

    monkeypatch.setattr(run_module, "evaluate_model", recording)
    out, vis = tmp_path / "out", tmp_path / "vis"
    code = ev.main(["--model_path", str(checkpoint), "--config", str(REPO / "configs" / "tiny.yaml"),
                    "--data_path", str(data_root), "--output_dir", str(out), "--vis_path", str(vis),
                    "--num_workers", "0", "--device", "cpu", "--no-report", "--bootstrap_resamples", "0"])
    assert code == 0
    assert seen["batch_size"] == 8 and seen["num_vis"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "EarthReason" and metrics["question_sampling"] == "random"
    assert metrics["run_config"] == str((REPO / "configs" / "tiny.yaml").resolve())
    assert len(list(vis.glob("*.png"))) == metrics["num_samples"] == 3  # num_vis 8 > 3 samples: all of them
