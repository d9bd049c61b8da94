r"""Text->image sampling speed: vd_jax vs diffusers on the same random weights.

  python bench/sample_speed.py --sizes=tiny,small --steps=20 --batch=2

For each size preset of `vd_jax.convert.tiny_folder` it reports
  warm: seconds per batch once compiled / warmed up (median of --repeats calls),
  cold: wall seconds of a fresh process that loads the folder and samples one batch,
and the vd_jax / diffusers ratios (target: warm ratio <= 0.6). Results also go to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PROMPT = "a red circle on a blue background"


def _diffusers_t2i(folder_or_components):
    from diffusers.pipelines.deprecated.versatile_diffusion import (
        VersatileDiffusionTextToImagePipeline,
    )

    if isinstance(folder_or_components, str):
        # model_index.json names UNetFlatConditionModel, which diffusers' loader cannot
        # resolve: load each component the pipeline needs by itself, as a user would.
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import (
            UNetFlatConditionModel,
        )
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        sub = lambda name: os.path.join(folder_or_components, name)
        pipe = VersatileDiffusionTextToImagePipeline(
            tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(sub("text_encoder")),
            image_unet=UNet2DConditionModel.from_pretrained(sub("image_unet")),
            text_unet=UNetFlatConditionModel.from_pretrained(sub("text_unet")),
            vae=AutoencoderKL.from_pretrained(sub("vae")),
            scheduler=DDIMScheduler.from_pretrained(sub("scheduler")),
        )
    else:
        c = {k: copy.deepcopy(v) for k, v in folder_or_components.items()}
        pipe = VersatileDiffusionTextToImagePipeline(
            tokenizer=c["tokenizer"],
            text_encoder=c["text_encoder"],
            image_unet=c["image_unet"],
            text_unet=c["text_unet"],
            vae=c["vae"],
            scheduler=c["scheduler"],
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_diffusers(pipe, steps, batch, latents):
    import torch

    with torch.no_grad():
        return pipe(
            [PROMPT] * batch,
            num_inference_steps=steps,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images


def _run_jax(pipe, steps, batch, latents):
    return pipe.text_to_image(
        [PROMPT] * batch, num_steps=steps, init_noise=latents, show_progress=False
    ).images


def _jax_pipe(folder):
    from vd_jax.convert.diffusers_folder import load_diffusers_folder
    from vd_jax.pipelines import VDPipeline

    return VDPipeline(load_diffusers_folder(folder, flows=("text_to_image",)))


def _latents(folder, batch):
    cfg = json.load(open(os.path.join(folder, "image_unet", "config.json")))
    s = cfg["sample_size"]
    return np.random.default_rng(0).standard_normal((batch, 4, s, s)).astype(np.float32)


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cold(impl: str, folder: str, steps: int, batch: int) -> None:
    """Body of the fresh process whose wall time is the cold time."""
    latents = _latents(folder, batch)
    if impl == "jax":
        _run_jax(_jax_pipe(folder), steps, batch, latents)
    else:
        _run_diffusers(_diffusers_t2i(folder), steps, batch, latents)


def bench_size(size: str, steps: int, batch: int, repeats: int, workdir: str) -> dict:
    from vd_jax.convert.tiny_folder import build_components, save_folder

    comps = build_components(os.path.join(workdir, size + "_build"), size=size)
    folder = save_folder(comps, os.path.join(workdir, size))
    latents = _latents(folder, batch)

    ref = _diffusers_t2i(comps)
    _run_diffusers(ref, steps, batch, latents)  # warm-up
    torch_warm = _timed(lambda: _run_diffusers(ref, steps, batch, latents), repeats)

    pipe = _jax_pipe(folder)
    ours = _run_jax(pipe, steps, batch, latents)  # compiles
    jax_warm = _timed(lambda: _run_jax(pipe, steps, batch, latents), repeats)
    max_diff = float(np.abs(ours - _run_diffusers(ref, steps, batch, latents)).max())

    cold_s = {}
    for impl in ("jax", "torch"):
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                __file__,
                f"--cold={impl}",
                f"--folder={folder}",
                f"--steps={steps}",
                f"--batch={batch}",
            ],
            check=True,
            capture_output=True,
        )
        cold_s[impl] = time.perf_counter() - t0
    return dict(
        size=size,
        steps=steps,
        batch=batch,
        diffusers_warm_s=torch_warm,
        vd_jax_warm_s=jax_warm,
        warm_ratio=jax_warm / torch_warm,
        diffusers_cold_s=cold_s["torch"],
        vd_jax_cold_s=cold_s["jax"],
        cold_ratio=cold_s["jax"] / cold_s["torch"],
        max_pixel_diff=max_diff,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/sample_speed.json")
    ap.add_argument("--cold", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cold:
        cold(args.cold, args.folder, args.steps, args.batch)
        return

    import jax
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes.split(","):
            rows.append(bench_size(size, args.steps, args.batch, args.repeats, workdir))
            print(json.dumps(rows[-1]), flush=True)
    header = f"{'size':6} {'diffusers warm':>15} {'vd_jax warm':>12} {'ratio':>6} "
    header += f"{'diffusers cold':>15} {'vd_jax cold':>12} {'ratio':>6} {'max |diff|':>10}"
    print(
        f"\nbackend={jax.default_backend()} torch_threads={torch.get_num_threads()} "
        f"steps={args.steps} batch={args.batch}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:6} {r['diffusers_warm_s']:15.3f} {r['vd_jax_warm_s']:12.3f} "
            f"{r['warm_ratio']:6.2f} {r['diffusers_cold_s']:15.2f} {r['vd_jax_cold_s']:12.2f} "
            f"{r['cold_ratio']:6.2f} {r['max_pixel_diff']:10.1e}"
        )
    with open(args.out, "w") as f:
        json.dump(dict(backend=jax.default_backend(), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
