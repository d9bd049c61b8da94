"""The demo job: dataset -> encoders -> latent cache -> VD training -> held-out evaluation.

`run_demo(config, workdir)` (configs/demo.py) writes into `workdir`:

- `data/`: the captioned-shapes TFDS dataset and the latent cache of its training split;
- `encoders/`: the pre-trained VAE and Optimus and the frozen CLIP towers (demo/encoders.py);
- `vd/`: the diffuser's training run (checkpoints, metrics.jsonl, TensorBoard, loss curve);
- `eval.json`: per-flow held-out accuracies, encoder reconstruction accuracies, wall times;
- `demo_grid.png`: examples of every flow.

Each stage reuses what an earlier run of the same workdir finished, so rerunning after an
interruption continues (VD training resumes from its newest checkpoint).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from vd_jax.demo import evaluate, pretrain, pretrain_clip, shapes
from vd_jax.demo.encoders import DemoEncoders, check_image_context, frozen_encoders
from vd_jax.train.metrics import MetricsWriter
from vd_jax.train.sharding import make_mesh


class _Clock:
    """Wall seconds per stage, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def stage(self, name: str, t0: float) -> None:
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        logging.info("demo stage %s: %.1fs", name, self.seconds[name])

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 2)


def _strip_history(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "history"}


def train_demo_vae(config, train: dict, held: dict) -> pretrain.Trained:
    """The image VAE of `config.vae`, trained on the training split."""
    c = config
    vae_cfg = pretrain.tiny_vae_config(
        c.data.image_size,
        latent_channels=c.vae.latent_channels,
        block_out_channels=tuple(c.vae.block_out_channels),
    )
    return pretrain.train_vae(
        train, vae_cfg, eval_data=held, steps=c.vae.steps, batch_size=c.vae.batch_size,
        lr=c.vae.lr, seed=c.seed,
    )  # fmt: skip


def train_demo_optimus(config, train: dict, held: dict) -> pretrain.Trained:
    """The Optimus text VAE of `config.optimus`, trained on the training split."""
    c = config
    opt_cfgs = pretrain.tiny_optimus_configs(
        c.optimus.latent_size, hidden=c.optimus.hidden, layers=c.optimus.layers
    )
    return pretrain.train_optimus(
        train, opt_cfgs, eval_data=held, steps=c.optimus.steps,
        batch_size=c.optimus.batch_size, lr=c.optimus.lr, beta=c.optimus.beta, seed=c.seed,
        paraphrase_prob=c.optimus.paraphrase_prob,
    )  # fmt: skip


def train_demo_clip(config, train: dict, held: dict) -> pretrain.Trained:
    """The CLIP towers of `config.clip`, trained contrastively (or random with steps=0)."""
    c = config
    clip_cfgs = pretrain_clip.tiny_clip_configs(
        c.data.image_size, hidden=c.clip.hidden, layers=c.clip.layers,
        projection_dim=c.clip.projection_dim, patch_size=c.clip.patch_size,
    )  # fmt: skip
    return pretrain_clip.train_clip(
        train, clip_cfgs, eval_data=held, steps=c.clip.steps, batch_size=c.clip.batch_size,
        lr=c.clip.lr, seed=c.seed, shape_groups=c.clip.shape_groups,
    )  # fmt: skip


def pretrain_encoders(config, train: dict, held: dict, clock: _Clock) -> DemoEncoders:
    """Trains the image VAE and Optimus on the training split; CLIP stays random or trains."""
    c = config
    t0 = time.perf_counter()
    vae = train_demo_vae(config, train, held)
    clock.stage("vae", t0)
    t0 = time.perf_counter()
    optimus = train_demo_optimus(config, train, held)
    clock.stage("optimus", t0)
    t0 = time.perf_counter()
    clip = train_demo_clip(config, train, held)
    clock.stage("clip", t0)
    bert, gpt2 = optimus.config
    return DemoEncoders(
        vae_config=vae.config,
        vae=vae.params,
        bert=bert,
        gpt2=gpt2,
        optimus=optimus.params,
        clip_text_config=clip.config[0],
        clip_vision_config=clip.config[1],
        clip={"text": clip.params["text"], "vision": clip.params["vision"]},
        text_scale=1.0 / optimus.metrics["latent_std"],
        text_length=pretrain.TEXT_LENGTH,
        image_context=c.clip.image_context,
        metrics={
            "vae": _strip_history(vae.metrics),
            "optimus": _strip_history(optimus.metrics),
            "clip": {
                "mode": "trained" if c.clip.steps else "frozen random",
                **_strip_history(clip.metrics),
            },
        },  # fmt: skip
    )


def _batches(data: dict, size: int):
    n = len(data["caption"])
    for s in range(0, n, size):
        yield {k: v[s : s + size] for k, v in data.items() if k in ("image", "caption", "key")}


def vd_train_config(config, workdir: str, cache: dict):
    """The diffuser's trainer config, pointed at the encoders and the latent cache."""
    vd = copy.deepcopy(config.vd)
    with vd.unlocked():
        vd.seed = config.seed
        vd.encoders.folder = os.path.join(workdir, "encoders")
        vd.data.name = cache["tfds_name"]
        vd.data.data_dir = cache["data_dir"]
    return vd


def run_demo(config, workdir: str) -> dict[str, Any]:
    """Runs every stage in `workdir`; returns the contents written to `eval.json`."""
    from vd_jax.train.loop import train_and_evaluate

    if jax.process_count() > 1:
        raise ValueError("the demo runs in one process (it is a single-CPU job)")
    check_image_context(config.clip.image_context)  # before minutes of pre-training
    os.makedirs(workdir, exist_ok=True)
    clock = _Clock()
    t0 = time.perf_counter()
    data_dir = os.path.join(workdir, "data")
    report = shapes.build_shapes_dataset(
        data_dir, seed=config.seed, num_train=config.data.num_train,
        num_eval=config.data.num_eval, image_size=config.data.image_size,
        jitter=config.data.jitter, radius=config.data.get("radius") or None,
    )  # fmt: skip
    train = shapes.load_split(report["dataset_dir"], "train")
    held = shapes.load_split(report["dataset_dir"], "heldout")
    clock.stage("data", t0)

    enc_dir = os.path.join(workdir, "encoders")
    enc, reused = _encoders(config, enc_dir, train, held, clock)

    t0 = time.perf_counter()
    cache = _latent_cache(
        enc, train, data_dir, f"demo_{report['tfds_name'].split('/')[-1]}", reused
    )
    clock.stage("cache", t0)

    t0 = time.perf_counter()
    vd_config = vd_train_config(config, workdir, cache)
    # One device, whatever the host exposes: the demo's numbers are a single-CPU measurement.
    mesh = make_mesh("1,1", jax.local_devices()[:1])
    frozen, _ = frozen_encoders(enc_dir, vd_config.model.context_dim)
    result = train_and_evaluate(vd_config, os.path.join(workdir, "vd"), mesh=mesh, encoders=frozen)
    clock.stage("vd_train", t0)
    if result["preempted"]:
        logging.warning("preempted during VD training: rerun the command to continue")
        return {}

    t0 = time.perf_counter()
    trainer, state = result["trainer"], result["state"]
    params = state["ema_params"] or state["params"]
    scores, examples = evaluate.evaluate_flows(config, trainer, params, enc, held)
    clock.stage("eval", t0)
    evaluate.write_grid(os.path.join(workdir, "demo_grid.png"), examples)
    out = _report(workdir, scores, enc, result, params, clock)
    _write_json(os.path.join(workdir, "eval.json"), out)
    return out


def _encoders(config, enc_dir: str, train, held, clock) -> tuple[DemoEncoders, bool]:
    """The pre-trained encoders of an earlier run in this workdir, or new ones; and which."""
    if not os.path.isfile(os.path.join(enc_dir, "encoders.json")):
        enc = pretrain_encoders(config, train, held, clock)
        enc.save(enc_dir)
        return enc, False
    enc = DemoEncoders.load(enc_dir)
    logging.info("reusing the pre-trained encoders in %s", enc_dir)
    if enc.image_context != config.clip.image_context:
        raise ValueError(
            f"the encoders in {enc_dir} give image contexts of {enc.image_context!r} tokens, "
            f"the config asks for {config.clip.image_context!r}: use a new workdir "
            "(or remove its encoders/ folder)"
        )
    return enc, True


def _latent_cache(enc: DemoEncoders, train, data_dir: str, name: str, reused: bool) -> dict:
    """The training split encoded once; new encoders write new latents."""
    from vd_jax.data.latent_cache import write_latent_cache

    write = lambda overwrite: write_latent_cache(  # noqa: E731
        {"train": _batches(train, 256)}, enc.encode_batch, data_dir, name=name, overwrite=overwrite
    )
    try:
        return write(not reused)
    except FileExistsError:  # a cache interrupted while being finalised: write it again
        return write(True)


def _report(workdir: str, scores: dict, enc: DemoEncoders, result: dict, params, clock) -> dict:
    """What `eval.json` holds: scores, encoder metrics, the VD run, wall times, the machine."""
    from vd_jax.train.trainer import measure_peak_flops

    metrics = MetricsWriter.read_jsonl(os.path.join(workdir, "vd", "metrics.jsonl"))
    out = {
        **{flow: s["all"] for flow, s in scores.items()},
        "details": scores,
        "encoders": enc.metrics,
        "vd": {
            "steps": int(result["step"]),
            "params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))),
            "first_loss": metrics[0]["loss"] if metrics else None,
            "final_loss": metrics[-1]["loss"] if metrics else None,
        },
        "heldout_combinations": len(shapes.combinations("heldout")),
        "wall_seconds": {**clock.seconds, "total": clock.total()},
        # This VM's speed varies ~2x from day to day: the wall times read with this number.
        "machine": {
            "cpus": os.cpu_count(),
            "matmul_gflops": round(measure_peak_flops(2048, 5) / 1e9, 1),
        },
    }
    return out


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
