"""DDIM (Song et al. 2021) as pure functions; the whole loop runs inside one jit.

Step for step the same arithmetic as diffusers' `DDIMScheduler` (timestep
spacing, `steps_offset`, `set_alpha_to_one`, clipping, eta), so the same
initial noise gives the same samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vd_jax.diffusion.schedules import NoiseSchedule


class DDIMTables(NamedTuple):
    """Per-step constants, index 0 = the first (noisiest) step."""

    timesteps: jax.Array  # [S] int32
    alpha_t: jax.Array  # [S] alpha_bar at t
    alpha_prev: jax.Array  # [S] alpha_bar at the next (less noisy) timestep


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The descending timesteps diffusers' `DDIMScheduler.set_timesteps` picks."""
    n = schedule.num_train_timesteps
    if not 0 < num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    if schedule.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif schedule.timestep_spacing == "leading":
        ts = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + schedule.steps_offset
    else:  # trailing
        ts = np.round(np.arange(n, 0, -n / num_steps)) - 1
    return ts.astype(np.int64)


def ddim_tables(schedule: NoiseSchedule, num_steps: int) -> DDIMTables:
    """Timesteps and alpha_bar pairs for `num_steps` DDIM steps.

    As diffusers does, the previous timestep is always t - n // num_steps
    (whatever the spacing), and below 0 it is alpha_bar = 1 (set_alpha_to_one)
    or alpha_bar[0].
    """
    ac = schedule.alphas_cumprod().astype(np.float32)
    ts = ddim_timesteps(schedule, num_steps)
    final = np.float32(1.0) if schedule.set_alpha_to_one else ac[0]
    prev = ts - schedule.num_train_timesteps // num_steps
    alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
    return DDIMTables(
        jnp.asarray(ts, jnp.int32),
        jnp.asarray(ac[ts], jnp.float32),
        jnp.asarray(alpha_prev, jnp.float32),
    )


def ddim_step(
    sample: jax.Array,
    model_output: jax.Array,
    alpha_t: jax.Array,
    alpha_prev: jax.Array,
    *,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    eta: float = 0.0,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t -> x_prev. Returns (x_prev, predicted x0)."""
    beta_t = 1.0 - alpha_t
    if prediction_type == "epsilon":
        x0 = (sample - jnp.sqrt(beta_t) * model_output) / jnp.sqrt(alpha_t)
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - jnp.sqrt(alpha_t) * x0) / jnp.sqrt(beta_t)
    elif prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_t) * sample - jnp.sqrt(beta_t) * model_output
        eps = jnp.sqrt(alpha_t) * model_output + jnp.sqrt(beta_t) * sample
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if clip_sample_range is not None:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev - std**2) * eps
    if eta > 0:
        x_prev = x_prev + std * noise
    return x_prev.astype(sample.dtype), x0


# A host-side progress bar the jitted loop ticks through jax.debug.callback. The
# callback reads this holder at run time, so one compiled loop serves every call.
_progress_bar: list[tqdm] = []


def _tick(_: jax.Array) -> None:
    if _progress_bar:
        _progress_bar[-1].update(1)


@contextlib.contextmanager
def progress(total: int, desc: str = "denoising", disable: bool = False) -> Iterator[None]:
    """Shows a tqdm bar for the loops `sample_loop(..., progress=True)` runs inside it."""
    bar = tqdm(total=total, desc=desc, disable=disable, leave=False)
    _progress_bar.append(bar)
    try:
        yield
    finally:
        _progress_bar.remove(bar)
        bar.close()


def sample_loop(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_init: jax.Array,
    tables: DDIMTables,
    schedule: NoiseSchedule,
    *,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    first_step: int = 0,
    show_progress: bool = False,
) -> jax.Array:
    """Runs DDIM from step `first_step` to the end with `lax.fori_loop` (call under jit).

    Args:
      model_fn: (x_t, t [B]) -> model output (guidance already applied).
      x_init: the starting sample at `tables.timesteps[first_step]`.
      tables: from `ddim_tables`.
      schedule: gives the prediction type and clipping.
      eta: 0 is deterministic DDIM; > 0 adds fresh noise each step from `rng`.
      rng: PRNG key, needed when eta > 0.
      first_step: skip the noisiest steps (SDEdit-style partial denoising).
      show_progress: tick the bar of an enclosing `progress(...)` context each step.

    Returns:
      The final sample.
    """
    if eta > 0 and rng is None:
        raise ValueError("eta > 0 needs an rng")
    clip = schedule.clip_sample_range if schedule.clip_sample else None

    def body(i, x):
        t = jnp.full((x.shape[0],), tables.timesteps[i], jnp.int32)
        out = model_fn(x, t)
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype) if eta > 0 else None
        x, _ = ddim_step(
            x,
            out,
            tables.alpha_t[i],
            tables.alpha_prev[i],
            prediction_type=schedule.prediction_type,
            clip_sample_range=clip,
            eta=eta,
            noise=noise,
        )
        if show_progress:
            jax.debug.callback(_tick, i)
        return x

    return jax.lax.fori_loop(first_step, tables.timesteps.shape[0], body, x_init)


def classifier_free_guidance(eps_uncond: jax.Array, eps_cond: jax.Array, scale: float) -> jax.Array:
    """eps = eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
