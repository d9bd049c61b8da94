"""Noise schedules and the forward process, as pure functions of a frozen config.

`NoiseSchedule.from_scheduler_config` reads a diffusers `scheduler_config.json`
so a folder's own settings (betas, offsets, spacing, clipping) are honoured.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")
_DIFFUSERS_DDIM_DEFAULTS = dict(
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=True,
    set_alpha_to_one=True,
    steps_offset=0,
)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The discrete diffusion schedule and the DDIM settings that go with it.

    Defaults are VD's: scaled-linear betas 0.00085 -> 0.012 over 1000 steps,
    epsilon prediction, no clipping.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} not in {_PREDICTION_TYPES}")
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} not in {_SPACINGS}")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported")

    @classmethod
    def from_scheduler_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """Reads a diffusers scheduler config dict (unknown keys ignored, missing ones default)."""
        if cfg.get("thresholding"):
            raise ValueError("scheduler_config: dynamic thresholding is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names and v is not None}
        if "trained_betas" in kwargs:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        # A key the file leaves out takes diffusers' DDIMScheduler default (what
        # `DDIMScheduler.from_config(file)` gives), not VD's: same result as diffusers.
        return cls(**{**_DIFFUSERS_DDIM_DEFAULTS, **kwargs})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> NoiseSchedule:
        with open(path) as f:
            return cls.from_scheduler_config(json.load(f))

    def to_scheduler_config(self) -> dict[str, Any]:
        """A diffusers `DDIMScheduler` `scheduler_config.json` dict of this schedule.

        Every field is written (none left to diffusers' defaults, which are not VD's), so
        `from_scheduler_config` reads it back to this schedule.
        """
        d = dataclasses.asdict(self)
        if self.trained_betas is not None:
            d["trained_betas"] = list(self.trained_betas)
        # diffusers' thresholding settings; thresholding is off, so its knobs are inert.
        extras = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
        return {"_class_name": "DDIMScheduler", **d, **extras}

    # ------------------------------------------------------------------ tables (numpy, host side)

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float64)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        else:  # squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule)
            f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
            t = np.arange(n, dtype=np.float64)
            betas = np.minimum(1 - f((t + 1) / n) / f(t / n), 0.999)
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas())


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023: shift and scale sqrt(alpha_bar) so the last step has zero SNR."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def q_sample(x0: jax.Array, noise: jax.Array, alpha_bar_t: jax.Array) -> jax.Array:
    """Forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; alpha_bar_t is [B]."""
    a = alpha_bar_t.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
