"""Optimus text-VAE state dicts -> vd_jax.models.optimus params.

`optimus-vae.pth` (docs/original.md §8.3) holds the encoder under
`encoder.*` (transformers `BertModel` names plus Optimus' `encoder.linear`) and
the decoder under `decoder.*` (`decoder.transformer.*` in `GPT2Model` names plus
`linear` / `linear_emb`, and `decoder.lm_head.weight`). VD's old full
checkpoint holds the same keys under `optimus.`.

Two kinds of keys carry no weights of their own:
- `decoder.transformer.h.{i}.attn.bias` / `.masked_bias` are causal-mask buffers;
- `decoder.lm_head.weight` is tied to `wte` (the file lists both, stores one).
  It is consumed and, by default, checked to equal `wte`: a file where they differ
  was not produced by the tied model this loader rebuilds.

`bert_rules` / `gpt2_rules` also read plain transformers `BertModel` /
`GPT2LMHeadModel` state dicts (used by the parity tests).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vd_jax.convert import core
from vd_jax.convert.core import (
    CheckpointError,
    Rule,
    StateDict,
    embedding,
    linear,
    norm,
    repeated,
)
from vd_jax.models.abstract import abstract_params
from vd_jax.models.bert import BertConfig, BertEncoder
from vd_jax.models.gpt2 import GPT2Config, GPT2Decoder

# Buffers of a BertModel state dict (files from older transformers keep them); GPT-2's
# mask buffers are in `tied_ignore`.
_BERT_BUFFERS = (r".*embeddings\.position_ids",)


def _conv1d(src: str, dst: str) -> list[Rule]:
    # GPT-2's Conv1D stores its weight [in, out], which already is a Flax kernel.
    return [Rule(f"{src}.weight", f"{dst}/kernel"), Rule(f"{src}.bias", f"{dst}/bias")]


# One layer of each model, in transformers' module names.
_BERT_LAYER = (
    (linear, "attention.self.query"),
    (linear, "attention.self.key"),
    (linear, "attention.self.value"),
    (linear, "attention.output.dense"),
    (norm, "attention.output.LayerNorm"),
    (linear, "intermediate.dense"),
    (linear, "output.dense"),
    (norm, "output.LayerNorm"),
)
_GPT2_LAYER = (
    (norm, "ln_1"),
    (_conv1d, "attn.c_attn"),
    (_conv1d, "attn.c_proj"),
    (norm, "ln_2"),
    (_conv1d, "mlp.c_fc"),
    (_conv1d, "mlp.c_proj"),
)


def bert_rules(cfg: BertConfig, prefix: str = "", *, latent_head: bool = False) -> list[Rule]:
    """Key table of a transformers `BertModel` (`{prefix}embeddings.*`, `encoder.layer.*`, ...).

    Args:
      cfg: the encoder config.
      prefix: put in front of every key ("encoder." inside `optimus-vae.pth`).
      latent_head: also map Optimus' bias-free `{prefix}linear` (mu/logvar head).

    Returns:
      The rules for `BertEncoder` params.
    """
    p = prefix
    rules = [
        *embedding(f"{p}embeddings.word_embeddings", "embeddings/word_embeddings"),
        *embedding(f"{p}embeddings.position_embeddings", "embeddings/position_embeddings"),
        *embedding(f"{p}embeddings.token_type_embeddings", "embeddings/token_type_embeddings"),
        *norm(f"{p}embeddings.LayerNorm", "embeddings/LayerNorm"),
    ]
    rules += repeated(f"{p}encoder.layer", "encoder/layer", cfg.num_hidden_layers, _BERT_LAYER)
    rules += linear(f"{p}pooler.dense", "pooler/dense")
    if latent_head:
        rules += linear(f"{p}linear", "linear", bias=False)
    return rules


def gpt2_rules(cfg: GPT2Config, prefix: str = "", *, latent_connector: bool = False) -> list[Rule]:
    """Key table of a transformers `GPT2LMHeadModel` (`{prefix}transformer.*`).

    `{prefix}lm_head.weight` is not in the table (tied to wte): pass
    `tied_ignore(prefix)` as `ignore`, or use `load_optimus` / `load_gpt2`.

    Args:
      cfg: the decoder config.
      prefix: put in front of every key ("decoder." inside `optimus-vae.pth`).
      latent_connector: also map Optimus' bias-free `transformer.linear` (memory)
        and `transformer.linear_emb` (embedding offset).

    Returns:
      The rules for `GPT2Decoder` params.
    """
    t = f"{prefix}transformer"
    rules = [*embedding(f"{t}.wte", "wte"), *embedding(f"{t}.wpe", "wpe")]
    rules += repeated(f"{t}.h", "h", cfg.n_layer, _GPT2_LAYER)
    rules += norm(f"{t}.ln_f", "ln_f")
    if latent_connector:
        rules += linear(f"{t}.linear", "linear", bias=False)
        rules += linear(f"{t}.linear_emb", "linear_emb", bias=False)
    return rules


def tied_ignore(prefix: str = "") -> list[str]:
    """Ignore patterns of a GPT-2 state dict: the mask buffers and the tied lm_head."""
    p = re.escape(prefix)
    return [rf"{p}transformer\.h\.\d+\.attn\.(bias|masked_bias)", rf"{p}lm_head\.weight"]


def optimus_rules(bert_cfg: BertConfig, gpt2_cfg: GPT2Config, prefix: str = "") -> list[Rule]:
    """Key table of `optimus-vae.pth` (prefix "") or VD's old full checkpoint ("optimus.").

    Destinations are `encoder/...` (a `BertEncoder`) and `decoder/...` (a
    `GPT2Decoder`). Buffers and the tied `decoder.lm_head.weight` are not rules;
    see `optimus_ignore`.
    """
    enc = bert_rules(bert_cfg, f"{prefix}encoder.", latent_head=True)
    dec = gpt2_rules(gpt2_cfg, f"{prefix}decoder.", latent_connector=True)
    return [Rule(r.src, f"encoder/{r.dst}", r.transform) for r in enc] + [
        Rule(r.src, f"decoder/{r.dst}", r.transform) for r in dec
    ]


def optimus_ignore(prefix: str = "") -> list[str]:
    """Keys of an Optimus state dict that map to no param (buffers, tied lm_head)."""
    return [*(re.escape(prefix) + b for b in _BERT_BUFFERS), *tied_ignore(f"{prefix}decoder.")]


def _check_tied(state: StateDict, wte_key: str, head_key: str):
    if head_key not in state:
        return
    if state.shape(head_key) != state.shape(wte_key) or not np.array_equal(
        np.asarray(state[head_key]), np.asarray(state[wte_key])
    ):
        raise CheckpointError(
            f"cannot load from {state.source}: {head_key} differs from {wte_key}, but the "
            "decoder ties its output projection to the token embeddings"
        )


def _abstract_on_ids(init: Callable[..., Any], *inputs: Any) -> dict[str, Any]:
    """Param shapes from `init` on two token ids (and `inputs`); no memory used."""
    # The params do not depend on the sequence length, so the shortest one traces fastest.
    return abstract_params(init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32), *inputs)


def abstract_optimus(
    bert_cfg: BertConfig, gpt2_cfg: GPT2Config, *, dtype: Any = jnp.float32, param_dtype=None
) -> dict[str, Any]:
    """Shapes of the Optimus params ({'encoder': ..., 'decoder': ...}), no memory used."""
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    enc = BertEncoder(bert_cfg, **kw)
    dec = GPT2Decoder(gpt2_cfg, **kw)
    z = jnp.zeros((1, gpt2_cfg.latent_size), jnp.float32)
    return {
        "encoder": _abstract_on_ids(functools.partial(enc.init, method="latent")),
        "decoder": _abstract_on_ids(dec.init, z),
    }


def load_optimus(
    state: StateDict,
    bert_cfg: BertConfig,
    gpt2_cfg: GPT2Config,
    *,
    prefix: str = "",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    check_tied: bool = True,
) -> dict[str, Any]:
    """Loads the Optimus VAE params from `optimus-vae.pth` (or an old full VD checkpoint).

    Args:
      state: the (lazy) state dict.
      bert_cfg: encoder config (`vd_jax.models.optimus.optimus_configs`).
      gpt2_cfg: decoder config.
      prefix: "optimus." for VD's old full checkpoint; keys outside it are not looked at.
      dtype: compute dtype of the models the params are for (does not change them).
      param_dtype: dtype of the returned arrays.
      check_tied: verify that `decoder.lm_head.weight`, when present, equals `wte`.

    Returns:
      `{"encoder": BertEncoder params, "decoder": GPT2Decoder params}` (numpy arrays).

    Raises:
      CheckpointError: naming every missing, unexpected or mis-shaped key.
    """
    target = abstract_optimus(bert_cfg, gpt2_cfg, dtype=dtype, param_dtype=param_dtype)
    # In VD's old full checkpoint only the keys under the prefix are Optimus'.
    state = state.under(prefix)
    params = core.load_params(
        state,
        optimus_rules(bert_cfg, gpt2_cfg, prefix),
        target,
        ignore=optimus_ignore(prefix),
        what="Optimus text VAE",
    )
    if check_tied:
        d = f"{prefix}decoder."
        _check_tied(state, f"{d}transformer.wte.weight", f"{d}lm_head.weight")
    return params


def load_bert(
    state: StateDict, cfg: BertConfig, *, prefix: str = "", param_dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Loads a plain transformers `BertModel` state dict into `BertEncoder` params (no `linear`)."""
    return core.load_params(
        state.under(prefix),
        bert_rules(cfg, prefix),
        _abstract_on_ids(BertEncoder(cfg, param_dtype=param_dtype).init),
        ignore=[re.escape(prefix) + b for b in _BERT_BUFFERS],
        what="BERT encoder",
    )


def load_gpt2(
    state: StateDict, cfg: GPT2Config, *, prefix: str = "", param_dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Loads a plain transformers `GPT2LMHeadModel` state dict into `GPT2Decoder` params."""
    target = _abstract_on_ids(GPT2Decoder(cfg, param_dtype=param_dtype).init)
    state = state.under(prefix)
    params = core.load_params(
        state, gpt2_rules(cfg, prefix), target, ignore=tied_ignore(prefix), what="GPT-2"
    )
    _check_tied(state, f"{prefix}transformer.wte.weight", f"{prefix}lm_head.weight")
    return params


# --------------------------------------------------------------------------- writing


def optimus_config_dict(bert_cfg: BertConfig, gpt2_cfg: GPT2Config) -> dict[str, Any]:
    """The `{"bert", "gpt2", "latent_size"}` dict `optimus_configs` reads back to these configs."""
    if bert_cfg.latent_size != gpt2_cfg.latent_size:
        raise ValueError(
            f"the encoder's latent_size {bert_cfg.latent_size} differs from the decoder's "
            f"{gpt2_cfg.latent_size}; Optimus has one latent"
        )
    return {"bert": bert_cfg.to_hf(), "gpt2": gpt2_cfg.to_hf(), "latent_size": bert_cfg.latent_size}


def causal_mask_buffer(n_positions: int) -> np.ndarray:
    """GPT-2's `attn.bias` buffer as the original file holds it: float32 [1, 1, n, n] tril."""
    return np.tril(np.ones((n_positions, n_positions), np.float32)).reshape(
        1, 1, n_positions, n_positions
    )


def export_optimus(
    params: Any, bert_cfg: BertConfig, gpt2_cfg: GPT2Config, prefix: str = ""
) -> dict[str, np.ndarray]:
    """The `optimus-vae.pth` state dict of `{"encoder": ..., "decoder": ...}` params (float32).

    Besides the learned tensors it holds what the original file holds: each layer's causal
    mask buffer (before that layer's `c_attn`) and `decoder.lm_head.weight`, the very
    array of `decoder.transformer.wte.weight` (tied, so a writer can store it once).

    Raises:
      CheckpointError: naming every param the table needs that `params` lacks.
    """
    rules = optimus_rules(bert_cfg, gpt2_cfg, prefix)
    learned = core.export_state(rules, params, np.float32, what="Optimus text VAE")
    mask = causal_mask_buffer(gpt2_cfg.n_positions)
    layer = re.compile(
        re.escape(f"{prefix}decoder.transformer.h.") + r"(\d+)\.attn\.c_attn\.weight"
    )
    state: dict[str, np.ndarray] = {}
    for key, value in learned.items():
        m = layer.fullmatch(key)
        if m:  # every layer gets its own buffer, as torch saves them
            state[f"{prefix}decoder.transformer.h.{m.group(1)}.attn.bias"] = mask.copy()
        state[key] = value
    wte = state[f"{prefix}decoder.transformer.wte.weight"]
    state[f"{prefix}decoder.lm_head.weight"] = wte
    return state
