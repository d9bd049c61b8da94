"""Per-executable XLA options: on CPU, convolutions on XLA's Eigen kernels instead of YNNPACK.

XLA:CPU (jaxlib 0.10) hands dots, reductions and convolutions to YNNPACK by default. At this
project's shapes its convolutions are the slow part: fwd + bwd of a 3x3 convolution on a
2-core CPU (`bench/conv_speed.py`) ran up to 2.7x faster on Eigen, and a training step of
bench's "small" U-Net 918 -> 779 ms, "tiny" 107 -> 102 ms (each pair compiled from one
lowering and run in turns in one process; the demo's diffuser 262 -> 238 ms with YNNPACK's
reductions off as well). YNNPACK keeps the dots and reductions, where it was as fast or
faster than Eigen (a 512x128 @ 128x1024 matmul: 110 against 71 GFLOP/s).

The choice travels as a compile option of each executable (`jax.jit(compiler_options=...)`,
`Lowered.compile(...)`), not as an `XLA_FLAGS` entry: a jaxlib that does not know the option
rejects it at compile time, where `compiler_options` falls back to XLA's default (a flag it
does not know would abort the process), and other JAX code in the process is unaffected. An
`XLA_FLAGS` that sets the option itself wins.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10's default set less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# 'eigen': convolutions on XLA's Eigen kernels; 'ynnpack': XLA's default.
CPU_CONVOLUTIONS = ("eigen", "ynnpack")


def check_cpu_convolutions(name: str) -> str:
    if name not in CPU_CONVOLUTIONS:
        raise ValueError(f"cpu_convolutions must be one of {CPU_CONVOLUTIONS}, got {name!r}")
    return name


@functools.cache
def _accepted(items: tuple[tuple[str, str], ...], backend: str) -> bool:
    """Whether this jaxlib compiles with these options (one tiny convolution, once).

    Lowered from a shape alone: no array moves, so the check also runs under a
    `jax.transfer_guard("disallow")` (the training loop's).
    """
    device = jax.sharding.SingleDeviceSharding(jax.devices(backend)[0])
    x = jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32, sharding=device)
    conv = lambda a: jax.lax.conv_general_dilated(
        a, a[0, :3, :3, :, None], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    try:
        jax.jit(conv, compiler_options=dict(items)).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - any refusal means: not this jaxlib's option
        warnings.warn(
            f"XLA refused {dict(items)} ({str(e).splitlines()[0]}); convolutions keep XLA's "
            "default kernels",
            stacklevel=3,
        )
        return False
    return True


def compiler_options(cpu_convolutions: str = "eigen", backend: str | None = None) -> dict:
    """The options for an executable on `backend` (default: JAX's default backend)."""
    check_cpu_convolutions(cpu_convolutions)
    backend = backend or jax.default_backend()
    if backend != "cpu" or cpu_convolutions == "ynnpack":
        return {}
    if YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}  # the user's own setting
    items = ((YNN_OPTION, YNN_WITHOUT_CONVOLUTIONS),)
    return dict(items) if _accepted(items, backend) else {}


def jit(fun: Callable, **kwargs: Any):
    """`jax.jit` with this backend's `compiler_options` (merged under any given ones)."""
    given = kwargs.pop("compiler_options", None) or {}
    return jax.jit(fun, compiler_options={**compiler_options(), **given}, **kwargs)
