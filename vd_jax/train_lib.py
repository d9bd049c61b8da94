"""The VD training loop: sharded state, orbax auto-resume, SIGTERM, metrics and sample grids.

`train_and_evaluate(config, workdir)` always resumes from the newest complete checkpoint in
`workdir/checkpoints` (params, optimizer state, EMA, step, rng and the data iterator's
position), so rerunning the same command after a crash or preemption continues the same
loss curve. A SIGTERM saves a checkpoint at the current step and returns cleanly.
"""

from __future__ import annotations

import functools
import os
import signal
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from vd_jax import flop_count, init_from, objective, xla_options
from vd_jax import sharding as shd
from vd_jax import train_step as ts
from vd_jax.metrics_writer import MetricsWriter, write_loss_curve
from vd_jax.models import unet
from vd_jax.train_samples import Sampler

# Compile options of programs that run once (inits): XLA's backend optimisation only costs.
_RUN_ONCE = {"xla_backend_optimization_level": 0}


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


# --------------------------------------------------------------------------- encoders, data


class _PipelineTextVAE:
    """Optimus through VDPipeline: the pluggable `text_vae` for pretrained folders."""

    def __init__(self, models):
        from vd_jax.pipelines import VDPipeline

        self.pipe = VDPipeline(models)

    def encode(self, texts):
        return np.asarray(self.pipe.encode_text_latents(texts), np.float32)

    def decode(self, latents):
        return self.pipe.decode_text_latents(latents)


def _init_once(init, *args):
    """A module's params from one jitted `init` compiled without XLA's backend optimisation:
    a program run once gains nothing from it (tiny VAE: 3.7 s to compile instead of 10.7 s)."""
    return jax.jit(init).lower(*args).compile(_RUN_ONCE)(*args)


def build_encoders(config, flows: tuple[str, ...], rng: jax.Array) -> ts.FrozenEncoders:
    """The frozen VAE / CLIP / text VAE the flows need, random (tests) or pretrained."""
    from vd_jax.models.clip import (
        CLIPTextConfig,
        CLIPTextEncoder,
        CLIPVisionConfig,
        CLIPVisionEncoder,
    )
    from vd_jax.models.vae import AutoencoderKL, VAEConfig

    e, cdim = config.encoders, config.model.context_dim
    image_data = any(objective.FLOWS[f][0] == "image" for f in flows)
    text_data = any(objective.FLOWS[f][0] == "text" for f in flows)
    enc = ts.FrozenEncoders(params={})
    k_vae, k_text, k_vis = jax.random.split(rng, 3)
    if e.source == "pretrained":
        m = init_from.pytorch_models(e.folder, tuple(flows))
        enc.vae, enc.params["vae"] = AutoencoderKL(m.vae_config), m.vae_params
        if m.text_config is not None:
            enc.clip_text, enc.tokenizer = CLIPTextEncoder(m.text_config), m.tokenizer
            enc.params["clip_text"] = m.text_params
        if m.vision_config is not None and e.on_the_fly:
            enc.clip_vision = CLIPVisionEncoder(m.vision_config)
            enc.params["clip_vision"] = m.vision_params
        if text_data and e.text_vae == "optimus":
            enc.text_vae = _PipelineTextVAE(m)
    elif e.source == "demo":
        from vd_jax.demo.encoders import frozen_encoders

        return frozen_encoders(e.folder, cdim)[0]
    elif e.source == "random":
        if image_data:
            enc.vae = AutoencoderKL(VAEConfig(**e.vae))
            x = jnp.zeros((1, config.image_size, config.image_size, 3))
            enc.params["vae"] = _init_once(enc.vae.init, k_vae, x)["params"]
        if e.on_the_fly:
            from vd_jax.tokenizers import load_clip_tokenizer, write_clip_tokenizer_files

            enc.tokenizer = load_clip_tokenizer(write_clip_tokenizer_files(tempfile.mkdtemp()))
            enc.clip_text = CLIPTextEncoder(CLIPTextConfig(**e.clip_text))
            ids = jnp.zeros((1, 77), jnp.int32)
            enc.params["clip_text"] = _init_once(enc.clip_text.init, k_text, ids)["params"]
            enc.clip_vision = CLIPVisionEncoder(CLIPVisionConfig(**e.clip_vision))
            s = enc.clip_vision.config.image_size
            px = jnp.zeros((1, s, s, 3))
            enc.params["clip_vision"] = _init_once(enc.clip_vision.init, k_vis, px)["params"]
    else:
        raise ValueError(
            f"encoders.source must be 'pretrained', 'random' or 'demo', got {e.source!r}"
        )
    if text_data and enc.text_vae is None and e.text_vae == "fake":
        from vd_jax.fake_data import FakeTextVAE

        enc.text_vae = FakeTextVAE(config.model.text_dim, seed=config.seed)
    # Unconditional contexts: CLIP("") for text (VD's), zeros for images (the new app's).
    text_len = 77 if e.on_the_fly else e.text_context_len
    image_len = e.image_context_len
    if e.on_the_fly and enc.clip_vision is not None:
        image_len = enc.clip_vision.config.num_patches + 1
    if enc.clip_text is not None:
        ids = jnp.asarray(enc.tokenize([""]))
        ctx = enc.clip_text.apply({"params": enc.params["clip_text"]}, ids, method="context")
        enc.params["uncond_text"] = ctx[:, :text_len].astype(jnp.float32)
    else:
        enc.params["uncond_text"] = jnp.zeros((1, text_len, cdim), jnp.float32)
    enc.params["uncond_image"] = jnp.zeros((1, image_len, cdim), jnp.float32)
    return enc


def make_iterator(config, *, process_index: int, process_count: int):
    """This host's batch iterator: fake data, or the TFDS input pipeline."""
    per_host = config.batch_size // process_count
    if config.data.source == "fake":
        from vd_jax.fake_data import FakeIterator

        e = config.encoders
        return FakeIterator(
            global_batch_size=config.batch_size,
            kind=config.data.get("kind", "latents"),
            num_examples=config.data.get("num_examples", 64),
            latent_size=config.latent_size,
            image_size=config.image_size,
            text_dim=config.model.text_dim,
            context_dim=config.model.context_dim,
            text_context_len=e.text_context_len,
            image_context_len=e.image_context_len,
            seed=config.seed,
            process_index=process_index,
            process_count=process_count,
        )
    from vd_jax import input_pipeline

    return input_pipeline.create_iterator(
        config.data,
        batch_size_per_host=per_host,
        process_index=process_index,
        process_count=process_count,
        seed=config.seed,
        image_size=config.image_size,
    )


# --------------------------------------------------------------------------- trainer setup


class Trainer:
    """Mesh, sharded state, compiled steps and the frozen encoders of one run."""

    def __init__(self, config, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.flows = objective.trained_flows(config)
        self.needed = objective.needed_inputs(self.flows)
        self.mesh = mesh or shd.make_mesh(config.mesh_shape)
        if config.batch_size % self.mesh.size:
            raise ValueError(f"batch {config.batch_size} is not divisible by {self.mesh.size}")
        objective.check_batch_fractions(
            config, config.batch_size // self.mesh.size // int(config.optim.grad_accum_steps)
        )
        self.cpu_convolutions = xla_options.check_cpu_convolutions(
            config.get("cpu_convolutions", "eigen")
        )
        self.dcfg = ts.diffuser_config(config)
        self.model = unet.VDDiffuser(self.dcfg, dtype=jnp.dtype(config.dtype))
        rng = jax.random.key(config.seed)
        self.encoders = build_encoders(config, self.flows, jax.random.fold_in(rng, 7))
        rules, lrules = config.param_rules, config.logical_axis_rules
        self.frozen_sh = shd.tree_shardings(
            self.encoders.params, self.mesh, rules, lrules, config.fsdp_min_size
        )
        self.frozen = jax.device_put(self.encoders.params, self.frozen_sh)
        abstract_params = unet.abstract_params(self.dcfg, ts.param_parts(self.flows))
        self.tx = ts.make_optimizer(config, abstract_params)
        init = functools.partial(ts.init_state, config, tx=self.tx)
        self.abstract_state = jax.eval_shape(init, rng)
        self.state_sh = shd.tree_shardings(
            self.abstract_state, self.mesh, rules, lrules, config.fsdp_min_size
        )
        self.batch_sh = shd.batch_sharding(self.mesh, lrules)
        self.rep = shd.replicated(self.mesh)
        self._init = jax.jit(init, out_shardings=self.state_sh)
        self._rng = rng
        # Devices the batch is split over: fused flows lay their rows out in this many blocks.
        self.batch_shards = self.mesh.size // self.batch_sh.shard_shape((self.mesh.size,))[0]
        self._step_fn = ts.make_train_step(
            config, self.model, self.tx, self.encoders.encode, self.batch_shards
        )
        self._compiled: dict[Any, Any] = {}
        self.flops: dict[Any, float] = {}  # per device and step (device_flops)
        self.compile_s = 0.0  # spent compiling steps, kept out of the examples/s figure

    @property
    def compile_options(self) -> dict:
        """The step's XLA options: the config's optimisation level, CPU convolution kernels."""
        platform = self.mesh.devices.flat[0].platform
        opts = xla_options.compiler_options(self.cpu_convolutions, platform)
        lvl = self.config.get("xla_opt_level", -1)
        return opts if lvl < 0 else {**opts, "xla_backend_optimization_level": lvl}

    def init_state(self) -> dict:
        """A fresh state, created already sharded (params never exist whole on one device)."""
        # Runs once: XLA's backend optimisation would only lengthen the compile.
        state = self._init.lower(self._rng).compile(_RUN_ONCE)(self._rng)
        if self.config.init_from:
            state = self.load_pretrained(state, self.config.init_from)
        return state

    def load_pretrained(self, state: dict, source: str) -> dict:
        """Fresh state with the diffuser parts `source` has put in (vd_jax.init_from)."""
        abstract = self.abstract_state["params"]
        loaded = init_from.load(
            source, abstract, self.state_sh["params"], self.flows,
            prefer_ema=self.config.get("init_from_ema", True),
        )  # fmt: skip
        logging.info("init_from %s: took %s", source, init_from.describe(loaded))
        params = init_from.graft(state["params"], loaded)
        ema = params if self.config.ema_decay > 0 else state["ema_params"]
        # The optimizer state of fresh params is zeros whatever the values: it stays valid.
        return {**state, "params": params, "ema_params": ema}

    def global_batch(self, host_batch: dict) -> dict:
        local = self.encoders.host_prepare(host_batch, self.needed)
        return shd.global_batch(local, self.batch_sh)

    def trace(self, batch: dict, flow: str | None) -> jax.stages.Traced:
        """The step for `flow` traced on this trainer's shardings (`.jaxpr`, `.lower()`)."""
        jitted = jax.jit(
            functools.partial(self._step_fn, flow=flow),
            in_shardings=(self.state_sh, self.frozen_sh, self.batch_sh),
            out_shardings=(self.state_sh, self.rep),
            donate_argnums=0,
        )
        return jitted.trace(self.abstract_state, self.frozen, batch)

    def device_flops(self, traced: jax.stages.Traced) -> float:
        """FLOPs per device of a traced step: the global program's over the mesh's devices
        (the batch splits evenly; FSDP's gathers add no arithmetic)."""
        return flop_count.jaxpr_flops(traced.jaxpr) / self.mesh.size

    def step(self, state: dict, batch: dict, flow: str | None):
        """One optimizer step; compiles (ahead of time, once per flow) on first use."""
        if flow not in self._compiled:
            t0 = time.time()
            traced = self.trace(batch, flow)
            self._compiled[flow] = traced.lower().compile(self.compile_options)
            self.flops[flow] = self.device_flops(traced)
            self.compile_s += time.time() - t0
            logging.info("compiled step flow=%s in %.1fs", flow, time.time() - t0)
        return self._compiled[flow](state, self.frozen, batch)


def measure_peak_flops(n: int | None = None, reps: int = 10, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s on one device: the 'peak' of the MFU estimate.

    In `dtype` on accelerators (the compute dtype's matrix units), float32 on CPU, which has
    no bf16 matrix units (XLA emulates them). `n` defaults to 8192 on accelerators (enough
    to fill an H100-class GPU) and 1024 on CPU. Random operands: zeros multiply faster.
    """
    dev = jax.devices()[0]
    accel = dev.platform != "cpu"
    n = n or (8192 if accel else 1024)
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype if accel else "float32"))
    x = jax.device_put(x, dev)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):  # queued back to back: the host's dispatch stays out of the time
        y = f(x)
    y.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint_every,
        max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=config.async_checkpointing,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def _save(mngr, step: int, state: dict, data_state: Any, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    with jax.transfer_guard("allow"):  # orbax copies device -> host its own way
        return mngr.save(step, args=args, force=force)


def restore(mngr, trainer: Trainer, step: int) -> tuple[dict, Any]:
    """The state at `step`, restored straight into its shardings, and the iterator state."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        trainer.abstract_state,
        trainer.state_sh,
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    try:
        out = mngr.restore(step, args=args)
    except ValueError as e:
        if "tree structures do not match" not in str(e):
            raise
        # e.g. flows or model sizes changed, or a run from before the optimizer state lost
        # its per-group copies (2026-11-30): the params can still be carried over.
        found = str(e).split("If this mismatch")[0].strip()
        raise ValueError(
            f"the checkpoint of step {step} in {mngr.directory} holds another train state "
            f"than this config builds ({found}). Resume it with the config it was written "
            "with, or start a new --workdir from its params with --config.init_from=<that workdir>"
        ) from e
    return out["state"], out["data"]


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (agreed on by all hosts)."""

    def __init__(self):
        self.flag = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        with jax.transfer_guard("allow"):
            return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config, workdir: str, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Trains `config.num_steps` steps in `workdir`, resuming from its newest checkpoint.

    Args:
      config: a config from `configs/` (see configs/vd_four_flow.py for every field).
      workdir: checkpoints, `metrics.jsonl`, TensorBoard events, sample grids and the loss
        curve go here.
      mesh: overrides `config.mesh_shape` (tests).

    Returns:
      {'step': last step, 'state': the final state, 'trainer': the Trainer, 'preempted': bool}.
    """
    maybe_initialize_distributed(config)
    if config.get("compilation_cache_dir", ""):
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    pid, nproc = jax.process_index(), jax.process_count()
    trainer = Trainer(config, mesh)
    mngr = checkpoint_manager(config, workdir)
    it = make_iterator(config, process_index=pid, process_count=nproc)
    latest = mngr.latest_step()
    if latest is not None:
        state, data_state = restore(mngr, trainer, latest)
        it.set_state(data_state)
        logging.info("resumed from step %d", latest)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state["step"]))
    n_params = ts.count_params(trainer.abstract_state["params"])
    logging.info("diffuser params: %d, flows %s, mesh %s", n_params, trainer.flows, trainer.mesh)
    writer = MetricsWriter(workdir, enabled=pid == 0, resume_step=start)
    peak = config.peak_flops or (
        measure_peak_flops(dtype=config.dtype) if config.log_every else 0.0
    )
    preempt = _Preemption()
    sampler = None
    if config.sample_every >= 0:
        first = next(make_iterator(config, process_index=0, process_count=1))
        sampler = Sampler(trainer, workdir, writer, first)

    bar = tqdm(total=config.num_steps, initial=start, disable=pid != 0, desc="train")
    t_last, steps_since, preempted = time.perf_counter(), 0, False
    step = start
    # Implicit host<->device copies in the loop are silent slowdowns: the loop moves data
    # only explicitly (make_array_from_process_local_data, device_get of the metrics).
    guard = jax.transfer_guard("disallow")
    guard.__enter__()
    try:
        for step in range(start, config.num_steps):
            flow = ts.sample_flow(config, step)
            batch = trainer.global_batch(next(it))
            compile_before = trainer.compile_s
            state, metrics = trainer.step(state, batch, flow)
            t_last += trainer.compile_s - compile_before
            done = step + 1
            steps_since += 1
            bar.update(1)
            if config.log_every and (done % config.log_every == 0 or done == config.num_steps):
                m = jax.device_get(metrics)
                dt = (time.perf_counter() - t_last) / steps_since
                m["examples_per_sec"] = config.batch_size / dt
                m["step_time_s"] = dt
                flops = trainer.flops.get(flow)
                if flops and peak:
                    m["mfu"] = flops / dt / peak
                writer.write_scalars(done, m)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}")
                t_last, steps_since = time.perf_counter(), 0
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                _save(mngr, done, state, it.get_state(), force=done == config.num_steps)
            if sampler is not None and config.sample_every and done % config.sample_every == 0:
                with jax.transfer_guard("allow"):
                    sampler(state, done)
            if preempt.requested():
                logging.warning("SIGTERM: saving step %d and exiting", done)
                if mngr.latest_step() != done:
                    _save(mngr, done, state, it.get_state(), force=True)
                preempted = True
                step = done
                break
        else:
            step = config.num_steps
    finally:
        guard.__exit__(None, None, None)
        mngr.wait_until_finished()
        bar.close()
        preempt.restore()
    if (
        sampler is not None
        and not preempted
        and (not config.sample_every or step % config.sample_every)
    ):
        sampler(state, step)  # the final grid
    if not preempted and pid == 0:
        write_loss_curve(writer.jsonl_path, os.path.join(workdir, "loss_curve.png"))
    writer.close()
    mngr.close()
    if hasattr(it, "close"):
        it.close()
    return {"step": step, "state": state, "trainer": trainer, "preempted": preempted}
