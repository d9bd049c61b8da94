r"""VD's four-flow recipe (docs/original.md §7): batch 512, AdamW lr 5e-5, 256^2 then 512^2.

Algorithm 1: every step takes the loss of all four flows (text->image, image variation,
image->text, text variation) on the batch and makes one update from the summed gradients.

  python train.py --config=configs/vd_four_flow.py:res=256 --workdir=/ckpt/vd4 \
      --config.data.name=latent_cache/laion_256 --config.data.data_dir=/data
  python train.py --config=configs/vd_four_flow.py:res=512 --workdir=/ckpt/vd4_512 \
      --config.init_from=/ckpt/vd4  # the 512^2 stage starts from the 256^2 run's EMA

`arg` is 'key=value,...' with keys res (256 | 512) and flows (all | dual | a flow name).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections.config_dict import placeholder

from vd_jax.data.input_pipeline import default_data_config
from vd_jax.models.unet import DiffuserConfig

FOUR_FLOWS = ("text_to_image", "image_variation", "image_to_text", "text_variation")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'res=512,flows=dual' -> ConfigDict over `defaults` (values keep the defaults' types)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(out)}")
        out[key] = type(out[key])(value) if out[key] is not None else value
    return ml_collections.ConfigDict(out)


def flows_config(names, loss_weights=None) -> ml_collections.ConfigDict:
    """Per flow: sampling `weight` ('sample' mode), `loss_weight`, `batch_fraction` (1/k: the
    flow trains on every k-th example of each batch; flows at the same 1/k start at different
    offsets, `objective.example_rows`) and per-group `grad_scales`."""
    loss_weights = loss_weights or {}
    return ml_collections.ConfigDict(
        {
            n: dict(
                weight=1.0,
                loss_weight=float(loss_weights.get(n, 1.0)),
                batch_fraction=1.0,
                grad_scales={"global": 1.0, "data": 1.0, "context": 1.0},
            )
            for n in names
        }
    )


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at the full model's values."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 30_000_000 // 512  # 30 M samples at 256^2
    c.batch_size = 512  # global, over all hosts
    c.image_size = 256  # pixels; latents are image_size / 8
    c.latent_size = 32
    c.model = dataclasses.asdict(DiffuserConfig())
    c.dtype = "bfloat16"  # compute; params, optimizer state and EMA stay float32
    c.flows = flows_config(FOUR_FLOWS)
    c.flow_mode = "all"  # 'all': Algorithm 1; 'sample': one flow per step, drawn by weight
    # Flows of one data type (text->image + image variation, image->text + text variation)
    # share one diffuser pass, each through its own context blocks (objective.flow_groups).
    c.fuse_flows = True
    c.dual_ratio = 0.5  # image-context share of the dual_context flow
    c.cfg_dropout = 0.1  # per-context probability of the unconditional context
    c.prediction_type = "epsilon"  # VD's; 'v_prediction' trains (and samples) SD 2's v target
    # Noise schedule fields over VD's (vd_jax.diffusion.schedules.NoiseSchedule); a fine-tune
    # takes its source's.
    c.schedule = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=5e-5,
            schedule="constant",  # 'constant' | 'cosine'
            warmup_steps=1000,
            end_lr_factor=0.0,  # cosine floor, as a fraction of lr
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip=1.0,  # global norm; 0 disables
            grad_accum_steps=1,
        )
    )
    # LR multipliers per layer group; a finer key ('data_text', 'context_image', ...), once set,
    # overrides its group for that modality's layers.
    c.lr_scales = ml_collections.ConfigDict(
        {"global": 1.0, "data": 1.0, "context": 1.0}
        | {f"{g}_{t}": placeholder(float) for g in ("data", "context") for t in ("image", "text")}
    )
    c.freeze = ""  # comma-separated groups to freeze, e.g. 'global,data' trains context only
    c.ema_decay = 0.9999  # 0 disables the EMA copy
    # Rematerialisation per block type: '' | 'full' | a jax.checkpoint_policies name.
    c.remat = ml_collections.ConfigDict(dict(resnet="", fc="", transformer="full", resample=""))

    c.mesh_shape = "-1,1"  # 'data,fsdp'; '-1,1' is pure data parallelism
    c.logical_axis_rules = (("batch", ("data", "fsdp")),)
    c.param_rules = ((".*", "fsdp"),)  # (regex on the param path, 'fsdp'|'replicate'|axes)
    c.fsdp_min_size = 2**14

    c.encoders = ml_collections.ConfigDict(
        dict(
            source="pretrained",  # 'pretrained' (from `folder`) | 'random' (tests) | 'demo'
            folder="",  # diffusers VD folder or the released original files
            on_the_fly=False,  # encode images / captions in the step (else precomputed)
            text_vae="optimus",  # 'optimus' | 'fake' | '' (no text flows on raw data)
            text_context_len=77,
            image_context_len=257,
            vae={},
            clip_text={},
            clip_vision={},
        )
    )
    # Fine-tune from: a diffusers VD folder, SHI-Labs' released files, or another vd_jax run's
    # workdir (its newest checkpoint). Only the parts both diffusers have are taken.
    c.init_from = ""
    c.init_from_ema = True  # from a vd_jax run: its EMA params when it kept them

    # Every input-pipeline field (vd_jax/data/input_pipeline.py), so any is settable by flag;
    # `kind` and `num_examples` are the fake source's.
    c.data = default_data_config()
    c.data.update(kind="latents", num_examples=64)

    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.log_every = 50
    c.sample_every = 5000  # 0: only at the end; -1: never
    c.num_samples = 4
    c.sample_steps = 50
    c.guidance_scale = 7.5
    c.xla_opt_level = -1  # XLA backend optimisation level; -1 = XLA's default
    # On CPU: convolutions on XLA's Eigen kernels ('eigen', faster here) or YNNPACK's
    # ('ynnpack', XLA's default); vd_jax/xla_options.py. No effect on other backends.
    c.cpu_convolutions = "eigen"
    c.compilation_cache_dir = ""  # persistent XLA compilation cache ('' = off)
    c.peak_flops = 0.0  # per device, for the MFU estimate; 0 measures a matmul at start

    c.distributed = ml_collections.ConfigDict(
        dict(enabled=False, coordinator_address="", num_processes=1, process_id=0)
    )
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, res=256, flows="all")
    c = base_config()
    c.image_size, c.latent_size = a.res, a.res // 8
    if a.res == 512:
        c.num_steps = 6_400_000 // 512  # then 6.4 M samples at 512^2
    names = {"all": FOUR_FLOWS, "dual": ("text_to_image", "image_variation")}.get(
        a.flows, (a.flows,)
    )
    c.flows = flows_config(names)
    return c
