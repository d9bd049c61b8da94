"""Times the demo's encoder pre-training on the shapes data and reports their accuracies.

  python bench/demo_pretrain.py [--which=vae,optimus,clip] [--steps=N] [--json=out.json]

Uses the numpy generator (the TFDS build gives the same arrays); each model reports its training
wall time and its reconstruction attribute accuracy (VAE, Optimus) or retrieval accuracy (CLIP)
on held-out attribute combinations.
"""

from __future__ import annotations

import argparse
import json
import time

from vd_jax.demo import pretrain, pretrain_clip, shapes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--which", default="vae,optimus,clip")
    p.add_argument("--steps", type=int, default=0, help="override every model's step count")
    p.add_argument("--num_train", type=int, default=2048)
    p.add_argument("--num_eval", type=int, default=256)
    p.add_argument("--json", default="")
    p.add_argument("--vae_channels", default="32,64,64")
    p.add_argument("--latent", type=int, default=16, help="Optimus latent size")
    p.add_argument("--clip_random", action="store_true", help="also report frozen random CLIP")
    a = p.parse_args()
    t = time.perf_counter()
    train = shapes.generate(a.num_train, seed=0, split="train")
    held = shapes.generate(a.num_eval, seed=0, split="heldout")
    out = {"data_seconds": time.perf_counter() - t}
    steps = lambda d: a.steps or d
    which = a.which.split(",")
    if "vae" in which:
        cfg = pretrain.tiny_vae_config(
            block_out_channels=[int(c) for c in a.vae_channels.split(",")]
        )
        r = pretrain.train_vae(train, cfg, eval_data=held, steps=steps(800))
        out["vae"] = {k: v for k, v in r.metrics.items() if k != "history"}
        print("vae", json.dumps(out["vae"]), flush=True)
    if "optimus" in which:
        r = pretrain.train_optimus(
            train, pretrain.tiny_optimus_configs(a.latent), eval_data=held, steps=steps(600)
        )
        out["optimus"] = {k: v for k, v in r.metrics.items() if k != "history"}
        print("optimus", json.dumps(out["optimus"]), flush=True)
    if "clip" in which:
        if a.clip_random:
            r = pretrain_clip.train_clip(train, eval_data=held, steps=0)
            out["clip_random"] = r.metrics
            print("clip_random", json.dumps(r.metrics), flush=True)
        r = pretrain_clip.train_clip(train, eval_data=held, steps=steps(200))
        out["clip"] = {k: v for k, v in r.metrics.items() if k != "history"}
        print("clip", json.dumps(out["clip"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
