"""CLIP image preprocessing, reproducing transformers' PIL `CLIPImageProcessor` exactly.

The steps (transformers' PIL backend): convert to RGB, resize with Pillow so the
shortest edge is `size` (output size truncated with `int`, as torchvision does),
center crop (top-left rounded down, zero padding if the image is too small),
multiply by `rescale_factor`, normalise. The output here is NHWC float32, ready
for `CLIPVisionEncoder`; transformers returns the same values in NCHW.

Float arrays follow transformers' quirks on purpose, since VD's unconditional
image context is computed from one (`unconditional_gray_image`): a float image in
[0, 1] is scaled by 255 and *truncated* to uint8 for Pillow, scaled back by 1/255
after the resize, and then rescaled by `rescale_factor` again like any image. So
the gray 0.5 image reaches the model as (127/255/255 - mean) / std, not
(0.5 - mean) / std.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size(value: Any, name: str, square_int: bool) -> int | tuple[int, int]:
    """An int (shortest edge) or (height, width) from transformers' size forms."""
    if isinstance(value, int):
        return (value, value) if square_int else value
    if isinstance(value, list | tuple) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value and value.get("longest_edge") is None:
            se = int(value["shortest_edge"])
            return (se, se) if square_int else se
    raise ValueError(
        f"unsupported {name} {value!r} (expected an int, or height/width, or shortest_edge)"
    )


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessorConfig:
    """A transformers `preprocessor_config.json` for CLIP; defaults are openai/clip-vit-*'s.

    `size` is the shortest edge after resizing (int) or an exact (height, width);
    `crop_size` is (height, width); `resample` a PIL resampling filter (3 = bicubic).
    """

    do_resize: bool = True
    size: int | tuple[int, int] = 224
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPImageProcessorConfig:
        """Reads a `preprocessor_config.json` dict; missing keys keep the defaults.

        `size` may be an int (shortest edge, as CLIP processors treat it), a dict
        with `shortest_edge` or `height`/`width`, or a [height, width] pair;
        `crop_size` likewise, where an int means a square.
        """
        kw: dict[str, Any] = {}
        for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(k) is not None:
                kw[k] = bool(d[k])
        if d.get("size") is not None:
            kw["size"] = _size(d["size"], "size", square_int=False)
        if d.get("crop_size") is not None:
            kw["crop_size"] = _size(d["crop_size"], "crop_size", square_int=True)
        if d.get("resample") is not None:
            r = d["resample"]
            kw["resample"] = int(PIL.Image.Resampling[r.upper()] if isinstance(r, str) else r)
        if d.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                v = d[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, list | tuple) else [v] * 3))
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CLIPImageProcessorConfig:
        """Reads a `preprocessor_config.json` file (see `from_dict`)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The transformers `CLIPImageProcessor` `preprocessor_config.json` dict of this config;
        `from_dict` reads it back to this config."""
        h, w = self.crop_size
        size = self.size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.do_resize,
            "size": (
                {"shortest_edge": size}
                if isinstance(size, int)
                else {"height": size[0], "width": size[1]}
            ),
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": h, "width": w},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }


def unconditional_gray_image(height: int = 512, width: int = 512) -> np.ndarray:
    """The float64 [H, W, 3] image of 0.5s diffusers' VD pipelines encode as "no image"."""
    return np.zeros((height, width, 3)) + 0.5


# ----------------------------------------------------------------------------- steps


def _to_rgb_array(image: Any, convert_rgb: bool) -> np.ndarray:
    """Any accepted input -> an [H, W, C] array (dtype kept for arrays)."""
    if isinstance(image, PIL.Image.Image):
        if not convert_rgb:
            arr = np.array(image)
            return arr[..., None] if arr.ndim == 2 else arr
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # Transparent pixels are composited onto white, as transformers does.
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an [H, W, C] image with C in (1, 3, 4), got {arr.shape}")
    if not convert_rgb or arr.shape[-1] == 3:
        return arr
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.floating) and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"RGBA float image outside [0, 1]: [{arr.min()}, {arr.max()}]")
    white = 255 if np.issubdtype(arr.dtype, np.integer) else 1.0
    alpha = arr[..., 3:4] / white
    rgb = alpha * arr[..., :3] + (1 - alpha) * white
    return np.round(rgb).astype(arr.dtype) if white == 255 else rgb.astype(arr.dtype)


def _needs_scaling_for_pil(arr: np.ndarray) -> bool:
    """Whether a float image is taken to be in [0, 1] (True) or [0, 255] (False).

    transformers decides per image: integral values in [0, 255] are pixel values,
    anything else must lie in [0, 1] and is multiplied by 255.
    """
    if arr.dtype == np.uint8:
        return False
    if np.allclose(arr, arr.astype(int)):
        if np.all(arr >= 0) and np.all(arr <= 255):
            return False
        raise ValueError(f"image values [{arr.min()}, {arr.max()}] do not fit in uint8")
    if np.all(arr >= 0) and np.all(arr <= 1):
        return True
    raise ValueError(f"float image values [{arr.min()}, {arr.max()}] are outside [0, 1]")


def _rescale(arr: np.ndarray, scale: float) -> np.ndarray:
    # float64 product then float32: the exact arithmetic of transformers' `rescale`.
    return (arr.astype(np.float64) * scale).astype(np.float32)


def _resize_shape(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, tuple):
        return size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _resize(arr: np.ndarray, size: int | tuple[int, int], resample: int) -> np.ndarray:
    oh, ow = _resize_shape(arr.shape[0], arr.shape[1], size)
    scaled = _needs_scaling_for_pil(arr)
    # Pillow only holds uint8 here; the cast truncates (0.5 * 255 -> 127), as transformers'.
    pix = _rescale(arr, 255) if scaled else arr
    pix = pix.astype(np.uint8)
    pil = PIL.Image.fromarray(pix[..., 0] if pix.shape[-1] == 1 else pix)
    out = np.array(pil.resize((ow, oh), resample=resample))
    out = out[..., None] if out.ndim == 2 else out
    return _rescale(out, 1 / 255) if scaled else out


def _center_crop(arr: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    h, w = arr.shape[:2]
    ch, cw = crop
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + ch, left : left + cw]
    # Smaller than the crop: zero-pad, centred with the extra pixel before, then crop.
    nh, nw = max(ch, h), max(cw, w)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
    padded[tp : tp + h, lp : lp + w] = arr
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def _normalize(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if arr.shape[-1] != len(mean) or arr.shape[-1] != len(std):
        raise ValueError(f"{arr.shape[-1]} channels but {len(mean)} means / {len(std)} stds")
    return (arr - np.array(mean, dtype=arr.dtype)) / np.array(std, dtype=arr.dtype)


def preprocess(images: Any, cfg: CLIPImageProcessorConfig | None = None) -> np.ndarray:
    """CLIP pixel values for one image or a list, as transformers' `CLIPImageProcessor`.

    Args:
      images: a PIL image, an [H, W, C] array (uint8 0..255, or float: [0, 1], or
        integral values in [0, 255], as transformers reads them) or a list of them.
      cfg: the processor settings (default: openai/clip-vit-large-patch14's).

    Returns:
      [B, crop_h, crop_w, 3] float32, NHWC.
    """
    cfg = cfg or CLIPImageProcessorConfig()
    if isinstance(images, PIL.Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    out = []
    for image in images:
        arr = _to_rgb_array(image, cfg.do_convert_rgb)
        if cfg.do_resize:
            arr = _resize(arr, cfg.size, cfg.resample)
        if cfg.do_center_crop:
            arr = _center_crop(arr, cfg.crop_size)
        if cfg.do_rescale:
            arr = _rescale(arr, cfg.rescale_factor)
        if cfg.do_normalize:
            arr = _normalize(arr, cfg.image_mean, cfg.image_std)
        out.append(arr)
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"images of different sizes after preprocessing: {[a.shape for a in out]}")
    return np.stack(out).astype(np.float32)
