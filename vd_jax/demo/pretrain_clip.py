"""Contrastive pre-training of the demo's tiny CLIP towers on the shapes data.

`train_clip` trains both towers (symmetric InfoNCE on the projected pooled embeddings,
learnable temperature). Batches repeat attribute combinations, so every pair with the same
(shape, fg, bg) counts as a positive rather than as a false negative; with `shape_groups`,
batches are made of one colour pair in each of its shapes, hard negatives that only shape
separates. Metrics: loss history, wall time, held-out retrieval accuracy and a linear probe of
the image embeddings on held-out combinations. The tokenizer and pixel helpers are shared with
the demo's encoders.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vd_jax import xla_options
from vd_jax.demo import shapes
from vd_jax.demo.pretrain import TEXT_LENGTH, Trained, batched, fit
from vd_jax.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from vd_jax.processing.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def tiny_clip_configs(
    image_size: int = shapes.IMAGE_SIZE,
    *,
    hidden: int = 64,
    layers: int = 2,
    projection_dim: int = 64,
    patch_size: int = 4,
    text_length: int = TEXT_LENGTH,
) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Small CLIP text and vision towers (the vision one over `patch_size` patches)."""
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=projection_dim,
    )
    text = CLIPTextConfig(max_position_embeddings=text_length, **common)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **common)
    return text, vision


@functools.cache
def clip_tokenizer():
    """CLIP ViT-L/14's tokenizer, written once into a temporary folder."""
    from vd_jax.processing.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer_files

    directory = os.path.join(tempfile.gettempdir(), f"vd_jax_clip_tokenizer_{os.getuid()}")
    if not os.path.isfile(os.path.join(directory, "vocab.json")):
        write_clip_tokenizer_files(directory)
    return load_clip_tokenizer(directory)


def clip_token_ids(captions: Sequence[str], length: int = TEXT_LENGTH) -> np.ndarray:
    """int32 [N, length] CLIP ids, padded with the end token as VD pads its prompts."""
    out = clip_tokenizer()(
        [str(c) for c in captions], padding="max_length", max_length=length, truncation=True
    )
    return np.asarray(out["input_ids"], np.int32)


def clip_pixels(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [N, S, S, 3] -> CLIP-normalised float pixels (the demo images are already at size)."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(OPENAI_CLIP_MEAN)) / jnp.asarray(OPENAI_CLIP_STD)


def clip_embeddings(
    configs: tuple[CLIPTextConfig, CLIPVisionConfig],
    params: dict,
    *,
    images: np.ndarray | None = None,
    captions: Sequence[str] | None = None,
) -> np.ndarray:
    """Unit-norm projected embeddings of images or captions (one of the two)."""
    text_cfg, vision_cfg = configs
    if images is not None:
        fn = xla_options.jit(
            lambda p, x: CLIPVisionEncoder(vision_cfg).apply({"params": p}, clip_pixels(x))[
                "image_embeds"
            ]
        )
        out = np.concatenate(batched(lambda x: np.asarray(fn(params["vision"], x)), images))
    else:
        fn = xla_options.jit(
            lambda p, i: CLIPTextEncoder(text_cfg).apply({"params": p}, i)["text_embeds"]
        )
        ids = clip_token_ids(captions, text_cfg.max_position_embeddings)
        out = np.concatenate(batched(lambda i: np.asarray(fn(params["text"], i)), ids))
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def clip_retrieval_accuracy(
    configs: tuple[CLIPTextConfig, CLIPVisionConfig], params: dict, data: dict[str, np.ndarray]
) -> dict[str, float]:
    """Image -> caption retrieval: each image picks the best of the 120 attribute combinations.

    A combination's text embedding is the mean over all caption templates. `all` counts images
    whose pick is exactly right among all 120 combinations, `among_split` among the combinations
    of the split the data comes from (for held-out data: the 24 never seen in training);
    `shape` / `fg` / `bg` are per-attribute accuracies of the pick among all 120.
    """
    combos = shapes.combinations()
    caps = [shapes.caption(*c, template=t) for c in combos for t in range(len(shapes.TEMPLATES))]
    text = (
        clip_embeddings(configs, params, captions=caps)
        .reshape(len(combos), len(shapes.TEMPLATES), -1)
        .mean(1)
    )
    img = clip_embeddings(configs, params, images=np.asarray(data["image"]))
    sims = img @ text.T
    truth = np.stack([data["shape"], data["fg"], data["bg"]], axis=1)
    combo_arr = np.asarray(combos)
    pick = combo_arr[sims.argmax(1)]
    in_split = {tuple(int(v) for v in t) for t in truth}
    split_cols = np.array([c in in_split for c in combos])
    pick_split = combo_arr[np.where(split_cols[None], sims, -np.inf).argmax(1)]
    return {
        "all": float(np.mean((pick == truth).all(1))),
        "among_split": float(np.mean((pick_split == truth).all(1))),
        **{
            k: float(np.mean(pick[:, i] == truth[:, i]))
            for i, k in enumerate(("shape", "fg", "bg"))
        },
    }


def linear_probe_accuracy(
    train_x: np.ndarray,
    train_labels: dict[str, np.ndarray],
    test_x: np.ndarray,
    test_labels: dict[str, np.ndarray],
    ridge: float = 1e-2,
) -> dict[str, float]:
    """Test accuracy of one linear read-out per attribute, fitted on the training features.

    Each attribute gets a ridge regression (with bias) onto one-hot labels; a test row's
    prediction is its arg-max class. `all` counts rows with every attribute right. On
    held-out attribute combinations this measures how compositionally the features code the
    attributes: a read-out fitted on seen combinations works on unseen ones only if each
    attribute has its own direction, independent of the others.
    """
    x_tr = np.c_[np.asarray(train_x, np.float64), np.ones(len(train_x))]
    x_te = np.c_[np.asarray(test_x, np.float64), np.ones(len(test_x))]
    gram = x_tr.T @ x_tr + ridge * np.eye(x_tr.shape[1])
    right = []
    out: dict[str, float] = {}
    for k, y_tr in train_labels.items():
        y_tr, y_te = np.asarray(y_tr, np.int64), np.asarray(test_labels[k], np.int64)
        classes = int(max(y_tr.max(), y_te.max())) + 1
        w = np.linalg.solve(gram, x_tr.T @ np.eye(classes)[y_tr])
        right.append((x_te @ w).argmax(1) == y_te)
        out[k] = float(np.mean(right[-1]))
    out["all"] = float(np.mean(np.all(right, axis=0)))
    return out


def clip_attribute_probe(
    configs: tuple[CLIPTextConfig, CLIPVisionConfig],
    params: dict,
    train: dict[str, np.ndarray],
    held: dict[str, np.ndarray],
) -> dict[str, float]:
    """`linear_probe_accuracy` of the image embeddings (the demo diffuser's CLS context).

    Fitted on `train`'s images, scored on `held`'s: whether an unseen combination's context
    still says each attribute the way seen ones do, which the image->text flow relies on.
    """
    keys = ("shape", "fg", "bg")
    embed = lambda d: clip_embeddings(configs, params, images=np.asarray(d["image"]))  # noqa: E731
    return linear_probe_accuracy(
        embed(train), {k: train[k] for k in keys}, embed(held), {k: held[k] for k in keys}
    )


def init_clip(configs: tuple[CLIPTextConfig, CLIPVisionConfig], seed: int = 0) -> dict:
    """Random params of both towers: `{"text": ..., "vision": ...}`."""
    text_cfg, vision_cfg = configs
    k1, k2 = jax.random.split(jax.random.key(seed))
    ids = jnp.zeros((1, text_cfg.max_position_embeddings), jnp.int32)
    px = jnp.zeros((1, vision_cfg.image_size, vision_cfg.image_size, 3), jnp.float32)
    return {
        "text": CLIPTextEncoder(text_cfg).init(k1, ids)["params"],
        "vision": CLIPVisionEncoder(vision_cfg).init(k2, px)["params"],
    }


def _shape_group_sampler(
    train: dict[str, np.ndarray], batch_size: int
) -> Callable[[np.random.Generator], np.ndarray]:
    """Batches of colour-pair groups, one example per shape in each (see `train_clip`)."""
    groups: dict[tuple[int, int], dict[int, list[int]]] = {}
    for i, (s, f, b) in enumerate(zip(train["shape"], train["fg"], train["bg"], strict=True)):
        groups.setdefault((int(f), int(b)), {}).setdefault(int(s), []).append(i)
    pairs = [list(by_shape.values()) for by_shape in groups.values()]

    def sample(rng: np.random.Generator) -> np.ndarray:
        idx: list[int] = []
        while len(idx) < batch_size:
            for members in pairs[rng.integers(len(pairs))]:
                idx.append(members[rng.integers(len(members))])
        return np.asarray(idx[:batch_size])

    return sample


def _contrastive_loss_fn(text_model: CLIPTextEncoder, vision_model: CLIPVisionEncoder):
    """`(params, batch, key) -> (loss, metrics)`: symmetric InfoNCE where every pair of the
    same attribute combination counts as a match."""

    def loss_fn(params, batch, key):
        del key
        t = text_model.apply({"params": params["text"]}, batch["ids"])["text_embeds"]
        v = vision_model.apply({"params": params["vision"]}, clip_pixels(batch["image"]))[
            "image_embeds"
        ]
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        logits = jnp.exp(jnp.minimum(params["logit_scale"], jnp.log(100.0))) * v @ t.T
        same = (batch["combo"][:, None] == batch["combo"][None, :]).astype(jnp.float32)
        target = same / same.sum(1, keepdims=True)
        loss = 0.5 * (
            optax.softmax_cross_entropy(logits, target).mean()
            + optax.softmax_cross_entropy(logits.T, target).mean()
        )
        return loss, {"logit_scale": params["logit_scale"]}

    return loss_fn


def train_clip(
    train: dict[str, np.ndarray],
    configs: tuple[CLIPTextConfig, CLIPVisionConfig] | None = None,
    *,
    eval_data: dict[str, np.ndarray] | None = None,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    shape_groups: bool = False,
) -> Trained:
    """Trains both CLIP towers contrastively on (image, caption) pairs.

    Args:
      train: training split (`image`, `caption`, `shape`, `fg`, `bg`).
      configs: (CLIPTextConfig, CLIPVisionConfig) (default `tiny_clip_configs` of the image size).
      eval_data: a split whose retrieval accuracy (`clip_retrieval_accuracy`) and linear-probe
        attribute accuracy (`clip_attribute_probe`) are reported.
      steps, batch_size, lr, seed: optimisation settings; `steps=0` keeps the random towers.
      shape_groups: hard-negative batches: colour pairs drawn at random, each with one example
        of every shape it has in `train`. With uniform batches an image rarely meets another
        of its colours, so colours alone separate almost every pair and the vision tower's
        shape features stay tied to the colours they were seen with.

    Returns:
      `Trained({"text": ..., "vision": ..., "logit_scale": ...}, configs, metrics)`.
    """
    images = np.asarray(train["image"])
    configs = configs or tiny_clip_configs(images.shape[1])
    text_cfg, vision_cfg = configs
    text_model, vision_model = CLIPTextEncoder(text_cfg), CLIPVisionEncoder(vision_cfg)
    params = {**init_clip(configs, seed), "logit_scale": jnp.log(jnp.float32(1 / 0.07))}
    combo = (train["shape"] * 64 + train["fg"] * 8 + train["bg"]).astype(np.int32)
    data = {
        "image": images,
        "ids": clip_token_ids(train["caption"], text_cfg.max_position_embeddings),
        "combo": combo,
    }

    loss_fn = _contrastive_loss_fn(text_model, vision_model)

    if steps:
        params, metrics = fit(
            loss_fn,
            params,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            desc="CLIP",
            sample_batch=_shape_group_sampler(train, batch_size) if shape_groups else None,
        )
    else:
        metrics = {"steps": 0, "train_seconds": 0.0}
    if eval_data is not None:
        t = time.perf_counter()
        metrics["retrieval_accuracy"] = clip_retrieval_accuracy(configs, params, eval_data)
        metrics["probe_accuracy"] = clip_attribute_probe(configs, params, train, eval_data)
        metrics["eval_seconds"] = time.perf_counter() - t
    return Trained(params, configs, metrics)
