"""GroupNorm (vd_jax's own statistics layout) against torch.nn.GroupNorm, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close

from vd_jax.models.layers import GroupNorm, group_norm

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _torch_group_norm(x, scale, bias, groups, eps, probe):
    """torch.nn.GroupNorm (channels first) of channels-last `x`: output and grads."""
    tx = torch.tensor(np.moveaxis(x, -1, 1).copy(), requires_grad=True)
    gn = torch.nn.GroupNorm(groups, x.shape[-1], eps=eps)
    with torch.no_grad():
        gn.weight.copy_(torch.tensor(scale))
        gn.bias.copy_(torch.tensor(bias))
    out = gn(tx)
    (torch.sin(out) * torch.tensor(np.moveaxis(probe, -1, 1).copy())).sum().backward()
    last = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)  # noqa: E731
    return last(out), last(tx.grad), gn.weight.grad.numpy(), gn.bias.grad.numpy()


@pytest.mark.parametrize(
    "shape,groups,mean",
    [
        ((2, 5, 6, 64), 32, 0.0),  # 2 channels a group: the layout flax's version ran slowly
        ((3, 4, 4, 48), 8, 0.0),
        ((2, 7, 24), 4, 0.0),  # [B, L, C] tokens (the text blocks' output norm)
        ((3, 96), 32, 0.0),  # flat vectors (FCResBlock)
        ((2, 4, 4, 32), 8, 300.0),  # a large mean: the two-pass variance keeps its digits
    ],
)
def test_group_norm_matches_torch(shape, groups, mean):
    rng = np.random.default_rng(0)
    x = (mean + rng.standard_normal(shape)).astype(np.float32)
    scale = (1 + 0.2 * rng.standard_normal(shape[-1])).astype(np.float32)
    bias = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    probe = rng.standard_normal(shape).astype(np.float32)
    want = _torch_group_norm(x, scale, bias, groups, 1e-5, probe)

    def loss(x, s, b):
        return jnp.sum(jnp.sin(group_norm(x, s, b, groups, 1e-5)) * probe)

    out = group_norm(jnp.asarray(x), scale, bias, groups, 1e-5)
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    # float32 on both sides: errors ~3e-7, 2e-5 covers summation order. At mean 300 the
    # inputs' own rounding (ulp 3e-5) gives up to 1.4e-4 (flax's two-pass GroupNorm: 1.8e-4);
    # the one-pass E[x^2]-E[x]^2 would be off by 3e-2 to 1e-1.
    tol = 3e-4 if mean else 2e-5
    for got, ref, what in zip((out, *grads), want, ("out", "dx", "dscale", "dbias"), strict=True):
        assert_rel_close(got, ref, tol, what)


def test_group_norm_module_params_and_dtype():
    x = jnp.ones((2, 4, 4, 8), jnp.bfloat16) * jnp.arange(8, dtype=jnp.bfloat16)
    m = GroupNorm(4, 1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = m.init(jax.random.key(0), x)["params"]
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
        "scale": ((8,), jnp.float32),
        "bias": ((8,), jnp.float32),
    }
    y = m.apply({"params": params}, x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    # Each group holds channels (2i, 2i+1) at constant values 2i, 2i+1: normalised to -1, +1.
    np.testing.assert_allclose(np.asarray(y[0, 0, 0], np.float32), [-1, 1] * 4, atol=1e-2)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="10 channels do not split into 4 groups"):
        group_norm(jnp.zeros((1, 2, 2, 10)), jnp.ones(10), jnp.zeros(10), 4, 1e-5)
