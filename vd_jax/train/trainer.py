"""One run's trainer: mesh, sharded train state, the compiled step per flow, frozen encoders.

`Trainer` turns a config into everything a step needs: the diffuser, the optimizer, the state
created already sharded (or grafted from `config.init_from`), the frozen encoders on the mesh
and one ahead-of-time compiled step per flow with explicit in/out shardings and the state
donated. `measure_peak_flops` gives the matmul peak the loop's MFU is measured against.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from vd_jax import flows as vd_flows
from vd_jax import xla_options
from vd_jax.data.encoders import RUN_ONCE, FrozenEncoders, build_encoders
from vd_jax.models import unet
from vd_jax.train import flop_count, init_from, objective, optimizer
from vd_jax.train import sharding as shd
from vd_jax.train import step as ts


class Trainer:
    """Mesh, sharded state, compiled steps and the frozen encoders of one run.

    Args:
      config: the training config.
      mesh: overrides `config.mesh_shape` (tests).
      encoders: the frozen encoders; default `build_encoders` from `config.encoders` (the
        demo passes the ones it trained).
    """

    def __init__(
        self,
        config,
        mesh: jax.sharding.Mesh | None = None,
        encoders: FrozenEncoders | None = None,
    ):
        self.config = config
        self.flows = objective.trained_flows(config)
        self.needed = vd_flows.needed_inputs(self.flows)
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
        self.encoders = encoders or build_encoders(config, self.flows, jax.random.fold_in(rng, 7))
        rules, lrules = config.param_rules, config.logical_axis_rules
        self.frozen_sh = shd.tree_shardings(
            self.encoders.params, self.mesh, rules, lrules, config.fsdp_min_size
        )
        self.frozen = jax.device_put(self.encoders.params, self.frozen_sh)
        abstract_params = unet.abstract_params(self.dcfg, ts.param_parts(self.flows))
        self.tx = optimizer.make_optimizer(config, abstract_params)
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
        state = self._init.lower(self._rng).compile(RUN_ONCE)(self._rng)
        if self.config.init_from:
            state = self.load_pretrained(state, self.config.init_from)
        return state

    def load_pretrained(self, state: dict, source: str) -> dict:
        """Fresh state with the diffuser parts `source` has put in (vd_jax.train.init_from)."""
        abstract = self.abstract_state["params"]
        loaded = init_from.load(
            source, abstract, self.state_sh["params"], self.flows,
            prefer_ema=self.config.get("init_from_ema", True),
        )  # fmt: skip
        logging.info("init_from %s: took %s", source, init_from.describe(loaded))
        params = init_from.graft(state["params"], loaded)
        ema = state["ema_params"]
        if self.config.ema_decay > 0:  # a copy: the step donates both trees, each its buffers
            copy = jax.jit(
                lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=self.state_sh["params"]
            )
            ema = copy(params)
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
            _wait_for_every_host(f"vd_jax_compiled_{flow}")
        return self._compiled[flow](state, self.frozen, batch)


def _wait_for_every_host(name: str, timeout_s: int = 3600) -> None:
    """A coordination-service barrier: hosts that compile at different speeds meet here, not
    in their first collective, whose CPU (gloo) set-up gives up after 30 s."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


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
