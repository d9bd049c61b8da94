r"""Training-step speed: vd_jax's jitted step vs diffusers' UNet2DConditionModel + AdamW.

  python bench/train_speed.py --sizes=tiny,small --batch=8 --steps=10
  python bench/train_speed.py --sizes=full --batch=32 --steps=10 --attention=auto,vd  # GPU

Both sides train the text->image flow (the image U-Net under a text context, ε-prediction
MSE, AdamW) on the same device with the same batch and compute dtype (`--dtype`: float32 on
CPU, bf16 with float32 params elsewhere; PyTorch under `torch.autocast`). Reported per size:
examples/s of each, the vd_jax / PyTorch ratio (target > 1), model FLOPs per step (XLA's cost
analysis of the step's HLO, lowered for the CPU, with the plain attention formula: no
recomputation counted, the same count whichever attention kernel runs), the measured matmul
peak of this device in the compute dtype (f32 on CPU) and the MFU estimate FLOPs / step time
/ peak (target >= 40%). Results also go to --out, after each size.
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


def jax_config(size: str, batch: int, dtype: str, attention: str):
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
    c.ema_decay, c.cfg_dropout = 0.9999, 0.1
    c.sample_every, c.peak_flops = -1, 1.0
    c.dtype = dtype
    c.optim.lr = 1e-4  # as PyTorch's side below (the tiny config's 3e-3 is for tiny models)
    return c


def model_flops(size: str, batch: int, dtype: str) -> tuple[float, str]:
    """FLOPs of one step as the model defines them, and how they were counted.

    With the plain attention formula (the vd VJP's recomputation and cuDNN's opaque kernel
    would each count differently): XLA's cost analysis of the unoptimised step lowered for
    the CPU (exact windows at padded borders), else, where this jax gives none, the jaxpr's
    matmuls and convolutions (`vd_jax.flop_count`, ~4% more at "small": it counts padding).
    """
    import jax

    from vd_jax import flop_count, train_lib
    from vd_jax import sharding as shd

    c = jax_config(size, batch, dtype, "xla")
    tr = train_lib.Trainer(c, shd.make_mesh("1,1", jax.devices("cpu")[:1]))
    it = train_lib.make_iterator(c, process_index=0, process_count=1)
    traced = tr.trace(tr.global_batch(next(it)), None)
    try:
        cost = traced.lower().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]), "xla_cost_analysis"
    except (TypeError, KeyError):  # no cost model for lowered programs in this jax
        return flop_count.jaxpr_flops(traced.jaxpr), "jaxpr_matmuls_convs"


def bench_jax(size: str, batch: int, steps: int, dtype: str, attention: str) -> dict:
    import jax

    from vd_jax import sharding as shd
    from vd_jax import train_lib

    c = jax_config(size, batch, dtype, attention)
    tr = train_lib.Trainer(c, shd.make_mesh("1,1", jax.devices()[:1]))
    it = train_lib.make_iterator(c, process_index=0, process_count=1)
    state = tr.init_state()
    batch_ = tr.global_batch(next(it))
    state, m = tr.step(state, batch_, None)  # compile + warm-up
    jax.block_until_ready(m)
    state, m = tr.step(state, batch_, None)  # a second warm-up: allocator, autotuned kernels
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = tr.step(state, batch_, None)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return dict(
        examples_per_s=batch / dt,
        step_s=dt,
        loss=float(m["loss"]),
        trainer_flops_per_step=tr.flops[None],  # what train.py's logged MFU divides
        compile_s=tr.compile_s,
        attention=attention,
    )


def bench_torch(size: str, batch: int, steps: int, dtype: str) -> dict:
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
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: cuDNN's autotuning, the allocator
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return dict(examples_per_s=batch / dt, step_s=dt, loss=float(loss.detach()), device=str(dev))


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
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_speed.json"))
    a = p.parse_args()

    import jax

    from vd_jax import train_lib

    device = jax.devices()[0]
    dtype = a.dtype if a.dtype != "auto" else (
        "float32" if device.platform == "cpu" else "bfloat16"
    )  # fmt: skip
    cpu = device.platform == "cpu"
    peak = train_lib.measure_peak_flops(2048 if cpu else None, 5 if cpu else 50, dtype)
    print(f"{device.device_kind}: {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s", flush=True)
    results = dict(
        machine=dict(
            device=device.device_kind, cpus=os.cpu_count(), batch=a.batch, steps=a.steps,
            dtype=dtype, peak_flops=peak, jax=jax.__version__,
        )
    )  # fmt: skip
    for size in a.sizes.split(","):
        flops, how = model_flops(size, a.batch, dtype)
        # PyTorch first: its caching allocator hands memory back; JAX's keeps what it takes.
        t = None if a.skip_torch else bench_torch(size, a.batch, a.steps, dtype)
        if t:
            release_torch_memory()
        r = dict(flops_per_step=flops, flops_counted_by=how, torch=t)
        if t:
            t["mfu"] = flops / t["step_s"] / peak
            print(f"{size}: PyTorch {t['examples_per_s']:.1f} ex/s (MFU {100 * t['mfu']:.1f}%)")
        for attention in a.attention.split(","):
            j = bench_jax(size, a.batch, a.steps, dtype, attention)
            j["mfu"] = flops / j["step_s"] / peak
            if t:
                j["jax_over_torch"] = j["examples_per_s"] / t["examples_per_s"]
            r[f"jax_{attention}"] = j
            ratio = f" | ratio {j['jax_over_torch']:.2f}x" if t else ""
            print(
                f"{size} (attention={attention}): vd_jax {j['examples_per_s']:.1f} ex/s "
                f"(MFU {100 * j['mfu']:.1f}%, {flops / 1e9:.2f} GFLOP/step, "
                f"compile {j['compile_s']:.0f} s){ratio}",
                flush=True,
            )
        results[size] = r
        with open(a.out, "w") as f:  # after every size: a run cut short keeps what it measured
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
