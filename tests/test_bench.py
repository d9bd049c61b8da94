"""bench/train_speed.py, run as README runs it at a tiny budget: its JSON is complete and
self-consistent (the numbers the README's tables and #4's targets are read from)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_speed_bench_reports_consistent_numbers(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "train_speed.json"
    batch = 2
    cmd = [
        sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--sizes=tiny",
        f"--batch={batch}", "--steps=2", "--cpu_convolutions=eigen", f"--out={out}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout  # the printed vd_jax / PyTorch line

    res = json.loads(out.read_text())
    machine, tiny = res["machine"], res["tiny"]
    assert machine["batch"] == batch and machine["device"] and machine["peak_flops"] > 1e9
    flops, peak = tiny["flops_per_step"], machine["peak_flops"]
    assert tiny["flops_counted_by"] in ("xla_cost_analysis", "jaxpr_matmuls_convs")
    # The tiny U-Net at batch 8 is 1.9 GFLOP per step (README); batch 2 a quarter of it.
    assert 0.3e9 < flops < 0.7e9, flops

    torch_r, jax_r = tiny["torch"], tiny["jax_auto"]
    for r in (torch_r, jax_r):
        assert r["step_s"] > 0 and math.isfinite(r["loss"])
        assert r["examples_per_s"] == pytest.approx(batch / r["step_s"], rel=1e-9)
        assert r["mfu"] == pytest.approx(flops / r["step_s"] / peak, rel=1e-9)
    assert jax_r["jax_over_torch"] == pytest.approx(torch_r["step_s"] / jax_r["step_s"], rel=1e-9)
    assert jax_r["cpu_convolutions"] == "eigen" and jax_r["compile_s"] > 0
    # train.py's logged MFU divides the jaxpr's count; the bench's XLA count skips padded
    # borders (a few % lower, flop_count's docstring): the two must stay that close.
    assert jax_r["trainer_flops_per_step"] == pytest.approx(flops, rel=0.1)
