r"""Trains Versatile Diffusion; all logic lives in vd_jax.train.loop.

  python train.py --config=configs/tiny.py --workdir=/tmp/tw --config.num_steps=20
  python train.py --config=configs/vd_four_flow.py:res=256 --workdir=/ckpt/vd4
  python train.py --config=configs/demo.py --workdir=/tmp/vd_demo  # the CPU demo, all stages

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    from vd_jax.train.loop import train_and_evaluate  # imports jax: XLA_FLAGS are read by now

    logging.info("config:\n%s", FLAGS.config)
    if FLAGS.config.get("job") == "demo":
        from vd_jax.demo.run import run_demo

        run_demo(FLAGS.config, FLAGS.workdir)
    else:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
