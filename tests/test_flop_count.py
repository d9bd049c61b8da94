"""FLOPs from the jaxpr (the MFU numerator) against hand counts and XLA's CPU cost model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from vd_jax.data.input_pipeline import make_iterator
from vd_jax.train import sharding as shd
from vd_jax.train.flop_count import jaxpr_flops
from vd_jax.train.trainer import Trainer


def _count(fn, *args) -> float:
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def test_matmul_conv_and_their_gradients():
    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert _count(jnp.matmul, a, b) == 2 * 4 * 8 * 16
    batched = jnp.ones((3, 4, 8)), jnp.ones((3, 8, 16))
    assert _count(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), *batched) == 3 * 2 * 4 * 8 * 16

    conv = nn.Conv(16, (3, 3), padding=1, use_bias=False)
    x = jnp.ones((2, 8, 8, 4))
    params = conv.init(jax.random.key(0), x)
    fwd = 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4)
    assert _count(conv.apply, params, x) == fwd
    # Backward: the input gradient and the weight gradient are convolutions of the same size.
    loss = lambda p, x: jnp.sum(conv.apply(p, x) ** 2)  # noqa: E731
    assert _count(jax.grad(loss, argnums=(0, 1)), params, x) == 3 * fwd
    strided = nn.Conv(16, (3, 3), strides=2, padding=1, use_bias=False)
    assert _count(strided.apply, strided.init(jax.random.key(1), x), x) == fwd / 4


def test_scan_counts_its_length():
    w = jnp.ones((8, 8))
    body = lambda c, _: (c @ w, None)  # noqa: E731
    scanned = lambda c: jax.lax.scan(body, c, None, length=5)[0]  # noqa: E731
    assert _count(scanned, jnp.ones((2, 8))) == 5 * 2 * 2 * 8 * 8


@pytest.mark.parametrize("attention", ["vd", "xla"])
def test_train_step_count_near_xla_cost_model(attention):
    """The tiny step's count is within 10% of XLA's CPU cost analysis of the same program
    (which skips padded convolution borders and counts elementwise work)."""
    c = tiny.get_config("flows=text_to_image")
    c.model.attention = attention
    tr = Trainer(c, shd.make_mesh("1,1", jax.devices()[:1]))
    batch = tr.global_batch(next(make_iterator(c, process_index=0, process_count=1)))
    traced = tr.trace(batch, None)
    ours = jaxpr_flops(traced.jaxpr)
    xla = traced.lower().cost_analysis()["flops"]
    print(f"{attention}: jaxpr {ours / 1e6:.1f} MFLOP, XLA {xla / 1e6:.1f} MFLOP")
    assert 0.9 < ours / xla < 1.1


def test_trainer_counts_per_device():
    """The MFU numerator is per device: a 4x2 mesh's count is 1/8 of one device's."""
    c = tiny.get_config("flows=text_to_image,levels=1")

    def count(mesh):
        devices = jax.devices()[: 1 if mesh == "1,1" else 8]
        tr = Trainer(c, shd.make_mesh(mesh, devices))
        it = make_iterator(c, process_index=0, process_count=1)
        return tr.device_flops(tr.trace(tr.global_batch(next(it)), None))

    one, eight = count("1,1"), count("4,2")
    assert one > 0 and eight == pytest.approx(one / 8, rel=1e-12)
