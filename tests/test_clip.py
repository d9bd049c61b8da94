"""CLIP towers, their converter and CLIP preprocessing against transformers.

Parity models are tiny random transformers CLIP towers saved with
`save_pretrained` and read back through the checkpoint machinery, so the test
covers config parsing, the key tables and the forward passes together.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from helpers import FIXTURES, assert_rel_close

from vd_jax.convert import core
from vd_jax.convert.clip import (
    clip_ignore,
    clip_text_rules,
    clip_vision_rules,
    load_clip_text,
    load_clip_vision,
)
from vd_jax.models.abstract import abstract_params
from vd_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPVisionConfig,
    CLIPVisionEncoder,
)
from vd_jax.processing.images import (
    CLIPImageProcessorConfig,
    preprocess,
    unconditional_gray_image,
)

TOL = 1e-4


def _fixture(name: str) -> dict:
    path = FIXTURES / name
    assert path.is_file(), f"fixture {path} is missing"
    return json.loads(path.read_text())


def _perturb(model):
    """Moves every weight off its init (LN weights 1, biases 0) so swaps would show."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _save_and_load(model, tmp_path):
    model.save_pretrained(tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    return core.read_state_dict(tmp_path / "model.safetensors"), hf_cfg


# ----------------------------------------------------------------------------- text


def _text_ids(rng, batch, length, vocab, eos):
    """Random ids ending in EOS then EOS padding, like CLIP's max_length padding."""
    ids = rng.integers(3, vocab, size=(batch, length))
    ids[ids == eos] = 3
    for b in range(batch):
        end = int(rng.integers(2, length - 1))
        ids[b, end:] = eos
    return ids


@pytest.mark.torch
@pytest.mark.parametrize(
    "eos, act, length",
    [(2, "quick_gelu", 77), (500, "gelu", 77), (500, "gelu", 13)],
    ids=["legacy-eos2", "eos500", "eos500-short"],
)
def test_text_tower_matches_transformers(tmp_path, eos, act, length):
    import torch
    import transformers

    hf = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=5,
        max_position_embeddings=77,
        projection_dim=24,
        hidden_act=act,
        eos_token_id=eos,
        bos_token_id=0,
        pad_token_id=1,
    )
    tm = _perturb(transformers.CLIPTextModelWithProjection(hf))
    state, hf_cfg = _save_and_load(tm, tmp_path)
    cfg = CLIPTextConfig.from_hf(hf_cfg)
    assert (cfg.eos_token_id, cfg.hidden_act, cfg.projection_dim) == (eos, act, 24)

    rng = np.random.default_rng(0)
    if eos == 2:
        # The legacy rule pools at the largest id: put the row maximum after the text.
        ids = _text_ids(rng, 3, length, 998, 999)
    else:
        ids = _text_ids(rng, 3, length, 1000, eos)
        # The two pooling rules must disagree on this data, or the test proves nothing.
        assert (ids.argmax(-1) != (ids == eos).argmax(-1)).any()
    with torch.no_grad():
        t_ids = torch.from_numpy(ids)
        inner = tm.text_model(t_ids)
        want_embeds = tm(t_ids).text_embeds.numpy()
        want_last = inner.last_hidden_state
        want_ctx = (
            tm.text_projection(want_last)
            / torch.linalg.norm(tm.text_projection(inner.pooler_output), dim=-1)[:, None, None]
        )

    params = {"params": load_clip_text(state, cfg)}
    model = CLIPTextEncoder(cfg)
    out = model.apply(params, jnp.asarray(ids, jnp.int32))
    ctx = model.apply(params, jnp.asarray(ids, jnp.int32), method="context")
    assert_rel_close(out["last_hidden_state"], want_last.numpy(), TOL, "last_hidden_state")
    assert_rel_close(out["pooler_output"], inner.pooler_output.numpy(), TOL, "pooler_output")
    assert_rel_close(out["text_embeds"], want_embeds, TOL, "text_embeds")
    assert_rel_close(ctx, want_ctx.numpy(), TOL, "context")
    assert ctx.shape == (3, length, 24)


# ----------------------------------------------------------------------------- vision


@pytest.mark.torch
def test_vision_tower_matches_transformers(tmp_path):
    import torch
    import transformers

    hf = transformers.CLIPVisionConfig(
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=3,
        num_attention_heads=5,
        image_size=30,
        patch_size=6,
        projection_dim=24,
        hidden_act="quick_gelu",
    )
    tm = _perturb(transformers.CLIPVisionModelWithProjection(hf))
    state, hf_cfg = _save_and_load(tm, tmp_path)
    cfg = CLIPVisionConfig.from_hf(hf_cfg)
    assert (cfg.image_size, cfg.patch_size, cfg.num_patches) == (30, 6, 25)

    pixels = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        inner = tm.vision_model(pixels)
        want_embeds = tm(pixels).image_embeds.numpy()
        z = tm.visual_projection(tm.vision_model.post_layernorm(inner.last_hidden_state))
        want_ctx = (z / torch.linalg.norm(z[:, 0], dim=-1)[:, None, None]).numpy()

    params = {"params": load_clip_vision(state, cfg)}
    model = CLIPVisionEncoder(cfg)
    nhwc = jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))
    out = model.apply(params, nhwc)
    ctx = model.apply(params, nhwc, method="context")
    assert_rel_close(out["last_hidden_state"], inner.last_hidden_state.numpy(), TOL, "last_hidden")
    assert_rel_close(out["pooler_output"], inner.pooler_output.numpy(), TOL, "pooler_output")
    assert_rel_close(out["image_embeds"], want_embeds, TOL, "image_embeds")
    assert_rel_close(ctx, want_ctx, TOL, "context")
    assert ctx.shape == (2, 26, 24)

    with pytest.raises(ValueError, match="NHWC"):
        model.apply(params, jnp.zeros((1, 3, 30, 30)))


# ----------------------------------------------------------------------------- configs


def test_config_from_full_clipmodel_dict():
    import transformers

    full = transformers.CLIPConfig(
        text_config=dict(hidden_size=40, num_attention_heads=5, eos_token_id=2),
        vision_config=dict(hidden_size=48, image_size=30, patch_size=6),
        projection_dim=24,
    ).to_dict()
    assert full["text_config"]["projection_dim"] != 24  # the nested value must lose
    t, v = CLIPTextConfig.from_hf(full), CLIPVisionConfig.from_hf(full)
    assert (t.hidden_size, t.num_attention_heads, t.projection_dim, t.eos_token_id) == (
        40,
        5,
        24,
        2,
    )
    assert (v.hidden_size, v.image_size, v.patch_size, v.projection_dim) == (48, 30, 6, 24)


def test_defaults_are_vit_l14_and_match_full_size_manifest():
    """Both default-config towers' tables fit the full-size CLIP keys of VD's new code."""
    keys = _fixture("clip_ctx_new.json")["keys"]

    class _TablesFitError(Exception):
        pass

    def never_read(key):  # reached only once every check in load_params has passed
        raise _TablesFitError(key)

    for prefix in ("ctx.text.model.", "ctx.image.model."):
        shapes = {k: tuple(v["shape"]) for k, v in keys.items() if k.startswith(prefix)}
        state = core.StateDict(shapes, never_read, "clip_ctx_new.json")
        text_rules = clip_text_rules(CLIPTextConfig(), prefix)
        vision_rules = clip_vision_rules(CLIPVisionConfig(), prefix)
        covered = {r.src for r in text_rules + vision_rules} | {prefix + "logit_scale"}
        assert covered == set(shapes)
        for load, cfg in (
            (load_clip_text, CLIPTextConfig()),
            (load_clip_vision, CLIPVisionConfig()),
        ):
            with pytest.raises(_TablesFitError):
                load(state, cfg, prefix=prefix)


def test_tiny_old_checkpoint_manifest_loads_both_towers():
    """VD's old-format file (`clip.model.*` among other components) through the tables."""
    manifest = _fixture("tiny_four_flow_old.json")["keys"]
    clip_cfg = _fixture("tiny_config.json")["ctx (CLIP)"]
    # The fixture lists the two tower configs under "text" / "vision" (not transformers' nesting).
    text_cfg = CLIPTextConfig.from_hf(clip_cfg["text"])
    vision_cfg = CLIPVisionConfig.from_hf(clip_cfg["vision"])
    assert text_cfg.projection_dim == vision_cfg.projection_dim == clip_cfg["projection_dim"]

    rng = np.random.default_rng(0)
    arrays = {
        k: rng.standard_normal(v["shape"]).astype(np.float32)
        for k, v in manifest.items()
        if k.startswith("clip.model.")
    }
    clip_keys = set(arrays)
    # Keys of other components, and the buffers transformers < 4.31 wrote, are skipped.
    other = next(k for k in manifest if k.startswith("autokl."))
    arrays[other] = np.zeros(manifest[other]["shape"], np.float32)
    arrays["clip.model.text_model.embeddings.position_ids"] = np.arange(77)[None]
    arrays["clip.model.vision_model.embeddings.position_ids"] = np.arange(17)[None]
    state = core.StateDict.from_arrays(arrays, "tiny_four_flow_old")

    text = load_clip_text(state, text_cfg, prefix="clip.model.", param_dtype=jnp.bfloat16)
    vision = load_clip_vision(state, vision_cfg, prefix="clip.model.")
    rules = clip_text_rules(text_cfg, "clip.model.") + clip_vision_rules(vision_cfg, "clip.model.")
    assert {r.src for r in rules} | {"clip.model.logit_scale"} == clip_keys

    flat_t, flat_v = core.flatten(text), core.flatten(vision)
    assert all(v.dtype == jnp.bfloat16 for v in flat_t.values())
    assert all(v.dtype == np.float32 for v in flat_v.values())
    np.testing.assert_array_equal(
        flat_v["embeddings/patch_embedding/kernel"],
        arrays["clip.model.vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        flat_t["text_projection/kernel"].astype(np.float32),
        arrays["clip.model.text_projection.weight"].T.astype(jnp.bfloat16).astype(np.float32),
    )
    # And the loaded trees run.
    ids = jnp.zeros((1, 77), jnp.int32).at[0, 5].set(text_cfg.eos_token_id)
    ctx = CLIPTextEncoder(text_cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply(
        {"params": text}, ids, method="context"
    )
    assert ctx.shape == (1, 77, 32) and ctx.dtype == jnp.bfloat16
    n = np.linalg.norm(np.asarray(ctx[0, 5], np.float32))
    assert abs(n - 1) < 2e-2  # the EOS token is the unit-norm reference
    img = jnp.zeros((1, 32, 32, 3))
    assert CLIPVisionEncoder(vision_cfg).apply({"params": vision}, img, method="context").shape == (
        1,
        17,
        32,
    )


def test_bad_checkpoints_name_the_key():
    cfg = CLIPTextConfig(
        vocab_size=50,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=7,
        projection_dim=4,
    )
    model = CLIPTextEncoder(cfg)
    target = abstract_params(model.init, jax.random.key(0), jnp.zeros((1, 7), jnp.int32))
    flat = core.flatten(target)
    arrays = {}
    for r in clip_text_rules(cfg):
        shape = flat[r.dst].shape
        arrays[r.src] = np.ones(shape[::-1] if r.transform == "linear" else shape, np.float32)
    load_clip_text(core.StateDict.from_arrays(arrays), cfg)  # the baseline loads

    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    renamed = dict(arrays)
    renamed["text_model.encoder.layers.0.mlp.fc_1.weight"] = renamed.pop(key)
    with pytest.raises(core.CheckpointError) as err:
        load_clip_text(core.StateDict.from_arrays(renamed, "renamed.safetensors"), cfg)
    assert key in str(err.value) and "mlp.fc_1.weight" in str(err.value)

    bad = dict(arrays)
    bad["text_projection.weight"] = np.ones((5, 8), np.float32)
    with pytest.raises(core.CheckpointError, match=r"text_projection\.weight \[5, 8\]"):
        load_clip_text(core.StateDict.from_arrays(bad), cfg)

    # A vision key in a text-only load is fine (full CLIPModel), other strangers are not.
    assert any("vision_model" in p for p in clip_ignore("text"))
    stray = dict(arrays, **{"text_model.extra.weight": np.ones(2, np.float32)})
    with pytest.raises(core.CheckpointError, match=r"text_model\.extra\.weight"):
        load_clip_text(core.StateDict.from_arrays(stray), cfg)


# ----------------------------------------------------------------------------- images


def _hf_processor(d: dict | None = None):
    import transformers

    # The PIL backend is what `CLIPImageProcessor` falls back to without torchvision.
    return transformers.CLIPImageProcessorPil(**(d or {}))


def _hf_pixels(proc, images) -> np.ndarray:
    return np.asarray(proc(images=images, return_tensors="np")["pixel_values"]).transpose(
        0, 2, 3, 1
    )


def _rand_pil(rng, h, w, mode="RGB"):
    c = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
    return PIL.Image.fromarray(arr[..., 0] if c == 1 else arr, mode)


IMAGE_TOL = 1e-5  # max abs difference to transformers' pixel_values (measured: exactly 0)


@pytest.mark.parametrize(
    "proc_cfg",
    [
        None,  # the defaults: openai/clip-vit-large-patch14
        {"size": {"shortest_edge": 37}, "crop_size": {"height": 31, "width": 28}},
        {"size": {"height": 40, "width": 33}, "crop_size": {"height": 45, "width": 29}},
    ],
    ids=["vit-l14", "odd-crop", "hw-size-pad"],
)
def test_preprocess_matches_transformers(proc_cfg):
    rng = np.random.default_rng(1)
    proc = _hf_processor(proc_cfg)
    cfg = CLIPImageProcessorConfig.from_dict(proc.to_dict())
    images = [
        _rand_pil(rng, 300, 211),
        _rand_pil(rng, 97, 143, "RGBA"),
        _rand_pil(rng, 64, 64, "L"),
        rng.integers(0, 256, size=(81, 120, 3), dtype=np.uint8),
        rng.random((120, 90, 3)),  # float in [0, 1]
        rng.random((50, 70, 3)).astype(np.float32),
    ]
    for img in images:
        got, want = preprocess([img], cfg), _hf_pixels(proc, [img])
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= IMAGE_TOL, type(img)
    batch = images[:1] + images[3:4]
    assert np.abs(preprocess(batch, cfg) - _hf_pixels(proc, batch)).max() <= IMAGE_TOL


def test_unconditional_gray_image_keeps_transformers_double_rescale():
    gray = unconditional_gray_image()
    assert gray.shape == (512, 512, 3) and gray.dtype == np.float64 and (gray == 0.5).all()
    got = preprocess([gray])
    want = _hf_pixels(_hf_processor(), [gray])
    assert np.abs(got - want).max() <= IMAGE_TOL
    # 0.5 -> uint8 127 for Pillow -> /255 after the resize -> /255 again as "rescale".
    mean, std = (
        np.array(CLIPImageProcessorConfig().image_mean),
        np.array(CLIPImageProcessorConfig().image_std),
    )
    np.testing.assert_allclose(got[0, 0, 0], (127 / 255 / 255 - mean) / std, atol=1e-6)


def test_processor_config_from_openai_json(tmp_path):
    # openai/clip-vit-large-patch14's preprocessor_config.json (old feature-extractor form).
    d = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(d))
    cfg = CLIPImageProcessorConfig.from_json_file(path)
    assert cfg == CLIPImageProcessorConfig()
    img = _rand_pil(np.random.default_rng(2), 233, 517)
    want = _hf_pixels(_hf_processor(d), [img])
    assert np.abs(preprocess(img, cfg) - want).max() <= IMAGE_TOL
