r"""Samples Versatile Diffusion flows in JAX. See configs/sample.py for the fields.

  python sample.py --config=configs/sample.py:text_to_image --config.weights=DIR \
      --config.prompt="a photo of a cat" --config.output_dir=out
"""

import sys

from absl import app
from ml_collections import config_flags

from vd_jax.convert.core import CheckpointError
from vd_jax.pipelines import sampling

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sample.py", "Sampling config.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sampling.run(_CONFIG.value)
    except (sampling.ConfigError, CheckpointError, FileNotFoundError) as e:
        # A user error: the message says what is wrong; a traceback would only bury it.
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
