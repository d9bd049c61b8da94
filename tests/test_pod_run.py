"""A pod run that survives, on this CPU: 2 processes x 4 devices (jax.distributed on
127.0.0.1, gloo collectives) train the tiny model on a TFDS dataset built by
`python -m vd_jax.datasets folder`, everything stored in a bucket of a GCS API server on
loopback. Each run is README's command: `python train.py --config=configs/tiny.py:kind=raw ...`.

- SIGTERM to one process: both save the same step and exit 0; then kill -9 of both mid-run;
  each time the same command again: the loss curve equals the uninterrupted run's;
- a 2-process run's checkpoint resumed by 1 process (another mesh): same global step, same
  examples, the same losses up to reduction order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fake_gcs import FakeGCS
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLOWS = "text_to_image+image_to_text"
# The trainer under test, not the model: one U-Net level.
TINY = f"--config=configs/tiny.py:kind=raw,levels=1,flows={FLOWS}"
STEPS = 10
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    """The bucket server, a captioned-images TFDS dataset in the bucket, a shared jit cache."""
    root = tmp_path_factory.mktemp("pod")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"picture {i} of {['red', 'blue'][i % 2]} noise")
    with FakeGCS(root / "gcs") as gcs:
        bucket = gcs.bucket("vd-pod")
        env = {**os.environ, **gcs.env, "PYTHONPATH": str(REPO)}
        env.pop("XLA_FLAGS", None)
        data_dir = f"{bucket}/tfds"
        cmd = [sys.executable, "-m", "vd_jax.datasets", "folder", str(images),
               f"--data_dir={data_dir}", "--name=noise"]  # fmt: skip
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        yield SimpleNamespace(
            gcs=gcs,
            bucket=bucket, env=env, data_dir=data_dir, logs=root / "logs",
            cache=root / "jit_cache",
        )  # fmt: skip


def _launch(pod, name: str, procs: int, steps: int, *extra: str) -> list[subprocess.Popen]:
    """`procs` processes of README's pod command (4 CPU devices each) on gs://.../`name`."""
    pod.logs.mkdir(exist_ok=True)
    port = _free_port()
    env = {**pod.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = []
    for i in range(procs):
        cmd = [
            sys.executable, "train.py", TINY, f"--workdir={pod.bucket}/{name}",
            "--config.data.source=tfds", "--config.data.name=captioned_images/noise",
            f"--config.data.data_dir={pod.data_dir}", f"--config.num_steps={steps}",
            "--config.checkpoint_every=2", "--config.keep_checkpoints=10",
            "--config.sample_every=-1", "--config.peak_flops=1",
            f"--config.mesh_shape={'4,2' if procs == 2 else '2,2'}",
            f"--config.compilation_cache_dir={pod.cache}", *extra,
        ]  # fmt: skip
        if procs > 1:
            cmd += [
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={procs}",
                f"--config.distributed.process_id={i}",
            ]
        log = open(pod.logs / f"{name}_{i}.log", "w")  # noqa: SIM115 - closed with the process
        out.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log))
    return out


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs]


def _log(pod, name: str, i: int) -> str:
    return (pod.logs / f"{name}_{i}.log").read_text()


def _steps(pod, name: str) -> list[int]:
    """The committed checkpoint steps of gs://.../`name` (orbax's commit marker is written
    last on object stores)."""
    names = pod.gcs.names(pod.bucket.removeprefix("gs://"), f"{name}/checkpoints/")
    found = (re.fullmatch(rf"{name}/checkpoints/(\d+)/commit_success.txt", n) for n in names)
    return sorted(int(m.group(1)) for m in found if m)


def _rows(pod, name: str) -> list[dict]:
    from etils import epath

    text = epath.Path(f"{pod.bucket}/{name}/metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _losses(pod, name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(pod, name)}


def _data_position(pod, name: str, step: int) -> int:
    from etils import epath

    path = epath.Path(f"{pod.bucket}/{name}/checkpoints/{step}/data/metadata")
    return json.loads(path.read_text())["position"]


@pytest.fixture(scope="module")
def reference(pod):
    """The uninterrupted 2-process run."""
    rcs = _wait(_launch(pod, "ref", 2, STEPS))
    assert rcs == [0, 0], _log(pod, "ref", 0)[-3000:] + _log(pod, "ref", 1)[-3000:]
    return _losses(pod, "ref")


def _wait_for_checkpoint(pod, name: str, procs, after: int = 0) -> None:
    """Until `name` has a committed checkpoint past step `after` (the processes running)."""
    deadline = time.monotonic() + 600
    while not [s for s in _steps(pod, name) if s > after]:
        alive = all(p.poll() is None for p in procs)
        assert time.monotonic() < deadline and alive, _log(pod, name, 0)[-3000:]
        time.sleep(0.2)


def test_sigterm_then_kill9_then_resume_equals_uninterrupted(pod, reference):
    """One run, stopped twice: SIGTERM to process 1 (both save the same step, exit 0), then
    kill -9 of both after a later checkpoint; each time README's command again. The losses
    of all steps equal the uninterrupted run's."""
    assert sorted(reference) == list(range(1, STEPS + 1))
    for row in _rows(pod, "ref"):  # where each step's time went, over both hosts
        assert 0 < row["data_wait_s"] < row["step_time_s"] and row["device_wait_s"] > 0
        assert row["data_wait_s/slowest_host"] in (0, 1) and row["data/skipped"] == 0

    procs = _launch(pod, "run", 2, 1000)  # stopped long before the end
    _wait_for_checkpoint(pod, "run", procs)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(procs, timeout=300) == [0, 0], _log(pod, "run", 1)[-3000:]
    saved = [re.findall(r"preempted: saving step (\d+)", _log(pod, "run", i)) for i in (0, 1)]
    assert saved[0] and saved[0] == saved[1], saved  # every host saved the same step
    term_step = int(saved[0][0])
    assert max(_steps(pod, "run")) == term_step < STEPS - 2
    assert "[process 1/2]" in _log(pod, "run", 1)  # per-host log prefixes

    procs = _launch(pod, "run", 2, 1000)
    _wait_for_checkpoint(pod, "run", procs, after=term_step)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    killed_at = max(_steps(pod, "run"))
    assert killed_at < STEPS  # a real interruption
    assert f"resumed from step {term_step}" in _log(pod, "run", 0)

    assert _wait(_launch(pod, "run", 2, STEPS)) == [0, 0], _log(pod, "run", 0)[-3000:]
    assert f"resumed from step {killed_at}" in _log(pod, "run", 0)
    resumed = _losses(pod, "run")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    err = max(abs(resumed[s] - reference[s]) for s in reference)
    print(f"SIGTERM at {term_step}, kill -9 after {killed_at}: max |dloss| {err:.1e}")
    assert err <= 1e-6


def test_two_process_checkpoint_resumed_by_one_process(pod, reference):
    from etils import epath

    from vd_jax.convert.load import copy_tree

    copy_tree(*(epath.Path(f"{pod.bucket}/{run}/checkpoints/4") for run in ("ref", "one")))
    assert _wait(_launch(pod, "one", 1, STEPS)) == [0], _log(pod, "one", 0)[-3000:]
    one = _losses(pod, "one")
    assert sorted(one) == list(range(5, STEPS + 1))  # the same global step
    # The same examples: one global data position, 8 examples a step, whatever the hosts.
    assert _data_position(pod, "one", STEPS) == _data_position(pod, "ref", STEPS) == 8 * STEPS
    err = max(abs(one[s] - reference[s]) / abs(reference[s]) for s in one)
    print(f"1 process (2x2 mesh) after 2 processes (4x2): loss rel err {err:.1e}")
    assert err <= 1e-5


def test_weights_folder_from_a_bucket_is_copied_once(pod, tmp_path, monkeypatch):
    """`encoders.folder` / `init_from` given as a URL: a local copy, made whole, reused."""
    from etils import epath

    from vd_jax.convert.load import local_folder

    monkeypatch.setenv("VD_JAX_CACHE", str(tmp_path))
    url = f"{pod.data_dir}/captioned_images/noise"
    local = Path(local_folder(url))
    src = dict(_files(epath.Path(url), ""))
    got = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
           if p.is_file() and p.name != ".complete"}  # fmt: skip
    assert got == src and any(k.endswith("dataset_info.json") for k in got)
    (local / "marker").write_text("kept")
    assert local_folder(url) == str(local) and (local / "marker").exists()  # not copied again


def _files(d, prefix: str):
    """(relative name, bytes) of every file under `d` (gs:// paths have no recursive glob)."""
    for child in d.iterdir():
        name = f"{prefix}{child.name}"
        if child.is_dir():
            yield from _files(child, name + "/")
        else:
            yield name, child.read_bytes()
