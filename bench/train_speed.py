r"""Training-step speed: vd_jax's jitted step vs diffusers' UNet2DConditionModel + AdamW.

  python bench/train_speed.py --sizes=tiny,small --cpu_convolutions=eigen,ynnpack
  python bench/train_speed.py --sizes=full --batch=32 --steps=10 --attention=auto,vd  # GPU

Both sides train the text->image flow (the image U-Net under a text context, ε-prediction
MSE, AdamW, global-norm clipping, an EMA copy of the params) on the same device with the same
batch and compute dtype (`--dtype`: float32 on CPU, bf16 with float32 params elsewhere;
PyTorch under `torch.autocast`). Reported per size: examples/s of each, the vd_jax / PyTorch
ratio (target > 1), model FLOPs per step (XLA's cost analysis of the step's HLO, lowered for
the CPU, with the plain attention formula: no recomputation counted, the same count whichever
attention kernel runs), the measured matmul peak of this device in the compute dtype (f32 on
CPU) and the MFU estimate FLOPs / step time / peak (target >= 40%). On a CPU the steps of
every variant, PyTorch's included, are taken in turns (`time_steps`), so that all see the same
stretch of a shared machine whose speed drifts; on accelerators one variant after the other.
Results also go to --out, after each size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Model sizes: 'tiny' is configs/tiny.py's; 'small' has the released model's structure
# (3 levels, attention on the first two, 8 heads) at 1/5 of the width.
SIZES = {
    "tiny": dict(channels=(32, 64), attn=(True, True), heads=4, groups=8, ctx=32, latent=8),
    "small": dict(channels=(64, 128, 128), attn=(True, True, False), heads=8, groups=32, ctx=64,
                  latent=16),
    # The released image U-Net (SD 1.x's) at 256² pixels.
    "full": dict(channels=(320, 640, 1280, 1280), attn=(True, True, True, False), heads=8,
                 groups=32, ctx=768, latent=32),
}  # fmt: skip
TEXT_LEN = 77
EMA_DECAY = 0.9999  # both sides keep an EMA copy of the params, as a training run does


def jax_config(size: str, batch: int, dtype: str, attention: str, cpu_convolutions: str = "eigen"):
    from configs import tiny

    z = SIZES[size]
    c = tiny.get_config("flows=text_to_image")
    c.model.update(
        model_channels=z["channels"][0],
        channel_mult=tuple(ch // z["channels"][0] for ch in z["channels"]),
        num_res_blocks=2,
        attention_levels=z["attn"],
        num_heads=z["heads"],
        context_dim=z["ctx"],
        norm_groups=z["groups"],
        attention=attention,
    )
    c.batch_size, c.latent_size, c.image_size = batch, z["latent"], 2 * z["latent"]
    c.encoders.text_context_len = TEXT_LEN
    c.xla_opt_level = -1  # XLA's full optimisation for timing
    c.ema_decay, c.cfg_dropout = EMA_DECAY, 0.1
    c.sample_every, c.peak_flops = -1, 1.0
    c.dtype = dtype
    c.cpu_convolutions = cpu_convolutions
    c.optim.lr = 1e-4  # as PyTorch's side below (the tiny config's 3e-3 is for tiny models)
    return c


def model_flops(size: str, batch: int, dtype: str) -> tuple[float, str]:
    """FLOPs of one step as the model defines them, and how they were counted.

    With the plain attention formula (the vd VJP's recomputation and cuDNN's opaque kernel
    would each count differently): XLA's cost analysis of the unoptimised step lowered for
    the CPU (exact windows at padded borders), else, where this jax gives none, the jaxpr's
    matmuls and convolutions (`vd_jax.train.flop_count`, ~4% more at "small": it counts padding).
    """
    import jax

    from vd_jax.data.input_pipeline import make_iterator
    from vd_jax.train import flop_count
    from vd_jax.train import sharding as shd
    from vd_jax.train.trainer import Trainer

    c = jax_config(size, batch, dtype, "xla")
    tr = Trainer(c, shd.make_mesh("1,1", jax.devices("cpu")[:1]))
    it = make_iterator(c, process_index=0, process_count=1)
    traced = tr.trace(tr.global_batch(next(it)), None)
    try:
        cost = traced.lower().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]), "xla_cost_analysis"
    except (TypeError, KeyError):  # no cost model for lowered programs in this jax
        return flop_count.jaxpr_flops(traced.jaxpr), "jaxpr_matmuls_convs"


def jax_runner(size: str, batch: int, dtype: str, attention: str, cpu_convolutions: str):
    """A compiled, warmed-up vd_jax step: (run one step and wait, its results' fields)."""
    import jax

    from vd_jax.data.input_pipeline import make_iterator
    from vd_jax.train import sharding as shd
    from vd_jax.train.trainer import Trainer

    c = jax_config(size, batch, dtype, attention, cpu_convolutions)
    tr = Trainer(c, shd.make_mesh("1,1", jax.devices()[:1]))
    it = make_iterator(c, process_index=0, process_count=1)
    held = dict(state=tr.init_state())
    batch_ = tr.global_batch(next(it))

    def run():
        held["state"], held["metrics"] = tr.step(held["state"], batch_, None)
        jax.block_until_ready(held["metrics"])

    run()  # compile + warm-up
    run()  # a second warm-up: allocator, autotuned kernels

    def fields():
        return dict(
            loss=float(held["metrics"]["loss"]),
            trainer_flops_per_step=tr.flops[None],  # what train.py's logged MFU divides
            compile_s=tr.compile_s,
            attention=attention,
            cpu_convolutions=cpu_convolutions,
        )

    return run, fields


def torch_runner(size: str, batch: int, dtype: str):
    """diffusers' U-Net + AdamW, warmed up: (run one step and wait, its results' fields)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count() or 1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # PyTorch's usual fast settings: TF32 for f32 matmuls, cuDNN's autotuned convolutions.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    z = SIZES[size]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in z["attn"])
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(z["attn"]))
    unet = (
        UNet2DConditionModel(
            sample_size=z["latent"],
            in_channels=4,
            out_channels=4,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=z["channels"],
            layers_per_block=2,
            cross_attention_dim=z["ctx"],
            attention_head_dim=z["heads"],
            norm_num_groups=z["groups"],
        )
        .to(dev)
        .train()
    )
    # fused=True on CUDA: the whole update in one kernel (PyTorch documents it as its fastest).
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01, fused=dev.type == "cuda")
    params = [p for p in unet.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0).to(dev)
    x0 = torch.randn(batch, 4, z["latent"], z["latent"], device=dev)
    ctx = torch.randn(batch, TEXT_LEN, z["ctx"], device=dev)
    half = dtype == "bfloat16"

    def step():
        t = torch.randint(0, 1000, (batch,), device=dev)
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=half):
            out = unet(xt, t, ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # the EMA update as one multi-tensor op
            torch._foreach_lerp_(ema, params, 1 - EMA_DECAY)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    held = {}

    def run():
        held["loss"] = step()
        sync()

    for _ in range(2):  # warm-up: cuDNN's autotuning, the allocator
        run()
    return run, lambda: dict(loss=float(held["loss"].detach()), device=str(dev))


def time_steps(runners: dict, steps: int, block: int = 3) -> dict[str, float]:
    """Median seconds per step of each runner, their steps taken in turns of `block`.

    In turns, so that every runner sees the same stretch of a shared machine: this VM's speed
    drifts by 10-40% within an hour, more than most differences measured here. Each turn
    starts with one untimed step: right after another framework's step, PyTorch's tiny step
    ran 30% slower (the other's worker threads still spinning).
    """
    times = {name: [] for name in runners}
    for _ in range(-(-steps // block)):
        for name, run in runners.items():
            run()
            for _ in range(block):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def release_torch_memory():
    """Hands PyTorch's cached GPU memory back (its model is gone) before JAX allocates."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument(
        "--attention", default="auto", help="vd_jax's: auto | vd | xla | cudnn (comma list)"
    )
    p.add_argument(
        "--cpu_convolutions", default="eigen", help="on CPU: eigen | ynnpack (comma list)"
    )
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_speed.json"))
    a = p.parse_args()

    import jax

    from vd_jax.train.trainer import measure_peak_flops

    device = jax.devices()[0]
    dtype = a.dtype if a.dtype != "auto" else (
        "float32" if device.platform == "cpu" else "bfloat16"
    )  # fmt: skip
    cpu = device.platform == "cpu"
    peak = measure_peak_flops(2048 if cpu else None, 5 if cpu else 50, dtype)
    print(f"{device.device_kind}: {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    results = dict(
        machine=dict(
            device=device.device_kind, cpus=os.cpu_count(), batch=a.batch, steps=a.steps,
            dtype=dtype, peak_flops=peak, jax=jax.__version__,
        )
    )  # fmt: skip
    variants = [(att, conv) for att in a.attention.split(",")
                for conv in (a.cpu_convolutions.split(",") if cpu else ["eigen"])]  # fmt: skip
    for size in a.sizes.split(","):
        flops, how = model_flops(size, a.batch, dtype)
        r = dict(flops_per_step=flops, flops_counted_by=how, torch=None)
        # The key names the convolution kernels only where they differ from the default.
        names = {v: f"jax_{v[0]}" + ("" if v[1] == "eigen" else f"_{v[1]}") for v in variants}
        fields, step_s = {}, {}
        if cpu:  # every runner built first, then their steps in turns (`time_steps`)
            runners = {}
            if not a.skip_torch:
                runners["torch"], fields["torch"] = torch_runner(size, a.batch, dtype)
            for v in variants:
                runners[names[v]], fields[names[v]] = jax_runner(size, a.batch, dtype, *v)
            step_s = time_steps(runners, a.steps)
        else:  # one at a time: PyTorch's allocator hands its memory back, JAX's keeps it
            if not a.skip_torch:
                run, fields["torch"] = torch_runner(size, a.batch, dtype)
                step_s.update(time_steps({"torch": run}, a.steps))
                del run
                release_torch_memory()
            for v in variants:
                run, fields[names[v]] = jax_runner(size, a.batch, dtype, *v)
                step_s.update(time_steps({names[v]: run}, a.steps))
        for name, dt in step_s.items():
            res = dict(
                examples_per_s=a.batch / dt, step_s=dt, mfu=flops / dt / peak, **fields[name]()
            )
            if "torch" in step_s and name != "torch":
                res["jax_over_torch"] = step_s["torch"] / dt
            r[name] = res
        if r["torch"]:
            t = r["torch"]
            print(f"{size}: PyTorch {t['examples_per_s']:.1f} ex/s (MFU {100 * t['mfu']:.1f}%)")
        for (attention, conv), name in names.items():
            j = r[name]
            ratio = f" | ratio {j['jax_over_torch']:.2f}x" if "jax_over_torch" in j else ""
            print(
                f"{size} (attention={attention}, cpu_convolutions={conv}): "
                f"vd_jax {j['examples_per_s']:.1f} ex/s "
                f"(MFU {100 * j['mfu']:.1f}%, {flops / 1e9:.2f} GFLOP/step, "
                f"compile {j['compile_s']:.0f} s){ratio}",
                flush=True,
            )
        results[size] = r
        with open(a.out, "w") as f:  # after every size: a run cut short keeps what it measured
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
