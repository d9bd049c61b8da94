"""VD's training objective, optimizer, train state and the one jitted train step.

The objective is VD's Algorithm 1 (vd_original.md §7): each flow (a data type plus one or
two context types) gets the ε-prediction L2 loss on the scaled-linear schedule, weighted
per flow; with `flow_mode='all'` every flow's loss is taken on the batch in each step and
their gradients are summed into one update, with `flow_mode='sample'` the host draws one
flow per step (by weight) and calls that flow's compiled step. Per-flow, per-group gradient
scales (the paper's Table 1) are identity ops in the forward pass that scale the cotangent.

The state is a plain dict (orbax saves and restores it as-is):
`{'step': int32[], 'params', 'opt_state', 'ema_params', 'rng': uint32[2]}`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vd_jax.diffusion.schedules import NoiseSchedule, q_sample
from vd_jax.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vd_jax.models import unet
from vd_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder
from vd_jax.models.text_blocks import FCResBlock, TextResample
from vd_jax.models.vae import AutoencoderKL, encode_images
from vd_jax.nn.layers import Downsample2D, ResnetBlock2D, SpatialTransformer, Upsample2D
from vd_jax.sharding import path_str

# name -> (data type, context types). 'dual_context' is image data under both contexts,
# mixed with `config.dual_ratio` (VD's dual-guided flow).
FLOWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "text_to_image": ("image", ("text",)),
    "image_variation": ("image", ("image",)),
    "image_to_text": ("text", ("image",)),
    "text_variation": ("text", ("text",)),
    "dual_context": ("image", ("image", "text")),
}
GROUPS = ("global", "data", "context")

State = dict[str, Any]


def trained_flows(config) -> tuple[str, ...]:
    """The flows of `config.flows`, in FLOWS order; unknown names raise."""
    names = tuple(config.flows.keys())
    bad = [n for n in names if n not in FLOWS]
    if bad or not names:
        raise ValueError(f"unknown flows {bad or names}; choose from {list(FLOWS)}")
    return tuple(n for n in FLOWS if n in names)


def param_parts(flows: Sequence[str]) -> tuple[str, ...]:
    """The diffuser parts (unet.ALL_PARTS names) the flows train."""
    parts: list[str] = []
    for f in flows:
        parts += unet.flow_parts(*FLOWS[f])
    return unet.normalize_parts(parts)


def diffuser_config(config) -> unet.DiffuserConfig:
    kw = dict(config.model)
    for k in ("channel_mult", "attention_levels"):
        kw[k] = tuple(kw[k])
    return unet.DiffuserConfig(**kw)


# --------------------------------------------------------------------------- param groups


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


def labels(params: Any, config) -> Any:
    """The optimizer label of every param: its group, or 'frozen'."""

    def one(path, _):
        label = group_label(path, config.lr_scales)
        return "frozen" if is_frozen(label, config) else label

    return jax.tree_util.tree_map_with_path(one, params)


# --------------------------------------------------------------------------- optimizer


def lr_schedule(config) -> optax.Schedule:
    """Linear warmup to `optim.lr`, then cosine decay to `lr * end_lr_factor` or constant."""
    o = config.optim
    warmup = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
    if o.schedule == "cosine":
        decay_steps = max(config.num_steps - o.warmup_steps, 1)
        rest = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.end_lr_factor)
    elif o.schedule == "constant":
        rest = optax.constant_schedule(o.lr)
    else:
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")
    return optax.join_schedules([warmup, rest], [o.warmup_steps])


def scale_by_group_lr(schedule: optax.Schedule, scales: Any) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate` with a constant factor per leaf: -(schedule(t) * s) * u.

    The step size is rounded as a per-group AdamW's (`lr = schedule * s`) is, so that the
    updates are those of one optax AdamW per group.
    """

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        lr = schedule(state.count)
        step = lambda u, s: jnp.asarray(-(lr * s), u.dtype) * u
        count = optax.safe_increment(state.count)
        return jax.tree_util.tree_map(step, updates, scales), optax.ScaleByScheduleState(count)

    return optax.GradientTransformation(init, update)


def make_optimizer(config, params: Any) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with each group's LR scale; frozen groups get no state.

    Weight decay skips vectors (biases, norm scales), as is usual for diffusion U-Nets.
    One Adam serves every group and each leaf's step size carries its group's scale: the
    arithmetic of `optax.multi_transform`'s per-group AdamWs (Adam's moments and the
    decoupled decay are per element; the demo's losses are bit-identical, elsewhere XLA may
    round 1 ulp apart). multi_transform keeps one masked copy of the whole tree per group,
    thousands of placeholder nodes that every step flattens and rebuilds: the demo's
    four-flow step took 260-273 ms with it, 226-236 ms without (2-core CPU, run in turns).
    """
    o = config.optim
    tree_labels = labels(params, config)

    def scale_of(label: str) -> float:
        if label == "frozen":
            return 0.0
        return float(config.lr_scales.get(label, config.lr_scales.get(label.split("_")[0], 1.0)))

    scales = jax.tree_util.tree_map(scale_of, tree_labels)
    decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)
    adam = optax.chain(
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
    )
    trainable = jax.tree_util.tree_map(lambda s: s != 0.0, scales)
    if not all(jax.tree_util.tree_leaves(trainable)):
        # Frozen leaves keep no moments; their zero (stop_gradient) gradients pass the mask
        # and get a step size of 0.
        adam = optax.masked(adam, trainable)
    chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    return optax.chain(*chain, adam, scale_by_group_lr(lr_schedule(config), scales))


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


def needed_inputs(flows: Sequence[str]) -> set[str]:
    """Batch entries the flows read: 'image_latent', 'text_latent', '*_context'."""
    need: set[str] = set()
    for f in flows:
        xtype, ctypes = FLOWS[f]
        need.add(f"{xtype}_latent")
        need.update(f"{c}_context" for c in ctypes)
    return need


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
    xtype, ctypes = FLOWS[flow]
    x0 = inputs[f"{xtype}_latent"].astype(jnp.float32)
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    alphas = jnp.asarray(NoiseSchedule().alphas_cumprod(), jnp.float32)
    t = jax.random.randint(k_t, (b,), 0, alphas.shape[0])
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    xt = q_sample(x0, noise, alphas[t])
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
    kw = dict(xtype=xtype, ctypes=ctypes, ratios=ratios)
    eps = model.apply({"params": params}, xt, t, contexts, **kw)
    err = jnp.square(eps.astype(jnp.float32) - target).reshape(b, -1).mean(axis=1)
    return err.mean()


def _flow_params(params: Any, flow: str, config) -> Any:
    """Params with this flow's gradient scales and frozen groups' stop_gradient applied."""
    scales = config.flows[flow].get("grad_scales", {}) or {}

    def one(path, x):
        label = group_label(path, config.lr_scales)
        if is_frozen(label, config):
            return jax.lax.stop_gradient(x)
        s = scales.get(label, scales.get(label.split("_")[0], 1.0))
        return x if s == 1.0 else scale_grad(x, float(s))

    return jax.tree_util.tree_map_with_path(one, params)


def example_stride(config, flow: str) -> int:
    """k where the flow trains on every k-th example of a batch (`batch_fraction` = 1/k)."""
    frac = float(config.flows[flow].get("batch_fraction", 1.0))
    k = round(1.0 / frac) if frac > 0 else 0
    if not 0.0 < frac <= 1.0 or abs(k * frac - 1.0) > 1e-6:
        raise ValueError(
            f"flows.{flow}.batch_fraction must be 1/k for a whole k >= 1 (1, 0.5, 0.25, ...), "
            f"got {frac}"
        )
    return k


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


def total_loss(model, params, inputs, uncond, rng, flows, config):
    """Σ_f loss_weight_f · L_f over `flows`; returns (loss, {'loss/<flow>': L_f}).

    A flow with `batch_fraction` 1/k sees every k-th example: a strided slice keeps each
    device's examples on that device when k divides its share of the batch.
    """
    total, per_flow = 0.0, {}
    for f in flows:
        k = example_stride(config, f)
        flow_inputs = inputs if k == 1 else {n: x[::k] for n, x in inputs.items()}
        loss = flow_loss(
            model, _flow_params(params, f, config), flow_inputs, uncond,
            jax.random.fold_in(rng, list(FLOWS).index(f)), f, config,
        )  # fmt: skip
        per_flow[f"loss/{f}"] = loss
        total = total + config.flows[f].loss_weight * loss
    return total, per_flow


# --------------------------------------------------------------------------- state and step


def init_state(config, rng: jax.Array, tx: optax.GradientTransformation) -> State:
    """The initial train state (call under jit with out_shardings to create it sharded)."""
    cfg = diffuser_config(config)
    model = unet.VDDiffuser(cfg)
    parts = param_parts(trained_flows(config))
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
) -> Callable[..., tuple[State, dict]]:
    """The pure step `(state, frozen, batch, *, flow) -> (state, metrics)`.

    Args:
      config: the training config.
      model: the diffuser module (its `dtype` is the compute dtype).
      tx: from `make_optimizer`.
      encode: `(frozen, batch, rng, needed) -> (inputs, uncond)`: the frozen encoders
        (`FrozenEncoders.encode`), outside the gradient, turning the batch into latents and
        contexts.

    Returns:
      The step to jit; `flow=None` is Algorithm 1 (all flows), a flow name trains that one.
    """
    all_flows = trained_flows(config)
    lr = lr_schedule(config)
    accum = int(config.optim.grad_accum_steps)
    interceptor = remat_interceptor(config.remat)

    def loss_fn(params, frozen, batch, rng, flows):
        inputs, uncond = encode(frozen, batch, jax.random.fold_in(rng, 99), needed_inputs(flows))
        if interceptor is None:
            return total_loss(model, params, inputs, uncond, rng, flows, config)
        with nn.intercept_methods(interceptor):
            return total_loss(model, params, inputs, uncond, rng, flows, config)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: State, frozen: Any, batch: dict, *, flow: str | None = None):
        flows = all_flows if flow is None else (flow,)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        if accum == 1:
            (loss, aux), grads = grad_fn(params, frozen, batch, rng, flows)
        else:
            # Microbatch i takes examples i, i+k, ...: every device keeps its own examples.
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
            loss, aux, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, aux, grads))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        if flow is not None:
            # A sampled flow leaves the other parts alone (no weight decay drift).
            updates = _only_parts(updates, unet.flow_parts(*FLOWS[flow]))
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
    flows = trained_flows(config)
    w = np.asarray([config.flows[f].weight for f in flows], np.float64)
    rng = np.random.default_rng([config.seed, step])
    return flows[int(rng.choice(len(flows), p=w / w.sum()))]


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------- frozen encoders

# The batch entries the step takes; anything else (captions, keys) stays on the host.
STEP_INPUTS = ("image_latent", "text_latent", "text_context", "image_context", "image", "text_ids")


@dataclasses.dataclass
class FrozenEncoders:
    """VAE, CLIP towers and text VAE, kept out of the optimizer.

    `params` (arrays only) is the step's separately sharded `frozen` argument; the modules
    are static. Image encodes (VAE latents, CLIP image contexts) and CLIP text contexts run
    inside the jitted step on batches that lack the precomputed entries; sentences become
    text latents on the host through `text_vae.encode` (Optimus, or `FakeTextVAE`).
    """

    params: dict[str, Any]  # 'vae', 'clip_text', 'clip_vision', 'uncond_text', 'uncond_image'
    vae: AutoencoderKL | None = None
    clip_text: CLIPTextEncoder | None = None
    clip_vision: CLIPVisionEncoder | None = None
    tokenizer: Any = None
    text_vae: Any = None  # .encode(list[str]) -> [B, D] numpy; .decode(latents) -> list[str]
    # Keep only the first N image-context tokens when encoding in the step (None: all; 1: the
    # CLS token alone, the demo's setting, see vd_jax/demo/encoders.py).
    image_context_tokens: int | None = None

    def host_prepare(self, batch: dict[str, np.ndarray], needed: set[str]) -> dict:
        """Tokenizes / text-VAE-encodes captions where needed; keeps only the step's inputs."""
        out = {k: np.asarray(v) for k, v in batch.items() if k in STEP_INPUTS}
        captions = batch.get("caption")
        if "text_context" in needed and "text_context" not in out:
            if self.tokenizer is None or captions is None:
                raise ValueError("batch has no 'text_context' and no captions + CLIP to make it")
            out["text_ids"] = self.tokenize(list(captions))
        if "text_latent" in needed and "text_latent" not in out:
            if self.text_vae is None or captions is None:
                raise ValueError("batch has no 'text_latent' and no captions + text VAE")
            out["text_latent"] = np.asarray(self.text_vae.encode(list(captions)), np.float32)
        for k in ("image_latent", "image_context"):
            if k in needed and k not in out and "image" not in out:
                raise ValueError(f"batch has neither {k!r} nor 'image' to encode it from")
        return out

    def tokenize(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True)
        return np.asarray(ids["input_ids"], np.int32)

    def clip_pixels(self, images01: jax.Array) -> jax.Array:
        """[0, 1] images -> CLIP's normalised square input (the images are square crops)."""
        s = self.clip_vision.config.image_size
        x = jax.image.resize(images01, (images01.shape[0], s, s, 3), "bicubic")
        mean, std = jnp.asarray(OPENAI_CLIP_MEAN), jnp.asarray(OPENAI_CLIP_STD)
        return (jnp.clip(x, 0.0, 1.0) - mean) / std

    def encode(self, frozen: dict, batch: dict, rng: jax.Array, needed: set[str]):
        """(inputs, uncond) for the objective; traced inside the step, no gradient."""
        inputs = {}
        for k in needed:
            if k in batch:
                inputs[k] = batch[k]
            elif k == "image_latent":
                inputs[k] = encode_images(self.vae, frozen["vae"], batch["image"], rng)
            elif k == "image_context":
                px = self.clip_pixels(batch["image"])
                ctx = self.clip_vision.apply(
                    {"params": frozen["clip_vision"]}, px, method="context"
                )
                inputs[k] = ctx[:, : self.image_context_tokens]
            elif k == "text_context":
                inputs[k] = self.clip_text.apply(
                    {"params": frozen["clip_text"]}, batch["text_ids"], method="context"
                )
        inputs = jax.lax.stop_gradient(inputs)
        uncond = {"text": frozen["uncond_text"], "image": frozen["uncond_image"]}
        return inputs, jax.lax.stop_gradient(uncond)
