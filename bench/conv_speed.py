r"""3x3 convolution speed on XLA:CPU: YNNPACK's kernels (XLA's default) vs Eigen's.

  python bench/conv_speed.py

Forward and forward + backward (input and kernel gradients) of one 3x3 SAME convolution at
the shapes of this project's models (NHWC, float32), each compiled twice from the same
function: with XLA's default options and with `vd_jax.xla_options.compiler_options()`
('eigen': YNNPACK keeps dots and reductions, convolutions go to Eigen). Reports GFLOP/s
(2·B·H·W·Cin·Cout·9 per forward, 3x that for forward + backward), median of --reps runs,
and writes --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = (  # (batch, height, width, in, out)
    (16, 8, 8, 64, 64),  # the demo's diffuser, second level
    (8, 16, 16, 64, 64),  # bench "small", first level
    (8, 8, 8, 128, 128),  # bench "small", second level
    (8, 32, 32, 32, 32),  # the demo's image VAE
    (1, 64, 64, 320, 320),  # the released U-Net at 512² px, first level (sampling on CPU)
    (1, 128, 128, 128, 128),  # the released VAE's decoder
)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "conv_speed.json"))
    a = p.parse_args()

    import jax
    import jax.numpy as jnp

    from vd_jax import xla_options

    if jax.default_backend() != "cpu":
        raise SystemExit("this benchmark compares XLA:CPU's convolution kernels: run it on a CPU")
    variants = {"ynnpack": {}, "eigen": xla_options.compiler_options("eigen")}
    if not variants["eigen"]:
        raise SystemExit("this jaxlib does not take the option (or XLA_FLAGS sets it)")

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def grads(x, w):
        return jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))(x, w)

    def median_ms(f, *args):
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times))

    rows = []
    key = jax.random.key(0)
    for b, h, w_, cin, cout in SHAPES:
        x = jax.random.normal(key, (b, h, w_, cin))
        w = jax.random.normal(key, (3, 3, cin, cout)) / (3 * cin**0.5)
        flops = 2 * b * h * w_ * cin * cout * 9
        row = dict(shape=[b, h, w_, cin, cout])
        for name, opts in variants.items():
            fwd = median_ms(jax.jit(conv, compiler_options=opts), x, w)
            both = median_ms(jax.jit(grads, compiler_options=opts), x, w)
            row[name] = dict(
                fwd_ms=fwd, fwd_gflops=flops / fwd / 1e6, fwd_bwd_ms=both,
                fwd_bwd_gflops=3 * flops / both / 1e6,
            )  # fmt: skip
        rows.append(row)
        y, e = row["ynnpack"], row["eigen"]
        print(
            f"{b}x{h}x{w_}x{cin}->{cout}: fwd {y['fwd_gflops']:.0f} -> {e['fwd_gflops']:.0f}, "
            f"fwd+bwd {y['fwd_bwd_gflops']:.0f} -> {e['fwd_bwd_gflops']:.0f} GFLOP/s "
            "(YNNPACK -> Eigen)",
            flush=True,
        )
    with open(a.out, "w") as f:
        json.dump(dict(cpus=os.cpu_count(), jax=jax.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
