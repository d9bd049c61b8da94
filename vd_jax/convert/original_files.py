"""Loading SHI-Labs' released Versatile Diffusion files (the `pretrained_pth/` folder).

Recognised files (any subset that covers the requested flows):
  vd-four-flow-v1-0-fp16.pth             new format, diffuser only (`diffuser.*`), fp16
  vd-four-flow-v1-0.pth / *-deprecated.pth  old format, everything (`model.diffusion_model.*`,
                                         `autokl.*`, `optimus.*`, `clip.model.*`, buffers)
  kl-f8.pth                              the image VAE (LDM names)
  optimus-vae.pth                        the Optimus text VAE
  clip/ (or clip-vit-large-patch14/)     transformers CLIPModel folder; the new-format file
                                         has no CLIP weights, the old one has
  vd_config.json (optional)              sizes for non-released models, in the original
                                         configs' layout ("diffuser.image", "diffuser.text",
                                         "vae.image", "vae.text", "ctx (CLIP)")

Tensors are read one at a time from memory-mapped files, and no pickle code runs
(vd_jax.convert.torch_zip). Every key of every file read must be accounted for —
mapped to a param, a known buffer, or a component the flows do not use — or the
load fails naming the keys: the original app's `strict=False` would silently load
nothing from an old-format file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from vd_jax import flows as vd_flows
from vd_jax.convert import core, unet_original
from vd_jax.convert.clip import CLIP_IGNORE, clip_text_rules, clip_vision_rules
from vd_jax.convert.components import VDModels, add_clip_tower, component_state_dict, read_json
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.optimus import abstract_optimus, optimus_ignore, optimus_rules
from vd_jax.convert.vae import load_vae, vae_rules
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from vd_jax.models.optimus import optimus_configs
from vd_jax.models.unet import ALL_PARTS, DiffuserConfig
from vd_jax.models.vae import VAEConfig
from vd_jax.processing.images import CLIPImageProcessorConfig

NEW_FILES = ("vd-four-flow-v1-0-fp16.pth", "vd-four-flow-v1-0-fp16.safetensors")
OLD_FILES = (
    "vd-four-flow-v1-0.pth",
    "vd-four-flow-v1-0-deprecated.pth",
    "vd-four-flow-v1-0-fp16-deprecated.pth",
    "vd-official.pth",
)
VAE_FILES = ("kl-f8.pth", "kl-f8.safetensors")
OPTIMUS_FILES = ("optimus-vae.pth", "optimus-vae.safetensors")
CLIP_DIRS = ("clip", "clip-vit-large-patch14")
# DDPM schedule buffers of the old file: recomputable, no learned weights.
_SCHEDULE_BUFFERS = (
    r"betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar"
)
RELEASED_IMAGE_SIZE = 512  # the app's output (and input squash) size


def _first(folder: str, names: Sequence[str]) -> str | None:
    for n in names:
        if os.path.isfile(os.path.join(folder, n)):
            return os.path.join(folder, n)
    return None


def is_original_folder(folder: str) -> bool:
    return any(_first(folder, names) for names in (NEW_FILES, OLD_FILES, VAE_FILES, OPTIMUS_FILES))


def _configs(folder: str) -> dict[str, Any]:
    """Component configs: the released sizes, or vd_config.json's."""
    path = os.path.join(folder, "vd_config.json")
    if not os.path.isfile(path):
        return dict(
            diffuser=DiffuserConfig(),
            vae=VAEConfig(),
            optimus=optimus_configs(None),
            clip_text=CLIPTextConfig(),
            clip_vision=CLIPVisionConfig(),
            latent_size=RELEASED_IMAGE_SIZE // 8,
        )
    cfg = read_json(path)
    try:
        vae = cfg["vae.image"]
        clip = cfg.get("ctx (CLIP)", {})
        vae_config = VAEConfig.from_ldm(vae, vae.get("embed_dim", vae["z_channels"]))
        return dict(
            diffuser=unet_original.config_from_original(
                cfg["diffuser.image"], cfg["diffuser.text"]
            ),
            vae=vae_config,
            optimus=optimus_configs(cfg.get("vae.text")),
            clip_text=CLIPTextConfig.from_hf(clip.get("text", {})),
            clip_vision=CLIPVisionConfig.from_hf(clip.get("vision", {})),
            latent_size=int(
                cfg.get("sample_size", vae["resolution"] // vae_config.downsampling_factor)
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot read the model sizes ({type(e).__name__}: {e})"
        ) from None


def describe(folder: str) -> tuple[DiffuserConfig, NoiseSchedule, tuple[str, ...], int, int]:
    """(diffuser config, schedule, flows, latent size, VAE factor) from the configs alone."""
    c = _configs(folder)
    has_optimus = bool(_first(folder, OPTIMUS_FILES) or _first(folder, OLD_FILES))
    flows = vd_flows.TRAINABLE if has_optimus else vd_flows.IMAGE_FLOWS
    return c["diffuser"], NoiseSchedule(), flows, c["latent_size"], c["vae"].downsampling_factor


def _check_accounted(
    state: core.StateDict, rule_lists: Sequence[Sequence[core.Rule]], ignore: Sequence[str]
):
    """Every key of `state` must be some table's source or match an ignore pattern."""
    known = {r.src for rules in rule_lists for r in rules}
    rx = [re.compile(p) for p in ignore]
    left = sorted(k for k in state if k not in known and not any(r.fullmatch(k) for r in rx))
    if left:
        raise CheckpointError(
            f"cannot load {state.source}: keys no component accounts for\n"
            + core._listing("unexpected keys", left)
        )


def _optimus_halves(state, prefix, bert_cfg, gpt2_cfg, halves, param_dtype) -> dict[str, Any]:
    """Loads only the Optimus halves ('encoder' / 'decoder') a flow uses."""
    rules = [r for r in optimus_rules(bert_cfg, gpt2_cfg, prefix) if r.dst.split("/")[0] in halves]
    target = abstract_optimus(bert_cfg, gpt2_cfg, param_dtype=param_dtype)
    under = "|".join(re.escape(f"{prefix}{h}.") for h in halves)
    sub = state.without(f"(?!{under}).*")
    return core.load_params(
        sub,
        rules,
        {h: target[h] for h in halves},
        ignore=optimus_ignore(prefix),
        what=f"Optimus {'+'.join(halves)}",
    )


def load_original_folder(
    folder: str | os.PathLike,
    flows: Sequence[str] | None,
    *,
    param_dtype: Any = jnp.float32,
    clip_dir: str | None = None,
    optimus_halves: Sequence[str] = (),
) -> VDModels:
    """Loads what `flows` need from a folder of the released original files.

    Args:
      folder: holds the released files (see the module docstring).
      flows: the flows to prepare (decides which files and parts are read). None: everything
        the folder holds (every diffuser part, CLIP, both Optimus halves when it has Optimus).
      param_dtype: storage dtype of the returned params (the fp16 file is upcast).
      clip_dir: a transformers CLIPModel folder (default: folder/clip if present).
      optimus_halves: Optimus halves ('encoder' / 'decoder') to load besides the flows'.
    """
    folder = os.fspath(folder)
    everything = flows is None
    if everything:
        has_optimus = bool(_first(folder, OPTIMUS_FILES) or _first(folder, OLD_FILES))
        flows = vd_flows.TRAINABLE if has_optimus else vd_flows.IMAGE_FLOWS
        optimus_halves = ("encoder", "decoder") if has_optimus else ()
    flows = vd_flows.check(flows)
    c = _configs(folder)
    needs = [vd_flows.get(f) for f in flows]
    old = _read_old_file(folder, c)
    parts = tuple(sorted(ALL_PARTS if everything else vd_flows.parts(flows)))
    diffuser_params = _load_diffuser(folder, old, c["diffuser"], parts, param_dtype)
    vae_params = _load_image_vae(folder, old, c["vae"], param_dtype)
    models = VDModels(
        flows=flows,
        schedule=NoiseSchedule(),  # VD's: scaled-linear 0.00085..0.012, DDIM from t=981
        diffuser_config=c["diffuser"],
        diffuser_params=diffuser_params,
        vae_config=c["vae"],
        vae_params=vae_params,
        image_sample_size=c["latent_size"],
        squash_images_to=RELEASED_IMAGE_SIZE,
    )
    needs_text = any(n.needs_clip_text for n in needs)
    needs_image = any(n.needs_clip_vision for n in needs)
    if needs_text or needs_image:
        _add_clip(models, folder, clip_dir, old, c, needs_text, needs_image, param_dtype)
    halves = tuple(sorted({h for n in needs for h in n.optimus} | set(optimus_halves)))
    if halves:
        _add_optimus(models, folder, old, c["optimus"], halves, param_dtype)
    return models


def _read_old_file(folder: str, c: dict[str, Any]) -> core.StateDict | None:
    """The old-format file if the folder has one, checked to hold only known keys."""
    old_path = _first(folder, OLD_FILES)
    if not old_path:
        return None
    old = core.read_state_dict(old_path)
    # The old file holds everything: account for all of it before reading any of it.
    _check_accounted(
        old,
        [
            unet_original.original_rules(c["diffuser"], "old"),
            vae_rules(c["vae"], "ldm", "autokl."),
            optimus_rules(*c["optimus"], "optimus."),
            clip_text_rules(c["clip_text"], "clip.model."),
            clip_vision_rules(c["clip_vision"], "clip.model."),
        ],
        [
            _SCHEDULE_BUFFERS,
            *optimus_ignore("optimus."),
            *CLIP_IGNORE,
            r"clip\.model\.logit_scale",
        ],
    )
    return old


def _load_diffuser(
    folder: str,
    old: core.StateDict | None,
    config: DiffuserConfig,
    parts: tuple[str, ...],
    param_dtype: Any,
) -> dict[str, Any]:
    # The new file if present (it is the maintained one), else the old file.
    new_path = _first(folder, NEW_FILES)
    if new_path:
        state, layout = core.read_state_dict(new_path), "new"
        _check_accounted(state, [unet_original.original_rules(config, "new")], [_SCHEDULE_BUFFERS])
    elif old is not None:
        state, layout = old, "old"
    else:
        raise CheckpointError(f"{folder}: no diffuser weights ({NEW_FILES[0]} or {OLD_FILES[0]})")
    return unet_original.load_original(state, config, layout, parts=parts, param_dtype=param_dtype)


def _load_image_vae(
    folder: str, old: core.StateDict | None, config: VAEConfig, param_dtype: Any
) -> dict[str, Any]:
    vae_path = _first(folder, VAE_FILES)
    if vae_path:
        return load_vae(core.read_state_dict(vae_path), config, "ldm", param_dtype=param_dtype)
    if old is not None:
        return load_vae(old, config, "ldm", "autokl.", param_dtype=param_dtype)
    raise CheckpointError(f"{folder}: no image VAE weights ({VAE_FILES[0]})")


def _add_clip(
    models: VDModels,
    folder: str,
    clip_dir: str | None,
    old: core.StateDict | None,
    c: dict[str, Any],
    needs_text: bool,
    needs_image: bool,
    param_dtype: Any,
) -> None:
    """Puts the CLIP towers the flows need, with their tokenizer / image processor, in `models`."""
    state, prefix = _clip_state(folder, clip_dir, old)
    if needs_text:
        add_clip_tower(models, c["clip_text"], state, prefix=prefix, param_dtype=param_dtype)
        models.tokenizer = _clip_tokenizer(folder, clip_dir)
    if needs_image:
        add_clip_tower(models, c["clip_vision"], state, prefix=prefix, param_dtype=param_dtype)
        size = c["clip_vision"].image_size
        models.image_processor = CLIPImageProcessorConfig(size=size, crop_size=(size, size))


def _add_optimus(
    models: VDModels,
    folder: str,
    old: core.StateDict | None,
    configs: tuple,
    halves: tuple[str, ...],
    param_dtype: Any,
) -> None:
    """Puts the Optimus halves the flows use, and both text tokenizers, in `models`."""
    from vd_jax.processing.optimus_tokenizers import load_bert_tokenizer, load_gpt2_tokenizer

    opt_path = _first(folder, OPTIMUS_FILES)
    if opt_path:
        state, prefix = core.read_state_dict(opt_path), ""
        _check_accounted(state, [optimus_rules(*configs)], optimus_ignore())
    elif old is not None:
        state, prefix = old, "optimus."
    else:
        raise CheckpointError(
            f"{folder}: {models.flows} need the Optimus text VAE ({OPTIMUS_FILES[0]})"
        )
    models.optimus_configs = configs
    models.optimus_params = _optimus_halves(state, prefix, *configs, halves, param_dtype)
    models.bert_tokenizer = load_bert_tokenizer()
    models.gpt2_tokenizer = load_gpt2_tokenizer()


def _clip_folder(folder: str, clip_dir: str | None) -> str | None:
    if clip_dir:
        return clip_dir
    for name in CLIP_DIRS:
        if os.path.isfile(os.path.join(folder, name, "config.json")):
            return os.path.join(folder, name)
    return None


def _clip_state(folder: str, clip_dir: str | None, old: core.StateDict | None):
    """(state, prefix) of the CLIP weights: a transformers folder, else the old file's."""
    d = _clip_folder(folder, clip_dir)
    if d is not None:
        return component_state_dict(os.path.dirname(d), os.path.basename(d)), ""
    if old is not None:
        return old, "clip.model."
    raise CheckpointError(
        f"{folder}: the new-format file holds no CLIP weights; put a transformers copy of "
        f"openai/clip-vit-large-patch14 in {os.path.join(folder, CLIP_DIRS[0])}/"
    )


def _clip_tokenizer(folder: str, clip_dir: str | None):
    from vd_jax.processing.clip_tokenizer import bundled_clip_tokenizer, load_clip_tokenizer

    d = _clip_folder(folder, clip_dir)
    if d is not None and any(
        os.path.isfile(os.path.join(d, n)) for n in ("vocab.json", "tokenizer.json")
    ):
        return load_clip_tokenizer(d)
    return bundled_clip_tokenizer()  # ViT-L/14's is CLIP's standard BPE


def write_config(folder: str, config: dict) -> None:
    """Writes a vd_config.json (for checkpoints with non-released sizes)."""
    with open(os.path.join(folder, "vd_config.json"), "w") as f:
        json.dump(config, f, indent=1)
