r"""Data preparation from the command line: captioned images -> TFDS dataset -> latent cache.

  # A folder of images with captions (stem.txt / stem.json / captions.csv):
  python -m vd_jax.datasets folder /data/my_images --data_dir=/data/tfds --min_size=256
  # img2dataset / webdataset shards (quote the glob):
  python -m vd_jax.datasets webdataset '/data/laion/*.tar' --data_dir=/data/tfds --name=laion
  # Encode it once with a training config's frozen encoders (overrides as in train.py):
  python -m vd_jax.datasets cache --config=configs/vd_four_flow.py:res=256 \
      --config.encoders.folder=/models/vd --data_dir=/data/tfds \
      --source_name=captioned_images/laion --name=laion_256
  # ... the same on N processes (e.g. one per host), process I with --shard_index=$I; the last
  # one to finish joins the shards (or run `cache --finalize --name=... --num_shards=N`):
  python -m vd_jax.datasets cache ... --num_shards=8 --shard_index=$I

Each subcommand prints its report as JSON; ``cache`` includes ``train_overrides``, the
``--config.*`` values that make train.py read the cache (a shard that finished before others
reports ``complete: false`` and ``waiting_for``). The logic lives in
`vd_jax.data.captioned_images` and `vd_jax.data.caching`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

from absl import flags

COMMANDS = ("folder", "webdataset", "cache")
_MAX_KEYS = 10  # skipped keys printed per reason; the full list is in build_report.json


def _define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    from ml_collections import config_flags

    flags.DEFINE_string("data_dir", None, "TFDS data dir written to.", flag_values=fv)
    flags.DEFINE_string(
        "name",
        None,
        "Dataset name (folder: default the folder's name; cache: default "
        "<source name>_<image_size>).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "min_size", 0, "Skip images with a shorter side below this.", flag_values=fv
    )
    flags.DEFINE_float(
        "val_fraction", 0.0, "Fraction of keys put in a 'validation' split.", flag_values=fv
    )
    flags.DEFINE_integer("num_threads", 8, "Image decoding threads.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Rebuild an existing dataset / cache.", flag_values=fv)
    # config_flags finds the --config.FIELD overrides in `sys_argv` (default: sys.argv).
    config_flags.DEFINE_config_file(
        "config",
        None,
        "cache: the training config file.",
        flag_values=fv,
        lock_config=True,
        sys_argv=list(argv),
    )
    flags.DEFINE_string(
        "source_name",
        None,
        "cache: the captioned-images dataset (a report's tfds_name); default config.data.name.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "source_data_dir",
        None,
        "cache: TFDS data dir of the source (default --data_dir).",
        flag_values=fv,
    )
    flags.DEFINE_list("splits", None, "cache: source splits (default all).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "cache: examples per encoder call.", flag_values=fv)
    flags.DEFINE_integer(
        "num_shards", 1, "cache: processes that build the cache together.", flag_values=fv
    )
    flags.DEFINE_integer(
        "shard_index",
        0,
        "cache: this process's part, 0..num_shards-1 (records [n*I//N, n*(I+1)//N) of each split).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "context_dtype",
        "bfloat16",
        ["bfloat16", "float32"],
        "cache: storage dtype of image_context / text_context.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "examples_per_file", 1024, "cache: about this many examples per file.", flag_values=fv
    )
    flags.DEFINE_bool(
        "finalize",
        False,
        "cache: encode nothing; check that all --num_shards shards are done and join them.",
        flag_values=fv,
    )


def summarize_report(report: dict, max_keys: int = _MAX_KEYS) -> dict:
    """The build report with at most ``max_keys`` skipped keys per reason."""
    out = dict(report)
    out["skipped_keys"] = {
        reason: keys[:max_keys]
        + ([f"... {len(keys) - max_keys} more"] if len(keys) > max_keys else [])
        for reason, keys in report.get("skipped_keys", {}).items()
        if keys
    }
    return out


def main(argv: Sequence[str]) -> dict:
    """Runs one subcommand; ``argv`` as in `sys.argv` (program name first). Returns its report.

    The report is printed to stdout as JSON; everything else (TFDS's messages, progress bars)
    goes to stderr, so stdout can be piped to e.g. ``jq``.
    """
    fv = flags.FlagValues()
    _define_flags(fv, argv)
    if {"-h", "--help", "--helpfull"} & set(argv):
        print(__doc__ + "\nflags:\n" + fv.get_help(), file=sys.stderr)
        raise SystemExit(0)
    try:
        args = fv(list(argv))[1:]
    except flags.Error as e:
        raise SystemExit(f"{e}\nsee: python -m vd_jax.datasets --help") from None
    if not args or args[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m vd_jax.datasets {{{'|'.join(COMMANDS)}}} ... (--help)")
    command, positional = args[0], args[1:]
    if not fv.data_dir:
        raise SystemExit("--data_dir is required")
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress messages
        report = _run(command, positional, fv)
    print(json.dumps(report, indent=1))
    return report


def _run(command: str, positional: list[str], fv: flags.FlagValues) -> dict:
    if command in ("folder", "webdataset"):
        from vd_jax.data import captioned_images

        if len(positional) != 1:
            raise SystemExit(
                f"{command} takes one source ({'SRC_DIR' if command == 'folder' else 'GLOB'})"
            )
        kw = dict(
            min_size=fv.min_size,
            val_fraction=fv.val_fraction,
            num_threads=fv.num_threads,
            overwrite=fv.overwrite,
        )
        if command == "folder":
            report = captioned_images.build_from_folder(
                positional[0], fv.data_dir, name=fv.name, **kw
            )
        else:
            if not fv.name:
                raise SystemExit("webdataset needs --name")
            report = captioned_images.build_from_webdataset(
                positional[0], fv.data_dir, name=fv.name, **kw
            )
        report = summarize_report(report)
    else:
        if positional:
            raise SystemExit(f"cache takes no positional arguments, got {positional}")
        report = _cache(fv)
    return report


def _cache(fv: flags.FlagValues) -> dict:
    from vd_jax.data import caching, latent_cache

    if fv.finalize:
        if not fv.name and (fv.config is None or not fv.source_name):
            raise SystemExit("cache --finalize needs --name (or --config and --source_name)")
        name = fv.name or caching.default_name(fv.source_name, fv.config.image_size)
        try:
            report = caching.finalize_latent_cache(fv.data_dir, name, fv.num_shards)
        except latent_cache.IncompleteCacheError as e:
            raise SystemExit(f"cache --finalize: {e}") from None
    elif fv.config is None:
        raise SystemExit("cache needs --config")
    else:
        report = caching.build_latent_cache(
            fv.config,
            data_dir=fv.data_dir,
            source_name=fv.source_name,
            source_data_dir=fv.source_data_dir,
            name=fv.name,
            splits=fv.splits,
            batch_size=fv.batch_size,
            num_threads=fv.num_threads,
            overwrite=fv.overwrite,
            num_shards=fv.num_shards,
            shard_index=fv.shard_index,
            context_dtype=fv.context_dtype,
            examples_per_file=fv.examples_per_file,
        )
    if "train_overrides" in report:  # a finished cache (not a shard waiting for others)
        report["train_flags"] = " ".join(
            f"--config.{k}={v}" for k, v in report["train_overrides"].items()
        )
    return report


if __name__ == "__main__":
    main(sys.argv)
