r"""The diffuser's attention implementations at the full model's shapes: error and speed.

  python bench/attention_speed.py --batch=32            # on a GPU: vd, xla, cudnn
  python bench/attention_speed.py --batch=2 --impls=vd,xla

For each self-/cross-attention shape of the released image U-Net at 256² (1024, 256 and 64
tokens; 77 context tokens) and of the text branch (4 tokens), and each implementation
(`vd_jax.models.attention.IMPLEMENTATIONS`): forward + backward time (median of --reps, after
a warm-up) and the relative error ‖x − ref‖ / ‖ref‖ of the output and dq/dk/dv in the
compute dtype against float32 ('xla' at highest matmul precision).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, query tokens, key tokens, channels); 8 heads everywhere, as in the released U-Net.
SHAPES = (
    ("level0_self", 1024, 1024, 320),
    ("level0_cross", 1024, 77, 320),
    ("level1_self", 256, 256, 640),
    ("level2_self", 64, 64, 1280),
    ("text_self", 4, 4, 320),  # the text branch: a [4, C] map per example
    ("text_cross", 4, 77, 320),
)
HEADS = 8


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--impls", default="vd,xla,cudnn")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="")
    a = p.parse_args()

    import jax
    import jax.numpy as jnp

    from vd_jax.models.attention import attention

    dtype = jnp.dtype(a.dtype)

    def fwd_bwd(q, k, v, probe, impl):
        f = lambda q, k, v: attention(q, k, v, HEADS, implementation=impl)  # noqa: E731
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(probe))

    results = {}
    for name, lq, lk, ch in SHAPES:
        keys = jax.random.split(jax.random.key(lq + lk + ch), 4)
        q = jax.random.normal(keys[0], (a.batch, lq, ch), jnp.float32)
        k, v = (jax.random.normal(kk, (a.batch, lk, ch), jnp.float32) for kk in keys[1:3])
        probe = jax.random.normal(keys[3], (a.batch, lq, ch), jnp.float32)

        with jax.default_matmul_precision("highest"):
            ref = jax.jit(fwd_bwd, static_argnums=4)(q, k, v, probe, "xla")
        low = [x.astype(dtype) for x in (q, k, v, probe)]
        for impl in a.impls.split(","):
            f = jax.jit(fwd_bwd, static_argnums=4)
            try:
                got = jax.block_until_ready(f(*low, impl))
            except Exception as e:  # an implementation this device lacks: say so, go on
                results[f"{name}/{impl}"] = dict(error=f"{type(e).__name__}: {e}"[:300])
                print(f"{name} {impl}: unavailable ({type(e).__name__})", flush=True)
                continue
            times = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*low, impl))
                times.append(time.perf_counter() - t0)
            errs = {
                what: float(jnp.linalg.norm(g.astype(jnp.float32) - r) / jnp.linalg.norm(r))
                for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
            }
            ms = 1e3 * float(np.median(times))
            results[f"{name}/{impl}"] = dict(ms=ms, rel_err=errs)
            worst = max(errs.values())
            print(f"{name} {impl}: {ms:.3f} ms fwd+bwd, worst rel err {worst:.2e}", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(
                dict(device=jax.devices()[0].device_kind, batch=a.batch, **results), fh, indent=2
            )


if __name__ == "__main__":
    main()
