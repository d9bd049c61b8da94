"""The base of vd_jax's TFDS builders (datasets built from local files, nothing downloaded) and
their way of writing to a bucket.

array_record *reads* ``gs://`` paths itself, but its writer opens local files only; so data
files for a URL are written to a local temporary file and then copied up whole
(`write_array_record`, `vd_jax.convert.load.copy_tree`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import file_adapters


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def write_array_record(path: epath.Path, examples: Iterable) -> None:
    """TFDS's array_record adapter writing `examples` to `path`, local or a URL."""
    if not is_url(path):
        file_adapters.ArrayRecordFileAdapter.write_examples(path, examples)
        return
    tmp = tempfile.mkdtemp(prefix="vd_jax_upload_")
    try:
        local = epath.Path(tmp) / path.name
        file_adapters.ArrayRecordFileAdapter.write_examples(local, examples)
        path.write_bytes(local.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `GeneratorBasedBuilder` whose data comes from local files or memory.

    TFDS looks up a packaged builder's code path through the `importlib_resources` backport,
    which is not installed; it only needs the path to find checksums of downloads, and these
    builders download nothing.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None
