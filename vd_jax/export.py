r"""`python -m vd_jax.export`: any weights vd_jax reads, written as a diffusers-format VD folder
or as SHI-Labs' original files.

  # a fine-tune (its newest checkpoint, EMA params) -> diffusers' VersatileDiffusion pipelines
  python -m vd_jax.export --source=runs/ft --output=exports/ft-diffusers --format=diffusers
  # the demo's model (with its Optimus) -> vd-four-flow-v1-0-fp16, kl-f8, optimus-vae, clip/
  python -m vd_jax.export --source=runs/demo --output=exports/demo-original --format=original

`--source` is a diffusers folder, a folder of the released files or a vd_jax run's workdir
(`--checkpoint_step`, `--use_ema` pick its weights). What a format cannot hold (Optimus in
diffusers, a CLS-only image context) is named in a warning; the folder appears whole or not at
all. Prints a JSON report: the files written and the warnings.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

FORMATS = ("diffusers", "original")
_DTYPES = ("", "float32", "float16", "bfloat16")

flags.DEFINE_string("source", None, "Weights to export: any folder sample.py reads.")
flags.DEFINE_string("output", None, "Folder to write (must not exist, or use --overwrite).")
flags.DEFINE_enum("format", "diffusers", FORMATS, "diffusers | original.")
flags.DEFINE_integer("checkpoint_step", -1, "A run's checkpoint; -1: its newest complete one.")
flags.DEFINE_bool("use_ema", True, "A run's EMA params (its raw params when False).")
flags.DEFINE_enum("dtype", "", _DTYPES, "diffusers: tensor dtype ('' keeps the params').")
flags.DEFINE_bool("pth", None, "original: also write .pth files (default: if torch imports).")
flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
flags.mark_flags_as_required(["source", "output"])
FLAGS = flags.FLAGS


def export(
    source: str,
    output: str,
    fmt: str = "diffusers",
    *,
    checkpoint_step: int | None = None,
    use_ema: bool = True,
    dtype: str = "",
    pth: bool | None = None,
    overwrite: bool = False,
) -> dict:
    """Loads everything `source` holds and writes it to `output` in `fmt`; returns the report."""
    import jax.numpy as jnp

    from vd_jax.convert.export import export_diffusers
    from vd_jax.convert.export_original import export_original
    from vd_jax.convert.load import load_models

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {FORMATS}")
    models = load_models(source, None, checkpoint_step=checkpoint_step, use_ema=use_ema)
    if fmt == "diffusers":
        np_dtype = jnp.dtype(dtype) if dtype else None  # jnp's knows bfloat16
        warnings = export_diffusers(models, output, dtype=np_dtype, overwrite=overwrite)
    else:
        warnings = export_original(models, output, pth=pth, overwrite=overwrite)
    files = sorted(
        os.path.relpath(os.path.join(d, f), output)
        for d, _, names in os.walk(output)
        for f in names
    )
    return {
        "source": models.source or source,
        "output": output,
        "format": fmt,
        "files": files,
        "warnings": warnings,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vd_jax.convert.core import CheckpointError

    try:
        report = export(
            FLAGS.source,
            FLAGS.output,
            FLAGS.format,
            checkpoint_step=FLAGS.checkpoint_step if FLAGS.checkpoint_step >= 0 else None,
            use_ema=FLAGS.use_ema,
            dtype=FLAGS.dtype,
            pth=FLAGS.pth,
            overwrite=FLAGS.overwrite,
        )
    except (CheckpointError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
