"""VD's training objective: the flows, the param groups, each flow's loss, flow fusion.

Each flow (a data type plus one or two context types) gets the ε-prediction L2 loss on the
scaled-linear schedule (docs/original.md §7, Algorithm 1), weighted per flow. Per-flow,
per-group gradient scales (the paper's Table 1) are identity ops in the forward pass that
scale the cotangent. Flows of one data type can share one diffuser pass (`flow_groups`,
`VDDiffuser.call_segments`): the same losses, one pass of the data blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vd_jax import flows as vd_flows
from vd_jax.diffusion.schedules import NoiseSchedule, q_sample
from vd_jax.models import unet
from vd_jax.train.sharding import path_str


def _types(flow: str) -> tuple[str, tuple[str, ...]]:
    """(data type, context types) of a flow (`vd_jax.flows`)."""
    f = vd_flows.get(flow)
    return f.data, f.contexts


def trained_flows(config) -> tuple[str, ...]:
    """The flows of `config.flows`, canonical names in table order; unknown names raise."""
    return vd_flows.check(config.flows.keys(), trainable=True)


# --------------------------------------------------------------------------- param groups

GROUPS = ("global", "data", "context")  # the coarse labels of `group_label`


def group_label(path: Sequence[Any], lr_scales) -> str:
    """'global' / 'data' / 'context', or the finer 'data_image'-style name if configured."""
    keys = path_str(path).split("/")
    top = keys[0]
    fine = f"{top}_{keys[1]}" if top != "global" and len(keys) > 1 else ""
    # A finer key counts only when set (the base config declares them unset, for the CLI).
    if fine and lr_scales.get(fine) is not None:
        return fine
    return top


def _frozen_groups(config) -> set[str]:
    return {g.strip() for g in str(config.freeze).split(",") if g.strip()}


def is_frozen(label: str, config) -> bool:
    frozen = _frozen_groups(config)
    return label in frozen or label.split("_")[0] in frozen


# --------------------------------------------------------------------------- objective


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_grad(x: Any, scale: float) -> Any:
    """Identity whose gradient is multiplied by `scale` (per-flow, per-group gradient scales)."""
    return x


def _scale_fwd(x, scale):
    return x, None


def _scale_bwd(scale, _, g):
    return (jax.tree_util.tree_map(lambda t: t * scale, g),)


scale_grad.defvjp(_scale_fwd, _scale_bwd)


def noise_schedule(config) -> NoiseSchedule:
    """The run's noise schedule: VD's, or the fields `config.schedule` sets (a fine-tune takes
    its source's), predicting `config.prediction_type`."""
    fields = {
        k: tuple(v) if isinstance(v, list) else v for k, v in (config.get("schedule") or {}).items()
    }
    fields["prediction_type"] = config.get("prediction_type", "epsilon")
    return NoiseSchedule(**fields)


def _noised(inputs, uncond, rng, flow: str, config) -> dict[str, Any]:
    """One flow's training inputs: noised latents x_t, timesteps, target, dropped contexts."""
    xtype, ctypes = _types(flow)
    x0 = inputs[f"{xtype}_latent"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    alphas = jnp.asarray(noise_schedule(config).alphas_cumprod(), jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, alphas.shape[0])
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    target = noise
    if config.get("prediction_type", "epsilon") == "v_prediction":
        a = alphas[t].reshape((b,) + (1,) * (x0.ndim - 1))
        target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    contexts = []
    for i, c in enumerate(ctypes):
        ctx = inputs[f"{c}_context"]
        drop = jax.random.bernoulli(jax.random.fold_in(k_drop, i), config.cfg_dropout, (b,))
        contexts.append(jnp.where(drop[:, None, None], uncond[c].astype(ctx.dtype), ctx))
    ratios = None if len(ctypes) == 1 else (config.dual_ratio, 1.0 - config.dual_ratio)
    return dict(xt=q_sample(x0, noise, alphas[t]), t=t, target=target, contexts=contexts,
                ctypes=ctypes, ratios=ratios)  # fmt: skip


def _mse(eps: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over latent elements per example, then over the batch."""
    err = jnp.square(eps.astype(jnp.float32) - target).reshape(target.shape[0], -1).mean(axis=1)
    return err.mean()


def flow_loss(
    model: nn.Module,
    params: Any,
    inputs: dict[str, jax.Array],
    uncond: dict[str, jax.Array],
    rng: jax.Array,
    flow: str,
    config,
) -> jax.Array:
    """ε-prediction L2 of one flow: mean over latent elements per example, then over the batch.

    With `config.prediction_type = 'v_prediction'` the target is v = sqrt(abar) eps -
    sqrt(1 - abar) x0 instead (SD 2's parameterisation; VD's is 'epsilon').

    Contexts are replaced by the unconditional ones per example with probability
    `config.cfg_dropout` (independently per context), so that classifier-free guidance works.
    """
    n = _noised(inputs, uncond, rng, flow, config)
    kw = dict(xtype=_types(flow)[0], ctypes=n["ctypes"], ratios=n["ratios"])
    eps = model.apply({"params": params}, n["xt"], n["t"], n["contexts"], **kw)
    return _mse(eps, n["target"])


def fused_flow_loss(model, params, inputs, uncond, rng, flows, config, shards=1):
    """`flow_loss` of several flows of one data type from one diffuser pass
    (`VDDiffuser.call_segments`): the same per-flow losses, up to float rounding.

    `inputs[f]`, `rng[f]` are each flow's own (as `flow_loss` takes them); `params` already
    carry the flows' gradient treatment (`fused_params`); `shards` is the batch's device
    count. Returns {flow: loss}.
    """
    noised = [_noised(inputs[f], uncond, rng[f], f, config) for f in flows]
    rows = [n["xt"].shape[0] for n in noised]
    segments = [
        (r, n["ctypes"], n["contexts"], n["ratios"]) for r, n in zip(rows, noised, strict=True)
    ]
    xt = unet.merge_segments([n["xt"] for n in noised], shards)
    t = unet.merge_segments([n["t"] for n in noised], shards)
    eps = model.apply(
        {"params": params}, xt, t, segments, xtype=_types(flows[0])[0], shards=shards,
        method=unet.VDDiffuser.call_segments,
    )  # fmt: skip
    eps = unet.split_segments(eps, rows, shards)
    return {f: _mse(e, n["target"]) for f, e, n in zip(flows, eps, noised, strict=True)}


def _treatment(path, flow: str, config) -> float | None:
    """How `flow`'s loss reaches the param at `path`: None if frozen, else its gradient scale."""
    scales = vd_flows.entry(config.flows, flow).get("grad_scales", {}) or {}
    label = group_label(path, config.lr_scales)
    if is_frozen(label, config):
        return None
    return float(scales.get(label, scales.get(label.split("_")[0], 1.0)))


def _flow_params(params: Any, flow: str, config) -> Any:
    """Params with this flow's gradient scales and frozen groups' stop_gradient applied."""

    def one(path, x):
        s = _treatment(path, flow, config)
        if s is None:
            return jax.lax.stop_gradient(x)
        return x if s == 1.0 else scale_grad(x, s)

    return jax.tree_util.tree_map_with_path(one, params)


def flow_groups(flows: Sequence[str], params: Any, config) -> list[tuple[str, ...]]:
    """`flows` in groups that share one pass of the data blocks (`fused_flow_loss`).

    Flows fuse (`config.fuse_flows`, default on) when they have the same data type, one
    context each, of different types (so each segment owns its context blocks' gradient
    treatment), and the same gradient scale / freezing on every param they share (`global`,
    their `data` blocks). Text->image with image variation, image->text with text variation:
    Algorithm 1's four flows run two diffuser passes instead of four. Dual-context stays alone.
    """
    if not config.get("fuse_flows", True):
        return [(f,) for f in flows]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]

    def shared(path, xtype):
        keys = [getattr(k, "key", k) for k in path]
        return keys[0] == "global" or keys[:2] == ["data", xtype]

    def fits(group, flow):
        xtype, ctypes = _types(flow)
        if len(ctypes) != 1 or _types(group[0])[0] != xtype:
            return False
        if any(len(_types(g)[1]) != 1 or _types(g)[1] == ctypes for g in group):
            return False
        return all(
            _treatment(p, flow, config) == _treatment(p, group[0], config)
            for p, _ in leaves
            if shared(p, xtype)
        )

    groups: list[list[str]] = []
    for f in flows:
        for g in groups:
            if fits(g, f):
                g.append(f)
                break
        else:
            groups.append([f])
    return [tuple(g) for g in groups]


def fused_params(params: Any, flows: Sequence[str], config) -> Any:
    """`_flow_params` for a fused group: the shared parts as the first flow's (equal for all,
    `flow_groups` checks), each flow's context blocks as its own."""
    out = _flow_params(params, flows[0], config)
    for f in flows[1:]:
        ctype = _types(f)[1][0]
        own = _flow_params(params, f, config)["context"][ctype]
        out = {**out, "context": {**out["context"], ctype: own}}
    return out


def example_stride(config, flow: str) -> int:
    """k where the flow trains on every k-th example of a batch (`batch_fraction` = 1/k)."""
    frac = float(vd_flows.entry(config.flows, flow).get("batch_fraction", 1.0))
    k = round(1.0 / frac) if frac > 0 else 0
    if not 0.0 < frac <= 1.0 or abs(k * frac - 1.0) > 1e-6:
        raise ValueError(
            f"flows.{flow}.batch_fraction must be 1/k for a whole k >= 1 (1, 0.5, 0.25, ...), "
            f"got {frac}"
        )
    return k


def example_rows(config, flow: str) -> tuple[int, int]:
    """(k, offset): the flow trains on examples offset, offset + k, ... of each batch.

    Flows with the same stride take turns at the offsets (the i-th of them in the flow table's order
    starts at i mod k), so that k flows at 1/k together use every example loaded, instead of
    all training on the same 1/k of the batch.
    """
    k = example_stride(config, flow)
    same = [f for f in trained_flows(config) if example_stride(config, f) == k]
    return k, same.index(flow) % k


def check_batch_fractions(config, per_device: int) -> None:
    """Each device's (micro)batch must split evenly, so that every device trains a flow on
    the same number of its own examples."""
    for f in trained_flows(config):
        k = example_stride(config, f)
        if per_device % k:
            raise ValueError(
                f"flows.{f}.batch_fraction = 1/{k} needs each device's batch ({per_device} "
                f"examples per micro-step) to be divisible by {k}"
            )


def total_loss(model, params, inputs, uncond, rng, flows, config, shards: int = 1):
    """Σ_f loss_weight_f · L_f over `flows`; returns (loss, {'loss/<flow>': L_f}).

    A flow with `batch_fraction` 1/k sees every k-th example from its offset (`example_rows`):
    a strided slice keeps each device's examples on that device when k divides its share of
    the batch. Flows of one data type share a diffuser pass where `flow_groups` allows
    (`shards`: the batch's device count, for the merged rows' layout).
    """
    total, per_flow = 0.0, {}

    def own(f):
        k, offset = example_rows(config, f)
        return inputs if k == 1 else {n: x[offset::k] for n, x in inputs.items()}

    def key(f):
        return jax.random.fold_in(rng, vd_flows.TRAINABLE.index(f))

    losses = {}
    for group in flow_groups(flows, params, config):
        if len(group) == 1:
            f = group[0]
            losses[f] = flow_loss(
                model, _flow_params(params, f, config), own(f), uncond, key(f), f, config
            )
        else:
            losses.update(
                fused_flow_loss(
                    model, fused_params(params, group, config), {f: own(f) for f in group},
                    uncond, {f: key(f) for f in group}, group, config, shards,
                )
            )  # fmt: skip
    for f in flows:
        per_flow[f"loss/{f}"] = losses[f]
        total = total + vd_flows.entry(config.flows, f).loss_weight * losses[f]
    return total, per_flow
