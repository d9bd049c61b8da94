"""FLOPs of a traced program, counted from its jaxpr: the numerator of the MFU estimate.

XLA's cost analysis of a compiled program is backend-specific: on GPU it does not see into
the cuDNN / cuBLAS custom calls that hold the convolutions and matmuls (an H200 run of the
full-size U-Net step reported 1.2-1.5 TFLOP of 16.3), and it is absent for some backends. The
jaxpr, traced before any backend is involved, holds every contraction explicitly.
"""

from __future__ import annotations

import math

import jax


def _dot_general(eqn) -> float:
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs = eqn.invars[1].aval.shape
    free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2.0 * math.prod(eqn.invars[0].aval.shape) * math.prod(free)


def _conv(eqn) -> float:
    # Each output element takes (kernel size / output features) multiply-adds: grouped
    # kernels and the backward pass's convolutions included (the input gradient of a strided
    # convolution counts its dilated zeros too).
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features


_COUNTERS = {"dot_general": _dot_general, "conv_general_dilated": _conv}


def jaxpr_flops(jaxpr: jax.extend.core.Jaxpr | jax.extend.core.ClosedJaxpr) -> float:
    """2 x multiply-adds of every matmul and convolution, sub-jaxprs included.

    A scan's body counts `length` times; a while loop's body once (its trip count is data).
    Elementwise work and opaque kernels (cuDNN's fused attention) are not counted; padded
    borders of a convolution are (XLA's CPU count, which skips them, is ~4% lower at a 16x16
    map with 3x3 kernels).
    """
    if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        counter = _COUNTERS.get(eqn.primitive.name)
        if counter is not None:
            total += counter(eqn)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    total += times * jaxpr_flops(sub)
    return total
