"""`python -m vd_jax.datasets`: folder / webdataset builds, the latent cache, training from it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from vd_jax.data import input_pipeline
from vd_jax.data.cli import main
from vd_jax.data.fake_data import FakeTextVAE
from vd_jax.models.vae import encode_images
from vd_jax.train import sharding as shd
from vd_jax.train.loop import train_and_evaluate
from vd_jax.train.metrics import MetricsWriter

REPO = Path(__file__).resolve().parents[1]
# Two flows that together need all four cached entries (image/text latents and contexts).
FLOWS = "text_to_image+image_to_text"
RAW_CONFIG = f"{REPO}/configs/tiny.py:kind=raw,flows={FLOWS}"


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
    """A persistent XLA cache: the cache pass, this test and the trainer build the same random
    encoders (their init compiles take most of the time on CPU)."""
    d = str(tmp_path_factory.getbasetemp() / "jit_cache")  # shared with tests/test_train.py
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return d


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """5 captioned 16x16 PNGs, a corrupt one with a caption and a caption-less one."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    pixels = {}
    for i in range(5):
        pixels[f"img{i}.png"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        (root / f"img{i}.png").write_bytes(_png(pixels[f"img{i}.png"]))
        (root / f"img{i}.txt").write_text(f"a picture number {i}\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (root / "broken.txt").write_text("never decoded")
    (root / "nocap.png").write_bytes(_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    return root, pixels


@pytest.fixture(scope="module")
def built(src, tmp_path_factory):
    """The `folder` subcommand as a user runs it; stdout is the report as JSON."""
    data_dir = tmp_path_factory.mktemp("tfds")
    cmd = [sys.executable, "-m", "vd_jax.datasets", "folder", str(src[0]),
           f"--data_dir={data_dir}", "--name=toy"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return data_dir, json.loads(out.stdout)


def test_folder_report(built):
    data_dir, report = built
    assert report["tfds_name"] == "captioned_images/toy"
    assert report["written"] == 5 and report["written_per_split"] == {"train": 5}
    assert report["skipped_corrupt"] == 1 and report["skipped_no_caption"] == 1
    assert report["skipped_keys"] == {"corrupt": ["broken.png"], "no_caption": ["nocap.png"]}
    assert (data_dir / "captioned_images" / "toy" / "1.0.0" / "build_report.json").exists()


def test_webdataset_and_usage(tmp_path, capsys):
    rng = np.random.default_rng(1)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for key, caption in (("000", "first"), ("001", "second"), ("002", None)):
            parts = {"png": _png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))}
            if caption:
                parts["txt"] = caption.encode()
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    argv = ["prog", "webdataset", str(tmp_path / "*.tar"), f"--data_dir={tmp_path / 'tfds'}",
            "--name=shards", "--val_fraction=0"]  # fmt: skip
    report = main(argv)
    assert json.loads(capsys.readouterr().out) == report
    assert report["written"] == 2 and report["skipped_keys"] == {"no_caption": ["002"]}
    with pytest.raises(SystemExit):
        main(["prog", "webdataset", str(tmp_path / "*.tar"), f"--data_dir={tmp_path}"])  # no name
    with pytest.raises(SystemExit):
        main(["prog", "frobnicate", f"--data_dir={tmp_path}"])


@pytest.fixture(scope="module")
def cache(built, tmp_path_factory, jit_cache):
    """The `cache` subcommand, in-process: tiny random encoders on the raw images."""
    data_dir, report = built
    cache_dir = tmp_path_factory.mktemp("cache")
    argv = ["prog", "cache", f"--config={RAW_CONFIG}", "--config.image_size=16",
            f"--data_dir={cache_dir}", f"--source_name={report['tfds_name']}",
            f"--source_data_dir={data_dir}", "--batch_size=4"]  # fmt: skip
    return main(argv)


def _read_cache(cache) -> dict[str, np.ndarray]:
    """The whole cache as one batch, through the training input pipeline."""
    data = ml_collections.ConfigDict(dict(source="tfds", name=cache["tfds_name"],
                                          data_dir=cache["data_dir"], shuffle=False,
                                          num_epochs=1))  # fmt: skip
    with input_pipeline.create_iterator(data, batch_size_per_host=8, drop_remainder=False) as it:
        (batch,) = list(it)
    return batch


def test_cache_contents(cache, src):
    _, pixels = src
    assert cache["tfds_name"] == "latent_cache/toy_16" and cache["num_examples"] == {"train": 5}
    arrays = {
        "image_latent": [[8, 8, 4], "float32"],
        "text_latent": [[24], "float32"],
        "text_context": [[77, 32], "bfloat16"],  # contexts in bfloat16 by default
        "image_context": [[17, 32], "bfloat16"],
    }
    assert cache["arrays"] == arrays and cache["skipped"] == {} and cache["complete"]
    overrides = cache["train_overrides"]
    assert overrides["data.name"] == cache["tfds_name"] and overrides["latent_size"] == 8
    assert overrides["encoders.text_context_len"] == 77
    assert "--config.data.name=latent_cache/toy_16" in cache["train_flags"]
    batch = _read_cache(cache)
    assert sorted(batch["key"]) == sorted(pixels)
    for name, (shape, dtype) in arrays.items():
        assert batch[name].shape == (5, *shape) and batch[name].dtype == dtype
    config = tiny.get_config(f"kind=raw,flows={FLOWS}")
    text = FakeTextVAE(config.model.text_dim, seed=config.seed).encode(list(batch["caption"]))
    np.testing.assert_array_equal(batch["text_latent"], text)
    # A second run reuses the cache without building any encoder.
    argv = ["prog", "cache", f"--config={RAW_CONFIG}", f"--data_dir={cache['data_dir']}",
            f"--source_name={cache['source']['name']}", "--name=toy_16"]  # fmt: skip
    assert main(argv)["reused"] is True


def test_train_from_cache(cache, src, tmp_path, jit_cache):
    c = tiny.get_config(f"flows={FLOWS}")
    c.num_steps, c.checkpoint_every, c.peak_flops, c.sample_every = 2, 1000, 1.0, -1
    # A one-level U-Net without EMA: this test is about the data; halves the compile on CPU.
    c.model.update(channel_mult=(1,), attention_levels=(True,))
    c.ema_decay = 0.0
    c.data = ml_collections.ConfigDict(dict(source="tfds", name="", data_dir=""))
    c.update_from_flattened_dict(cache["train_overrides"])
    out = train_and_evaluate(c, str(tmp_path), shd.make_mesh("1,1", jax.devices()[:1]))
    rows = MetricsWriter.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The cached latents are the posterior mean of the center-cropped images under the VAE
    # the trainer builds from the same config (5 images in batches of 4: the short, padded
    # batch gives the same rows as one unpadded call).
    _, pixels = src
    batch = _read_cache(cache)
    images = np.stack([pixels[k] for k in batch["key"]]).astype(np.float32) / 255.0
    enc = out["trainer"].encoders
    direct = jax.jit(lambda p, x: encode_images(enc.vae, p, x, None))(enc.params["vae"], images)
    np.testing.assert_allclose(batch["image_latent"], np.asarray(direct), atol=1e-5, rtol=1e-5)
