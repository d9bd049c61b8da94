"""Sampling: the VD pipeline (every flow), its sampling program and the original app's tools.

- `vd_pipeline`: `VDPipeline`, one object for text->image, image variation, image->text,
  text variation, dual-guided and multi-context sampling.
- `sampler`: the one-jit DDIM loop with classifier-free guidance that every flow runs.
- `applications`: the original app's image-variation controls, I2T2I editing.
- `sampling`: what ``sample.py`` runs (config validation, images/captions written out).
"""

from vd_jax.pipelines.vd_pipeline import IMAGE_UNCOND_MODES, VDPipeline, load_image

__all__ = ["IMAGE_UNCOND_MODES", "VDPipeline", "load_image"]
