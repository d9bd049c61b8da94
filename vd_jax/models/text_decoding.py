"""Text generation from Optimus latents: sampling, greedy and beam search, all in one jit.

The original (`optimus_vae_next.decode` -> `sample_single_sequence_conditional`,
docs/original.md §4.4) starts from `<BOS>`, re-runs the whole
prefix for every new token, samples with temperature 1, top_k 0, top_p 1.0
(pure ancestral sampling) and stops at `<EOS>` or after 30 tokens, the 30th
being forced to `<EOS>`. Here the prefix runs once (`GPT2Decoder.prefill`) and
each token is one cached `GPT2Decoder.step`, inside a `lax.while_loop` that
stops when every sequence has produced `<EOS>`.

Every decoder returns a `Decoded`: `tokens` [B, max_length] are the tokens after
`<BOS>`, `<EOS>` included, then `pad_id`; `lengths` [B] count them up to and
including `<EOS>`. The new app then removes repeated word runs from the text
(`remove_duplicate_words`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vd_jax.models.gpt2 import Cache, GPT2Decoder


class Decoded(NamedTuple):
    """Generated tokens (after `<BOS>`, `<EOS>` included, then padding) and their lengths."""

    tokens: jax.Array  # [B, max_length] int32
    lengths: jax.Array  # [B] int32, EOS included
    scores: jax.Array | None = None  # beam search: the chosen beam's score


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Top-k and nucleus (top-p) filtering: removed entries become -inf.

    Args:
      logits: [..., V] float logits.
      top_k: keep the k largest (0: no limit).
      top_p: keep the smallest set of most likely tokens whose probability reaches
        top_p (the token that crosses the threshold is kept). 1.0 keeps everything;
        the original's top_p=1.0 could drop a few ~0-probability tokens to float
        round-off, which is not reproduced.

    Returns:
      Filtered logits, same shape.
    """
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered.astype(jnp.float32), axis=-1)
        # Keep a token while the mass of the tokens before it has not passed top_p (so the
        # token that crosses the threshold stays, as in the original's filter).
        keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs <= top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, jnp.maximum(keep, 1) - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def _first_eos_lengths(tokens: jax.Array, eos_id: int) -> jax.Array:
    return (jnp.argmax(tokens == eos_id, axis=-1) + 1).astype(jnp.int32)


def _token_args(
    z: jax.Array | None,
    bos_id: int,
    eos_id: int,
    pad_id: int | None,
    max_length: int,
    batch_size: int | None,
) -> dict[str, int]:
    """The static arguments every decoder shares: pad_id defaults to eos_id, the batch to z's."""
    if z is not None:
        batch_size = z.shape[0]
    return dict(
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        max_length=max_length,
        batch_size=1 if batch_size is None else batch_size,
    )


def _prefill(
    decoder: GPT2Decoder,
    variables: Any,
    z: jax.Array | None,
    rows: int,
    bos_id: int,
    max_length: int,
) -> tuple[jax.Array, Cache]:
    """`<BOS>` through the decoder for `rows` sequences: (logits, a cache for max_length more)."""
    bos = jnp.full((rows, 1), bos_id, jnp.int32)
    return decoder.apply(variables, bos, z, max_new_tokens=max_length, method=GPT2Decoder.prefill)


def _unfinished(max_length: int):
    """The while_loop condition: a token left to generate and a sequence without `<EOS>`.

    The carry is (i, logits, cache, done, ...), as both `_decode` and `_beam` lay it out.
    """

    def cond(carry):
        i, done = carry[0], carry[3]
        return (i < max_length) & ~jnp.all(done)

    return cond


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "mode", "bos_id", "eos_id", "pad_id", "max_length", "top_k",
                     "top_p", "batch_size"),
)  # fmt: skip
def _decode(
    decoder: GPT2Decoder,
    params: Any,
    z: jax.Array | None,
    rng: jax.Array,
    temperature: jax.Array,
    *,
    mode: str,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    top_k: int,
    top_p: float,
    batch_size: int,
) -> Decoded:
    variables = {"params": params}
    logits, cache = _prefill(decoder, variables, z, batch_size, bos_id, max_length)

    def body(carry):
        i, logits, cache, done, tokens, rng = carry
        rng, key = jax.random.split(rng)
        if mode == "greedy":
            tok = jnp.argmax(logits, axis=-1)
        else:
            scaled = filter_logits(logits / temperature, top_k, top_p)
            tok = jax.random.categorical(key, scaled, axis=-1)
        tok = jnp.where(i == max_length - 1, eos_id, tok).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        done = done | (tok == eos_id)
        logits, cache = decoder.apply(variables, tok, cache, method=GPT2Decoder.step)
        return i + 1, logits, cache, done, tokens, rng

    carry = (
        jnp.int32(0),
        logits[:, -1],
        cache,
        jnp.zeros((batch_size,), bool),
        jnp.full((batch_size, max_length), pad_id, jnp.int32),
        rng,
    )
    tokens = jax.lax.while_loop(_unfinished(max_length), body, carry)[4]
    return Decoded(tokens, _first_eos_lengths(tokens, eos_id))


def sample(
    decoder: GPT2Decoder,
    params: Any,
    z: jax.Array | None,
    rng: jax.Array,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
    max_length: int = 30,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int | None = None,
) -> Decoded:
    """Ancestral sampling (the original's decoding: T=1, top_k 0, top_p 1.0, 30 tokens).

    Args:
      decoder: the `GPT2Decoder` module.
      params: its params (`load_optimus(...)["decoder"]`).
      z: [B, latent] text latents, or None for plain GPT-2 (then `batch_size` rows).
      rng: a JAX PRNG key; the same key gives the same tokens.
      bos_id, eos_id: start and end tokens (Optimus: 50258, 50259).
      pad_id: written after `<EOS>` (default: eos_id).
      max_length: tokens generated at most, the last one forced to `<EOS>`.
      temperature: logits are divided by it before filtering.
      top_k, top_p: see `filter_logits`.
      batch_size: rows when z is None.

    Returns:
      `Decoded(tokens [B, max_length], lengths [B])`.
    """
    return _decode(
        decoder,
        params,
        z,
        rng,
        jnp.asarray(temperature, jnp.float32),
        mode="sample",
        top_k=top_k,
        top_p=float(top_p),
        **_token_args(z, bos_id, eos_id, pad_id, max_length, batch_size),
    )


def greedy(
    decoder: GPT2Decoder,
    params: Any,
    z: jax.Array | None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
    max_length: int = 30,
    batch_size: int | None = None,
) -> Decoded:
    """Arg-max decoding; arguments as in `sample`."""
    return _decode(
        decoder,
        params,
        z,
        jax.random.key(0),
        jnp.float32(1.0),
        mode="greedy",
        top_k=0,
        top_p=1.0,
        **_token_args(z, bos_id, eos_id, pad_id, max_length, batch_size),
    )


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "bos_id", "eos_id", "pad_id", "max_length", "num_beams",
                     "batch_size"),
)  # fmt: skip
def _beam(
    decoder: GPT2Decoder,
    params: Any,
    z: jax.Array | None,
    length_penalty: jax.Array,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int,
    num_beams: int,
    batch_size: int,
) -> Decoded:
    variables = {"params": params}
    b, k = batch_size, num_beams
    if z is not None:
        z = jnp.repeat(z, k, axis=0)  # row b * k + j is beam j of item b
    logits, cache = _prefill(decoder, variables, z, b * k, bos_id, max_length)
    vocab = logits.shape[-1]
    neg = jnp.float32(-jnp.inf)
    # A finished beam may only continue with pad_id, at no cost: it keeps its score.
    finished_row = jnp.full((vocab,), neg).at[pad_id].set(0.0)
    eos_only = jnp.full((vocab,), neg).at[eos_id].set(0.0)

    def body(carry):
        i, logits, cache, done, tokens, scores = carry
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
        # The last token is forced to EOS, as in sampling; it still pays its log-prob.
        logp = jnp.where(i == max_length - 1, logp + eos_only, logp)
        logp = jnp.where(done[..., None], finished_row, logp)
        top, flat = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * vocab), k)
        beam, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1).at[:, :, i].set(tok)
        done = jnp.take_along_axis(done, beam, axis=1) | (tok == eos_id)
        rows = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
        cache = {
            **cache,
            "k": tuple(x[rows] for x in cache["k"]),
            "v": tuple(x[rows] for x in cache["v"]),
            "emb": cache["emb"][rows],
        }
        logits, cache = decoder.apply(variables, tok.reshape(-1), cache, method=GPT2Decoder.step)
        return i + 1, logits, cache, done, tokens, top

    # Only beam 0 is alive at first, so the first expansion yields k distinct tokens.
    scores = jnp.where(jnp.arange(k) == 0, 0.0, neg)
    carry = (
        jnp.int32(0),
        logits[:, -1],
        cache,
        jnp.zeros((b, k), bool),
        jnp.full((b, k, max_length), pad_id, jnp.int32),
        jnp.broadcast_to(scores, (b, k)),
    )
    _, _, _, _, tokens, scores = jax.lax.while_loop(_unfinished(max_length), body, carry)
    lengths = _first_eos_lengths(tokens, eos_id)
    best = jnp.argmax(scores / lengths.astype(jnp.float32) ** length_penalty, axis=-1)
    pick = lambda x: jnp.take_along_axis(x, best.reshape((b,) + (1,) * (x.ndim - 1)), axis=1)
    return Decoded(pick(tokens)[:, 0], pick(lengths)[:, 0], pick(scores)[:, 0])


def beam_search(
    decoder: GPT2Decoder,
    params: Any,
    z: jax.Array | None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
    num_beams: int = 4,
    max_length: int = 30,
    length_penalty: float = 0.0,
    batch_size: int | None = None,
) -> Decoded:
    """Fixed-width beam search (not used by VD's own pipeline, which samples).

    Beams that emit `<EOS>` stay in the beam with their final score and compete
    with the unfinished ones, so the search ends when all `num_beams` beams of
    every item are finished or after `max_length` tokens. The returned beam
    maximises `score / length ** length_penalty` (score = summed log-probability).

    Args:
      decoder, params, z, bos_id, eos_id, pad_id, max_length, batch_size: as in `sample`.
      num_beams: beam width.
      length_penalty: exponent of the final length normalisation (0: raw score).

    Returns:
      `Decoded(tokens [B, max_length], lengths [B], scores [B])`.
    """
    return _beam(
        decoder,
        params,
        z,
        jnp.asarray(length_penalty, jnp.float32),
        num_beams=num_beams,
        **_token_args(z, bos_id, eos_id, pad_id, max_length, batch_size),
    )


# ----------------------------------------------------------------------------- text


_ATTACH = "<puncnext>"  # marks punctuation glued to its neighbour word


def _split_punctuation(text: str) -> list[str]:
    """Words with leading "([{" and trailing "?!.,:;}])" split off as tokens of their own,
    joined to the word by an `_ATTACH` marker (as the app tokenises before de-duplicating)."""
    tokens: list[str] = []
    for word in text.split():
        while word and word[0] in "([{":
            tokens += [word[0], _ATTACH]
            word = word[1:]
        tail: list[str] = []
        while word and word[-1] in "?!.,:;}])":
            tail = [_ATTACH, word[-1], *tail]
            word = word[:-1]
        tokens += ([word] if word else []) + tail
    return tokens


def remove_duplicate_words(text: str, max_ngram: int | None = None) -> str:
    """Collapses immediately repeated runs of words, as the new app's `remove_duplicate_word`.

    Optimus samples often stutter ("a man a man riding riding a horse"). As in the
    app, punctuation is split off the words first ("runs runs." has a repeat); then
    any run of n tokens directly followed by the same n tokens loses the copy, for
    every n from 1 up (to `max_ngram`), until nothing changes:
    "a man a man riding riding a horse" -> "a man riding a horse". The old code's
    merge of adjacent duplicate words is `max_ngram=1`.

    Args:
      text: decoded text.
      max_ngram: longest run length to look for (None: any).

    Returns:
      The text with single spaces between the kept words.
    """
    words = _split_punctuation(text)
    changed = True
    while changed:
        changed = False
        longest = len(words) // 2 if max_ngram is None else min(max_ngram, len(words) // 2)
        for n in range(1, longest + 1):
            i = 0
            while i + 2 * n <= len(words):
                if words[i : i + n] == words[i + n : i + 2 * n]:
                    del words[i + n : i + 2 * n]  # stay at i: a third copy may follow
                    changed = True
                else:
                    i += 1
    return " ".join(words).replace(f" {_ATTACH} ", "")


def decode_texts(
    tokenizer, decoded: Decoded | jax.Array, *, remove_duplicates: bool = True
) -> list[str]:
    """Sentences of a decoding result, post-processed as VD's app does.

    Args:
      tokenizer: `vd_jax.processing.optimus_tokenizers.load_gpt2_tokenizer()`.
      decoded: a `Decoded` (or a [B, L] token array).
      remove_duplicates: apply `remove_duplicate_words` (the new app does; the
        library-level `optimus_vae_next.decode` alone does not).

    Returns:
      One string per row.
    """
    from vd_jax.processing.optimus_tokenizers import decode_tokens

    tokens = decoded.tokens if isinstance(decoded, Decoded) else decoded
    texts: Sequence[str] = decode_tokens(tokenizer, jax.device_get(tokens))
    return [remove_duplicate_words(t) if remove_duplicates else t for t in texts]
