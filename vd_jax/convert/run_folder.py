"""A vd_jax training run as a source of weights: its workdir read into `VDModels`.

The trainer writes `vd_model.json` into its workdir when it starts (`write_run_record`): the
diffuser's sizes, the noise schedule, the flows it trains, the image and latent sizes, where
its frozen encoders come from and what it was initialised from. With the orbax checkpoints
beside it that is everything sampling and export need:

- the diffuser: the newest complete checkpoint (or a chosen step), its EMA params when the run
  kept an EMA (else its raw params). Parts the run does not train (a fine-tune of the image
  flows has no text data layers) come from its `init_from` source when it has one;
- the encoders, by the record's `encoders.kind`:
    ``folder``  a diffusers folder or the released original files (a fine-tune's), read with
                `load_models`;
    ``saved``   encoders the run made itself, saved in `encoders_folder` format (the demo's
                pre-trained VAE / Optimus / CLIP, or a test run's random ones);
    ``none``    the run trained on precomputed latents and contexts: it can be exported, not
                sampled.

A path is a run when it holds `vd_model.json`, or `vd/vd_model.json` (the demo's workdir,
whose diffuser run is `vd/` beside `encoders/`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vd_jax import flows as vd_flows
from vd_jax.convert.components import VDModels, has_part
from vd_jax.convert.core import CheckpointError
from vd_jax.convert.encoders_folder import add_to_models, cast_params, read_encoders_folder
from vd_jax.diffusion.schedules import NoiseSchedule
from vd_jax.models.unet import ALL_PARTS, DiffuserConfig

RUN_FILE = "vd_model.json"
FORMAT = "vd_jax run"
ENCODER_KINDS = ("folder", "saved", "none")


def run_dir(path: str | os.PathLike) -> epath.Path | None:
    """The run folder at `path` (itself, or its `vd/` for the demo's workdir), else None."""
    for d in (epath.Path(path), epath.Path(path) / "vd"):
        if (d / RUN_FILE).exists():
            return d
    return None


def make_record(
    diffuser: DiffuserConfig,
    schedule: NoiseSchedule,
    flows: Sequence[str],
    *,
    image_size: int,
    latent_size: int,
    encoders_kind: str,
    encoders_folder: str = "",
    init_from: str = "",
) -> dict[str, Any]:
    """`vd_model.json`'s content. `encoders_folder` may be relative to the run folder."""
    if encoders_kind not in ENCODER_KINDS:
        raise ValueError(f"encoders_kind must be one of {ENCODER_KINDS}, got {encoders_kind!r}")
    return {
        "format": FORMAT,
        "version": 1,
        "diffuser": dataclasses.asdict(diffuser),
        "schedule": dataclasses.asdict(schedule),
        "flows": list(flows),
        "image_size": int(image_size),
        "latent_size": int(latent_size),
        "encoders": {"kind": encoders_kind, "folder": encoders_folder},
        "init_from": init_from,
    }


def write_record(workdir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Writes `vd_model.json` whole (aside, then renamed; one object on object stores)."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1)
    if "://" in os.fspath(workdir):
        (path / RUN_FILE).write_text(text)
        return
    tmp = path / f"{RUN_FILE}.tmp"
    tmp.write_text(text)
    tmp.replace(path / RUN_FILE)


def read_record(run: epath.Path) -> dict[str, Any]:
    try:
        rec = json.loads((run / RUN_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{run / RUN_FILE}: not valid JSON ({e})") from None
    if rec.get("format") != FORMAT:
        raise CheckpointError(f"{run / RUN_FILE}: not a vd_jax run record")
    return rec


def _tupled(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def diffuser_config(rec: dict) -> DiffuserConfig:
    return DiffuserConfig(**_tupled(rec["diffuser"]))


def schedule(rec: dict) -> NoiseSchedule:
    return NoiseSchedule(**_tupled(rec["schedule"]))


def pick_step(run: epath.Path, step: int | None) -> int:
    """`step` if the run has that complete checkpoint, else its newest; raises naming the
    steps there are."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(run / "checkpoints")
    steps = sorted(mngr.all_steps())
    mngr.close()
    if not steps:
        raise CheckpointError(f"{run}: the run has no complete checkpoint yet")
    if step is None or step < 0:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{run}: no checkpoint of step {step}; it has steps {steps}")
    return step


def read_diffuser_params(
    run: epath.Path, step: int, use_ema: bool = True
) -> tuple[dict[str, Any], str]:
    """(the diffuser params of checkpoint `step` as numpy arrays, 'ema_params' | 'params').

    Only that subtree is read (not the optimizer state). Without an EMA copy in the run the
    raw params are returned (and said so)."""
    import orbax.checkpoint as ocp

    path = run / "checkpoints" / str(step) / "state"
    tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata
    key = "ema_params" if use_ema and tree.get("ema_params") else "params"
    item = {key: tree[key]}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with jax.transfer_guard("allow"):
        out = ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    return _plain(out[key]), key


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return np.asarray(tree)


def _take(params: dict, part: str) -> Any:
    group, _, modality = part.partition("/")
    return params[group] if not modality else params[group][modality]


def _put(params: dict, part: str, value: Any) -> None:
    group, _, modality = part.partition("/")
    if not modality:
        params[group] = value
    else:
        params.setdefault(group, {})[modality] = value


def _resolve(run: epath.Path, folder: str) -> str:
    """A folder the record names, relative to the run folder unless absolute or a URL."""
    if not folder or "://" in folder or os.path.isabs(folder):
        return folder
    return os.fspath(run / folder)


def load_run(
    path: str | os.PathLike,
    flows: Sequence[str] | None,
    *,
    param_dtype: Any = jnp.float32,
    checkpoint_step: int | None = None,
    use_ema: bool = True,
    optimus_halves: Sequence[str] = (),
) -> VDModels:
    """What `flows` need (None: everything the run has) from a vd_jax run.

    Args:
      path: the run's workdir (local or a URL) or the demo's workdir.
      flows: the flows to prepare, or None for every part and encoder the run has (export).
      param_dtype: storage dtype of the returned params.
      checkpoint_step: the checkpoint to read (None: the newest complete one).
      use_ema: the EMA params when the run kept them.
      optimus_halves: Optimus halves to load besides those the flows sample with.
    """
    from vd_jax.convert.load import load_models  # a fine-tune's source: any format

    run = run_dir(path)
    if run is None:
        raise CheckpointError(f"{path}: not a vd_jax run (no {RUN_FILE})")
    rec = read_record(run)
    step = pick_step(run, checkpoint_step)
    params, which = read_diffuser_params(run, step, use_ema)
    params = cast_params(params, param_dtype)
    everything = flows is None
    trained = vd_flows.check(rec["flows"], trainable=True)
    flows = trained if everything else vd_flows.check(flows)
    wanted = ALL_PARTS if everything else vd_flows.parts(flows)
    missing = [p for p in wanted if not has_part(params, p)]
    init_from = _resolve(run, rec.get("init_from", ""))
    source = None
    if missing and init_from:
        source = load_models(init_from, None, param_dtype=param_dtype)
        for part in missing:
            if has_part(source.diffuser_params, part):
                _put(params, part, _take(source.diffuser_params, part))
    still = [p for p in wanted if not has_part(params, p)]
    if still and not everything:
        raise CheckpointError(
            f"{run}: {list(flows)} need the diffuser parts {still}, which the run (flows "
            f"{list(trained)}) does not train" + (f" and {init_from} lacks" if init_from else "")
        )
    models = VDModels(
        flows=tuple(flows),
        schedule=schedule(rec),
        diffuser_config=diffuser_config(rec),
        diffuser_params=params,
        vae_config=None,
        vae_params=None,
        image_sample_size=int(rec["latent_size"]),
    )
    _add_encoders(
        models, run, rec, flows, optimus_halves, everything, param_dtype, source, init_from
    )
    models.source = f"{run} (step {step}, {which})"
    return models


def _add_encoders(
    models, run, rec, flows, optimus_halves, everything, dtype, source, init_from
) -> None:
    """The encoders the record names; `source` (the `init_from` source read whole, or None)
    is reused when they are its."""
    enc = rec["encoders"]
    needs = [vd_flows.get(f) for f in flows]
    text = any(n.needs_clip_text for n in needs)
    vision = any(n.needs_clip_vision for n in needs)
    halves = {h for n in needs for h in n.optimus} | set(optimus_halves)
    if enc["kind"] == "none":
        if everything:
            return
        raise CheckpointError(
            f"{run}: the run trained on precomputed latents and contexts and recorded no "
            "encoders, so it cannot be sampled (it can be exported: python -m vd_jax.export)"
        )
    folder = _resolve(run, enc["folder"])
    if enc["kind"] == "saved":
        saved = read_encoders_folder(folder)
        if everything:  # whatever the folder holds
            text, vision = "clip_text" in saved.configs, "clip_vision" in saved.configs
            halves = {"encoder", "decoder"} if "bert" in saved.configs else set()
        add_to_models(models, saved, text=text, vision=vision, optimus=bool(halves), dtype=dtype)
        return
    from vd_jax.convert.load import load_models

    if source is not None and folder == init_from:
        src = source  # a fine-tune's encoders are usually its source's: read once
    else:
        src_flows = None if everything else flows
        src = load_models(folder, src_flows, param_dtype=dtype, optimus_halves=tuple(halves))
    for field in (
        "vae_config vae_params text_config text_params tokenizer vision_config vision_params "
        "image_processor squash_images_to optimus_configs optimus_params bert_tokenizer "
        "gpt2_tokenizer optimus_lowercase text_latent_scale image_context_tokens"
    ).split():
        setattr(models, field, getattr(src, field))
    # A fine-tune keeps its source's unconditional image context (its pipelines' default):
    # a few steps on vd_jax's zeros do not retrain what the source learned.
    models.image_uncond = src.image_uncond
