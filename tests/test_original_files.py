"""SHI-Labs' released file layouts: random tensors from the tiny manifests load and run every
flow through sample.py; the full-size manifests are accounted for key by key."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import FIXTURES, manifest, random_state
from PIL import Image

from configs import sample as sample_config
from vd_jax.convert import core
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.load import load_models
from vd_jax.convert.original_files import _SCHEDULE_BUFFERS, _check_accounted
from vd_jax.pipelines import sampling

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_original(tmp_path_factory):
    """Two folders: the old full file alone, and new fp16 + kl-f8 + optimus-vae + clip/."""
    root = tmp_path_factory.mktemp("original")
    config = json.loads((FIXTURES / "tiny_config.json").read_text())
    old = root / "old"
    old.mkdir()
    torch.save(random_state(manifest("tiny_four_flow_old.json"), 0), old / "vd-four-flow-v1-0.pth")
    new = root / "new"
    new.mkdir()
    torch.save(
        random_state(manifest("tiny_four_flow_new_fp16.json"), 1),
        new / "vd-four-flow-v1-0-fp16.pth",
    )
    torch.save(random_state(manifest("tiny_kl_f8.json"), 2), new / "kl-f8.pth")
    torch.save(random_state(manifest("tiny_optimus_vae.json"), 3), new / "optimus-vae.pth")
    # The new file has no CLIP: give a transformers CLIPModel folder, as a user would.
    from transformers import CLIPConfig, CLIPModel

    clip_cfg = config["ctx (CLIP)"]
    clip = CLIPModel(
        CLIPConfig(
            text_config=clip_cfg["text"],
            vision_config=clip_cfg["vision"],
            projection_dim=clip_cfg["projection_dim"],
        )
    )
    clip.save_pretrained(new / "clip")
    for d in (old, new):
        (d / "vd_config.json").write_text(json.dumps(config))
    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (48, 40, 3))).astype(np.uint8)).save(
        root / "in.png"
    )
    return root


def _config(folder, out, flow, **kw):
    c = sample_config.get_config(flow)
    c.weights = str(folder)
    c.output_dir = str(out)
    c.num_steps = 3
    c.progress = False
    c.update(kw)
    return c


FLOW_ARGS = {
    "text_to_image": dict(prompt="a red circle"),
    "image_variation": dict(image="IN", focus=0.2, fidelity=0.5, color_adjust=True),
    "dual_guided": dict(prompt="a red circle", image="IN", text_strength=0.4, focus=0.8),
    "multi_context": dict(
        image="IN,IN",
        image_weights="1,0.5",
        image_focus="0.5,0.9",
        prompt="a cat",
        text_strength=0.3,
    ),
    "image_to_text": dict(image="IN", num_samples=2),
    "text_variation": dict(prompt="a red circle on a blue background", num_samples=2),
    "i2t2i": dict(image="IN", negative_prompt="a dog", positive_prompt="a cat"),
}


@pytest.mark.parametrize("layout", ["old", "new"])
@pytest.mark.parametrize("flow", list(FLOW_ARGS))
def test_every_flow_runs_from_original_files(tiny_original, tmp_path, layout, flow):
    args = {
        k: (v.replace("IN", str(tiny_original / "in.png")) if isinstance(v, str) else v)
        for k, v in FLOW_ARGS[flow].items()
    }
    record = sampling.run(_config(tiny_original / layout, tmp_path, flow, **args))
    files = set(os.listdir(tmp_path))
    if flow in ("image_to_text", "text_variation", "i2t2i"):
        texts = json.loads((tmp_path / "texts.json").read_text())["texts"]
        assert len(texts) == args.get("num_samples", 1) and all(isinstance(t, str) for t in texts)
    if flow not in ("image_to_text", "text_variation"):
        images = np.load(tmp_path / "samples.npy")
        # tiny_config: VAE resolution 64 at factor 2 -> 32 latent -> 64 px images
        assert images.shape[1:] == (64, 64, 3) and np.isfinite(images).all()
        assert "sample_000.png" in files
    assert record["flow"] == flow and "run.json" in files


def test_flow_reads_only_what_it_needs(tiny_original):
    models = load_models(tiny_original / "new", ("text_to_image",))
    assert set(models.diffuser_params["data"]) == {"image"}
    assert set(models.diffuser_params["context"]) == {"text"}
    assert models.optimus_params is None and models.vision_params is None
    models = load_models(tiny_original / "new", ("image_to_text",))
    assert set(models.optimus_params) == {"decoder"}
    assert set(models.diffuser_params["data"]) == {"text"}


def test_unknown_key_in_old_file_is_named(tiny_original, tmp_path):
    sd = torch.load(tiny_original / "old" / "vd-four-flow-v1-0.pth", weights_only=True)
    sd["model.diffusion_model.unet_image.stray.weight"] = torch.zeros(2)
    d = tmp_path / "bad"
    d.mkdir()
    torch.save(sd, d / "vd-four-flow-v1-0.pth")
    shutil.copy(tiny_original / "old" / "vd_config.json", d / "vd_config.json")
    with pytest.raises(CheckpointError, match="unet_image.stray.weight"):
        load_models(d, ("text_to_image",))


def test_missing_clip_for_new_format_is_explained(tiny_original, tmp_path):
    d = tmp_path / "noclip"
    shutil.copytree(tiny_original / "new", d)
    shutil.rmtree(d / "clip")
    with pytest.raises(CheckpointError, match="holds no CLIP weights"):
        load_models(d, ("text_to_image",))


def _shapes_only(manifest, name):
    def refuse(key):
        raise AssertionError(f"{key} was read: accounting must not read tensors")

    return core.StateDict({k: tuple(v["shape"]) for k, v in manifest.items()}, refuse, name)


def test_full_size_old_manifest_is_fully_accounted_for():
    from vd_jax.convert import unet_original
    from vd_jax.convert.clip import CLIP_IGNORE, clip_text_rules, clip_vision_rules
    from vd_jax.convert.optimus import optimus_ignore, optimus_rules
    from vd_jax.convert.vae import vae_rules
    from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
    from vd_jax.models.optimus import optimus_configs
    from vd_jax.models.unet import DiffuserConfig
    from vd_jax.models.vae import VAEConfig

    state = _shapes_only(manifest("four_flow_old.json"), "four_flow_old.json")
    rules = [
        unet_original.original_rules(DiffuserConfig(), "old"),
        vae_rules(VAEConfig(), "ldm", "autokl."),
        optimus_rules(*optimus_configs(None), "optimus."),
        clip_text_rules(CLIPTextConfig(), "clip.model."),
        clip_vision_rules(CLIPVisionConfig(), "clip.model."),
    ]
    ignore = [
        _SCHEDULE_BUFFERS,
        *optimus_ignore("optimus."),
        *CLIP_IGNORE,
        r"clip\.model\.logit_scale",
    ]
    _check_accounted(state, rules, ignore)  # raises on any unaccounted key
    mapped = {r.src for rs in rules for r in rs}
    assert (
        len(mapped) == 2581 - 12 - 12 - 1 - 1
    )  # minus schedule buffers, attn masks, lm_head, logit_scale
    with pytest.raises(CheckpointError, match="unexpected keys"):
        _check_accounted(state, rules[:-1], ignore)  # without the vision tower's table
