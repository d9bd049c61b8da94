"""Text flows trained from raw captioned images with pretrained-format encoders: the host only
tokenizes captions, Optimus' BERT encoder runs inside the jitted step (under the loop's
transfer guard) and gives the same latents as the eager `OptimusVAE.encode`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import FIXTURES

from configs import tiny
from vd_jax.processing.optimus_tokenizers import ENCODER_LENGTH
from vd_jax.train import sharding as shd
from vd_jax.train.loop import train_and_evaluate
from vd_jax.train.metrics import MetricsWriter

torch = pytest.importorskip("torch")

FLOWS = ("image_to_text", "text_variation")
TINY_SIZES = json.loads((FIXTURES / "tiny_config.json").read_text())
LATENT_SIZE = TINY_SIZES["vae.text"]["latent_size"]  # Optimus'; the diffuser's text_dim
# In float32 the in-step latents differ from the eager ones only by summation order (the
# step pads every sentence to ENCODER_LENGTH, the eager call to the batch's longest).
LATENT_ATOL = 1e-5
CAPTIONS = [
    "A red circle on a BLUE background",
    "x",
    "two cats, one dog and a very long list of things: " + "apples and pears, " * 30,
    "",
]


def _random_state(manifest: dict, seed: int) -> dict:
    """Random tensors with the manifest's keys, shapes and dtypes (integer buffers zero)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, info in manifest.items():
        dtype = np.dtype(info["dtype"].replace("torch.", ""))
        if np.issubdtype(dtype, np.integer):
            arr = np.zeros(info["shape"], dtype)
        else:
            arr = np.asarray(rng.standard_normal(info["shape"]) * 0.05, dtype)
        out[key] = torch.from_numpy(arr)
    for key in out:  # GPT-2's output projection is tied to its token embeddings
        if key.endswith("decoder.lm_head.weight"):
            out[key] = out[key.replace("lm_head.weight", "transformer.wte.weight")]
    return out


def _lively_text_encoder(state: dict, seed: int) -> None:
    """Gives Optimus' BERT unit-scale activations, so that its latents tell sentences apart:
    with every tensor at 0.05 (LayerNorm scales included) they hardly depend on the input."""
    rng = np.random.default_rng(seed)
    for key, t in state.items():
        if not key.startswith("optimus.encoder."):
            continue
        if key.endswith("LayerNorm.weight"):
            state[key] = torch.ones_like(t)
        elif key.endswith("LayerNorm.bias"):
            state[key] = torch.zeros_like(t)
        elif t.ndim == 2 and ".embeddings." not in key:  # [out, in]: unit-variance outputs
            w = rng.standard_normal(tuple(t.shape)) / np.sqrt(t.shape[1])
            state[key] = torch.from_numpy(np.asarray(w, np.float32)).to(t.dtype)


@pytest.fixture(scope="module")
def original_folder(tmp_path_factory):
    """A tiny random folder in the released old layout: one file with the diffuser, VAE,
    CLIP and Optimus (the diffusers layout has no Optimus)."""
    d = tmp_path_factory.mktemp("tiny_original")
    manifest = json.loads((FIXTURES / "tiny_four_flow_old.json").read_text())["keys"]
    state = _random_state(manifest, 0)
    _lively_text_encoder(state, 1)
    torch.save(state, d / "vd-four-flow-v1-0.pth")
    (d / "vd_config.json").write_text(json.dumps(TINY_SIZES))
    return str(d)


def _config(folder: str, steps: int):
    """Tiny text flows on raw fake data with the folder's encoders; samples at the end only."""
    c = tiny.get_config("kind=raw,levels=1,flows=" + "+".join(FLOWS))
    c.model.text_dim = LATENT_SIZE
    c.encoders.update(source="pretrained", folder=folder, text_vae="optimus")
    c.num_steps, c.checkpoint_every, c.peak_flops, c.sample_every = steps, 1000, 1.0, 0
    return c


def test_text_flows_train_with_optimus_in_the_step(tmp_path, original_folder):
    steps = 8
    mesh = shd.make_mesh("1,1", jax.devices()[:1])
    out = train_and_evaluate(_config(original_folder, steps), str(tmp_path), mesh=mesh)
    trainer = out["trainer"]
    assert out["step"] == steps
    rows = MetricsWriter.read_jsonl(tmp_path / "metrics.jsonl")
    losses = np.asarray([r["loss"] for r in rows])
    print("losses", np.round(losses, 4))
    assert len(losses) == steps and np.all(np.isfinite(losses))
    assert losses[-2:].mean() < losses[:2].mean()
    # The final samples went through the sampler's own in-jit encode and Optimus' decoder.
    for flow in FLOWS:
        lines = (tmp_path / "samples" / f"{flow}_{steps:07d}.txt").read_text().splitlines()
        assert len(lines) == trainer.config.num_samples, flow

    enc = trainer.encoders
    assert set(enc.params["optimus"]) == set(enc.text_vae.encoder_params)
    assert "optimus" in trainer.frozen  # placed on the mesh with the other frozen params

    # The host tokenizes: fixed-length ids and mask, no text latents.
    batch = enc.host_prepare({"caption": np.asarray(CAPTIONS, object)}, {"text_latent"})
    assert "text_latent" not in batch
    for k in ("optimus_ids", "optimus_mask"):
        assert batch[k].shape == (len(CAPTIONS), ENCODER_LENGTH) and batch[k].dtype == np.int32
    assert batch["optimus_mask"][2].all() and not batch["optimus_mask"][1].all()

    # The in-step latents (jitted, the trainer's placed params) equal the eager reference.
    encode = jax.jit(lambda f, b: enc.encode(f, b, None, {"text_latent"})[0]["text_latent"])
    in_step = np.asarray(encode(trainer.frozen, batch))
    eager = np.asarray(enc.text_vae.encode(CAPTIONS))
    err = float(np.abs(in_step - eager).max())
    print(
        f"in-step vs eager Optimus latents: max abs {err:.2e} (|mu| max {np.abs(eager).max():.2f})"
    )
    assert in_step.shape == (len(CAPTIONS), LATENT_SIZE)
    assert err <= LATENT_ATOL
    # Distinct sentences give distinct latents (the comparison is not of constants).
    assert np.abs(eager[0] - eager[1]).max() > 100 * LATENT_ATOL


def test_latent_cache_encodes_captions_in_jit(original_folder):
    """The latent cache builder's encoder takes the same in-jit Optimus path (its short last
    batch padded), so cached text latents are the eager ones too."""
    from vd_jax.data.caching import CacheEncoder

    encoder = CacheEncoder(_config(original_folder, 1), batch_size=len(CAPTIONS) + 1)
    assert encoder.encoders.text_latents_in_step
    images = np.random.default_rng(0).uniform(size=(len(CAPTIONS), 16, 16, 3))
    batch = {"image": images.astype(np.float32), "caption": np.asarray(CAPTIONS, object)}
    cached = encoder(batch)["text_latent"]
    eager = np.asarray(encoder.encoders.text_vae.encode(CAPTIONS))
    err = float(np.abs(cached - eager).max())
    print(f"cached vs eager Optimus latents: max abs {err:.2e}")
    assert cached.shape == eager.shape and err <= LATENT_ATOL
