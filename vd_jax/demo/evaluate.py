"""Held-out evaluation of the demo's four flows (and dual-guided), and its picture.

Every flow is scored on the held-out split, whose attribute combinations training never saw,
by reading attributes from what it produced (`vd_jax.demo.attributes`) and comparing them with
what the input asks for. A sample counts only if all three attributes (shape, shape colour,
background colour) are right; `eval.json` also has the per-attribute rates.

- text_to_image: caption -> image; the image must show the caption's attributes.
- image_variation: image -> image; the variation must keep the input's attributes.
- image_to_text: image -> caption; the caption must name the image's attributes.
- text_variation: caption -> caption; the output must keep the input's attributes (also
  reported: how often its wording differs from the input's).
- dual_guided: caption of example i + image of example j (a different shape) -> image, mixing
  the two contexts' attention with `eval.dual_ratio` (image share), VD's dual-guided flow. Its
  target: the shape from the text, both colours from the image.

Image outputs are sampled with `eval.guidance_scale`, text outputs with
`eval.text_guidance_scale` (lower: strong guidance pushes a text latent out of its caption's
region of the Optimus latent space).
"""

from __future__ import annotations

import textwrap
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vd_jax import xla_options
from vd_jax.demo.attributes import (
    attribute_accuracy,
    attributes_of,
    read_image_attributes,
    read_text_attributes,
)

EVAL_FLOWS = ("text_to_image", "image_variation", "image_to_text", "text_variation", "dual_guided")


def _partners(shape: np.ndarray) -> np.ndarray:
    """For each example, the next one (cyclically) whose shape differs."""
    n = len(shape)
    out = np.empty(n, np.int64)
    for i in range(n):
        j = (i + 1) % n
        while shape[j] == shape[i] and j != i:
            j = (j + 1) % n
        out[i] = j
    return out


def evaluate_flows(config, trainer, params: Any, enc, held: dict) -> tuple[dict, dict]:
    """Samples every flow on held-out inputs; returns (scores per flow, grid examples)."""
    from vd_jax.train.samples import make_flow_sampler

    e = config.eval
    n = min(int(e.num), len(held["caption"]))
    captions = [str(c) for c in held["caption"][:n]]
    images = np.asarray(held["image"][:n])
    shape, fg, bg = (np.asarray(held[k][:n]) for k in ("shape", "fg", "bg"))
    truth = [attributes_of(*t) for t in zip(shape, fg, bg, strict=True)]
    text_ctx, image_ctx = enc.text_contexts(captions), enc.image_contexts(images)
    partner = _partners(shape)
    dual_truth = [attributes_of(shape[i], fg[j], bg[j]) for i, j in enumerate(partner)]
    jobs = {
        "text_to_image": ({"text_context": text_ctx}, truth),
        "image_variation": ({"image_context": image_ctx}, truth),
        "image_to_text": ({"image_context": image_ctx}, truth),
        "text_variation": ({"text_context": text_ctx}, truth),
        "dual_guided": (
            {"text_context": text_ctx, "image_context": image_ctx[partner]},
            dual_truth,
        ),
    }
    scores, examples = {}, {}
    k = int(e.grid_examples)
    for i, (flow, (inputs, want)) in enumerate(jobs.items()):
        to_text = flow in ("image_to_text", "text_variation")
        scale = e.text_guidance_scale if to_text else e.guidance_scale
        run = make_flow_sampler(
            trainer.model, trainer.encoders.vae, flow, num=n,
            latent_size=config.vd.latent_size, steps=int(e.sample_steps),
            guidance_scale=float(scale), dual_ratio=float(e.dual_ratio),
            prediction_type=config.vd.prediction_type,
        )  # fmt: skip
        rng = jax.random.key(config.seed + 1000 + i)
        out = np.asarray(xla_options.jit(run)(params, trainer.frozen, inputs, rng))
        if to_text:
            texts = enc.decode_texts(out)
            read = [read_text_attributes(t) for t in texts]
            outputs: list = texts
        else:
            read = [read_image_attributes(x) for x in out]
            outputs = list(out)
        scores[flow] = attribute_accuracy(read, want)
        if flow == "text_variation":
            scores[flow]["changed_wording"] = float(
                np.mean([t.strip() != c.strip() for t, c in zip(texts, captions, strict=True)])
            )
        if flow == "dual_guided":
            scores[flow]["ratio_image"] = float(e.dual_ratio)
        if flow in ("text_to_image", "text_variation"):
            ins = [[c] for c in captions[:k]]
        elif flow == "dual_guided":
            ins = [[captions[j], images[partner[j]]] for j in range(k)]
        else:
            ins = [[x] for x in images[:k]]
        examples[flow] = {"score": scores[flow]["all"], "inputs": ins, "outputs": outputs[:k]}
    return scores, examples


# --------------------------------------------------------------------------- the grid

_CELL_W, _IMG = 132, 64
_LABEL_W = 150


def _font():
    return ImageFont.load_default()


def _text_height(lines: int) -> int:
    return 12 * lines


def _item_height(item) -> int:
    if isinstance(item, str):
        return _text_height(len(textwrap.wrap(item, 21)) or 1)
    return _IMG


def _draw_item(canvas: Image.Image, draw: ImageDraw.ImageDraw, item, x: int, y: int) -> int:
    if isinstance(item, str):
        for j, line in enumerate(textwrap.wrap(item, 21) or [""]):
            draw.text((x + 2, y + 12 * j), line, fill=(0, 0, 0), font=_font())
        return _item_height(item)
    arr = np.asarray(item)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((_IMG, _IMG), Image.NEAREST)
    canvas.paste(img, (x + (_CELL_W - _IMG) // 2, y))
    return _IMG


def write_grid(path: str, examples: dict) -> None:
    """A labelled PNG: one row per flow, each cell an input (top) and what VD made of it."""
    rows = []
    for flow, ex in examples.items():
        h_in = max((sum(_item_height(i) + 4 for i in ins) for ins in ex["inputs"]), default=0)
        h_out = max((_item_height(o) for o in ex["outputs"]), default=0)
        rows.append((flow, ex, h_in, h_out))
    k = max(len(ex["inputs"]) for ex in examples.values())
    width = _LABEL_W + k * _CELL_W
    height = sum(h_in + h_out + 28 for _, _, h_in, h_out in rows) + 8
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 4
    for flow, ex, h_in, h_out in rows:
        draw.text((6, y + 4), flow, fill=(0, 0, 0), font=_font())
        draw.text((6, y + 20), f"held-out acc {ex['score']:.2f}", fill=(90, 90, 90), font=_font())
        draw.text((6, y + h_in + 10), "->", fill=(90, 90, 90), font=_font())
        for c, (ins, out) in enumerate(zip(ex["inputs"], ex["outputs"], strict=True)):
            x = _LABEL_W + c * _CELL_W
            yy = y
            for item in ins:
                yy += _draw_item(canvas, draw, item, x, yy) + 4
            _draw_item(canvas, draw, out, x, y + h_in + 8)
        y += h_in + h_out + 20
        draw.line([(0, y), (width, y)], fill=(200, 200, 200))
        y += 8
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    import os

    os.replace(tmp, path)
