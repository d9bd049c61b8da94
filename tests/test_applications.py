"""VD's editing controls against a PyTorch transcription of the original app's equations."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from vd_jax.diffusion import ddim
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.pipelines import applications as app

torch = pytest.importorskip("torch")


def _original_focus(x, lvl, q=20, sem=1, sty=5):
    """The original app's rank adjustment, written from its documented equations."""
    std_save = x.std(axis=[-2, -1])
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    torch.manual_seed(0)
    u, s, v = torch.pca_lowrank(xc, q=q, center=False, niter=100)
    low = u @ torch.diag_embed(s) @ v.transpose(1, 2)
    rest = xc - low
    ramp = lambda t, t0, t1, y00, y01: (np.exp((t - 0.5) * 2) - t0) / (t1 - t0) * (y01 - y00) + y00
    s = s.clone()
    if lvl < 0.5:
        y0 = ramp(lvl, np.exp(-1), 1.0, -sem, 1)
        for i in range(sem + 1):
            s[:, i] *= max((i - 0) / (sem + 1 - 0) * (1 - y0) + y0, 0)
    elif lvl > 0.5:
        y0 = ramp(lvl, np.exp(1), 1.0, -(q - sty), 1)
        for i in range(sty, q):
            s[:, i] *= max((i - (q - 1)) / ((sty - 1) - (q - 1)) * (1 - y0) + y0, 0)
        rest = 0
    new = u @ torch.diag_embed(s) @ v.transpose(1, 2) + mean + rest
    return new / new.std(axis=[-2, -1])[:, None, None] * std_save[:, None, None]


def _tokens(seed=0):
    # A decaying spectrum, as real CLIP tokens have, so the randomised PCA converges.
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((2, 30, 48))
    coef = rng.standard_normal((2, 64, 30)) * (0.7 ** np.arange(30))
    return (coef @ basis + 0.01 * rng.standard_normal((2, 64, 48))).astype(np.float32)


@pytest.mark.parametrize("level", [0.0, 0.2, 0.45, 0.7, 1.0])
def test_focus_matches_original_equations(level):
    x = _tokens()
    ref = _original_focus(torch.from_numpy(x).double(), level).numpy()
    ours = np.asarray(app.adjust_rank(jnp.asarray(x), level))
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err


def test_focus_extremes():
    assert np.array_equal(app.focus_multipliers(0.5)[0], np.ones(20))
    m0, drop0 = app.focus_multipliers(0.0)
    assert list(m0[:2]) == [0.0, 0.0] and np.all(m0[2:] == 1) and not drop0
    m1, drop1 = app.focus_multipliers(1.0)
    assert np.all(m1[5:] == 0) and np.all(m1[:5] == 1) and drop1
    ctx = jnp.asarray(_tokens())
    out = app.apply_focus(ctx, 0.0)
    np.testing.assert_array_equal(out[:, 0], ctx[:, 0])  # CLS kept
    with pytest.raises(ValueError, match="focus level"):
        app.focus_multipliers(1.5)


def test_mask_token_weights():
    mask = np.zeros((40, 40), np.float32)
    mask[:, :20] = 1.0  # keep the left half
    w = app.mask_token_weights(mask, image_size=32, patch_size=8)
    assert w.shape == (1 + 16,)
    assert math.isclose(w[0], 0.5, abs_tol=1e-3)
    grid = w[1:].reshape(4, 4)
    np.testing.assert_allclose(grid[:, :2], 1.0, atol=0.02)  # bilinear edge
    np.testing.assert_allclose(grid[:, 2:], 0.0, atol=0.02)


def test_sdedit_start_and_color_adjust():
    schedule = NoiseSchedule()
    tables = ddim.ddim_tables(schedule, 50)
    lat = jnp.ones((1, 2, 2, 4))
    x, first = app.sdedit_start(lat, jnp.zeros_like(lat), tables, schedule.alphas_cumprod(), 0.3)
    assert first == 50 - 35
    t = int(tables.timesteps[first])
    np.testing.assert_allclose(x, np.sqrt(schedule.alphas_cumprod()[t]), rtol=1e-6)
    with pytest.raises(ValueError, match="fidelity"):
        app.sdedit_start(lat, lat, tables, schedule.alphas_cumprod(), 1.0)
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.2, 0.6, (8, 8, 3))
    out = app.color_adjust_simple(rng.uniform(0, 1, (2, 8, 8, 3)), ref)
    np.testing.assert_allclose(
        out.reshape(2, -1, 3).mean(1), np.tile(ref.reshape(-1, 3).mean(0), (2, 1)), atol=1e-5
    )
