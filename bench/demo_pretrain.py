r"""Times the demo's encoder pre-training and reports its accuracies, for one or more seeds.

  python bench/demo_pretrain.py --config=configs/demo.py [--which=vae,optimus,clip] \
      [--seeds=0,1,2] [--json=out.json] [--config.clip.steps=800 ...]

Trains each chosen model exactly as the demo does (`vd_jax.demo.run.train_demo_*`, the
config's sizes and steps) on the dataset the demo builds for each seed (the numpy generator:
the TFDS build stores the same arrays), and prints its wall time and held-out accuracies:
attribute reconstruction (VAE, Optimus), retrieval and the linear probe of the image
embeddings (CLIP). Use it to tune one pre-training stage without running the diffuser.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vd_jax.demo import run, shapes  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "The demo config.")
_WHICH = flags.DEFINE_list("which", ["vae", "optimus", "clip"], "Models to train.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Dataset and init seeds (`config.seed`).")
_JSON = flags.DEFINE_string("json", "", "Also write the results here.")

_TRAINERS = {
    "vae": run.train_demo_vae,
    "optimus": run.train_demo_optimus,
    "clip": run.train_demo_clip,
}


def main(argv):
    del argv
    config = flags.FLAGS.config
    bad = [w for w in _WHICH.value if w not in _TRAINERS]
    if bad:
        raise app.UsageError(f"--which: unknown models {bad}; choose from {list(_TRAINERS)}")
    d = config.data
    out: dict = {}
    for seed in (int(s) for s in _SEEDS.value):
        with config.unlocked():
            config.seed = seed
        kw = dict(seed=seed, image_size=d.image_size, jitter=d.jitter, radius=d.radius or None)
        train = shapes.generate(d.num_train, split="train", **kw)
        held = shapes.generate(d.num_eval, split="heldout", **kw)
        for name in _WHICH.value:
            r = _TRAINERS[name](config, train, held)
            metrics = {k: v for k, v in r.metrics.items() if k != "history"}
            out.setdefault(name, {})[str(seed)] = metrics
            print(name, "seed", seed, json.dumps(metrics), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
