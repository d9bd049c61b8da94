"""vd_jax.xla_options: CPU convolutions on Eigen's kernels, per executable, same numbers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from vd_jax import xla_options
from vd_jax.data.input_pipeline import make_iterator
from vd_jax.train import sharding as shd
from vd_jax.train.trainer import Trainer


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _loss_and_grads(x, w):
    return jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(_conv(x, w))), argnums=(0, 1))(x, w)


def convolutions(hlo: str) -> tuple[int, int]:
    """(all convolutions, those inside YNNPACK fusions) in a compiled module's text."""
    ynn = set(
        re.findall(r'calls=%?([\w.\-]+), backend_config=\{"fusion_config":\{"kind":"__ynn', hlo)
    )
    total = inside = 0
    computation = None
    for line in hlo.splitlines():
        header = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if header:
            computation = header.group(1)
        elif " convolution(" in line:
            total += 1
            inside += computation in ynn
    return total, inside


def test_compiler_options_per_backend_and_name():
    opts = xla_options.compiler_options("eigen", "cpu")
    assert opts == {xla_options.YNN_OPTION: xla_options.YNN_WITHOUT_CONVOLUTIONS}
    assert xla_options.compiler_options("ynnpack", "cpu") == {}
    assert xla_options.compiler_options("eigen", "gpu") == {}
    assert xla_options.compiler_options("eigen", "tpu") == {}
    with pytest.raises(ValueError, match="cpu_convolutions must be one of"):
        xla_options.compiler_options("mkl", "cpu")


def test_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_options.YNN_OPTION}=")
    assert xla_options.compiler_options("eigen", "cpu") == {}


def test_first_use_under_the_training_loops_transfer_guard():
    xla_options._accepted.cache_clear()  # the check itself must run under the guard
    with jax.transfer_guard("disallow"):
        opts = xla_options.compiler_options("eigen", "cpu")
    assert opts == {xla_options.YNN_OPTION: xla_options.YNN_WITHOUT_CONVOLUTIONS}


def test_refused_option_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(xla_options, "YNN_WITHOUT_CONVOLUTIONS", "LIBRARY_FUSION_TYPE_NO_SUCH")
    with pytest.warns(UserWarning, match="XLA refused"):
        assert xla_options.compiler_options("eigen", "cpu") == {}


def test_convolutions_leave_ynnpack_with_the_same_numbers():
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (4, 8, 8, 16))
    w = jax.random.normal(kw, (3, 3, 16, 24)) / 12
    ours = xla_options.jit(_loss_and_grads)
    default = jax.jit(_loss_and_grads)
    # The option reaches the executable: XLA's default runs convolutions (here the forward
    # one) in YNNPACK fusions, ours none of the three (forward and both gradients).
    total, inside = convolutions(default.lower(x, w).compile().as_text())
    assert total == 3 and inside >= 1
    assert convolutions(ours.lower(x, w).compile().as_text()) == (3, 0)
    (l1, g1), (l0, g0) = ours(x, w), default(x, w)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _trainer(cpu_convolutions: str):
    c = tiny.get_config("levels=1,flows=text_to_image")
    c.cpu_convolutions = cpu_convolutions
    return c, Trainer(c, shd.make_mesh("1,1", jax.devices()[:1]))


def test_trainer_step_takes_the_config_choice_with_the_same_losses():
    losses = {}
    for name in ("eigen", "ynnpack"):
        c, tr = _trainer(name)
        it = make_iterator(c, process_index=0, process_count=1)
        state, batch = tr.init_state(), tr.global_batch(next(it))
        losses[name] = []
        for _ in range(3):
            state, m = tr.step(state, batch, None)
            losses[name].append(float(m["loss"]))
        total, inside = convolutions(tr._compiled[None].as_text())
        assert total > 10
        assert (inside == 0) if name == "eigen" else (inside > 0), (name, inside, total)
    np.testing.assert_allclose(losses["eigen"], losses["ynnpack"], rtol=1e-5)
    assert losses["eigen"][-1] < losses["eigen"][0]


def test_trainer_rejects_an_unknown_choice():
    with pytest.raises(ValueError, match="cpu_convolutions must be one of"):
        _trainer("onednn")
