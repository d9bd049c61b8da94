"""Training data: TFDS datasets, the input pipeline, latent caches, fake data.

- `captioned_images`: the ``captioned_images/<name>`` TFDS builder (folders, webdataset shards).
- `latent_cache`: the ``latent_cache/<name>`` TFDS builder of pre-encoded examples.
- `caching`: encodes a captioned-images dataset into a latent cache.
- `input_pipeline`: per-host batch iterators over either kind (grain-free, resumable).
- `fake_data`: random batches and a fake text VAE for tests and benchmarks.
- `cli`: ``python -m vd_jax.datasets {folder|webdataset|cache}``.

Both datasets are written as array_record files and read by random access
(``tfds.builder_from_directory(dir).as_data_source(split)``), so TensorFlow is not needed.
"""

from vd_jax.data.captioned_images import (
    CaptionedImages,
    CaptionedImagesConfig,
    build_from_folder,
    build_from_webdataset,
)
from vd_jax.data.latent_cache import LatentCache, LatentCacheConfig, write_latent_cache

__all__ = [
    "CaptionedImages",
    "CaptionedImagesConfig",
    "LatentCache",
    "LatentCacheConfig",
    "build_from_folder",
    "build_from_webdataset",
    "write_latent_cache",
]
