"""TFDS datasets for training: captioned images and precomputed latent caches.

Both are written as array_record files and read by random access
(``tfds.builder_from_directory(dir).as_data_source(split)``), so TensorFlow is not needed.
`vd_jax.input_pipeline.create_iterator` reads either kind.
"""

from vd_jax.datasets.captioned_images import (
    CaptionedImages,
    CaptionedImagesConfig,
    build_from_folder,
    build_from_webdataset,
)
from vd_jax.datasets.latent_cache import LatentCache, LatentCacheConfig, write_latent_cache

__all__ = [
    "CaptionedImages",
    "CaptionedImagesConfig",
    "LatentCache",
    "LatentCacheConfig",
    "build_from_folder",
    "build_from_webdataset",
    "write_latent_cache",
]
