"""The train state and the one jitted train step (loss: `objective`; optimizer: `optimizer`).

With `flow_mode='all'` (VD's Algorithm 1, docs/original.md §7) every flow's loss is taken on
the batch in each step and their gradients are summed into one update; with
`flow_mode='sample'` the host draws one flow per step (by weight) and calls that flow's
compiled step.

The state is a plain dict (orbax saves and restores it as-is):
`{'step': int32[], 'params', 'opt_state', 'ema_params', 'rng': uint32[2]}`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vd_jax import flows as vd_flows
from vd_jax.models import unet
from vd_jax.models.layers import Downsample2D, ResnetBlock2D, SpatialTransformer, Upsample2D
from vd_jax.models.text_blocks import FCResBlock, TextResample
from vd_jax.train import objective, optimizer

State = dict[str, Any]


def param_parts(flows: Sequence[str]) -> tuple[str, ...]:
    """The diffuser parts (unet.ALL_PARTS names) the flows train."""
    return unet.normalize_parts(vd_flows.parts(flows))


def diffuser_config(config) -> unet.DiffuserConfig:
    kw = dict(config.model)
    for k in ("channel_mult", "attention_levels"):
        kw[k] = tuple(kw[k])
    return unet.DiffuserConfig(**kw)


# --------------------------------------------------------------------------- remat

_REMAT_TYPES = {
    "resnet": (ResnetBlock2D,),
    "fc": (FCResBlock,),
    "transformer": (SpatialTransformer,),
    "resample": (Downsample2D, Upsample2D, TextResample),
}
_inside_remat = threading.local()


def _policy(name: str):
    if name in ("full", "nothing_saveable"):
        return None  # save nothing: recompute the whole block in the backward pass
    return getattr(jax.checkpoint_policies, name)


def remat_interceptor(remat_config) -> Callable | None:
    """A Linen method interceptor that wraps chosen block types in `nn.checkpoint`.

    `remat_config` maps 'resnet' / 'fc' / 'transformer' / 'resample' to '' (off), 'full' or
    a `jax.checkpoint_policies` name ('dots_saveable', ...). The diffuser itself stays
    unchanged: the interceptor re-enters the block through the lifted checkpoint, and a
    thread-local flag lets that one inner call through.
    """
    chosen = [
        (types, _policy(remat_config[name]))
        for name, types in _REMAT_TYPES.items()
        if remat_config.get(name, "")
    ]
    if not chosen:
        return None

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        policy = next((p for t, p in chosen if isinstance(context.module, t)), False)
        if policy is False:
            return next_fun(*args, **kwargs)
        if getattr(_inside_remat, "on", False):
            _inside_remat.on = False
            return next_fun(*args, **kwargs)

        def block(mdl, *a):
            _inside_remat.on = True
            return mdl(*a)

        return nn.checkpoint(block, policy=policy, prevent_cse=True)(context.module, *args)

    return interceptor


# --------------------------------------------------------------------------- state and step


def init_state(config, rng: jax.Array, tx: optax.GradientTransformation) -> State:
    """The initial train state (call under jit with out_shardings to create it sharded)."""
    cfg = diffuser_config(config)
    model = unet.VDDiffuser(cfg)
    parts = param_parts(objective.trained_flows(config))
    params = model.init(rng, parts, method=unet.VDDiffuser.init_parts)["params"]
    params = jax.tree_util.tree_map(lambda x: x, dict(params))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema_params": params if config.ema_decay > 0 else {},
        "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
    }


def make_train_step(
    config,
    model: nn.Module,
    tx: optax.GradientTransformation,
    encode: Callable[[Any, dict, jax.Array, set[str]], tuple[dict, dict]],
    batch_shards: int = 1,
) -> Callable[..., tuple[State, dict]]:
    """The pure step `(state, frozen, batch, *, flow) -> (state, metrics)`.

    Args:
      config: the training config.
      model: the diffuser module (its `dtype` is the compute dtype).
      tx: from `optimizer.make_optimizer`.
      encode: `(frozen, batch, rng, needed) -> (inputs, uncond)`: the frozen encoders
        (`FrozenEncoders.encode`), outside the gradient, turning the batch into latents and
        contexts.
      batch_shards: how many devices the batch is split over (the merged rows' layout of
        fused flows, `total_loss`).

    Returns:
      The step to jit; `flow=None` is Algorithm 1 (all flows), a flow name trains that one.
    """
    all_flows = objective.trained_flows(config)
    lr = optimizer.lr_schedule(config)
    accum = int(config.optim.grad_accum_steps)
    interceptor = remat_interceptor(config.remat)

    def loss_fn(params, frozen, batch, rng, flows):
        needed = vd_flows.needed_inputs(flows)
        inputs, uncond = encode(frozen, batch, jax.random.fold_in(rng, 99), needed)
        args = (model, params, inputs, uncond, rng, flows, config, batch_shards)
        if interceptor is None:
            return objective.total_loss(*args)
        with nn.intercept_methods(interceptor):
            return objective.total_loss(*args)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: State, frozen: Any, batch: dict, *, flow: str | None = None):
        flows = all_flows if flow is None else (flow,)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        if accum == 1:
            (loss, aux), grads = grad_fn(params, frozen, batch, rng, flows)
        else:
            loss, aux, grads = _accumulate(grad_fn, accum, params, frozen, batch, rng, flows)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        if flow is not None:
            # A sampled flow leaves the other parts alone (no weight decay drift).
            updates = _only_parts(updates, vd_flows.get(flow).parts)
        params = optax.apply_updates(params, updates)
        ema = state["ema_params"]
        if config.ema_decay > 0:
            d = config.ema_decay
            ema = jax.tree_util.tree_map(lambda e, p: e * d + p * (1 - d), ema, params)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "ema_params": ema,
            "rng": state["rng"],
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr(state["step"]), **aux}
        return new_state, metrics

    return step


def _accumulate(grad_fn, accum: int, params, frozen, batch: dict, rng: jax.Array, flows):
    """Mean loss, metrics and gradients over `accum` microbatches, scanned (one compiled body).

    Microbatch i takes examples i, i+k, ...: every device keeps its own examples.
    """
    micro = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
        batch,
    )

    def body(carry, xs):
        i, mb = xs
        (l_, a_), g_ = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i), flows)
        return jax.tree_util.tree_map(jnp.add, carry, (l_, a_, g_)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    init = (jnp.zeros(()), {f"loss/{f}": jnp.zeros(()) for f in flows}, zeros)
    (loss, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
    return jax.tree_util.tree_map(lambda x: x / accum, (loss, aux, grads))


def _only_parts(updates: dict, used: Sequence[str]) -> dict:
    """Zeroes the updates of the diffuser parts ('data/text', ...) not in `used`."""
    zero = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
    out = {}
    for top, sub in updates.items():
        if top == "global":
            out[top] = sub if "global" in used else zero(sub)
        else:
            out[top] = {t: v if f"{top}/{t}" in used else zero(v) for t, v in sub.items()}
    return out


def sample_flow(config, step: int) -> str | None:
    """The flow step `step` trains: None (all) in 'all' mode, else drawn by weight from
    (seed, step), so every host and every resumed run draws the same."""
    if config.flow_mode == "all":
        return None
    if config.flow_mode != "sample":
        raise ValueError(f"flow_mode must be 'all' or 'sample', got {config.flow_mode!r}")
    flows = objective.trained_flows(config)
    w = np.asarray([vd_flows.entry(config.flows, f).weight for f in flows], np.float64)
    rng = np.random.default_rng([config.seed, step])
    return flows[int(rng.choice(len(flows), p=w / w.sum()))]


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
