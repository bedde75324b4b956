"""One-process DeepSpeed jobs skip the engine's identity all-reduce and clip with foreach kernels: the
gradients and weights must stay bit-identical to the untouched engine's (training/lone_process.py).

The engines run in a subprocess: they need a process group, which must not leak into the pytest process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import copy, json, os, sys, socket
import torch
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed
from model_utils import tiny_model, make_batch
from segearthr1.training import lone_process

gas = int(sys.argv[3])

def engine(model, stage, clip):
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

torch.manual_seed(0)
base = tiny_model(seed=0)
clip = float(sys.argv[2])
plain, skipped = engine(copy.deepcopy(base), 0, clip), engine(copy.deepcopy(base), 0, clip)
out = {"skipped": lone_process.skip_identity_collectives(skipped), "grads_equal": [], "weights_equal": [],
       "losses": [], "unused": 0}
probe = copy.deepcopy(base)  # parameters without a gradient: the reduction gives them zeros, AdamW then steps them
probe(**make_batch(batch_size=2, seed=0)).loss.backward()
out["unused"] = sum(p.grad is None for p in probe.parameters() if p.requires_grad)
calls = {id(plain): 0, id(skipped): 0}
for eng in (plain, skipped):
    def counted(*a, _eng=eng, _original=eng.buffered_allreduce_fallback, **k):
        calls[id(_eng)] += 1
        return _original(*a, **k)
    eng.buffered_allreduce_fallback = counted
for step in range(3 * gas):  # 3 optimizer steps
    batch = make_batch(batch_size=2, seed=step)
    grads = []
    for eng in (plain, skipped):
        torch.manual_seed(100 + step)  # the loss samples random points
        eng.train()
        loss = eng(**batch).loss
        eng.backward(loss)
        grads.append([None if p.grad is None else p.grad.clone() for p in eng.module.parameters()])
        eng.step()
    out["losses"].append(float(loss.detach()))
    out["grads_equal"].append(all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                                  for a, b in zip(*grads)))
    out["weights_equal"].append(all(torch.equal(a, b) for a, b in
                                    zip(plain.module.parameters(), skipped.module.parameters())))
out["reductions"] = [calls[id(plain)], calls[id(skipped)]]
out["stage1_reason"] = lone_process.identity_collectives_reason(engine(copy.deepcopy(base), 1, clip))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("clip,gas", [(1e-3, 1), (1e3, 1), (1e-3, 2)])  # clipping on / off; gradient accumulation
def test_one_process_engine_without_identity_collectives_is_bit_identical(clip, gas):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(clip), str(gas)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["skipped"]
    assert out["reductions"] == [3, 0]  # the untouched engine reduced at every accumulation boundary, the other never
    assert out["grads_equal"] == [True] * 3 * gas, out  # after backward (+ reduction), zero-filled where unused
    assert out["weights_equal"] == [True] * 3 * gas, out  # after the clipped optimizer steps
    assert all(v == v for v in out["losses"])
    assert out["unused"] > 0  # so the zero-filling that the reduction does is exercised
    assert "ZeRO stage 1" in out["stage1_reason"]


def test_clip_gradients_foreach_matches_deepspeed_clip_grad_norm():
    import torch
    from deepspeed.runtime import utils as ds_utils

    from segearthr1.training.lone_process import clip_gradients_foreach

    torch.manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 5), (1,)]
    for max_norm in (1e-2, 1.0, 1e4):
        ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape) * 3
            b.grad = a.grad.clone()
        theirs.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped by both
        ours.append(torch.nn.Parameter(torch.zeros(2)))
        norm_ours = clip_gradients_foreach(ours, max_norm)
        norm_theirs = _deepspeed_clip_one_process(ds_utils, theirs, max_norm)
        assert torch.equal(norm_ours.reshape(()), norm_theirs.reshape(()))
        for a, b in zip(ours[:-1], theirs[:-1]):
            assert torch.equal(a.grad, b.grad)


def _deepspeed_clip_one_process(ds_utils, parameters, max_norm):
    """DeepSpeed's clip_grad_norm_ with its one-process all-reduce (a sum of one term) done without a group."""
    import unittest.mock

    with unittest.mock.patch.object(ds_utils.dist, "all_reduce", lambda *a, **k: None), \
            unittest.mock.patch.object(ds_utils.dist, "get_world_size", lambda *a, **k: 1), \
            unittest.mock.patch.object(ds_utils.groups, "_get_data_parallel_group", lambda: None):
        return ds_utils.clip_grad_norm_(parameters, max_norm)


def test_the_one_process_quickstart_launch_skips_them(tmp_path):
    """Through the real launcher and Trainer, as scripts/quickstart.sh runs it (one process, scripts/zero0.json);
    tests/test_train.py checks that a two-process run keeps the reduction."""
    from segearthr1.data.synthetic import generate

    generate(tmp_path / "data", datasets=("EarthReason",), n_train=4, n_val=1, n_test=0, seed=1, min_size=48,
             max_size=64)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(29000 + os.getpid() % 400), "--module",
           "segearthr1.train", "--config", "configs/tiny.yaml"]
    for item in (f"data.data_path={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "model.image_size=64", "train.per_device_train_batch_size=2", "train.save_strategy=no",
                 "train.deepspeed=scripts/zero0.json"):
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "one-process DeepSpeed job: no identity all-reduce" in log
    assert (tmp_path / "run" / "final").is_dir()
