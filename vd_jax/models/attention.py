"""Multi-head scaled dot-product attention, with a hand-written backward pass.

Autodiff of the plain formula is slow on XLA:CPU where the logits are large and the heads
narrow (the diffuser's self-attention: 256 tokens x 8 heads of 8 channels, batch 8):

* its backward contracts the [L, L] weights over their leading axis (`dv = wᵀ·g`,
  `dk = dlᵀ·q`), a layout XLA:CPU runs ~5x slower than `gᵀ·w` transposed afterwards;
* the logits' scale is a broadcast XLA:CPU materialises as large as the logits;
* the softmax VJP's row sums run over [L, L] (`Σₖ w·dw`) where `g · out` over [L, D]
  gives the same numbers.

The VJP below avoids all three and keeps no [L, L] weights between the passes: the backward
recomputes them from per-row statistics (memory O(L) per query, as flash attention does;
only a given mask is kept). On CPU both passes also run over chunks of the batch·heads axis
(`lax.map`), which bounds the logits alive at once. Measured fwd+bwd of that self-attention
on a 2-core CPU: 35 ms with autodiff, 11 ms here (PyTorch's SDPA: 17 ms); a training step
of bench's "small" U-Net 0.60 s -> 0.49 s (bench/train_speed.py, same hour).

On a GPU, `implementation` can hand the work to `jax.nn.dot_product_attention` instead: its
plain XLA formula or cuDNN's fused flash attention, which 'auto' takes where an H200 ran it
faster (`resolve_implementation`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# f32 logits per chunk on CPU: at 256 tokens 4 MiB ran as fast as 2 MiB or unchunked (within
# noise) and 8 MiB slower, and it bounds the live logits; accelerators take the whole batch
# at once (a sequential map only serialises).
CPU_CHUNK_BYTES = 4 * 2**20

# "vd": the VJP below; "xla" / "cudnn": `jax.nn.dot_product_attention` with that
# implementation (cudnn: fused flash attention, GPU only, bf16/f16 only); "auto": see
# `resolve_implementation`.
IMPLEMENTATIONS = ("auto", "vd", "xla", "cudnn")
# 'auto' takes cuDNN's kernel from this many logits per head on (fwd + bwd on an H200, bf16,
# batch 32, bench/attention_speed.py: 1024² 2.9 -> 1.1 ms, 256² 0.47 -> 0.32 ms; at 64² and
# under, and for the 4-token text branch, the vd VJP was as fast or faster).
CUDNN_MIN_LOGITS = 256 * 256


def resolve_implementation(name: str, dtype, lq: int = 0, lk: int = 0) -> str:
    """The implementation `name` stands for at `dtype`, `lq` x `lk` logits, on this backend.

    'auto' is cuDNN's fused flash attention on a GPU in bf16/f16 where it was measured
    faster (`CUDNN_MIN_LOGITS`) and cuDNN takes the shape (an even key count: this jax's
    cuDNN path refused 77 context tokens in training), else the vd VJP.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name != "auto":
        return name
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = lq * lk >= CUDNN_MIN_LOGITS and lk % 2 == 0
    return "cudnn" if half and fits and jax.default_backend() == "gpu" else "vd"


def _num_chunks(rows: int, logits_per_row: int, budget: int | None) -> int:
    """The fewest chunks (a divisor of `rows`) whose logits fit in `budget` bytes."""
    if budget is None:
        return 1
    for n in range(1, rows + 1):
        if rows % n == 0 and (rows // n) * logits_per_row * 4 <= budget:
            return n
    return rows


def _chunked(fn, n: int, *xs):
    """`fn` over `n` sequential chunks of every array's leading axis (None passes through).

    Chunk i holds rows i, i+n, i+2n, ...: a batch axis sharded in blocks over devices stays
    sharded the same way in every chunk (contiguous chunks would each sit on a few devices).
    """
    if n == 1:
        return fn(*xs)
    split = lambda x: jnp.swapaxes(x.reshape(-1, n, *x.shape[1:]), 0, 1)  # noqa: E731
    merge = lambda y: jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])  # noqa: E731
    return jax.tree.map(merge, jax.lax.map(lambda a: fn(*a), jax.tree.map(split, xs)))


def _logits(q, k, mask):
    # q arrives scaled by 1/sqrt(D): scaling the [L, L] logits instead makes XLA:CPU
    # materialise a broadcast of the scale as large as the logits.
    logits = jnp.einsum("nqd,nkd->nqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return logits


def _forward(q, k, v, mask):
    """Softmax attention of pre-scaled `q` on [N, L, D] rows; also the softmax statistics."""
    logits = _logits(q, k, mask)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - row_max)
    inv_sum = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
    weights = (e * inv_sum).astype(v.dtype)
    # Without the barrier XLA:CPU fuses the softmax into the next dot's operand and
    # recomputes it per output element: 5x slower self-attention at 256 tokens.
    weights = jax.lax.optimization_barrier(weights)
    return jnp.einsum("nqk,nkd->nqd", weights, v), row_max, inv_sum


def _backward(q, k, v, mask, row_max, inv_sum, g, delta):
    """Gradients of one chunk, the softmax weights recomputed from the saved statistics."""
    w = jnp.exp(_logits(q, k, mask) - row_max) * inv_sum
    dw = jnp.einsum("nqd,nkd->nqk", g, v, preferred_element_type=jnp.float32)
    # softmax' VJP: w ⊙ (dw − Σₖ w ⊙ dw), where Σₖ w ⊙ dw = g · out (`delta`, per query).
    dl = w * (dw - delta)
    if mask is not None:  # rows with every key masked get uniform weights but no gradient
        dl = jnp.where(mask, dl, 0.0)
    dl = jax.lax.optimization_barrier(dl.astype(q.dtype))
    dq = jnp.einsum("nqk,nkd->nqd", dl, k)
    # Contract over the queries with the [L, D] operand first (see the module docstring);
    # the barrier keeps XLA from folding the transposes back into the dots.
    dk_t, dv_t = jax.lax.optimization_barrier(
        (jnp.einsum("nqd,nqk->ndk", q, dl), jnp.einsum("nqd,nqk->ndk", g, w.astype(v.dtype)))
    )
    return dq, jnp.swapaxes(dk_t, 1, 2), jnp.swapaxes(dv_t, 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sdpa(q, k, v, mask, chunks):
    return _chunked(lambda *a: _forward(*a)[0], chunks, q, k, v, mask)


def _sdpa_fwd(q, k, v, mask, chunks):
    out, row_max, inv_sum = _chunked(_forward, chunks, q, k, v, mask)
    # The [L, L] weights are not kept: the backward pass recomputes them chunk by chunk
    # (memory O(L) per query instead of O(L²), as in flash attention).
    return out, (q, k, v, mask, out, row_max, inv_sum)


def _sdpa_bwd(chunks, res, g):
    q, k, v, mask, out, row_max, inv_sum = res
    g = g.astype(v.dtype)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    grads = _chunked(_backward, chunks, q, k, v, mask, row_max, inv_sum, g, delta)
    return (*(d.astype(x.dtype) for d, x in zip(grads, (q, k, v), strict=True)), None)


_sdpa.defvjp(_sdpa_fwd, _sdpa_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    mask: jax.Array | None = None,
    chunk_bytes: int | None = -1,
    implementation: str = "vd",
) -> jax.Array:
    """Multi-head scaled dot-product attention on [B, L, H*D] projections.

    Softmax runs in float32 whatever the compute dtype; `mask` ([B | 1, H | 1, Lq, Lk]
    booleans, True = attend) is optional. `chunk_bytes`: logits budget per sequential
    chunk of the batch·heads axis; -1 = `CPU_CHUNK_BYTES` on CPU and no chunking
    elsewhere, None = no chunking. `implementation`: one of `IMPLEMENTATIONS`.
    """
    b, lq, inner = q.shape
    lk, d = k.shape[1], inner // heads
    implementation = resolve_implementation(implementation, q.dtype, lq, lk)
    if implementation != "vd":
        # [B, L, H*D] is already jax.nn's [B, L, H, D] layout: no transposes.
        split = lambda x: x.reshape(b, x.shape[1], heads, d)  # noqa: E731
        out = jax.nn.dot_product_attention(
            split(q), split(k), split(v), mask=mask, implementation=implementation
        )
        return out.reshape(b, lq, inner)

    def rows(x):  # [B, L, H*D] -> [B*H, L, D]
        x = x.reshape(b, x.shape[1], heads, d).transpose(0, 2, 1, 3)
        return x.reshape(b * heads, x.shape[2], d)

    q, k, v = rows(q) * jnp.asarray(d**-0.5, q.dtype), rows(k), rows(v)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, heads, lq, lk)).reshape(b * heads, lq, lk)
    if chunk_bytes == -1:
        chunk_bytes = CPU_CHUNK_BYTES if jax.default_backend() == "cpu" else None
    out = _sdpa(q, k, v, mask, _num_chunks(b * heads, lq * lk, chunk_bytes))
    out = out.reshape(b, heads, lq, d).transpose(0, 2, 1, 3)
    return out.reshape(b, lq, inner)
