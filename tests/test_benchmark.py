"""`segearthr1 benchmark`: runs on the tiny config, its per-stage parts add up, its FLOPs are the real count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model_utils import make_batch, tiny_model
from segearthr1.benchmark import Step, main as benchmark_main
from segearthr1.perf import STAGES, StageTimer

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["train", "predict"])
def test_benchmark_tiny_config_json(tmp_path, mode, capsys):
    out = tmp_path / "bench.json"
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--mode", mode, "--steps", "2", "--warmup", "0",
            "--batch_size", "2", "--threads", "1", "--output", str(out)]
    if mode == "train":
        args += ["--optimizer", "adamw"]
    assert benchmark_main(args) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == mode and len(result["step_s"]["all"]) == 2
    parts = sum(v for phase in result["stages_s"].values() for v in phase.values())
    assert parts == pytest.approx(result["stages_step_s"], rel=1e-6)  # parts add up to the step, by construction
    inside = parts - result["stages_s"]["other"]["other"]
    assert inside >= 0.9 * result["stages_step_s"]  # the stages cover >= 90 % of the step
    assert set(result["stages_s"]["forward"]) <= set(STAGES)
    assert result["flops_per_sample"] > 0 and result["mfu"] is None  # no peak on CPU
    assert result["parameters"]["total"] == result["parameters"]["trainable"] + result["parameters"]["frozen"]
    assert result["memory"]["gb"] > 0
    kernel = result["kernel"]  # what the OS cost per step: page faults and system CPU time
    assert kernel["page_faults_per_step"] >= 0 and kernel["system_cpu_s_per_step"] >= 0
    table = capsys.readouterr().out
    assert "vision_encoder" in table and "FLOPs/sample" in table
    assert "page faults" in table and "left alone" in table  # the pytest process keeps glibc's defaults (conftest)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_benchmark_bf16_on_reference_cpu_kernels(tmp_path, capsys, monkeypatch):
    """bf16 where PyTorch would use its reference CPU kernels (oneDNN off: the AVX2-only path): the step runs
    its products in fp32 (said in the JSON and the table) and counts the same FLOPs as fp32."""
    monkeypatch.delenv("SEGEARTHR1_CPU_LOWP_PRODUCTS", raising=False)
    results = {}
    for dtype in ("bf16", "fp32"):
        out = tmp_path / f"{dtype}.json"
        with torch.backends.mkldnn.flags(enabled=False):
            assert benchmark_main(["--config", str(REPO / "configs" / "tiny.yaml"), "--mode", "train", "--steps", "1",
                                   "--warmup", "0", "--batch_size", "2", "--threads", "1", "--dtype", dtype,
                                   "--output", str(out)]) == 0
        results[dtype] = json.loads(out.read_text())
    assert results["bf16"]["cpu_products_in_fp32"] is True and results["fp32"]["cpu_products_in_fp32"] is False
    assert "matrix products, convolutions and the attention backward in fp32" in capsys.readouterr().out
    assert results["bf16"]["flops_per_step"] == results["fp32"]["flops_per_step"]


def test_stage_flops_add_up_to_an_independent_count():
    """Per-stage FLOPs of a train step sum to what a plain FlopCounterMode counts for the same step."""
    model = tiny_model(image_size=64)
    model.point_sampler = lambda logits: torch.rand(logits.shape[0], 32, 2, generator=torch.Generator().manual_seed(0))
    batch = make_batch("reason_seg", batch_size=2, image_size=64)
    plain = FlopCounterMode(display=False)
    with plain:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    timer = StageTimer("cpu", flop_counter=counter)
    model.stage_observer = timer
    with counter:
        Step(model, batch, "train", optimizer=None)(timer)
    model.stage_observer = None
    split = timer.step_summary()
    total = sum(v for phase in split.values() for v in phase.values())
    assert total == plain.get_total_flops()
    assert split["forward"]["vision_encoder"] > 0 and split["backward"]["pixel_decoder"] > 0
    # backward of a matmul costs twice its forward: the LLM's backward FLOPs are ~2x its forward
    assert 1.5 < split["backward"]["llm"] / split["forward"]["llm"] < 2.5


def test_observer_does_not_change_outputs_or_gradients():
    model = tiny_model(image_size=64)
    model.point_sampler = lambda logits: torch.rand(logits.shape[0], 32, 2, generator=torch.Generator().manual_seed(0))
    batch = make_batch("reason_seg", batch_size=2, image_size=64)
    torch.manual_seed(1)
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.stage_observer = StageTimer("cpu")
    torch.manual_seed(1)
    out = model(**batch)
    out.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    for n, p in model.named_parameters():
        if n in ref_grads:
            assert torch.equal(p.grad, ref_grads[n]), n


def test_benchmark_cli_entry_point_and_bad_device():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "segearthr1.cli", "benchmark", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--peak_tflops" in proc.stdout and "--optimizer" in proc.stdout
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "segearthr1.cli", "benchmark", "--config", "configs/tiny.yaml",
                               "--device", "cuda"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "CUDA is not available" in proc.stderr


def test_deform_attn_core_benchmark_tool(tmp_path, capsys):
    """tools/bench_deform_attn.py times every core on the device and reports their agreement."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import bench_deform_attn
    finally:
        sys.path.pop(0)
    out = tmp_path / "cores.json"
    assert bench_deform_attn.main(["--image_size", "64", "--repeats", "1", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["cores"]) == {"pytorch", "gather"}
    for row in result["cores"].values():
        assert row["forward_s"] > 0 and row["forward_backward_s"] > 0
    assert result["cores"]["gather"]["max_abs_diff_output"] < 1e-5
    assert "gather" in capsys.readouterr().out
