"""The weight writers: what vd_jax reads, it writes back bit for bit.

diffusers folder -> VDModels -> export_diffusers: the same tensors under the same keys,
configs that parse to the same sizes, and diffusers' own pipeline gives the same pixels.
Original files -> VDModels -> export_original: the released files' keys, shapes and dtypes
(the manifests), the same tensors (fp16 exact), buffers included. And the torch-free
`python -m vd_jax.tiny_folder` writes a folder vd_jax and diffusers both load.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import manifest, write_tiny_original
from safetensors.numpy import load_file

from vd_jax.convert import unet as unet_convert
from vd_jax.convert.components import read_json
from vd_jax.convert.core import (
    INVERSE_TRANSFORMS,
    TRANSFORMS,
    CheckpointError,
    export_state,
    flatten,
)
from vd_jax.convert.export import export_diffusers
from vd_jax.convert.export_original import export_original
from vd_jax.convert.load import load_models
from vd_jax.convert.original_files import _configs
from vd_jax.convert.vae import vae_rules
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vd_jax.models.vae import VAEConfig
from vd_jax.processing.images import CLIPImageProcessorConfig

torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = {
    "image_unet": "diffusion_pytorch_model.safetensors",
    "text_unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "image_encoder": "model.safetensors",
}
ORIGINAL_FILES = {
    "vd-four-flow-v1-0-fp16": "tiny_four_flow_new_fp16.json",
    "kl-f8": "tiny_kl_f8.json",
    "optimus-vae": "tiny_optimus_vae.json",
}


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_same_tensors(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:8]}"
    bad = [k for k in want if not _same_bits(got[k], want[k])]
    assert not bad, f"{what}: tensors differ: {bad[:8]}"


# --------------------------------------------------------------------------- core


def test_inverse_transforms_are_exact():
    rng = np.random.default_rng(0)
    shapes = {
        "identity": (3, 5),
        "linear": (4, 6),
        "conv": (5, 3, 3, 2),
        "conv1x1_as_dense": (6, 4, 1, 1),
    }
    for name, shape in shapes.items():
        torch_w = rng.standard_normal(shape).astype(np.float32)
        assert _same_bits(INVERSE_TRANSFORMS[name](TRANSFORMS[name](torch_w)), torch_w), name


def test_export_state_names_every_missing_param():
    cfg = VAEConfig(block_out_channels=(8,), norm_num_groups=4)
    rules = vae_rules(cfg)
    params = {r.dst: np.zeros(1) for r in rules}
    del params["encoder/conv_in/kernel"], params["decoder/conv_out/bias"]
    with pytest.raises(CheckpointError, match="(?s)encoder/conv_in/kernel.*decoder/conv_out/bias"):
        export_state(rules, params)


# --------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def diffusers_export(tiny_vd, tmp_path_factory):
    models = load_models(tiny_vd["folder"], None)
    out = tmp_path_factory.mktemp("export") / "vd"
    return models, str(out), export_diffusers(models, out)


def test_diffusers_round_trip_is_bit_identical(tiny_vd, diffusers_export):
    _, out, warnings = diffusers_export
    assert warnings == []
    src = tiny_vd["folder"]
    for component, name in WEIGHTS.items():
        _assert_same_tensors(
            load_file(os.path.join(out, component, name)),
            load_file(os.path.join(src, component, name)),
            component,
        )
    # text_unet's unused time MLP is the image one's copy, as diffusers' converter makes it.
    image = load_file(os.path.join(out, "image_unet", WEIGHTS["image_unet"]))
    text = load_file(os.path.join(out, "text_unet", WEIGHTS["text_unet"]))
    for text_key, image_key in unet_convert.text_unet_time_embedding_keys(None).items():
        assert _same_bits(text[text_key.split(".", 1)[1]], image[image_key.split(".", 1)[1]])


def test_diffusers_configs_read_back_the_same(tiny_vd, diffusers_export):
    _, out, _ = diffusers_export
    src = tiny_vd["folder"]
    both = lambda rel: [read_json(os.path.join(f, rel)) for f in (out, src)]
    image, text = both("image_unet/config.json"), both("text_unet/config.json")
    assert unet_convert.diffuser_config_from_diffusers(
        image[0], text[0]
    ) == unet_convert.diffuser_config_from_diffusers(image[1], text[1])
    assert image[0]["sample_size"] == image[1]["sample_size"]
    for rel, parse in [
        ("vae/config.json", VAEConfig.from_diffusers),
        ("text_encoder/config.json", CLIPTextConfig.from_hf),
        ("image_encoder/config.json", CLIPVisionConfig.from_hf),
        ("scheduler/scheduler_config.json", NoiseSchedule.from_scheduler_config),
        ("image_feature_extractor/preprocessor_config.json", CLIPImageProcessorConfig.from_dict),
    ]:
        ours, theirs = both(rel)
        assert parse(ours) == parse(theirs), rel
    index = both("model_index.json")
    assert set(index[0]) == set(index[1])
    assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == sorted(
        os.listdir(os.path.join(src, "tokenizer"))
    )


def test_diffusers_pipeline_loads_the_export_and_draws_the_same(tiny_vd, diffusers_export):
    from diffusers import VersatileDiffusionTextToImagePipeline

    _, out, _ = diffusers_export
    pipe = VersatileDiffusionTextToImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for p in (pipe, tiny_vd["refs"]["text_to_image"]):
        with torch.no_grad():
            result = p(
                "a red circle",
                num_inference_steps=3,
                height=16,
                width=16,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            )
        images.append(result.images)
    assert images[0].std() > 0.01
    np.testing.assert_array_equal(images[0], images[1])


def test_missing_text_data_layers_are_zeros_with_a_warning(diffusers_export, tmp_path):
    models, _, _ = diffusers_export
    m = dataclasses.replace(models)
    m.diffuser_params = {
        **models.diffuser_params,
        "data": {"image": models.diffuser_params["data"]["image"]},
    }
    m.image_context_tokens = 1
    m.image_uncond = "zeros"
    m.text_latent_scale = 2.0
    warnings = export_diffusers(m, tmp_path / "vd")
    assert any(w.startswith("text_latent_scale=2 left out") for w in warnings)
    assert any("text_unet's text data layers are not in the source" in w for w in warnings)
    assert any("image_context_tokens=1" in w for w in warnings)
    assert any("image_uncond='zeros'" in w for w in warnings)
    text = load_file(os.path.join(tmp_path, "vd", "text_unet", WEIGHTS["text_unet"]))
    assert not text["conv_in.weight"].any() and text["time_embedding.linear_1.weight"].any()


def test_clear_errors_for_what_a_layout_needs(diffusers_export, tmp_path):
    models, _, _ = diffusers_export
    no_clip = dataclasses.replace(models, text_params=None)
    with pytest.raises(CheckpointError, match="CLIP text tower"):
        export_diffusers(no_clip, tmp_path / "a")
    no_context = dataclasses.replace(
        models, diffuser_params={**models.diffuser_params, "context": {}}
    )
    with pytest.raises(CheckpointError, match=r"'context/image', 'context/text'"):
        export_diffusers(no_context, tmp_path / "b")
    # tiny_vd's 8-group norms: the original configs hard-code 32 groups.
    with pytest.raises(CheckpointError, match="norm_groups=8"):
        export_original(models, tmp_path / "c")
    assert os.listdir(tmp_path) == []  # nothing half-written is left behind


# --------------------------------------------------------------------------- original files


@pytest.fixture(scope="module")
def original_source(tmp_path_factory):
    """The released files at the tiny sizes, with real causal-mask buffers."""
    return write_tiny_original(tmp_path_factory.mktemp("original") / "src")


@pytest.fixture(scope="module")
def original_export(original_source, tmp_path_factory):
    models = load_models(original_source, None)
    assert set(models.optimus_params) == {"encoder", "decoder"}
    out = tmp_path_factory.mktemp("export_original") / "vd"
    return models, out, export_original(models, out, pth=True)


def test_original_round_trip_matches_files_and_manifests(original_source, original_export):
    _, out, warnings = original_export
    assert warnings == []
    for stem, manifest_name in ORIGINAL_FILES.items():
        keys = manifest(manifest_name)
        source = {k: v.numpy() for k, v in torch.load(original_source / f"{stem}.pth").items()}
        written = load_file(out / f"{stem}.safetensors")
        pth = torch.load(out / f"{stem}.pth", weights_only=True)
        assert set(pth) == set(keys), f"{stem}: keys differ"
        for k, info in keys.items():
            assert (
                list(written[k].shape) == info["shape"] and str(written[k].dtype) == info["dtype"]
            )
        _assert_same_tensors(written, source, f"{stem}.safetensors")
        _assert_same_tensors({k: v.numpy() for k, v in pth.items()}, source, f"{stem}.pth")
    pth = torch.load(out / "optimus-vae.pth", weights_only=True)
    # The buffers sit where the released file has them, and lm_head shares wte's storage.
    assert list(pth) == list(manifest(ORIGINAL_FILES["optimus-vae"]))
    head, wte = pth["decoder.lm_head.weight"], pth["decoder.transformer.wte.weight"]
    assert head.untyped_storage().data_ptr() == wte.untyped_storage().data_ptr()


def test_original_clip_folder_and_config_read_back(original_source, original_export):
    _, out, _ = original_export
    src = load_file(original_source / "clip" / "model.safetensors")
    got = load_file(out / "clip" / "model.safetensors")
    # position_ids are buffers older transformers saved and logit_scale is CLIPModel's
    # contrastive temperature: VD reads neither, so the writer holds only what vd_jax loads,
    # plus logit_scale at transformers' initial value.
    skip = lambda k: k.endswith("position_ids") or k == "logit_scale"
    _assert_same_tensors(
        {k: v for k, v in got.items() if not skip(k)},
        {k: v for k, v in src.items() if not skip(k)},
        "clip",
    )
    assert got["logit_scale"] == np.float32(2.6592)
    from transformers import CLIPModel

    CLIPModel.from_pretrained(out / "clip")  # a folder transformers loads
    want, back = _configs(str(original_source)), _configs(str(out))
    assert back == want


def test_original_export_loads_back(original_export):
    models, out, _ = original_export
    again = load_models(out, None)
    for name in ("diffuser_params", "vae_params", "text_params", "vision_params", "optimus_params"):
        a, b = flatten(getattr(models, name)), flatten(getattr(again, name))
        assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a), name


def test_original_export_folds_the_text_latent_scale_into_optimus(original_export, tmp_path):
    models, out, _ = original_export
    m = dataclasses.replace(models)
    m.text_latent_scale = 2.0  # a power of two: the folded weights are exact
    assert export_original(m, tmp_path / "vd", pth=False) == []
    plain = load_file(out / "optimus-vae.safetensors")
    folded = load_file(tmp_path / "vd" / "optimus-vae.safetensors")
    latent = m.optimus_configs[0].latent_size
    head = "encoder.linear.weight"  # torch [2 * latent, hidden]: mu rows, then logvar rows
    assert _same_bits(folded[head][:latent], plain[head][:latent] * 2)
    assert _same_bits(folded[head][latent:], plain[head][latent:])
    for name in ("linear", "linear_emb"):
        key = f"decoder.transformer.{name}.weight"
        assert _same_bits(folded[key], plain[key] / 2)


def test_diffusers_source_exported_to_original_warns_about_optimus(original_export, tmp_path):
    models, _, _ = original_export
    warnings = export_diffusers(models, tmp_path / "diffusers")
    assert warnings == ["Optimus text VAE left out: diffusers has no place for it"]
    from_diffusers = load_models(tmp_path / "diffusers", None)
    warnings = export_original(from_diffusers, tmp_path / "original", pth=False)
    assert len(warnings) == 1 and "optimus-vae not written" in warnings[0]
    assert sorted(os.listdir(tmp_path / "original")) == [
        "clip",
        "kl-f8.safetensors",
        "vd-four-flow-v1-0-fp16.safetensors",
        "vd_config.json",
    ]


# --------------------------------------------------------------------------- tiny folder


def test_tiny_folder_needs_no_torch(tiny_vd, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for name in ("torch", "diffusers", "transformers"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    folder = tmp_path / "tiny"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO])}
    subprocess.run(
        [sys.executable, "-m", "vd_jax.tiny_folder", str(folder), "tiny"],
        check=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert (folder / "example.png").is_file()
    from vd_jax.pipelines import VDPipeline

    models = load_models(folder, ["text_to_image", "image_variation", "dual_guided"])
    # The same sizes and settings as the diffusers-built folder of the same preset.
    built = load_models(tiny_vd["folder"], ["text_to_image", "image_variation", "dual_guided"])
    for field in (
        "diffuser_config",
        "vae_config",
        "text_config",
        "vision_config",
        "image_processor",
        "schedule",
        "image_sample_size",
    ):
        assert getattr(models, field) == getattr(built, field), field
    result = VDPipeline(models).text_to_image("a red circle", num_steps=1, show_progress=False)
    assert result.images.shape == (1, 16, 16, 3) and np.isfinite(result.images).all()
    from diffusers import VersatileDiffusionDualGuidedPipeline

    VersatileDiffusionDualGuidedPipeline.from_pretrained(folder)
