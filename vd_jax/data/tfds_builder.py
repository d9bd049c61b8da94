"""The base of vd_jax's TFDS builders: datasets built from local files, nothing downloaded."""

from __future__ import annotations

import tensorflow_datasets as tfds


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
