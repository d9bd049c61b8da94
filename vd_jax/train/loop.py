"""The VD training loop: sharded state, orbax auto-resume, SIGTERM, metrics and sample grids.

`train_and_evaluate(config, workdir)` always resumes from the newest complete checkpoint in
`workdir/checkpoints` (params, optimizer state, EMA, step, rng and the data iterator's
position), so rerunning the same command after a crash or preemption continues the same
loss curve, on the same or another number of hosts. A SIGTERM to any host makes every host
save the same step and return cleanly. `workdir` may be local or a URL (``gs://bucket/run``).

Every `log_every` steps a metrics row also says where the hosts' time went: `data_wait_s`
(the slowest host's seconds per step spent getting and placing its batch), `device_wait_s`
(the rest of the step) and the input pipelines' skip counts summed over hosts.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from vd_jax.data.encoders import FrozenEncoders
from vd_jax.data.input_pipeline import make_iterator
from vd_jax.train import checkpoints as ckpt
from vd_jax.train import finetune
from vd_jax.train import step as ts
from vd_jax.train.metrics import MetricsWriter, write_loss_curve
from vd_jax.train.samples import Sampler
from vd_jax.train.trainer import Trainer, measure_peak_flops


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize` from `config.distributed` (no-op when not enabled)."""
    d = config.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    # CPU processes exchange collectives over gloo (tests, CPU clusters); accelerators ignore
    # this. (Asking for the backend here would start it before `initialize`, which fails.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if d.coordinator_address:
        kw = dict(
            coordinator_address=d.coordinator_address,
            num_processes=d.num_processes,
            process_id=d.process_id,
        )
    jax.distributed.initialize(**kw)


class _ProcessFormatter(logging.PythonFormatter):
    """absl's log lines, each prefixed with its process: a pod's hosts log side by side."""

    def format(self, record):
        return f"[process {jax.process_index()}/{jax.process_count()}] " + super().format(record)


def _prefix_log_lines() -> None:
    if jax.process_count() > 1:
        logging.get_absl_handler().setFormatter(_ProcessFormatter())


def train_and_evaluate(
    config,
    workdir: str,
    mesh: jax.sharding.Mesh | None = None,
    encoders: FrozenEncoders | None = None,
) -> dict:
    """Trains `config.num_steps` steps in `workdir`, resuming from its newest checkpoint.

    Args:
      config: a config from `configs/` (see configs/vd_four_flow.py for every field).
      workdir: checkpoints, `metrics.jsonl`, TensorBoard events, sample grids and the loss
        curve go here.
      mesh: overrides `config.mesh_shape` (tests).
      encoders: the frozen encoders (default: built from `config.encoders`; the demo passes
        its own).

    Returns:
      {'step': last step, 'state': the final state, 'trainer': the Trainer, 'preempted': bool}.
    """
    maybe_initialize_distributed(config)
    _prefix_log_lines()
    config = finetune.resolve(config)
    if config.get("compilation_cache_dir", ""):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    pid = jax.process_index()
    trainer = Trainer(config, mesh, encoders)
    mngr = ckpt.checkpoint_manager(config, workdir)
    it = make_iterator(config, process_index=pid, process_count=jax.process_count())
    state = _initial_state(trainer, mngr, it)
    start = int(jax.device_get(state["step"]))
    n_params = ts.count_params(trainer.abstract_state["params"])
    logging.info("diffuser params: %d, flows %s, mesh %s", n_params, trainer.flows, trainer.mesh)
    ckpt.write_run_record(config, trainer, workdir)
    workdir = ckpt.workdir_path(workdir)
    writer = MetricsWriter(str(workdir), enabled=pid == 0, resume_step=start)
    if start == 0:
        writer.write_hparams(_flat(config.to_dict()))
    sampler = None
    if config.sample_every >= 0:
        first = next(make_iterator(config, process_index=0, process_count=1))
        sampler = Sampler(trainer, str(workdir), writer, first)
    state, step, preempted = _run_steps(config, trainer, state, start, it, mngr, writer, sampler)
    if (
        sampler is not None
        and not preempted
        and (not config.sample_every or step % config.sample_every)
    ):
        sampler(state, step)  # the final grid
    if not preempted and pid == 0:
        write_loss_curve(writer.jsonl_path, workdir / "loss_curve.png")
    writer.close()
    mngr.close()
    if hasattr(it, "close"):
        it.close()
    return {"step": step, "state": state, "trainer": trainer, "preempted": preempted}


def _initial_state(trainer: Trainer, mngr, it) -> dict:
    """The newest checkpoint's state (and the iterator put back to its position), or a fresh
    one."""
    latest = mngr.latest_step()
    if latest is None:
        return trainer.init_state()
    state, data_state = ckpt.restore(mngr, trainer, latest)
    it.set_state(data_state)
    logging.info("resumed from step %d", latest)
    return state


def _run_steps(config, trainer: Trainer, state: dict, start: int, it, mngr, writer, sampler):
    """Steps from the state's step to `num_steps`: logs, checkpoints, samples, stops on
    SIGTERM. Returns (state, the last step done, whether it was preempted)."""
    log = _StepLog(config, trainer, writer, start, it)
    preempt = ckpt.Preemption(mngr)
    step = start
    # Implicit host<->device copies in the loop are silent slowdowns: the loop moves data
    # only explicitly (make_array_from_process_local_data, device_get of the metrics).
    guard = jax.transfer_guard("disallow")
    guard.__enter__()
    try:
        for step in range(start, config.num_steps):
            flow = ts.sample_flow(config, step)
            t_data = time.perf_counter()
            batch = trainer.global_batch(next(it))
            t_data = time.perf_counter() - t_data
            compile_before = trainer.compile_s
            state, metrics = trainer.step(state, batch, flow)
            done = step + 1
            log.after_step(done, flow, metrics, trainer.compile_s - compile_before, t_data)
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                writer.flush()  # the metrics up to a checkpoint outlive a kill (object stores)
                ckpt.save(mngr, done, state, it.get_state(), force=done == config.num_steps)
            if sampler is not None and config.sample_every and done % config.sample_every == 0:
                with jax.transfer_guard("allow"):
                    sampler(state, done)
            if preempt.reached(done):
                logging.warning("preempted: saving step %d and exiting", done)
                if mngr.latest_step() != done:
                    writer.flush()
                    ckpt.save(mngr, done, state, it.get_state(), force=True)
                return state, done, True
        step = config.num_steps
    finally:
        guard.__exit__(None, None, None)
        mngr.wait_until_finished()
        log.close()
        preempt.restore()
    return state, step, False


class _StepLog:
    """The progress bar, and every `log_every` steps a metrics row: the step's metrics,
    examples/s and step time (compiles excluded), MFU, and where the hosts' time went."""

    def __init__(self, config, trainer: Trainer, writer: MetricsWriter, start: int, it):
        self.config, self.trainer, self.writer, self.it = config, trainer, writer, it
        self.peak = config.peak_flops or (
            measure_peak_flops(dtype=config.dtype) if config.log_every else 0.0
        )
        disable = jax.process_index() != 0
        self.bar = tqdm(total=config.num_steps, initial=start, disable=disable, desc="train")
        self.t_last, self.steps, self.data_s = time.perf_counter(), 0, 0.0

    def after_step(
        self, done: int, flow: str | None, metrics: dict, compile_s: float, data_s: float
    ) -> None:
        c = self.config
        self.t_last += compile_s
        self.steps += 1
        self.data_s += data_s
        self.bar.update(1)
        if not c.log_every or (done % c.log_every and done != c.num_steps):
            return
        m = jax.device_get(metrics)
        dt = (time.perf_counter() - self.t_last) / self.steps
        m["examples_per_sec"] = c.batch_size / dt
        m["step_time_s"] = dt
        m.update(self._hosts(self.data_s / self.steps, dt))
        flops = self.trainer.flops.get(flow)
        if flops and self.peak:
            m["mfu"] = flops / dt / self.peak
        self.writer.write_scalars(done, m)
        self.bar.set_postfix(loss=f"{float(m['loss']):.4f}")
        self.t_last, self.steps, self.data_s = time.perf_counter(), 0, 0.0

    def _hosts(self, data_s: float, dt: float) -> dict:
        """Data wait and input skips over all hosts (one small gather per logged step)."""
        stats = self.it.stats() if hasattr(self.it, "stats") else {}
        skipped = sum(
            v for k, v in stats.items() if k.startswith("skipped_") and k != "skipped_keys"
        )
        mine = np.asarray([data_s, skipped, stats.get("substituted", 0)], np.float64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            with jax.transfer_guard("allow"):
                every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
        else:
            every = mine[None]
        slowest = int(np.argmax(every[:, 0]))
        return {
            "data_wait_s": every[slowest, 0],
            "data_wait_s/slowest_host": slowest,
            "device_wait_s": max(dt - every[slowest, 0], 0.0),
            "data/skipped": every[:, 1].sum(),
            "data/substituted": every[:, 2].sum(),
        }

    def close(self) -> None:
        self.bar.close()


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as {'a.b.c': value} (TensorBoard's hparams are flat)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
