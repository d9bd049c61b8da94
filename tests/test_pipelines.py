"""Whole-pipeline parity with diffusers' Versatile Diffusion pipelines, and sample.py's outputs.

Same tiny random weights, same initial latents: vd_jax's pixels must equal
diffusers' to <= 2e-3 max abs on [0, 1] images (measured: ~1e-5).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dual_patch import patch_dual_transformer  # noqa: E402

from configs import sample as sample_config  # noqa: E402
from vd_jax.convert.diffusers_folder import load_diffusers_folder  # noqa: E402
from vd_jax.convert.tiny_folder import IMAGE_PX, sample_picture  # noqa: E402
from vd_jax.pipelines import VDPipeline, sampling  # noqa: E402

PIXEL_TOL = 2e-3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_vd):
    return tiny_vd


@pytest.fixture(scope="module")
def pipe(tiny):
    return VDPipeline(load_diffusers_folder(tiny["folder"]))


def _latents(n, seed=0):
    return (
        np.random.default_rng(seed)
        .standard_normal((n, 4, IMAGE_PX // 2, IMAGE_PX // 2))
        .astype(np.float32)
    )


def _reference(pipeline, *args, latents, **kw):
    with torch.no_grad():
        out = pipeline(*args, latents=torch.from_numpy(latents), output_type="np", **kw)
    return np.asarray(out.images, np.float32)


def test_text_to_image_matches_diffusers(tiny, pipe):
    prompts = ["a red circle on a blue background", "a green square"]
    lat = _latents(4)
    ref = _reference(
        tiny["refs"]["text_to_image"],
        prompts,
        num_inference_steps=6,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        latents=lat,
    )
    ours = pipe.text_to_image(
        prompts, num_samples=2, num_steps=6, guidance_scale=7.5, init_noise=lat, show_progress=False
    )
    assert ours.images.shape == ref.shape == (4, IMAGE_PX, IMAGE_PX, 3)
    err = np.abs(ours.images - ref).max()
    assert err <= PIXEL_TOL, err
    # Different prompts must give different images, or the comparison proves little.
    assert np.abs(ref[0] - ref[2]).max() > 20 * PIXEL_TOL


def test_image_variation_matches_diffusers(tiny, pipe):
    images = [sample_picture(1), sample_picture(2, (64, 48))]
    lat = _latents(2, seed=1)
    ref = _reference(
        tiny["refs"]["image_variation"],
        images,
        num_inference_steps=5,
        guidance_scale=5.0,
        latents=lat,
    )
    ours = pipe.image_variation(
        images, num_steps=5, guidance_scale=5.0, init_noise=lat, show_progress=False
    )
    err = np.abs(ours.images - ref).max()
    assert err <= PIXEL_TOL, err


@pytest.mark.parametrize("text_strength", [0.3, 1.0])
def test_dual_guided_matches_diffusers(tiny, pipe, monkeypatch, text_strength):
    patch_dual_transformer(monkeypatch)
    lat = _latents(1, seed=2)
    ref = _reference(
        tiny["refs"]["dual_guided"],
        "a red circle",
        sample_picture(3),
        num_inference_steps=5,
        guidance_scale=7.5,
        text_to_image_strength=text_strength,
        latents=lat,
    )
    ours = pipe.dual_guided(
        "a red circle",
        sample_picture(3),
        text_strength=text_strength,
        num_steps=5,
        guidance_scale=7.5,
        init_noise=lat,
        show_progress=False,
    )
    err = np.abs(ours.images - ref).max()
    assert err <= PIXEL_TOL, err


def test_dual_guided_extremes_reduce_to_single_flows(pipe):
    """text_strength 1 is text->image and 0 is image variation, in vd_jax itself."""
    lat = _latents(1, seed=3)
    kw = dict(num_steps=4, guidance_scale=3.0, init_noise=lat, show_progress=False)
    img = sample_picture(4)
    np.testing.assert_allclose(
        pipe.dual_guided("a cat", img, text_strength=1.0, **kw).images,
        pipe.text_to_image("a cat", **kw).images,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        pipe.dual_guided("a cat", img, text_strength=0.0, **kw).images,
        pipe.image_variation(img, **kw).images,
        atol=1e-5,
    )


def test_compiled_once_per_shape(pipe):
    kw = dict(num_steps=3, guidance_scale=2.0, show_progress=False)
    first = pipe.text_to_image("one", seed=1, **kw)
    second = pipe.text_to_image("two", seed=2, **kw)
    assert second.compile_s == 0.0  # cached executable, no retrace
    assert not np.allclose(first.images, second.images)


def test_bad_arguments_raise(pipe):
    with pytest.raises(ValueError, match="init_noise has shape"):
        pipe.text_to_image("x", num_steps=2, init_noise=np.zeros((1, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="height"):
        pipe.text_to_image("x", num_steps=2, height=15)
    with pytest.raises(ValueError, match="text_strength"):
        pipe.dual_guided("x", sample_picture(), text_strength=1.5, num_steps=2)
    with pytest.raises(ValueError, match="2 prompts but 3 images"):
        pipe.dual_guided(["a", "b"], [sample_picture()] * 3, num_steps=2)


def test_flow_loads_only_what_it_needs(tiny):
    models = load_diffusers_folder(tiny["folder"], flows=("text_to_image",))
    assert models.vision_params is None and models.image_processor is None
    assert set(models.diffuser_params) == {"global", "data", "context"}
    assert set(models.diffuser_params["data"]) == {"image"}
    assert set(models.diffuser_params["context"]) == {"text"}


def _config(tiny, out, **overrides):
    c = sample_config.get_config("text_to_image")
    c.weights = tiny["folder"]
    c.output_dir = str(out)
    c.num_steps = 4
    c.progress = False
    c.update(overrides)
    return c


def test_sampling_run_writes_outputs(tiny, tmp_path):
    lat = _latents(2, seed=5)
    np.save(tmp_path / "noise.npy", lat)
    picture = tmp_path / "in.png"
    sample_picture(6).save(picture)
    out = tmp_path / "out"
    record = sampling.run(
        _config(
            tiny,
            out,
            flow="dual_guided",
            prompt="a red circle",
            image=str(picture),
            text_strength=0.6,
            num_samples=2,
            init_noise=str(tmp_path / "noise.npy"),
        )
    )
    files = sorted(os.listdir(out))
    assert files == ["run.json", "sample_000.png", "sample_001.png", "samples.npy"]
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2, IMAGE_PX, IMAGE_PX, 3) and samples.dtype == np.float32
    assert 0.0 <= samples.min() and samples.max() <= 1.0
    run = json.loads((out / "run.json").read_text())
    assert run == json.loads(json.dumps(record))
    assert set(run["timings"]) == {"load_s", "compile_s", "sample_s"}
    assert run["config"]["text_strength"] == 0.6 and run["seed"] == 0


def test_sampling_config_errors(tiny, tmp_path):
    with pytest.raises(sampling.ConfigError, match="config.weights"):
        sampling.run(_config(tiny, tmp_path, weights=""))
    with pytest.raises(sampling.ConfigError, match="config.flow"):
        sampling.run(_config(tiny, tmp_path, flow="image_to_video"))
    with pytest.raises(sampling.ConfigError, match="config.image"):
        sampling.run(_config(tiny, tmp_path, flow="image_variation"))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        sampling.run(_config(tiny, tmp_path, flow="image_variation", image="nope.png"))
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.slow
def test_sample_py_cli(tiny, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "sample.py",
        "--config=configs/sample.py:text_to_image",
        f"--config.weights={tiny['folder']}",
        "--config.prompt=a red circle|a blue square",
        "--config.num_steps=3",
        f"--config.output_dir={out}",
        "--config.seed=3",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(out / "samples.npy").shape == (2, IMAGE_PX, IMAGE_PX, 3)
    bad_cmd = [
        a if not a.startswith("--config.weights=") else "--config.weights=/nonexistent" for a in cmd
    ]
    bad = subprocess.run(bad_cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "/nonexistent" in bad.stderr and "Traceback" not in bad.stderr
