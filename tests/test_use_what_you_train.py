"""A vd_jax run as weights: sampled from its workdir, fine-tuned from any source, exported and
read by diffusers and by vd_jax's reader of the original files.

Tolerances: a run's params load bit-identical to the trainer's final state; diffusers'
pipelines on an export give sample.py's pixels to <= 2e-3 max abs on [0, 1] images (the
pipelines' parity bound, tests/test_pipelines.py); captions read back from an original-format
export are the same strings.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import sample as sample_config
from configs import tiny
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.load import load_models
from vd_jax.convert.run_folder import RUN_FILE
from vd_jax.pipelines import VDPipeline, sampling
from vd_jax.train.loop import train_and_evaluate
from vd_jax.train.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL_TOL = 2e-3
# One CPU device in the subprocesses (conftest gives this process 8).
ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two steps of the tiny trainer on raw fake data (random VAE / CLIP saved in the run)."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny.get_config("kind=raw,levels=1,flows=text_to_image+image_variation")
    cfg.update(num_steps=2, checkpoint_every=1, keep_checkpoints=3, sample_every=-1)
    cfg.async_checkpointing = False
    out = train_and_evaluate(cfg, str(workdir), mesh=make_mesh("1,1", jax.devices()[:1]))
    return workdir, cfg, out


def test_run_records_what_sampling_needs(tiny_run):
    workdir, cfg, _ = tiny_run
    rec = json.loads((workdir / RUN_FILE).read_text())
    assert rec["flows"] == ["text_to_image", "image_variation"]
    assert rec["encoders"] == {"kind": "saved", "folder": "encoders"}
    assert rec["diffuser"]["model_channels"] == cfg.model.model_channels
    assert (rec["latent_size"], rec["image_size"]) == (8, 16)
    assert rec["schedule"]["beta_schedule"] == "scaled_linear"
    assert (workdir / "encoders" / "encoders.json").is_file()


def test_from_pretrained_reads_the_runs_ema_and_raw_params(tiny_run):
    workdir, _, out = tiny_run
    state = jax.device_get(out["state"])
    ema = VDPipeline.from_pretrained(str(workdir)).models
    assert ema.flows == ("text_to_image", "image_variation")
    assert "step 2, ema_params" in ema.source
    for want, got in (
        (state["ema_params"], ema.diffuser_params),
        (state["params"], load_models(str(workdir), None, use_ema=False).diffuser_params),
    ):
        want, got = _flat(want), _flat(got)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    older = _flat(load_models(str(workdir), None, checkpoint_step=1).diffuser_params)
    assert any(not np.array_equal(older[k], v) for k, v in _flat(ema.diffuser_params).items())


def test_sample_py_samples_a_run(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    out = tmp_path / "t2i"
    cmd = [
        sys.executable, "sample.py", "--config=configs/sample.py:text_to_image",
        f"--config.weights={workdir}", "--config.prompt=a red circle", "--config.num_steps=2",
        "--config.checkpoint_step=1", "--config.use_ema=False", f"--config.output_dir={out}",
        "--config.progress=False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert "(step 1, params)" in run["weights"]
    assert np.asarray(Image.open(out / "sample_000.png")).shape == (16, 16, 3)


def test_a_run_in_a_bucket_loads_like_the_local_one(tiny_run, tmp_path):
    """A pod's workdir in gs:// (a GCS API server on loopback): the same params and encoders."""
    from etils import epath
    from fake_gcs import FakeGCS

    from vd_jax.convert.load import copy_tree

    workdir, _, _ = tiny_run
    local = load_models(str(workdir), ["text_to_image"])
    with FakeGCS(tmp_path / "gcs") as gcs:
        url = f"{gcs.bucket('vd-runs')}/tiny"
        copy_tree(epath.Path(workdir), epath.Path(url))
        remote = load_models(url, ["text_to_image"])
    assert remote.source.startswith("gs://vd-runs/tiny (step 2, ema_params)")
    for want, got in ((local.diffuser_params, remote.diffuser_params),
                      (local.text_params, remote.text_params)):  # fmt: skip
        want, got = _flat(want), _flat(got)
        assert want.keys() == got.keys()
        assert all(np.array_equal(got[k], v) for k, v in want.items())


def test_run_errors_name_the_problem(tiny_run, tiny_vd):
    workdir, _, _ = tiny_run
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7; it has steps \[1, 2\]"):
        load_models(str(workdir), ["text_to_image"], checkpoint_step=7)
    with pytest.raises(CheckpointError, match=r"need the diffuser parts \['data/text'\]"):
        load_models(str(workdir), ["image_to_text"])
    with pytest.raises(CheckpointError, match="applies to vd_jax runs"):
        load_models(tiny_vd["folder"], ["text_to_image"], checkpoint_step=3)
    cfg = sample_config.get_config("image_variation")
    cfg.update(weights=str(workdir), image="missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sampling.run(cfg)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def user_dataset(tmp_path_factory):
    """A folder of captioned PNGs built into a TFDS dataset by the datasets command."""
    root = tmp_path_factory.mktemp("user")
    pngs = root / "pngs"
    pngs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(pngs / f"{i}.png")
        (pngs / f"{i}.txt").write_text(f"a photo of thing number {i}")
    cmd = [sys.executable, "-m", "vd_jax.datasets", "folder", str(pngs),
           f"--data_dir={root / 'data'}", "--name=mine"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _finetune(source, workdir, data_root, flows):
    cmd = [
        sys.executable, "train.py", f"--config=configs/finetune.py:flows={flows}",
        f"--workdir={workdir}", f"--config.init_from={source}",
        "--config.data.name=captioned_images/mine", f"--config.data.data_dir={data_root / 'data'}",
        "--config.num_steps=2", "--config.batch_size=2", "--config.dtype=float32",
        "--config.mesh_shape=1,1", "--config.checkpoint_every=2", "--config.sample_every=-1",
        "--config.optim.warmup_steps=0", "--config.optim.lr=1e-3", "--config.xla_opt_level=0",
        "--config.async_checkpointing=False",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _export(source, output, fmt):
    cmd = [sys.executable, "-m", "vd_jax.export", f"--source={source}", f"--output={output}",
           f"--format={fmt}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


@pytest.mark.slow
def test_finetune_sample_export_and_diffusers_agree(tiny_vd, user_dataset, tmp_path):
    """captioned PNGs -> dataset -> fine-tune of a diffusers folder -> sample.py from the run
    -> export to diffusers -> diffusers' pipelines give sample.py's images."""
    import torch
    from diffusers.pipelines.deprecated.versatile_diffusion import (
        VersatileDiffusionImageVariationPipeline,
        VersatileDiffusionTextToImagePipeline,
    )

    run = tmp_path / "ft"
    _finetune(tiny_vd["folder"], run, user_dataset, "text_to_image+image_variation")
    source_params = _flat(load_models(tiny_vd["folder"], ["text_to_image"]).diffuser_params)
    tuned = _flat(load_models(str(run), ["text_to_image"]).diffuser_params)
    assert any(not np.allclose(tuned[k], v) for k, v in source_params.items())  # it trained

    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    image = str(user_dataset / "pngs" / "0.png")
    ours = {}
    for flow in ("text_to_image", "image_variation"):
        cfg = sample_config.get_config(flow)
        cfg.update(
            weights=str(run), prompt="a photo of thing number 1", image=image, num_steps=4,
            init_noise=str(tmp_path / "noise.npy"), output_dir=str(tmp_path / flow),
            progress=False,
        )  # fmt: skip
        sampling.run(cfg)
        ours[flow] = np.load(tmp_path / flow / "samples.npy")

    exported = tmp_path / "exported"
    report = _export(run, exported, "diffusers")
    assert "image_unet/diffusion_pytorch_model.safetensors" in report["files"]
    # The text data layers were not fine-tuned: the export carries the source's.
    text_data = _flat(load_models(str(exported), None).diffuser_params["data"]["text"])
    source_text = _flat(load_models(tiny_vd["folder"], None).diffuser_params["data"]["text"])
    assert text_data.keys() == source_text.keys()
    assert all(np.array_equal(text_data[k], v) for k, v in source_text.items())
    kw = dict(num_inference_steps=4, output_type="np", latents=torch.from_numpy(noise))
    with torch.no_grad():
        t2i = VersatileDiffusionTextToImagePipeline.from_pretrained(exported)
        ref = t2i("a photo of thing number 1", guidance_scale=7.5, **kw).images
        np.testing.assert_allclose(ours["text_to_image"], ref, atol=PIXEL_TOL)
        iv = VersatileDiffusionImageVariationPipeline.from_pretrained(exported)
        ref = iv(Image.open(image).convert("RGB"), guidance_scale=7.5, **kw).images
        np.testing.assert_allclose(ours["image_variation"], ref, atol=PIXEL_TOL)


def test_folding_a_latent_scale_into_optimus_is_exact():
    """An original-format export cannot store a text latent scale: it is folded into Optimus'
    latent head and latent projections (models.optimus.fold_latent_scale)."""
    import jax.numpy as jnp

    from vd_jax.models.optimus import (
        BertConfig,
        BertEncoder,
        GPT2Config,
        GPT2Decoder,
        fold_latent_scale,
    )

    bert = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, latent_size=8, vocab_size=64,
    )  # fmt: skip
    gpt2 = GPT2Config(n_positions=16, n_embd=32, n_layer=1, n_head=4, latent_size=8, vocab_size=64)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 7)), jnp.int32)
    enc_p = BertEncoder(bert).init(jax.random.key(0), ids, ids > 0, method="latent")["params"]
    z = jax.random.normal(jax.random.key(1), (2, 8))
    dec_p = GPT2Decoder(gpt2).init(jax.random.key(2), ids, z)["params"]
    scale = 1.7
    folded = fold_latent_scale({"encoder": enc_p, "decoder": dec_p}, scale)
    mu = BertEncoder(bert).apply({"params": enc_p}, ids, ids > 0, method="latent")[0]
    mu_f = BertEncoder(bert).apply({"params": folded["encoder"]}, ids, ids > 0, method="latent")[0]
    np.testing.assert_allclose(mu_f, scale * mu, rtol=1e-5, atol=1e-6)
    logits = GPT2Decoder(gpt2).apply({"params": dec_p}, ids, z)
    logits_f = GPT2Decoder(gpt2).apply({"params": folded["decoder"]}, ids, scale * z)
    np.testing.assert_allclose(logits_f, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_text_flow_run_exported_to_original_reads_back_the_same_captions(user_dataset, tmp_path):
    """A fine-tune of the released files' layout (with Optimus) on image->text, exported to the
    original format and read back: the same greedy captions as from its workdir."""
    from helpers import write_tiny_original

    source = write_tiny_original(tmp_path / "source")
    run = tmp_path / "ft_text"
    _finetune(source, run, user_dataset, "image_to_text")
    exported = tmp_path / "exported"
    report = _export(run, exported, "original")
    for name in (
        "vd-four-flow-v1-0-fp16.safetensors",
        "optimus-vae.safetensors",
        "clip/config.json",
    ):
        assert name in report["files"]
    image = Image.open(user_dataset / "pngs" / "2.png").convert("RGB")
    kw = dict(num_steps=4, seed=0, decode={"method": "greedy"}, show_progress=False)
    # The released layout stores the diffuser in float16: compare with the run's diffuser
    # rounded the same way, so any other difference shows.
    models = load_models(str(run), ["image_to_text"])
    models.diffuser_params = jax.tree_util.tree_map(
        lambda x: np.asarray(x, np.float16).astype(np.float32), models.diffuser_params
    )
    ours = VDPipeline(models).image_to_text(image, **kw)
    back = VDPipeline.from_pretrained(str(exported), ["image_to_text"]).image_to_text(image, **kw)
    np.testing.assert_allclose(back.latents, ours.latents, atol=1e-5)
    assert back.texts == ours.texts and ours.texts[0].strip()


def test_finetune_config_takes_sizes_encoders_and_flows_from_its_source(tiny_vd, tiny_run):
    from configs import finetune as finetune_config
    from vd_jax.train.finetune import resolve

    cfg = finetune_config.get_config()
    with pytest.raises(ValueError, match="give --config.init_from"):
        resolve(cfg)
    cfg.init_from = tiny_vd["folder"]
    out = resolve(cfg)
    image_unet = json.loads(open(os.path.join(tiny_vd["folder"], "image_unet/config.json")).read())
    assert out.model.model_channels == image_unet["block_out_channels"][0]
    assert (out.image_size, out.latent_size) == (16, 8)
    assert out.encoders.folder == tiny_vd["folder"] and out.encoders.on_the_fly
    assert set(out.flows) == {"text_to_image", "image_variation", "dual_guided"}  # no Optimus
    assert out.schedule.beta_schedule == "scaled_linear" and out.prediction_type == "epsilon"
    cfg.image_size = 32  # another resolution: the latents follow
    assert (resolve(cfg).image_size, resolve(cfg).latent_size) == (32, 16)
    workdir, run_cfg, _ = tiny_run  # a vd_jax run as the source
    cfg = finetune_config.get_config("flows=text_to_image")
    cfg.init_from = str(workdir)
    out = resolve(cfg)
    assert out.model.model_channels == run_cfg.model.model_channels
    assert list(out.flows) == ["text_to_image"]
