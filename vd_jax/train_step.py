"""VD's optimizer, train state and the one jitted train step (the loss: `objective`).

With `flow_mode='all'` (VD's Algorithm 1, vd_original.md §7) every flow's loss is taken on
the batch in each step and their gradients are summed into one update; with
`flow_mode='sample'` the host draws one flow per step (by weight) and calls that flow's
compiled step.

The state is a plain dict (orbax saves and restores it as-is):
`{'step': int32[], 'params', 'opt_state', 'ema_params', 'rng': uint32[2]}`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vd_jax import objective
from vd_jax.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vd_jax.models import unet
from vd_jax.models.clip import CLIPTextEncoder, CLIPVisionEncoder
from vd_jax.models.text_blocks import FCResBlock, TextResample
from vd_jax.models.vae import AutoencoderKL, encode_images
from vd_jax.nn.layers import Downsample2D, ResnetBlock2D, SpatialTransformer, Upsample2D

State = dict[str, Any]


def param_parts(flows: Sequence[str]) -> tuple[str, ...]:
    """The diffuser parts (unet.ALL_PARTS names) the flows train."""
    parts: list[str] = []
    for f in flows:
        parts += unet.flow_parts(*objective.FLOWS[f])
    return unet.normalize_parts(parts)


def diffuser_config(config) -> unet.DiffuserConfig:
    kw = dict(config.model)
    for k in ("channel_mult", "attention_levels"):
        kw[k] = tuple(kw[k])
    return unet.DiffuserConfig(**kw)


# --------------------------------------------------------------------------- param groups


def labels(params: Any, config) -> Any:
    """The optimizer label of every param: its group, or 'frozen'."""

    def one(path, _):
        label = objective.group_label(path, config.lr_scales)
        return "frozen" if objective.is_frozen(label, config) else label

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
      tx: from `make_optimizer`.
      encode: `(frozen, batch, rng, needed) -> (inputs, uncond)`: the frozen encoders
        (`FrozenEncoders.encode`), outside the gradient, turning the batch into latents and
        contexts.
      batch_shards: how many devices the batch is split over (the merged rows' layout of
        fused flows, `total_loss`).

    Returns:
      The step to jit; `flow=None` is Algorithm 1 (all flows), a flow name trains that one.
    """
    all_flows = objective.trained_flows(config)
    lr = lr_schedule(config)
    accum = int(config.optim.grad_accum_steps)
    interceptor = remat_interceptor(config.remat)

    def loss_fn(params, frozen, batch, rng, flows):
        needed = objective.needed_inputs(flows)
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
            updates = _only_parts(updates, unet.flow_parts(*objective.FLOWS[flow]))
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
    flows = objective.trained_flows(config)
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
