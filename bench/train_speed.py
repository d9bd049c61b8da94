r"""Training-step speed: vd_jax's jitted step vs diffusers' UNet2DConditionModel + AdamW.

  python bench/train_speed.py --sizes=tiny,small --batch=8 --steps=10

Both sides train the text->image flow (the image U-Net under a text context, ε-prediction
MSE, AdamW) on the same machine with the same batch. Reported per size: examples/s of each,
the vd_jax / PyTorch ratio (target > 1), FLOPs per step (XLA's cost analysis of the compiled
step), the measured f32 matmul peak of this machine (JAX, one device) and the MFU estimate
FLOPs per step / step time / peak (target >= 40%). Results also go to --out.
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
}  # fmt: skip
TEXT_LEN = 77


def jax_config(size: str, batch: int):
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
    )
    c.batch_size, c.latent_size, c.image_size = batch, z["latent"], 2 * z["latent"]
    c.encoders.text_context_len = TEXT_LEN
    c.xla_opt_level = -1  # XLA's full optimisation for timing
    c.ema_decay, c.cfg_dropout = 0.9999, 0.1
    c.sample_every, c.peak_flops = -1, 1.0
    return c


def bench_jax(size: str, batch: int, steps: int) -> dict:
    import jax

    from vd_jax import sharding as shd
    from vd_jax import train_lib

    c = jax_config(size, batch)
    tr = train_lib.Trainer(c, shd.make_mesh("1,1", jax.devices()[:1]))
    it = train_lib.make_iterator(c, process_index=0, process_count=1)
    state = tr.init_state()
    batch_ = tr.global_batch(next(it))
    state, m = tr.step(state, batch_, None)  # compile + warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = tr.step(state, batch_, None)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    peak = train_lib.measure_peak_flops(2048, 5)
    flops = tr.flops[None]
    return dict(
        examples_per_s=batch / dt,
        step_s=dt,
        flops_per_step=flops,
        peak_flops=peak,
        mfu=flops / dt / peak if flops else None,
        compile_s=tr.compile_s,
    )


def bench_torch(size: str, batch: int, steps: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count() or 1)
    z = SIZES[size]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in z["attn"])
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(z["attn"]))
    unet = UNet2DConditionModel(
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
    ).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    x0 = torch.randn(batch, 4, z["latent"], z["latent"])
    ctx = torch.randn(batch, TEXT_LEN, z["ctx"])

    def step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t, ctx).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return dict(examples_per_s=batch / dt, step_s=dt)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_speed.json"))
    a = p.parse_args()
    results = {}
    for size in a.sizes.split(","):
        j = bench_jax(size, a.batch, a.steps)
        t = bench_torch(size, a.batch, a.steps)
        r = dict(jax=j, torch=t, jax_over_torch=j["examples_per_s"] / t["examples_per_s"])
        results[size] = r
        mfu = f"{100 * j['mfu']:.1f}%" if j["mfu"] else "n/a"
        print(
            f"{size}: vd_jax {j['examples_per_s']:.1f} ex/s (MFU {mfu}, "
            f"{j['flops_per_step'] / 1e9:.2f} GFLOP/step, peak {j['peak_flops'] / 1e9:.1f} "
            f"GFLOP/s) | PyTorch {t['examples_per_s']:.1f} ex/s | ratio {r['jax_over_torch']:.2f}x"
        )
    results["machine"] = dict(cpus=os.cpu_count(), batch=a.batch, steps=a.steps)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
