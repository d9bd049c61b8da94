"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train like
one process with 8 devices on the same 4x2 mesh."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import tiny
from vd_jax.train.loop import train_and_evaluate
from vd_jax.train.metrics import MetricsWriter

REPO = Path(__file__).resolve().parents[1]
FLOWS = "text_to_image+image_to_text"
TINY_ARG = f"flows={FLOWS},levels=1"  # the trainer under test, not the model: one level
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsWriter.read_jsonl(f"{workdir}/metrics.jsonl")}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "jit_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    env.pop("XLA_FLAGS", None)
    port, multi = _free_port(), tmp_path / "multi"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests/train_worker.py"),
                str(port),
                str(i),
                str(multi),
                str(STEPS),
                TINY_ARG,
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    # The single-process reference runs meanwhile (8 devices, same mesh and config).
    c = tiny.get_config(TINY_ARG)
    c.num_steps, c.mesh_shape, c.checkpoint_every, c.peak_flops = STEPS, "4,2", 1000, 1.0
    c.sample_every = -1
    train_and_evaluate(c, str(tmp_path / "single"))
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out[-3000:]
    one, two = _losses(tmp_path / "single"), _losses(multi)
    assert sorted(two) == list(range(1, STEPS + 1))
    err = max(abs(one[s] - two[s]) / abs(one[s]) for s in one)
    print(f"two-process vs one-process loss rel err {err:.2e}")
    assert err <= 1e-5
    assert (multi / "checkpoints" / str(STEPS)).is_dir()
