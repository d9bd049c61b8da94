"""The attention core (hand-written VJP, chunked on CPU) against PyTorch's SDPA and autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close

from vd_jax.models.attention import CPU_CHUNK_BYTES, _num_chunks, attention, resolve_implementation

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

B, LQ, HEADS, D = 3, 24, 4, 8


def _inputs(lk: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, LQ, HEADS * D), np.float32)
    k, v = (rng.standard_normal((B, lk, HEADS * D), np.float32) for _ in range(2))
    probe = rng.standard_normal((B, LQ, HEADS * D), np.float32)  # makes every output count
    return q, k, v, probe


def _jax_grads(fn, q, k, v, probe):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * probe)  # noqa: E731
    out = fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    return (out, *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


def _torch_grads(q, k, v, probe, mask):
    heads = lambda x: torch.tensor(x).unflatten(-1, (HEADS, D)).transpose(1, 2)  # noqa: E731
    tq, tk, tv = (heads(x).requires_grad_() for x in (q, k, v))
    tm = None if mask is None else torch.tensor(mask)
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)
    out = out.transpose(1, 2).flatten(-2)
    (torch.sin(out) * torch.tensor(probe)).sum().backward()
    flat = lambda t: t.transpose(1, 2).flatten(-2).numpy()  # noqa: E731
    return (out.detach().numpy(), flat(tq.grad), flat(tk.grad), flat(tv.grad))


@pytest.mark.parametrize("lk", [LQ, 7], ids=["self", "cross"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("chunk_bytes", [None, LQ * LQ * 4 * 2], ids=["whole", "chunks"])
def test_values_and_grads_match_torch_sdpa(lk, masked, chunk_bytes):
    """Output and dq/dk/dv equal torch SDPA's within 1e-5 relative, whole or in chunks."""
    q, k, v, probe = _inputs(lk)
    mask = None
    if masked:  # causal-like: query i sees keys <= i (shifted so that no row is empty)
        mask = np.arange(lk)[None, :] <= np.arange(LQ)[:, None] * lk // LQ
        mask = np.broadcast_to(mask, (B, 1, LQ, lk))
    ours = _jax_grads(
        lambda q, k, v: attention(q, k, v, HEADS, None if mask is None else jnp.asarray(mask),
                                  chunk_bytes=chunk_bytes),
        q, k, v, probe,
    )  # fmt: skip
    ref = _torch_grads(q, k, v, probe, mask)
    for a, b, what in zip(ours, ref, ("out", "dq", "dk", "dv"), strict=True):
        assert_rel_close(np.asarray(a), b, 1e-5, what)


@pytest.mark.parametrize("lk", [LQ, 7], ids=["self", "cross"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_jax_nn_implementation_matches_torch_sdpa(lk, masked):
    """implementation='xla' (jax.nn.dot_product_attention on the [B, L, H, D] view of the
    projections, the layout 'cudnn' shares) equals torch SDPA within 1e-5 relative."""
    q, k, v, probe = _inputs(lk, seed=5)
    mask = None
    if masked:
        mask = np.random.default_rng(6).random((B, HEADS, LQ, lk)) < 0.7
        mask[..., 0] = True  # no empty row: torch gives NaN there
    m = None if mask is None else jnp.asarray(mask)
    ours = _jax_grads(
        lambda q, k, v: attention(q, k, v, HEADS, m, implementation="xla"), q, k, v, probe
    )
    ref = _torch_grads(q, k, v, probe, mask)
    for a, b, what in zip(ours, ref, ("out", "dq", "dk", "dv"), strict=True):
        assert_rel_close(np.asarray(a), b, 1e-5, what)


def test_implementation_choice():
    """'auto' is the vd VJP on CPU whatever the dtype; an unknown name is refused by name."""
    assert jax.default_backend() == "cpu"
    for dtype in (jnp.float32, jnp.bfloat16):
        assert resolve_implementation("auto", dtype) == "vd"
    assert resolve_implementation("cudnn", jnp.float32) == "cudnn"
    with pytest.raises(ValueError, match="'flash'"):
        resolve_implementation("flash", jnp.float32)
    from vd_jax.models.unet import DiffuserConfig

    with pytest.raises(ValueError, match="attention must be one of"):
        DiffuserConfig(attention="flash")


def test_context_block_implementations_agree():
    """A SpatialTransformer (the diffuser's context block) gives the same output with either
    implementation, on the same params (1e-5 relative)."""
    from vd_jax.models.layers import SpatialTransformer

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 32)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    params = SpatialTransformer(4, norm_groups=8).init(jax.random.key(0), x, ctx)
    outs = {
        impl: SpatialTransformer(4, norm_groups=8, attention=impl).apply(params, x, ctx)
        for impl in ("vd", "xla")
    }
    assert_rel_close(np.asarray(outs["xla"]), np.asarray(outs["vd"]), 1e-5, "xla vs vd")
    # The choice reaches the kernel: only the vd forward pass has its optimization barrier.
    for impl in ("vd", "xla"):
        block = SpatialTransformer(4, norm_groups=8, attention=impl)
        jaxpr = str(jax.make_jaxpr(lambda p, b=block: b.apply(p, x, ctx))(params))
        assert ("optimization_barrier" in jaxpr) == (impl == "vd"), impl


def test_diffuser_config_attention_reaches_every_context_block():
    """DiffuserConfig.attention is what the diffuser's context blocks run (image and text
    branches): with 'xla' no vd kernel is left in the forward pass."""
    from vd_jax.models.unet import DiffuserConfig, VDDiffuser, abstract_params

    for impl in ("vd", "xla"):
        cfg = DiffuserConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, True),
                             num_heads=4, context_dim=16, text_dim=8, norm_groups=8,
                             attention=impl)  # fmt: skip
        ctx = jnp.zeros((1, 3, cfg.context_dim))
        inputs = {"image": jnp.zeros((1, 8, 8, 4)), "text": jnp.zeros((1, cfg.text_dim))}
        for xtype, x in inputs.items():
            model = VDDiffuser(cfg)
            fwd = functools.partial(model.apply, xtype=xtype, ctypes=("text",))
            jaxpr = jax.make_jaxpr(lambda p, x, c, f=fwd: f({"params": p}, x, jnp.array([10]), [c]))
            jaxpr = str(jaxpr(abstract_params(cfg), x, ctx))
            assert ("optimization_barrier" in jaxpr) == (impl == "vd"), (impl, xtype)


def test_fully_masked_rows_match_autodiff():
    """A query that may see no key gets uniform weights (as the plain formula does) and no
    gradient through q or k; torch's SDPA gives NaN there, so the reference is JAX autodiff."""
    q, k, v, probe = _inputs(LQ, seed=1)
    rng = np.random.default_rng(2)
    mask = rng.random((B, HEADS, LQ, LQ)) < 0.6
    mask[:, :, 3] = False  # query 3 sees nothing

    def plain(q, k, v):
        split = lambda x: x.reshape(B, -1, HEADS, D).transpose(0, 2, 1, 3)  # noqa: E731
        logits = jnp.einsum("bhqd,bhkd->bhqk", split(q), split(k)) * D**-0.5
        w = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", w, split(v)).transpose(0, 2, 1, 3).reshape(B, LQ, -1)

    ref = _jax_grads(plain, q, k, v, probe)
    m = jnp.asarray(mask)
    for cb in (None, LQ * LQ * 4):
        ours = _jax_grads(
            lambda q, k, v, cb=cb: attention(q, k, v, HEADS, m, chunk_bytes=cb), q, k, v, probe
        )
        for a, b, what in zip(ours, ref, ("out", "dq", "dk", "dv"), strict=True):
            assert_rel_close(np.asarray(a), np.asarray(b), 1e-5, f"{what} chunk_bytes={cb}")


def test_bfloat16_compute():
    """bf16 inputs give bf16 outputs and gradients within bf16 rounding of the f32 ones."""
    q, k, v, probe = _inputs(LQ, seed=3)
    fn = lambda q, k, v: attention(q, k, v, HEADS, chunk_bytes=None)  # noqa: E731
    ref = _jax_grads(fn, q, k, v, probe)
    low = _jax_grads(fn, *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), probe)
    for a, b, what in zip(low, ref, ("out", "dq", "dk", "dv"), strict=True):
        assert a.dtype == jnp.bfloat16, what
        assert_rel_close(np.asarray(a, np.float32), np.asarray(b), 3e-2, what)


def test_chunk_count():
    """The fewest chunks of whole rows whose f32 logits fit the budget; none off CPU."""
    rows, per_row = 64, 256 * 256  # 8 images x 8 heads of 256 tokens: 16 MiB of logits
    assert _num_chunks(rows, per_row, CPU_CHUNK_BYTES) == 4
    assert _num_chunks(rows, per_row, None) == 1
    assert _num_chunks(rows, per_row, 2**40) == 1
    assert _num_chunks(6, per_row, 3 * per_row * 4) == 2
    assert _num_chunks(6, per_row, per_row * 4 // 2) == 6  # one row over budget: one per chunk
    assert _num_chunks(5, per_row, 2 * per_row * 4) == 5  # no divisor of 5 in between


def test_chunks_keep_a_sharded_batch_in_place():
    """Batch sharded over 8 devices: chunked values and gradients equal one device's, and
    no collective moves data (every chunk spans every device)."""
    from jax.sharding import NamedSharding, PartitionSpec

    assert jax.device_count() == 8, "conftest sets 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(4)
    q, k, v, probe = (rng.standard_normal((8, LQ, HEADS * D), np.float32) for _ in range(4))
    budget = 8 * LQ * LQ * 4  # 8 of the 32 batch·head rows per chunk: 4 chunks
    assert _num_chunks(8 * HEADS, LQ * LQ, budget) == 4

    def grads(q, k, v):
        fn = lambda q, k, v: attention(q, k, v, HEADS, chunk_bytes=budget)  # noqa: E731
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * probe), argnums=(0, 1, 2))(q, k, v)

    sh = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.jit(grads, in_shardings=(sh,) * 3, out_shardings=(sh,) * 3)
    hlo = sharded.lower(q, k, v).compile().as_text()
    for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
        assert op not in hlo, f"{op} in the sharded attention"
    for a, b in zip(sharded(q, k, v), jax.jit(grads)(q, k, v), strict=True):
        assert_rel_close(np.asarray(a), np.asarray(b), 1e-6, "sharded vs whole")
