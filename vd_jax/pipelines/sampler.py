"""The sampling program: VD's DDIM loop with classifier-free guidance, compiled as one jit.

`VDPipeline` prepares contexts and calls what `make_sampler` builds; the loop itself
(`vd_jax.diffusion.ddim.sample_loop`) is pure diffusion math over a model function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax import xla_options
from vd_jax.diffusion import ddim
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.unet import VDDiffuser
from vd_jax.models.vae import AutoencoderKL, decode_latents


def initial_noise(shape: tuple, xtype: str, seed: int, init_noise, dtype: Any) -> jax.Array:
    """x_T: the given noise (PyTorch layout, checked and moved to NHWC) or drawn by seed."""
    if init_noise is None:
        return jax.random.normal(jax.random.key(seed), shape, dtype)
    noise = np.asarray(init_noise, np.float32)
    torch_shape = (shape[0], shape[3], shape[1], shape[2]) if xtype == "image" else shape
    if noise.shape != torch_shape:
        raise ValueError(f"init_noise has shape {noise.shape}; expected {torch_shape}")
    noise = noise.transpose(0, 2, 3, 1) if xtype == "image" else noise
    return jnp.asarray(noise, dtype)


def make_sampler(
    diffuser: VDDiffuser,
    vae: AutoencoderKL,
    schedule: NoiseSchedule,
    xtype: str,
    ctypes: tuple[str, ...],
    guided: bool,
    eta: float,
    first_step: int,
    show_progress: bool,
):
    """The jitted `(params, cond, uncond, ratios, x_init, tables, scale, rng) -> (images,
    latents)`: every DDIM step in one `lax.fori_loop`, classifier-free guidance as one batch
    of [uncond; cond], and the VAE decode of image latents, all in one program."""

    def run(params, cond, uncond, ratios, x_init, tables, scale, rng):
        def model_fn(x, t):
            call = lambda x, t, ctx: diffuser.apply(
                {"params": params["diffuser"]},
                x,
                t,
                ctx,
                xtype=xtype,
                ctypes=ctypes,
                ratios=ratios,
            )
            if not guided:
                return call(x, t, cond)
            both = [jnp.concatenate([u, c]) for u, c in zip(uncond, cond, strict=True)]
            eps_u, eps_c = jnp.split(
                call(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2
            )
            return ddim.classifier_free_guidance(eps_u, eps_c, scale)

        latents = ddim.sample_loop(
            model_fn,
            x_init,
            tables,
            schedule,
            eta=eta,
            rng=rng,
            first_step=first_step,
            show_progress=show_progress,
        )
        images = decode_latents(vae, params["vae"], latents) if xtype == "image" else None
        return images, latents

    return xla_options.jit(run)
