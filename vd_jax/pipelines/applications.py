"""VD's editing controls as pure functions: focus, fidelity, colour adjustment, masks.

- focus (semantic <-> style): the original app's rank adjustment of the 256
  local CLIP-image tokens. The tokens are de-meaned per token, their top-q
  principal directions found, and the leading (semantic, level < 0.5) or the
  trailing (style, level > 0.5) singular values scaled down on an exponential
  ramp; the result is rescaled to the input's std. The original uses a
  randomised `torch.pca_lowrank(q=20, niter=100)`; vd_jax takes the exact top-q
  SVD, which that iteration converges to.
- fidelity: SDEdit, start DDIM from the noised input latent and run the last
  steps only.
- colour adjustment "simple": match each RGB channel's mean and std to the input.
- masks: per-token weights for CLIP-image tokens (the multi-context blender).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.diffusion.ddim import DDIMTables


def focus_multipliers(
    level: float, q: int = 20, max_drop_rank: tuple[int, int] = (1, 5)
) -> tuple[np.ndarray, bool]:
    """Per-singular-value scales for focus `level` in [0, 1], and whether the residual
    beyond rank q is dropped (the style side). 0.5 is neutral (all ones)."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"focus level must be in [0, 1], got {level}")
    sem, sty = max_drop_rank
    mult = np.ones(q, np.float64)
    ramp = math.exp((level - 0.5) * 2)
    if level < 0.5:
        # y0 runs from -sem (level 0) to 1 (level 0.5); index i gets a linear ramp
        # from y0 at i=0 to 1 at i=sem+1, clipped at 0.
        y0 = (ramp - math.exp(-1)) / (1 - math.exp(-1)) * (1 + sem) - sem
        for i in range(sem + 1):
            mult[i] = max(i / (sem + 1) * (1 - y0) + y0, 0.0)
        return mult, False
    if level > 0.5:
        # Mirror image on the style side: indices sty..q-1 fade, the last first.
        y0 = (ramp - math.e) / (1 - math.e) * (1 + q - sty) - (q - sty)
        for i in range(sty, q):
            mult[i] = max((i - (q - 1)) / ((sty - 1) - (q - 1)) * (1 - y0) + y0, 0.0)
        return mult, True
    return mult, False


def adjust_rank(x: jax.Array, level: float, q: int = 20, max_drop_rank=(1, 5)) -> jax.Array:
    """Focus on [B, L, D] tokens (all of them; see `apply_focus` for VD's use)."""
    if level == 0.5:
        return x
    mult, drop_rest = focus_multipliers(level, q, max_drop_rank)
    xf = x.astype(jnp.float32)
    std_in = jnp.std(xf, axis=(-2, -1), ddof=1, keepdims=True)
    mean = xf.mean(-1, keepdims=True)
    centred = xf - mean
    u, s, vt = jnp.linalg.svd(centred, full_matrices=False)
    q = min(q, s.shape[-1])  # small (test) models can have fewer tokens than q
    u, s, vt, mult = u[..., :q], s[..., :q], vt[..., :q, :], mult[:q]
    low = jnp.einsum("blq,bq,bqd->bld", u, s, vt)
    rest = 0.0 if drop_rest else centred - low
    new = jnp.einsum("blq,bq,bqd->bld", u, s * jnp.asarray(mult, jnp.float32), vt) + mean + rest
    new = new / jnp.std(new, axis=(-2, -1), ddof=1, keepdims=True) * std_in
    return new.astype(x.dtype)


def apply_focus(context: jax.Array, level: float) -> jax.Array:
    """VD's focus on a CLIP-image context [B, 1+N, D]: the CLS token is kept as it is."""
    if level == 0.5:
        return context
    return jnp.concatenate([context[:, :1], adjust_rank(context[:, 1:], level)], axis=1)


def mask_token_weights(mask: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """Weights [1+N] for CLIP-image tokens from a mask in [0, 1] (1 = keep).

    The mask is resized (bilinear) to the tower's input size; each patch token gets
    the mean of its patch, the CLS token the mean of the whole mask.
    """
    from PIL import Image

    m = np.clip(np.asarray(mask, np.float32), 0.0, 1.0)
    if m.ndim == 3:
        m = m[..., 0]
    m = np.asarray(
        Image.fromarray(m, mode="F").resize((image_size, image_size), Image.Resampling.BILINEAR)
    )
    g = image_size // patch_size
    patches = m[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size)
    return np.concatenate([[m.mean()], patches.mean(axis=(1, 3)).reshape(-1)]).astype(np.float32)


def sdedit_start(
    latents: jax.Array,
    noise: jax.Array,
    tables: DDIMTables,
    alphas_cumprod: np.ndarray,
    fidelity: float,
) -> tuple[jax.Array, int]:
    """Noised start latents and the first DDIM step index for fidelity in [0, 1).

    Of S steps the last k = int(S * (1 - fidelity)) run; the input latent is noised
    to the timestep step S - k starts from. (The original app noises to one step
    further than it starts denoising from; vd_jax keeps the two consistent.)
    """
    if not 0.0 <= fidelity < 1.0:
        raise ValueError(f"fidelity must be in [0, 1), got {fidelity}")
    steps = int(tables.timesteps.shape[0])
    k = int(steps * (1.0 - fidelity))
    if k <= 0:
        raise ValueError(f"fidelity={fidelity} leaves no denoising step of {steps}")
    first = steps - k
    t = int(tables.timesteps[first])
    a = jnp.asarray(alphas_cumprod[t], jnp.float32)
    return jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise, first


def color_adjust_simple(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Matches each channel's mean/std of images [N, H, W, 3] to reference [H', W', 3]."""
    ref = np.asarray(reference, np.float32).reshape(-1, 3)
    out = np.asarray(images, np.float32)
    flat = out.reshape(out.shape[0], -1, 3)
    mean, std = flat.mean(1, keepdims=True), flat.std(1, ddof=1, keepdims=True)
    adjusted = (flat - mean) / np.maximum(std, 1e-6) * ref.std(0, ddof=1) + ref.mean(0)
    return np.clip(adjusted, 0.0, 1.0).reshape(out.shape)
