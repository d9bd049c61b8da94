"""Pre-training of the demo's tiny encoders on the shapes data, before VD itself trains.

Three models (two here), each the same module as the full-size one with a small config:

- `train_vae`: the image `AutoencoderKL` (posterior mean, or a sample, -> decode; MSE + L1 +
  a small KL), after which the latent `scaling_factor` is set to 1 / std of the training
  latents so that the diffuser sees about unit-variance latents, as SD's 0.18215 does.
- `train_optimus`: the text VAE (BERT encoder -> (mu, logvar) -> GPT-2 decoder with the latent
  as memory and embedding offset); teacher-forced cross-entropy + beta * KL on a posterior
  sample. Real tokenizers and vocabularies, so VD's decoding code runs unchanged.
- `pretrain_clip.train_clip`: both CLIP towers, contrastively (its own module).

Each returns `Trained(params, config, metrics)`; metrics hold the loss history, wall time and
the reconstruction attribute accuracy (encode -> decode -> read attributes, compared with the
truth) or, for CLIP, retrieval accuracy. Evaluation helpers are public for the demo's use.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from vd_jax import xla_options
from vd_jax.demo import shapes
from vd_jax.demo.attributes import (
    attribute_accuracy,
    attributes_of,
    read_image_attributes,
    read_text_attributes,
)
from vd_jax.models.optimus import BertConfig, BertEncoder, GPT2Config, GPT2Decoder
from vd_jax.models.text_decoding import decode_texts, greedy
from vd_jax.models.vae import AutoencoderKL, VAEConfig, decode_latents, encode_images
from vd_jax.processing import optimus_tokenizers as otok

# Token budget of a caption: the longest template needs 11 tokens in every tokenizer.
TEXT_LENGTH = 16


class Trained(NamedTuple):
    """A pre-trained model: params, its (possibly updated) config and metrics."""

    params: Any
    config: Any
    metrics: dict[str, Any]


# ----------------------------------------------------------------------------- configs


def tiny_vae_config(
    image_size: int = shapes.IMAGE_SIZE,
    *,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64, 64),
) -> VAEConfig:
    """A small kl-f(2^(levels-1)) VAE; the default maps 32 px to an 8x8x4 latent."""
    return VAEConfig(
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=1.0,  # set from the latents' std after training
    )


def tiny_optimus_configs(
    latent_size: int = 16, hidden: int = 64, layers: int = 2
) -> tuple[BertConfig, GPT2Config]:
    """Small BERT encoder and GPT-2 decoder with the real vocabularies."""
    bert = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        latent_size=latent_size,
    )
    gpt2 = GPT2Config(
        n_positions=32, n_embd=hidden, n_layer=layers, n_head=4, latent_size=latent_size
    )
    return bert, gpt2


# ----------------------------------------------------------------------------- training loop


def fit(
    loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
    params: Any,
    data: dict[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 25,
    desc: str = "pretrain",
    sample_batch: Callable[[np.random.Generator], np.ndarray] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """AdamW with warmup + cosine decay over random batches of `data` (numpy, first axis).

    `sample_batch(rng)` picks a batch's example indices; default: `batch_size` uniform draws.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, min(50, max(steps // 10, 1)), max(steps, 2), end_value=lr * 0.1
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = opt.init(params)

    @xla_options.jit
    def step(params, opt_state, batch, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    n = len(next(iter(data.values())))
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history, first_loss = [], None
    start = time.perf_counter()
    for i in tqdm(range(steps), desc=desc, mininterval=2.0):
        idx = rng.integers(0, n, batch_size) if sample_batch is None else sample_batch(rng)
        key, sub = jax.random.split(key)
        params, opt_state, loss, aux = step(
            params, opt_state, {k: v[idx] for k, v in data.items()}, sub
        )
        if i == 0:
            first_loss = float(loss)
            compiled = time.perf_counter()
        if (i + 1) % log_every == 0 or i == steps - 1:
            history.append(
                {"step": i + 1, "loss": float(loss), **{k: float(v) for k, v in aux.items()}}
            )
    jax.block_until_ready(params)
    end = time.perf_counter()
    return params, {
        "steps": steps,
        "batch_size": batch_size,
        "first_loss": first_loss,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "train_seconds": end - start,
        "seconds_per_step": (end - compiled) / max(steps - 1, 1) if steps > 1 else None,
    }


def _truth(data: dict[str, np.ndarray]) -> list[dict[str, str]]:
    return [
        attributes_of(s, f, b)
        for s, f, b in zip(data["shape"], data["fg"], data["bg"], strict=True)
    ]


def batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch: int = 256) -> list:
    return [fn(x[i : i + batch]) for i in range(0, len(x), batch)]


# ----------------------------------------------------------------------------- image VAE


def vae_reconstruct(config: VAEConfig, params: Any, images: np.ndarray) -> np.ndarray:
    """uint8 images -> posterior mean -> decoded float images in [0, 1] (numpy)."""
    model = AutoencoderKL(config)
    fn = xla_options.jit(
        lambda p, x: decode_latents(model, p, encode_images(model, p, x.astype(jnp.float32) / 255))
    )
    return np.concatenate(batched(lambda x: np.asarray(fn(params, x)), images))


def vae_attribute_accuracy(
    config: VAEConfig, params: Any, data: dict[str, np.ndarray]
) -> dict[str, float]:
    """Attributes read from reconstructed images vs the truth (`data` as from `shapes.generate`)."""
    recon = vae_reconstruct(config, params, data["image"])
    return attribute_accuracy([read_image_attributes(x) for x in recon], _truth(data))


def train_vae(
    train: dict[str, np.ndarray],
    config: VAEConfig | None = None,
    *,
    eval_data: dict[str, np.ndarray] | None = None,
    steps: int = 800,
    batch_size: int = 8,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    sample_posterior: bool = False,
    seed: int = 0,
) -> Trained:
    """Trains the image VAE on `train["image"]` (uint8 [N, S, S, 3]).

    Args:
      train: training split (as from `shapes.generate` or `shapes.load_split`).
      config: the VAE config (default `tiny_vae_config` of the image size).
      eval_data: a split whose reconstruction attribute accuracy is reported (e.g. heldout).
      steps, batch_size, lr, seed: optimisation settings.
      kl_weight: weight of the KL to N(0, 1) per latent element (the reconstruction loss is
        a per-pixel mean); small, so the latent stays informative and about unit scale.
      sample_posterior: decode a posterior sample (the KL VAE's recipe); False decodes the
        mean (a plain autoencoder, which learns faster).

    Returns:
      `Trained(params, config with scaling_factor = 1 / latent std, metrics)`.
    """
    images = np.asarray(train["image"])
    config = config or tiny_vae_config(images.shape[1])
    model = AutoencoderKL(config)
    x0 = jnp.zeros((1, *images.shape[1:]), jnp.float32)
    params = model.init(jax.random.key(seed), x0)["params"]

    def loss_fn(params, batch, key):
        x = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        mean, logvar = model.apply({"params": params}, x, method=AutoencoderKL.encode)
        z = mean
        if sample_posterior:
            z = z + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        y = model.apply({"params": params}, z, method=AutoencoderKL.decode)
        mse, l1 = jnp.mean((y - x) ** 2), jnp.mean(jnp.abs(y - x))
        kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
        return mse + l1 + kl_weight * kl, {"mse": mse, "kl": kl}

    params, metrics = fit(
        loss_fn,
        params,
        {"image": images},
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        desc="image VAE",
    )
    # Latent scale: SD's recipe, 1 / std of the (unscaled) posterior means of training images.
    sample = images[: min(len(images), 512)]
    z = np.concatenate(
        batched(lambda x: np.asarray(encode_images(model, params, x / 255.0)), sample)
    )
    std = float(z.std())
    config = dataclasses.replace(config, scaling_factor=1.0 / std)
    metrics["latent_std"] = std
    metrics["latent_shape"] = list(z.shape[1:])
    if eval_data is not None:
        t = time.perf_counter()
        metrics["recon_attribute_accuracy"] = vae_attribute_accuracy(config, params, eval_data)
        metrics["eval_seconds"] = time.perf_counter() - t
    return Trained(params, config, metrics)


# ----------------------------------------------------------------------------- Optimus


@functools.cache
def _tokenizers():
    return otok.load_bert_tokenizer(), otok.load_gpt2_tokenizer()


def optimus_inputs(captions: Sequence[str], length: int = TEXT_LENGTH) -> dict[str, np.ndarray]:
    """Encoder ids/mask and decoder `<BOS> text <EOS> <PAD>...` ids of captions."""
    bert_tok, gpt_tok = _tokenizers()
    enc_ids, enc_mask = otok.encode_for_optimus(bert_tok, list(captions), pad_to=length)
    dec = np.full((len(captions), length), otok.PAD_ID, np.int32)
    for i, text in enumerate(captions):
        ids = [otok.BOS_ID, *gpt_tok.encode(text), otok.EOS_ID]
        if len(ids) > length:
            raise ValueError(f"{text!r} needs {len(ids)} decoder tokens, more than {length}")
        dec[i, : len(ids)] = ids
    return {"enc_ids": enc_ids, "enc_mask": enc_mask, "dec_ids": dec}


@functools.lru_cache(maxsize=8)
def _posterior_mean_fn(bert: BertConfig):
    return xla_options.jit(
        lambda p, i, m: BertEncoder(bert).apply({"params": p}, i, m, method=BertEncoder.latent)[0]
    )


def optimus_encode(bert: BertConfig, params: Any, captions: Sequence[str]) -> np.ndarray:
    """[N, latent] posterior means (VD's text latents) of captions."""
    inputs = optimus_inputs(captions)
    fn = _posterior_mean_fn(bert)
    n = len(captions)
    return np.concatenate(
        [np.asarray(fn(params, inputs["enc_ids"][s : s + 256], inputs["enc_mask"][s : s + 256]))
         for s in range(0, n, 256)]
    )  # fmt: skip


def optimus_decode(gpt2: GPT2Config, params: Any, z: np.ndarray, max_length: int = TEXT_LENGTH):
    """Greedy captions of latents [N, latent]."""
    _, gpt_tok = _tokenizers()
    out = []
    for s in range(0, len(z), 256):
        dec = greedy(
            GPT2Decoder(gpt2),
            params,
            jnp.asarray(z[s : s + 256]),
            bos_id=otok.BOS_ID,
            eos_id=otok.EOS_ID,
            pad_id=otok.PAD_ID,
            max_length=max_length,
        )
        out += decode_texts(gpt_tok, dec, remove_duplicates=False)
    return out


def optimus_attribute_accuracy(
    configs: tuple[BertConfig, GPT2Config], params: dict, data: dict[str, np.ndarray]
) -> dict[str, float]:
    """Attributes read from greedy reconstructions of `data["caption"]` vs the truth."""
    bert, gpt2 = configs
    texts = optimus_decode(
        gpt2, params["decoder"], optimus_encode(bert, params["encoder"], data["caption"])
    )
    acc = attribute_accuracy([read_text_attributes(t) for t in texts], _truth(data))
    acc["exact_text"] = float(
        np.mean([t == c for t, c in zip(texts, data["caption"], strict=True)])
    )
    return acc


def paraphrases(data: dict[str, np.ndarray], seed: int = 0) -> list[str]:
    """One caption per example in a random template (its own may come up) of the example's
    (shape, fg, bg) combination."""
    missing = sorted({"shape", "fg", "bg"} - set(data))
    if missing:
        raise ValueError(f"paraphrases need the attribute columns; missing {missing}")
    rng = np.random.default_rng(seed)
    n = len(data["shape"])
    templates = rng.integers(len(shapes.TEMPLATES), size=n)
    cols = (np.asarray(data[k]) for k in ("shape", "fg", "bg"))
    return [shapes.caption(int(s), int(f), int(b), int(t))
            for s, f, b, t in zip(*cols, templates, strict=True)]  # fmt: skip


def _optimus_loss_fn(
    encoder, decoder, dec_ids: np.ndarray, vocab_size: int, beta: float, paraphrase_prob: float
):
    """`(params, batch, key) -> (CE + beta * KL, metrics)`: the Optimus VAE's ELBO."""
    # The captions use a few dozen GPT-2 tokens: the softmax runs over those only (training
    # cost no longer scales with the 50260-token vocabulary). Greedy decoding still ranks the
    # whole vocabulary; the evaluation below measures exactly that.
    used = np.unique(dec_ids[:, 1:])
    to_used = np.zeros(vocab_size, np.int32)
    to_used[used] = np.arange(len(used))
    is_ln_f = lambda mdl, _: mdl.name == "ln_f"  # noqa: E731

    def loss_fn(params, batch, key):
        mu, logvar = encoder.apply(
            {"params": params["encoder"]}, batch["enc_ids"], batch["enc_mask"],
            method=BertEncoder.latent,
        )  # fmt: skip
        ids = batch["dec_ids"]
        if paraphrase_prob > 0:  # a split only here: the default's draws stay as they were
            key, kalt = jax.random.split(key)
            use = jax.random.bernoulli(kalt, paraphrase_prob, (ids.shape[0], 1))
            ids = jnp.where(use, batch["alt_dec_ids"], ids)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        # The full-vocabulary logits are unused, so jit drops them; only ln_f's output is kept.
        _, state = decoder.apply(
            {"params": params["decoder"]}, ids[:, :-1], z,
            capture_intermediates=is_ln_f, mutable=["intermediates"],
        )  # fmt: skip
        h = state["intermediates"]["ln_f"]["__call__"][0]
        logits = h @ params["decoder"]["wte"]["embedding"][used].T
        target = ids[:, 1:]
        mask = (target != otok.PAD_ID).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(to_used)[target])
        ce = jnp.sum(ce * mask) / jnp.sum(mask)
        kl = 0.5 * jnp.mean(jnp.sum(mu**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
        return ce + beta * kl, {"ce": ce, "kl": kl}

    return loss_fn


def train_optimus(
    train: dict[str, np.ndarray],
    configs: tuple[BertConfig, GPT2Config] | None = None,
    *,
    eval_data: dict[str, np.ndarray] | None = None,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    beta: float = 1e-3,
    paraphrase_prob: float = 0.0,
    seed: int = 0,
) -> Trained:
    """Trains the Optimus text VAE on `train["caption"]`.

    Args:
      train: training split (only `caption` is used).
      configs: (BertConfig, GPT2Config) (default `tiny_optimus_configs()`).
      eval_data: a split whose reconstruction attribute accuracy is reported.
      steps, batch_size, lr, seed: optimisation settings.
      beta: KL weight (per sentence; CE is a per-token mean). Small: the latent must carry the
        whole caption, the KL only keeps its scale near N(0, 1) for the diffuser.
      paraphrase_prob: the share of examples whose decoder target is another paraphrase of
        the same combination (one drawn per example, needs `train`'s shape/fg/bg) instead of
        the caption itself: the latent then carries the attributes more than the wording.

    Returns:
      `Trained({"encoder": ..., "decoder": ...}, configs, metrics)`; metrics include the KL
      weight and the latent std of training captions.
    """
    bert, gpt2 = configs or tiny_optimus_configs()
    captions = [str(c) for c in train["caption"]]
    inputs = optimus_inputs(captions)
    if not 0.0 <= paraphrase_prob <= 1.0:
        raise ValueError(f"paraphrase_prob must be in [0, 1], got {paraphrase_prob}")
    if paraphrase_prob > 0:
        inputs["alt_dec_ids"] = optimus_inputs(paraphrases(train, seed + 5))["dec_ids"]
    encoder, decoder = BertEncoder(bert), GPT2Decoder(gpt2)
    k1, k2 = jax.random.split(jax.random.key(seed))
    ids = jnp.asarray(inputs["dec_ids"][:1])
    params = {
        "encoder": encoder.init(k1, inputs["enc_ids"][:1], method=BertEncoder.latent)["params"],
        "decoder": decoder.init(k2, ids, jnp.zeros((1, bert.latent_size)))["params"],
    }

    loss_fn = _optimus_loss_fn(
        encoder, decoder, inputs["dec_ids"], gpt2.vocab_size, beta, paraphrase_prob
    )

    params, metrics = fit(
        loss_fn,
        params,
        inputs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        desc="Optimus",
    )
    metrics["beta"] = beta
    metrics["latent_std"] = float(optimus_encode(bert, params["encoder"], captions[:512]).std())
    if eval_data is not None:
        t = time.perf_counter()
        metrics["recon_attribute_accuracy"] = optimus_attribute_accuracy(
            (bert, gpt2), params, eval_data
        )
        metrics["eval_seconds"] = time.perf_counter() - t
    return Trained(params, (bert, gpt2), metrics)
