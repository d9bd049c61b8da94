"""Parity of the Flax AutoencoderKL with diffusers', and its key tables against the manifests."""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES

from tests.helpers import assert_rel_close
from vd_jax.convert import core
from vd_jax.convert.core import CheckpointError, StateDict, read_state_dict
from vd_jax.convert.vae import abstract_vae_params, load_vae, vae_rules
from vd_jax.models.vae import AutoencoderKL, VAEConfig, decode_latents, encode_images

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def _manifest(name: str) -> dict[str, list[int]]:
    keys = json.loads((FIXTURES / name).read_text())["keys"]
    return {k: tuple(v["shape"]) for k, v in keys.items()}


def _tiny_ldm_config() -> VAEConfig:
    tiny = json.loads((FIXTURES / "tiny_config.json").read_text())["vae.image"]
    return VAEConfig.from_ldm(tiny, tiny["embed_dim"])


def _perturb(module, scale: float = 0.05) -> None:
    # Norm affines start at exactly 1/0: noise makes a swapped weight/bias or scale visible.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
    """A random diffusers VAE saved as a diffusers folder, and its Flax twin."""
    torch.manual_seed(0)
    tvae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 48),
        layers_per_block=2,
        norm_num_groups=16,
        latent_channels=4,
        sample_size=24,
    ).eval()
    _perturb(tvae)
    folder = tmp_path_factory.mktemp("vae")
    tvae.save_pretrained(folder, safe_serialization=True)
    cfg = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    state = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    params = load_vae(state, cfg)
    return tvae, cfg, state, params


def test_config_from_diffusers(tiny_diffusers):
    _, cfg, _, _ = tiny_diffusers
    assert cfg.block_out_channels == (32, 48)
    assert cfg.layers_per_block == 2 and cfg.norm_num_groups == 16
    assert cfg.scaling_factor == pytest.approx(0.18215)
    assert cfg.downsampling_factor == 2
    assert VAEConfig().downsampling_factor == 8


@pytest.mark.parametrize(
    "field, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("latents_mean", [0.0] * 4),
    ],
)
def test_config_rejects_unsupported(field, value):
    d = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2)
    d["up_block_types"] = ["UpDecoderBlock2D"] * 2
    d[field] = value
    with pytest.raises(ValueError, match=field):
        VAEConfig.from_diffusers(d)


def test_encode_decode_match_diffusers(tiny_diffusers):
    tvae, cfg, _, params = tiny_diffusers
    model = AutoencoderKL(cfg)
    # Odd height: the encoder's (0, 1) pad then stride-2 conv takes 23 -> 11, as torch does.
    x = np.random.default_rng(0).uniform(-1, 1, (2, 23, 20, 3)).astype(np.float32)
    with torch.no_grad():
        post = tvae.encode(_nchw(x)).latent_dist
        want_dec = tvae.decode(post.mean).sample
    mean, logvar = jax.jit(partial(model.apply, method=AutoencoderKL.encode))({"params": params}, x)
    assert mean.shape == (2, 11, 10, 4)
    # Guard against a vacuous pass: the compared signals must be O(1).
    assert np.abs(_nhwc(post.mean)).max() > 0.1 and np.abs(_nhwc(want_dec)).max() > 0.1
    assert_rel_close(mean, _nhwc(post.mean), TOL, "posterior mean")
    assert_rel_close(logvar, _nhwc(post.logvar), TOL, "posterior logvar")
    dec = jax.jit(partial(model.apply, method=AutoencoderKL.decode))({"params": params}, mean)
    assert_rel_close(dec, _nhwc(want_dec), TOL, "decode")
    # __call__ = encode -> mean -> decode.
    assert_rel_close(model.apply({"params": params}, x), _nhwc(want_dec), TOL, "__call__")


def test_scaled_helpers_match_diffusers(tiny_diffusers):
    tvae, cfg, _, params = tiny_diffusers
    model = AutoencoderKL(cfg)
    sf = cfg.scaling_factor
    images = np.random.default_rng(1).uniform(0, 1, (1, 16, 24, 3)).astype(np.float32)
    enc = jax.jit(partial(encode_images, model))
    dec = jax.jit(partial(decode_latents, model))

    with torch.no_grad():
        post = tvae.encode(_nchw(images) * 2 - 1).latent_dist
    assert_rel_close(enc(params, images), _nhwc(post.mean) * sf, TOL, "encode_images (mean)")

    key = jax.random.key(3)
    noise = np.asarray(jax.random.normal(key, (1, 8, 12, 4), jnp.float32))
    want = (_nhwc(post.mean) + _nhwc(post.std) * noise) * sf
    assert_rel_close(enc(params, images, key), want, TOL, "encode_images (sampled)")

    latents = np.random.default_rng(2).normal(size=(2, 8, 12, 4)).astype(np.float32) * sf * 4
    with torch.no_grad():
        ref = ((tvae.decode(_nchw(latents) / sf).sample + 1) / 2).clamp(0, 1)
    got = dec(params, latents)
    assert float(jnp.min(got)) >= 0.0 and float(jnp.max(got)) <= 1.0
    assert_rel_close(got, _nhwc(ref), TOL, "decode_latents")


def test_legacy_diffusers_attention_names(tiny_diffusers):
    """Folders saved by diffusers < 0.14 name the mid attention query/key/value/proj_attn."""
    _, cfg, state, params = tiny_diffusers
    renames = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    legacy = {}
    for k in state:
        new = k
        for a, b in renames.items():
            new = new.replace(a, b) if "attentions" in k else new
        legacy[new] = state[k]
    got = load_vae(StateDict.from_arrays(legacy), cfg)  # layout="diffusers" detects it
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def test_ldm_table_covers_tiny_manifest_and_matches_diffusers_converter():
    """Random tensors under the original kl-f8 names, through our LDM table and through
    diffusers' own LDM->diffusers converter into a torch model: same outputs."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    shapes = _manifest("tiny_kl_f8.json")
    cfg = _tiny_ldm_config()
    rng = np.random.default_rng(0)
    arrays = {}
    for k, s in shapes.items():
        base = 1.0 if k.endswith("weight") and len(s) == 1 else 0.0  # norm scales around 1
        arrays[k] = (base + rng.standard_normal(s) * 0.1).astype(np.float32)
    params = load_vae(StateDict.from_arrays(arrays), cfg, layout="ldm")
    assert len(vae_rules(cfg, "ldm")) == len(shapes) == 124

    tcfg = dict(
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        latent_channels=cfg.latent_channels,
    )
    tvae = diffusers.AutoencoderKL(**tcfg).eval()
    converted = convert_ldm_vae_checkpoint(
        {k: torch.from_numpy(v) for k, v in arrays.items()}, tcfg
    )
    tvae.load_state_dict(converted, strict=True)

    model = AutoencoderKL(cfg)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 12, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = tvae.encode(_nchw(x)).latent_dist
        want = tvae.decode(post.mean).sample
    mean, _ = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    assert_rel_close(mean, _nhwc(post.mean), TOL, "ldm: posterior mean")
    assert_rel_close(model.apply({"params": params}, x), _nhwc(want), TOL, "ldm: decode")


def test_ldm_table_with_old_checkpoint_prefix():
    """The old full VD file holds the VAE under `autokl.` among 2,457 other keys."""
    shapes = _manifest("tiny_four_flow_old.json")
    assert sum(k.startswith("autokl.") for k in shapes) == 124
    state = StateDict(shapes, lambda k: np.zeros(shapes[k], np.float32), "tiny_four_flow_old")
    params = load_vae(state, _tiny_ldm_config(), layout="auto", prefix="autokl.")
    assert params["decoder"]["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"].shape == (
        3,
        3,
        64,
        64,
    )


class _ReadingStartedError(Exception):
    """Raised by a getter: load_params checked every key and shape and began reading."""


def test_full_size_ldm_manifest_shapes_only():
    shapes = _manifest("kl_f8.json")
    cfg = VAEConfig()  # the SD / VD kl-f8 defaults
    abstract = abstract_vae_params(cfg)
    n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
    assert n == 83_653_863
    assert sum(math.prod(s) for s in shapes.values()) == n

    def refuse(key):  # validation passed if load_params gets as far as reading a tensor
        raise _ReadingStartedError(key)

    with pytest.raises(_ReadingStartedError):
        core.load_params(StateDict(shapes, refuse, "kl_f8"), vae_rules(cfg, "ldm"), abstract)
    # The diffusers table names exactly as many tensors.
    assert len(vae_rules(cfg, "diffusers")) == len(shapes) == 248


def test_wrong_shape_is_named(tiny_diffusers):
    _, cfg, state, _ = tiny_diffusers
    arrays = {k: state[k] for k in state}
    bad = "decoder.up_blocks.1.resnets.2.conv1.weight"
    arrays[bad] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=bad.replace(".", r"\.")):
        load_vae(StateDict.from_arrays(arrays), cfg)


def test_missing_and_unexpected_keys_are_named(tiny_diffusers):
    _, cfg, state, _ = tiny_diffusers
    arrays = {k: state[k] for k in state if k != "quant_conv.bias"}
    arrays["decoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        load_vae(StateDict.from_arrays(arrays), cfg)
    assert "quant_conv.bias" in str(err.value) and "decoder.extra.weight" in str(err.value)
    # A config that disagrees with the file (3 resnets per block) is refused, not half-loaded.
    with pytest.raises(CheckpointError, match="missing keys"):
        load_vae(state, dataclasses.replace(cfg, layers_per_block=3))
