"""DDIM parity with diffusers' DDIMScheduler (tolerance 1e-5 relative) and schedule facts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_rel_close

from vd_jax.diffusion import ddim
from vd_jax.diffusion.schedules import NoiseSchedule, q_sample

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    ),
    dict(
        beta_schedule="linear",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=True,
        prediction_type="v_prediction",
    ),
    dict(
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="linspace",
        clip_sample=False,
        prediction_type="sample",
        set_alpha_to_one=False,
    ),
    dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    ),
]


def _fake_model(x, t):
    # Any smooth function of (x, t) exercises the update; it need not be a denoiser.
    return 0.3 * x + 0.05 * np.sin(np.asarray(t, np.float32) / 100.0).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_loop_matches_diffusers(cfg, eta):
    steps = 13
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    schedule = NoiseSchedule.from_scheduler_config(dict(ref.config))
    tables = ddim.ddim_tables(schedule, steps)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), ref.timesteps.numpy())

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    noises = rng.standard_normal((steps, 2, 4, 5, 3)).astype(np.float32)
    x = torch.from_numpy(x0)
    for i, t in enumerate(ref.timesteps):
        out = torch.from_numpy(_fake_model(x.numpy(), [int(t)] * 2))
        x = ref.step(out, t, x, eta=eta, variance_noise=torch.from_numpy(noises[i])).prev_sample

    xj = jnp.asarray(x0)
    for i in range(steps):
        out = jnp.asarray(_fake_model(np.asarray(xj), [int(tables.timesteps[i])] * 2))
        xj, _ = ddim.ddim_step(
            xj,
            out,
            tables.alpha_t[i],
            tables.alpha_prev[i],
            prediction_type=schedule.prediction_type,
            clip_sample_range=schedule.clip_sample_range if schedule.clip_sample else None,
            eta=eta,
            noise=jnp.asarray(noises[i]),
        )
    assert_rel_close(xj, x.numpy(), 1e-5, f"ddim {cfg} eta={eta}")


def test_fori_loop_equals_python_loop():
    schedule = NoiseSchedule()
    tables = ddim.ddim_tables(schedule, 10)
    fn = lambda x, t: 0.2 * x + 0.01 * t[:, None].astype(x.dtype)
    x = jax.random.normal(jax.random.key(1), (3, 6))
    looped = jax.jit(lambda x: ddim.sample_loop(fn, x, tables, schedule))(x)
    y = x
    for i in range(10):
        y, _ = ddim.ddim_step(
            y, fn(y, jnp.full((3,), tables.timesteps[i])), tables.alpha_t[i], tables.alpha_prev[i]
        )
    np.testing.assert_allclose(looped, y, rtol=1e-6, atol=1e-6)


def test_vd_schedule_facts():
    s = NoiseSchedule()
    betas = s.betas()
    assert betas.shape == (1000,)
    np.testing.assert_allclose([betas[0], betas[-1]], [0.00085, 0.012], rtol=1e-12)
    # VD's original DDIM-50 visits 981, 961, ..., 1 (docs/original.md section 5).
    ts = ddim.ddim_timesteps(s, 50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    ab = jnp.asarray(s.alphas_cumprod()[[0, 999]], jnp.float32)
    xt = q_sample(jnp.ones((2, 3)), jnp.zeros((2, 3)), ab)
    np.testing.assert_allclose(xt[:, 0], np.sqrt(np.asarray(ab)), rtol=1e-6)


def test_bad_schedule_settings_raise():
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule(timestep_spacing="sideways")
    with pytest.raises(ValueError, match="num_steps"):
        ddim.ddim_timesteps(NoiseSchedule(), 0)
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_scheduler_config({"thresholding": True})
