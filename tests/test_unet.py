"""VDDiffuser against diffusers' VD U-Nets: every flow, cross-routing, dual guidance, loading."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, assert_rel_close

from vd_jax import flows as vd_flows
from vd_jax.convert.core import (
    TRANSFORMS,
    CheckpointError,
    StateDict,
    flatten,
    merge,
    read_state_dict,
)
from vd_jax.convert.unet import (
    diffuser_config_from_diffusers,
    diffusers_rules,
    load_diffuser,
    text_unet_time_embedding_keys,
)
from vd_jax.convert.unet_original import config_from_original, load_original, original_rules
from vd_jax.models.unet import (
    DiffuserConfig,
    VDDiffuser,
    abstract_params,
    init_params,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

B, HW, TEXT_DIM, CTX_DIM, L_TEXT, L_IMAGE = 2, 8, 40, 24, 5, 7

# VD's image_unet / text_unet layouts at toy widths: two levels, attention on the first only
# (VD: attention on all but the last), a cross-attention middle block, 4 heads.
IMAGE_UNET = dict(
    sample_size=HW,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    cross_attention_dim=CTX_DIM,
    norm_num_groups=8,
)
TEXT_UNET = dict(
    IMAGE_UNET,
    in_channels=(TEXT_DIM, 1, 1),
    out_channels=(TEXT_DIM, 1, 1),
    down_block_types=("CrossAttnDownBlockFlat", "DownBlockFlat"),
    up_block_types=("UpBlockFlat", "CrossAttnUpBlockFlat"),
)


def _perturbed(model):
    # diffusers' inits leave some layers near zero or at identity; noise on every tensor makes
    # a mis-mapped or mis-ordered weight show up in the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
        UNetFlatConditionModel,
    )

    torch.manual_seed(0)
    image_unet = _perturbed(UNet2DConditionModel(**IMAGE_UNET))
    text_unet = _perturbed(UNetFlatConditionModel(**TEXT_UNET))
    # diffusers' converter copies the one original time MLP into both U-Nets.
    text_unet.time_embedding.load_state_dict(image_unet.time_embedding.state_dict())
    root = tmp_path_factory.mktemp("vd")
    image_unet.save_pretrained(root / "image_unet")
    text_unet.save_pretrained(root / "text_unet")
    state = merge(
        read_state_dict(root / "image_unet/diffusion_pytorch_model.safetensors").prefixed(
            "image_unet."
        ),
        read_state_dict(root / "text_unet/diffusion_pytorch_model.safetensors").prefixed(
            "text_unet."
        ),
    )
    config = diffuser_config_from_diffusers(
        json.loads((root / "image_unet/config.json").read_text()),
        json.loads((root / "text_unet/config.json").read_text()),
    )
    params = load_diffuser(state, config)
    rng = np.random.default_rng(0)
    inputs = dict(
        image=rng.standard_normal((B, 4, HW, HW)).astype(np.float32),
        text=rng.standard_normal((B, TEXT_DIM)).astype(np.float32),
        t=np.array([981, 20]),
        ctx_text=rng.standard_normal((B, L_TEXT, CTX_DIM)).astype(np.float32),
        ctx_image=rng.standard_normal((B, L_IMAGE, CTX_DIM)).astype(np.float32),
    )
    return dict(
        image_unet=image_unet,
        text_unet=text_unet,
        state=state,
        config=config,
        params=params,
        **inputs,
    )


def _torch_image(unet, s, ctx):
    with torch.no_grad():
        out = unet(torch.from_numpy(s["image"]), torch.from_numpy(s["t"]), torch.from_numpy(ctx))
    return out.sample.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _torch_text(unet, s, ctx):
    # The flat U-Net wants the latent as a [B, D, 1, 1] "image" and returns the same shape.
    with torch.no_grad():
        x = torch.from_numpy(s["text"])[:, :, None, None]
        out = unet(x, torch.from_numpy(s["t"]), torch.from_numpy(ctx))
    return out.sample.numpy()[:, :, 0, 0]


def _jax(s, xtype, ctypes, ratios=None, params=None):
    model = VDDiffuser(s["config"])
    x = s["image"].transpose(0, 2, 3, 1) if xtype == "image" else s["text"]
    contexts = [s[f"ctx_{c}"] for c in ctypes]
    out = model.apply(
        {"params": params or s["params"]},
        x,
        s["t"],
        contexts,
        xtype=xtype,
        ctypes=ctypes,
        ratios=ratios,
    )
    return np.asarray(out)


def _with_attentions_of(target, source):
    """A copy of `target` whose Transformer2DModels carry `source`'s weights."""
    out = copy.deepcopy(target)
    sd = out.state_dict()
    sd.update({k: v for k, v in source.state_dict().items() if ".attentions." in k})
    out.load_state_dict(sd)
    return out


def test_config_from_diffusers(setup):
    cfg = setup["config"]
    assert cfg == DiffuserConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attention_levels=(True, False),
        num_heads=4,
        context_dim=CTX_DIM,
        norm_groups=8,
        text_dim=TEXT_DIM,
    )
    image = dict(setup["image_unet"].config)
    text = dict(setup["text_unet"].config)
    with pytest.raises(ValueError, match="block_out_channels"):
        diffuser_config_from_diffusers(image, dict(text, block_out_channels=[32, 96]))
    with pytest.raises(ValueError, match="attention_head_dim"):
        diffuser_config_from_diffusers(image, dict(text, attention_head_dim=2))
    with pytest.raises(ValueError, match="use_linear_projection"):
        diffuser_config_from_diffusers(dict(image, use_linear_projection=True), text)
    with pytest.raises(ValueError, match="up_block_types"):
        diffuser_config_from_diffusers(dict(image, up_block_types=["UpBlock2D", "UpBlock2D"]))


def test_param_tree_layout(setup):
    params = setup["params"]
    assert set(params) == {"global", "data", "context"}
    assert set(params["global"]) == {"linear_1", "linear_2"}
    # 1 conv_in + 2x2 res + 1 down; 2 mid; 2x3 res + 1 up; out.
    assert sorted(params["data"]["image"]) == sorted(f"blocks_{i}" for i in range(16))
    assert len(params["data"]["text"]) == 16
    # 2 on the way down, 1 middle, 3 on the way up.
    assert len(params["context"]["image"]) == len(params["context"]["text"]) == 6


def test_image_variation_matches_image_unet(setup):
    want = _torch_image(setup["image_unet"], setup, setup["ctx_image"])
    assert_rel_close(_jax(setup, "image", ("image",)), want, 1e-4, "image data + image context")


def test_text_variation_matches_text_unet(setup):
    want = _torch_text(setup["text_unet"], setup, setup["ctx_text"])
    assert_rel_close(_jax(setup, "text", ("text",)), want, 1e-4, "text data + text context")


def test_cross_routing_matches_transplanted_unets(setup):
    # text->image: image data blocks with text_unet's attentions (VD's text-context layers).
    unet = _with_attentions_of(setup["image_unet"], setup["text_unet"])
    want = _torch_image(unet, setup, setup["ctx_text"])
    assert_rel_close(_jax(setup, "image", ("text",)), want, 1e-4, "text->image")
    # image->text: text data blocks with image_unet's attentions.
    unet = _with_attentions_of(setup["text_unet"], setup["image_unet"])
    want = _torch_text(unet, setup, setup["ctx_image"])
    assert_rel_close(_jax(setup, "text", ("image",)), want, 1e-4, "image->text")


def _dual_image_unet(image_unet, text_unet, mix_ratio):
    """image_unet with DualTransformer2DModels, set up like VD's dual-guided pipeline does."""
    from diffusers.models import DualTransformer2DModel, Transformer2DModel

    class Dual(DualTransformer2DModel):
        # diffusers 0.42's CrossAttn blocks pass encoder_attention_mask, which
        # DualTransformer2DModel.forward does not accept (the pipeline itself breaks there).
        def forward(self, *args, encoder_attention_mask=None, **kwargs):
            return super().forward(*args, **kwargs)

    unet = copy.deepcopy(image_unet)
    for name, module in list(unet.named_modules()):
        if isinstance(module, Transformer2DModel):
            parent, index = name.rsplit(".", 1)
            cfg = module.config
            dual = Dual(
                num_attention_heads=cfg.num_attention_heads,
                attention_head_dim=cfg.attention_head_dim,
                in_channels=cfg.in_channels,
                num_layers=cfg.num_layers,
                norm_num_groups=cfg.norm_num_groups,
                cross_attention_dim=cfg.cross_attention_dim,
            )
            dual.transformers[0] = module
            dual.transformers[1] = copy.deepcopy(text_unet.get_submodule(name))
            # set_transformer_params(mix_ratio, ("text", "image")) with our token counts.
            dual.mix_ratio = mix_ratio
            dual.condition_lengths = [L_TEXT, L_IMAGE]
            dual.transformer_index_for_condition = [1, 0]
            unet.get_submodule(parent)[int(index)] = dual
    return unet


@pytest.mark.parametrize("text_strength", [0.3, 0.75])
def test_dual_guided_mixing_matches_dual_transformer(setup, text_strength):
    unet = _dual_image_unet(setup["image_unet"], setup["text_unet"], text_strength)
    ctx = np.concatenate([setup["ctx_text"], setup["ctx_image"]], axis=1)
    want = _torch_image(unet, setup, ctx)
    got = _jax(setup, "image", ("text", "image"), ratios=(text_strength, 1 - text_strength))
    assert_rel_close(got, want, 1e-4, f"dual-guided r={text_strength}")
    # Ratios are normalised: scaling them changes nothing.
    got2 = _jax(
        setup, "image", ("text", "image"), ratios=(2 * text_strength, 2 - 2 * text_strength)
    )
    assert_rel_close(got2, got, 1e-6, "ratio normalisation")


def test_text_unet_time_embedding_is_the_shared_one(setup):
    state = setup["state"]
    pairs = text_unet_time_embedding_keys(setup["config"])
    assert len(pairs) == 4
    for text_key, image_key in pairs.items():
        np.testing.assert_array_equal(state[text_key], state[image_key])


def test_partial_load_only_touches_the_flow(setup):
    parts = vd_flows.parts(["text_to_image"])
    params = load_diffuser(setup["state"], setup["config"], parts)
    assert set(params) == {"global", "data", "context"}
    assert set(params["data"]) == {"image"} and set(params["context"]) == {"text"}
    got = _jax(setup, "image", ("text",), params=params)
    assert_rel_close(got, _jax(setup, "image", ("text",)), 0.0, "partial load")
    # The image-only half of the checkpoint is enough for image variation.
    image_only = StateDict.from_arrays(
        {k: setup["state"][k] for k in setup["state"] if k.startswith("image_unet.")}
    )
    load_diffuser(image_only, setup["config"], vd_flows.parts(["image_variation"]))


def _arrays(state):
    return {k: state[k] for k in state}


def test_renamed_key_raises(setup):
    arrays = _arrays(setup["state"])
    key = "text_unet.down_blocks.0.resnets.1.conv2.weight"
    arrays[key.replace("conv2", "conv3")] = arrays.pop(key)
    with pytest.raises(CheckpointError) as e:
        load_diffuser(StateDict.from_arrays(arrays), setup["config"])
    assert key in str(e.value) and "conv3" in str(e.value)


def test_wrong_shape_raises(setup):
    arrays = _arrays(setup["state"])
    key = "image_unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"
    arrays[key] = arrays[key][:, :-1]
    with pytest.raises(CheckpointError, match="wrong shapes") as e:
        load_diffuser(StateDict.from_arrays(arrays), setup["config"])
    assert key in str(e.value)


def test_rules_consume_every_key(setup):
    used = {r.src for r in diffusers_rules(setup["config"])}
    ignored = set(text_unet_time_embedding_keys(setup["config"]))
    assert used | ignored == set(setup["state"])
    assert not used & ignored


def test_jit_matches_eager(setup):
    model = VDDiffuser(setup["config"])
    apply = jax.jit(model.apply, static_argnames=("xtype", "ctypes"))
    x = jnp.asarray(setup["text"])
    ctx = [jnp.asarray(setup["ctx_image"]), jnp.asarray(setup["ctx_text"])]
    kw = dict(xtype="text", ctypes=("image", "text"), ratios=(0.4, 0.6))
    jitted = apply({"params": setup["params"]}, x, setup["t"], ctx, **kw)
    eager = model.apply({"params": setup["params"]}, x, setup["t"], ctx, **kw)
    # Fusion reorders float32 sums, so "identical" means equal to float32 rounding.
    assert_rel_close(jitted, eager, 1e-5, "jit vs eager")


def test_init_and_abstract_params_follow_parts(setup):
    cfg = setup["config"]
    shapes = jax.tree_util.tree_map(lambda a: a.shape, setup["params"])
    assert jax.tree_util.tree_map(lambda a: a.shape, abstract_params(cfg)) == shapes
    flow = abstract_params(cfg, vd_flows.parts(["image_to_text"]))
    assert set(flow["data"]) == {"text"} and set(flow["context"]) == {"image"}
    # Real init is slow on CPU (a PRNG kernel per shape): init only the global layer here.
    params = init_params(cfg, jax.random.key(1), ["global"])
    assert jax.tree_util.tree_map(lambda a: a.shape, params) == {"global": shapes["global"]}


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_full_size_param_counts():
    cfg = DiffuserConfig()
    assert _count(abstract_params(cfg, ("global", "data/image", "context/image"))) == 859_520_964
    assert _count(abstract_params(cfg, ("global",))) == 2_050_560
    assert _count(abstract_params(cfg, ("data/image",))) == 590_231_044
    assert _count(abstract_params(cfg, ("context/image",))) == 267_239_360
    assert _count(abstract_params(cfg, ("context/text",))) == 267_239_360
    assert _count(abstract_params(cfg, ("data/text",))) == 1_439_558_528
    full = abstract_params(cfg)
    assert _count(full) == 2_566_318_852
    assert len(full["data"]["image"]) == len(full["data"]["text"]) == 30
    assert len(full["context"]["image"]) == len(full["context"]["text"]) == 16


# --------------------------------------------------------------------------- original checkpoints


def _manifest(name, prefix=""):
    keys = json.loads((FIXTURES / name).read_text())["keys"]
    return {k: v for k, v in keys.items() if k.startswith(prefix)}


def _tiny_config():
    cfg = json.loads((FIXTURES / "tiny_config.json").read_text())
    return config_from_original(cfg["diffuser.image"], cfg["diffuser.text"])


def _random_state(manifest, rng):
    return StateDict.from_arrays(
        {
            k: rng.standard_normal(v["shape"]).astype(np.dtype(v["dtype"]))
            for k, v in manifest.items()
        }
    )


@pytest.mark.parametrize("layout", ["new", "old"])
def test_original_tiny_checkpoint_loads_every_key(layout):
    cfg = _tiny_config()
    if layout == "new":
        manifest = _manifest("tiny_four_flow_new_fp16.json")
    else:  # the old full file also holds VAE/CLIP/Optimus/buffers: load_original skips them
        manifest = _manifest("tiny_four_flow_old.json")
    state = _random_state(manifest, np.random.default_rng(0))
    params = load_original(state, cfg, layout)
    assert _count(params) == _count(abstract_params(cfg))
    prefix = "diffuser." if layout == "new" else "model.diffusion_model."
    used = {r.src for r in original_rules(cfg, layout)}
    assert used == {k for k in manifest if k.startswith(prefix)}
    # The tiny model runs on what was loaded (fp16 tensors, float32 params).
    ctx = np.zeros((1, 3, cfg.context_dim), np.float32)
    out = VDDiffuser(cfg).apply(
        {"params": params},
        np.zeros((1, cfg.text_dim), np.float32),
        np.array([10]),
        [ctx],
        xtype="text",
        ctypes=("image",),
    )
    assert out.shape == (1, cfg.text_dim) and np.isfinite(np.asarray(out)).all()


def test_original_old_and_new_layouts_agree():
    cfg = _tiny_config()
    new = {r.dst: r.src for r in original_rules(cfg, "new")}
    old = {r.dst: r.src for r in original_rules(cfg, "old")}
    assert new.keys() == old.keys()
    shapes_new, shapes_old = (
        _manifest("tiny_four_flow_new_fp16.json"),
        _manifest("tiny_four_flow_old.json"),
    )
    for dst in new:
        assert shapes_new[new[dst]]["shape"] == shapes_old[old[dst]]["shape"], dst


def test_original_full_size_manifest_maps_shape_for_shape():
    cfg = DiffuserConfig()
    manifest = _manifest("four_flow_new_fp16.json", "diffuser.")
    target = flatten(abstract_params(cfg))
    rules = original_rules(cfg, "new")
    assert {r.src for r in rules} == set(manifest)
    assert {r.dst for r in rules} == set(target) and len(rules) == len(target)
    for r in rules:
        # A zero-stride view stands in for the tensor: the transform's shape, no memory.
        fake = np.broadcast_to(np.zeros((), np.float16), manifest[r.src]["shape"])
        assert TRANSFORMS[r.transform](fake).shape == target[r.dst].shape, r.src
