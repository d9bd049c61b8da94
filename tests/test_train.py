"""Training core on CPU with the tiny config: loss goes down, mesh parity, FSDP memory,
checkpoint resume after kill -9 (also during an async save), metrics files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from vd_jax.models import unet
from vd_jax.train import checkpoints, objective, optimizer
from vd_jax.train import sharding as shd
from vd_jax.train import step as ts
from vd_jax.train.loop import train_and_evaluate
from vd_jax.train.metrics import MetricsWriter, read_events
from vd_jax.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
# Two flows cover both data types and both context types at half the compile time of five;
# one U-Net level halves it again (these tests check the trainer, not the model).
FLOWS = "text_to_image+image_to_text"
TINY_ARG = f"flows={FLOWS},levels=1"


@pytest.fixture(scope="session")
def jit_cache(tmp_path_factory):
    """One persistent XLA cache for this session's runs, in-process and in subprocesses."""
    d = str(tmp_path_factory.getbasetemp() / "jit_cache")  # shared with the multi-host test
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return d


def _config(steps: int, mesh: str = "-1,1", **kw):
    c = tiny.get_config(TINY_ARG)
    c.num_steps, c.mesh_shape = steps, mesh
    c.checkpoint_every, c.peak_flops, c.sample_every = 1000, 1.0, -1
    for k, v in kw.items():
        c[k] = v
    return c


def _one_device():
    return shd.make_mesh("1,1", jax.devices()[:1])


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsWriter.read_jsonl(f"{workdir}/metrics.jsonl")}


@pytest.fixture(scope="module")
def run_4x2(tmp_path_factory, jit_cache):
    """6 steps on a 4x2 data x fsdp mesh: the reference of the parity test."""
    wd = tmp_path_factory.mktemp("run_4x2")
    out = train_and_evaluate(_config(6, "4,2"), str(wd))
    return dict(workdir=wd, params=jax.device_get(out["state"]["params"]), state=out["state"])


def test_loss_decreases_and_metrics(tmp_path, jit_cache):
    c = _config(40)
    c.checkpoint_every = 20
    out = train_and_evaluate(c, str(tmp_path), mesh=_one_device())
    rows = MetricsWriter.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("loss", "loss/text_to_image", "loss/image_to_text", "lr", "grad_norm",
                "examples_per_sec", "mfu"):  # fmt: skip
        assert key in rows[0], key
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    print(f"loss first5 {first:.4f} last5 {last:.4f}")
    assert last < 0.88 * first
    assert out["step"] == 40 and int(out["state"]["step"]) == 40
    # TensorBoard events: readable records with our scalar tags; the loss curve PNG.
    (events,) = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    tags = [(e.step, v.tag) for e in read_events(str(events)) for v in e.summary.value]
    assert [st for st, tag in tags if tag == "loss/text_to_image"] == list(range(1, 41))
    assert any(tag == "_hparams_/experiment" for _, tag in tags)  # the config, for HParams
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]


def test_mesh_parity_and_fsdp_memory(tmp_path, run_4x2, jit_cache):
    """One device and a 4x2 data x fsdp mesh give the same losses and params."""
    one = train_and_evaluate(_config(6), str(tmp_path), mesh=_one_device())
    l1, l8 = _losses(tmp_path), _losses(run_4x2["workdir"])
    loss_err = max(abs(l1[s] - l8[s]) / abs(l1[s]) for s in l1)
    p1 = jax.device_get(one["state"]["params"])
    flat = lambda p: np.concatenate([x.ravel() for x in jax.tree.leaves(p)])  # noqa: E731
    a, b = flat(p1), flat(run_4x2["params"])
    # Relative over the whole parameter vector. Per tensor, a bias that starts at zero holds
    # only a few Adam steps of size lr, and Adam turns summation-order noise in its near-zero
    # gradients into visible relative differences (2e-5 on the worst such tensor).
    param_err = np.linalg.norm(a - b) / np.linalg.norm(a)
    print(f"parity: loss rel err {loss_err:.2e}, params rel err {param_err:.2e}")
    assert loss_err <= 1e-5 and param_err <= 1e-5
    frac = shd.per_device_fraction(run_4x2["state"]["params"])
    print(f"fsdp=2: max per-device fraction of params {frac:.3f}")
    assert 0.5 <= frac < 0.53


def test_fsdp8_shardings_hold_an_eighth():
    """Under a 1x8 mesh every device holds ~1/8 of params and Adam moments (no compile)."""
    # Two U-Net levels (nothing is compiled here): one level's many small tensors, replicated
    # under fsdp_min_size, would hold 0.137 of the params on each device.
    c = tiny.get_config(f"flows={FLOWS}")
    c.mesh_shape = "1,8"
    tr_flows = objective.trained_flows(c)
    from vd_jax.models import unet

    abstract = unet.abstract_params(ts.diffuser_config(c), ts.param_parts(tr_flows))
    mesh = shd.make_mesh(c.mesh_shape)
    shards = shd.tree_shardings(abstract, mesh, c.param_rules, c.logical_axis_rules, 256)
    total = sum(x.size for x in jax.tree.leaves(abstract))
    per_dev = sum(
        int(np.prod(s.shard_shape(x.shape)))
        for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shards), strict=True)
    )
    print(f"fsdp=8: per-device fraction {per_dev / total:.4f}")
    assert per_dev / total < 0.13


def test_config_and_pieces():
    c = _config(10)
    assert shd.parse_mesh_shape("4,2") == (4, 2) and shd.parse_mesh_shape("-1") == (-1, 1)
    assert shd.fsdp_spec((3, 8, 5), 2) == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert shd.fsdp_spec((3, 5), 2) == jax.sharding.PartitionSpec()
    # 'sample' mode draws flows by weight, reproducibly per step.
    c.flow_mode = "sample"
    draws = [ts.sample_flow(c, s) for s in range(40)]
    assert set(draws) == {"text_to_image", "image_to_text"}
    assert draws == [ts.sample_flow(c, s) for s in range(40)]
    # Group labels, LR scales and freezing.
    c.freeze = "global,data"
    params = {"global": {"w": np.zeros((2, 2))}, "data": {"image": {"w": np.zeros(2)}},
              "context": {"text": {"w": np.zeros((2, 2))}}}  # fmt: skip
    assert optimizer.labels(params, c) == {
        "global": {"w": "frozen"},
        "data": {"image": {"w": "frozen"}},
        "context": {"text": {"w": "context"}},
    }


def test_batch_fraction_trains_a_flow_on_every_kth_example():
    """`flows.<f>.batch_fraction` = 1/k: that flow's loss is the loss on examples ::k (same
    draws), the other flow still sees the whole batch; two flows at 1/2 take examples 0::2 and
    1::2; fractions not 1/k, or a device batch that 1/k does not split, are refused."""
    c = _config(10)
    model, params, inputs, uncond = _loss_setup(c, b=4, text_uncond=0.0)
    flows, rng = objective.trained_flows(c), jax.random.key(3)
    _, whole = objective.total_loss(model, params, inputs, uncond, rng, flows, c)
    c.flows.text_to_image.batch_fraction = 0.5
    _, strided = objective.total_loss(model, params, inputs, uncond, rng, flows, c)
    c.flows.text_to_image.batch_fraction = 1.0
    half = {k: v[::2] for k, v in inputs.items()}
    _, on_half = objective.total_loss(model, params, half, uncond, rng, flows, c)
    np.testing.assert_allclose(strided["loss/text_to_image"], on_half["loss/text_to_image"],
                               rtol=1e-6)  # fmt: skip
    assert abs(float(strided["loss/text_to_image"] - whole["loss/text_to_image"])) > 1e-4
    np.testing.assert_allclose(strided["loss/image_to_text"], whole["loss/image_to_text"],
                               rtol=1e-6)  # fmt: skip
    # A second flow at 1/2 takes the other half (examples 1::2), not the same one.
    _, on_odd = objective.total_loss(
        model, params, {k: v[1::2] for k, v in inputs.items()}, uncond, rng, flows, c
    )
    c.flows.text_to_image.batch_fraction = c.flows.image_to_text.batch_fraction = 0.5
    assert [objective.example_rows(c, f) for f in flows] == [(2, 0), (2, 1)]
    _, halves = objective.total_loss(model, params, inputs, uncond, rng, flows, c)
    for f, want in (("text_to_image", on_half), ("image_to_text", on_odd)):
        np.testing.assert_allclose(halves[f"loss/{f}"], want[f"loss/{f}"], rtol=1e-6)
    c.flows.image_to_text.batch_fraction = 1.0
    c.flows.text_to_image.batch_fraction = 0.3
    with pytest.raises(ValueError, match=r"text_to_image.batch_fraction must be 1/k"):
        objective.total_loss(model, params, inputs, uncond, rng, flows, c)
    c.flows.text_to_image.batch_fraction = 0.25
    objective.check_batch_fractions(c, per_device=8)
    with pytest.raises(ValueError, match=r"each device's batch \(6 examples"):
        objective.check_batch_fractions(c, per_device=6)


def _loss_setup(c, b, text_uncond):
    """Model, random params, random latents/contexts of `b` examples, uncond contexts."""
    cfg = ts.diffuser_config(c)
    model = unet.VDDiffuser(cfg)
    params = model.init(jax.random.key(0), ts.param_parts(objective.trained_flows(c)),
                        method=unet.VDDiffuser.init_parts)["params"]  # fmt: skip
    r = np.random.default_rng(0)
    ls = c.latent_size
    inputs = {
        "image_latent": r.normal(size=(b, ls, ls, cfg.image_in_channels)),
        "text_latent": r.normal(size=(b, cfg.text_dim)),
        "text_context": r.normal(size=(b, 3, cfg.context_dim)),
        "image_context": r.normal(size=(b, 5, cfg.context_dim)),
    }
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    uncond = {"text": jnp.full((3, cfg.context_dim), text_uncond),
              "image": jnp.zeros((5, cfg.context_dim))}  # fmt: skip
    return model, params, inputs, uncond


def _five_flow_setup(b=8):
    # `dual_context`, the old name of `dual_guided`, still names the flow in a config.
    c = tiny.get_config(
        "flows=text_to_image+image_variation+image_to_text+text_variation+dual_context,levels=1"
    )
    return (c, *_loss_setup(c, b, text_uncond=1.0))


def test_fused_flows_equal_separate_passes():
    """`fuse_flows`: flows of one data type share a diffuser pass (two passes for Algorithm 1's
    four flows, dual-context alone), with each flow's loss and the summed gradients equal to
    separate passes (rtol 1e-5 / 1e-4), also with a half-batch flow and the rows laid out
    for 2 shards; unequal gradient treatment of shared params keeps flows apart."""
    c, model, params, inputs, uncond = _five_flow_setup()
    c.flows.text_to_image.batch_fraction = 0.5
    c.cfg_dropout = 0.5  # both the dropped and the kept contexts take part
    flows, rng = objective.trained_flows(c), jax.random.key(3)
    assert objective.flow_groups(flows, params, c) == [
        ("text_to_image", "image_variation"), ("image_to_text", "text_variation"),
        ("dual_guided",),
    ]  # fmt: skip
    flows = flows[:4]  # dual-context runs alone either way: left out to save compile time

    def loss_fn(fuse, shards=1):
        c.fuse_flows = fuse
        return lambda p: objective.total_loss(model, p, inputs, uncond, rng, flows, c, shards)

    def n_conv(fn):
        return str(jax.make_jaxpr(fn)(params)).count("conv_general_dilated")

    (total, per_flow), grads = jax.jit(jax.value_and_grad(loss_fn(False), has_aux=True))(params)
    (total2, per_flow2), grads2 = jax.jit(jax.value_and_grad(loss_fn(True, 2), has_aux=True))(
        params
    )
    _, per_flow1 = jax.jit(loss_fn(True))(params)
    np.testing.assert_allclose(total2, total, rtol=1e-5)
    for got in (per_flow1, per_flow2):
        for f in flows:
            np.testing.assert_allclose(got[f"loss/{f}"], per_flow[f"loss/{f}"], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads2, grads
    )
    # One image pass instead of two (the text blocks have no convolutions).
    assert n_conv(loss_fn(False)) == 2 * n_conv(loss_fn(True)) > 0

    c.fuse_flows = True
    c.flows.image_variation.grad_scales = {"global": 1.0, "data": 0.5, "context": 1.0}
    assert ("text_to_image", "image_variation") not in objective.flow_groups(flows, params, c)
    c.flows.image_variation.grad_scales = {"global": 1.0, "data": 1.0, "context": 0.5}
    assert ("text_to_image", "image_variation") in objective.flow_groups(flows, params, c)
    with pytest.raises(ValueError, match=r"segment rows \[4, 3\] must sum to the batch \(8\)"):
        seg = [(4, ("text",), [inputs["text_context"][:4]], None),
               (3, ("image",), [inputs["image_context"][:3]], None)]  # fmt: skip
        model.apply({"params": params}, inputs["image_latent"], jnp.zeros(8), seg,
                    xtype="image", method=unet.VDDiffuser.call_segments)  # fmt: skip


def test_fused_flows_keep_rows_on_their_devices():
    """On 8 devices (batch-sharded), merging two flows' rows with `shards=8` needs no
    collective but the gradients' all-reduce; a 1-block layout of the same rows does move
    rows between devices (the check has teeth). merge_segments / split_segments invert."""
    a, b = jnp.arange(16.0).reshape(16, 1), -jnp.arange(8.0).reshape(8, 1)
    for shards in (1, 2, 8):
        merged = unet.merge_segments([a, b], shards)
        back = unet.split_segments(merged, [16, 8], shards)
        np.testing.assert_array_equal(back[0], a)
        np.testing.assert_array_equal(back[1], b)
    assert unet.merge_segments([a, b], 8)[:3, 0].tolist() == [0.0, 1.0, -0.0]

    c, model, params, inputs, uncond = _five_flow_setup(b=16)
    flows, rng = ("text_to_image", "image_variation"), jax.random.key(3)
    mesh = shd.make_mesh("8,1", jax.devices()[:8])
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def collectives(shards):
        fn = lambda p, x: objective.total_loss(model, p, x, uncond, rng, flows, c, shards)[0]
        step = jax.jit(jax.grad(fn), in_shardings=(rep, sh), out_shardings=rep)
        hlo = step.lower(params, inputs).compile().as_text()
        ops = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
        return {op: hlo.count(f" {op}(") for op in ops}

    for mesh_shape, shards in (("4,2", 8), ("8,1", 8), ("1,1", 1)):
        n = int(np.prod([int(x) for x in mesh_shape.split(",")]))
        trainer = Trainer(_config(10, mesh_shape), shd.make_mesh(mesh_shape, jax.devices()[:n]))
        assert trainer.batch_shards == shards, mesh_shape

    local, moved = collectives(8), collectives(1)
    assert local["all-gather"] == local["all-to-all"] == local["collective-permute"] == 0, local
    assert local["all-reduce"] > 0
    assert moved["all-gather"] + moved["all-to-all"] + moved["collective-permute"] > 0, moved


def test_optimizer_steps_by_lr_with_decoupled_decay():
    """AdamW per group: a constant gradient moves each param by lr * scale per step (Adam's
    normalisation), plus lr * weight_decay * param on matrices only; frozen groups: no state."""
    c = _config(10)
    c.optim.update(lr=1e-3, warmup_steps=1, schedule="constant", grad_clip=0.0, weight_decay=0.1)
    c.lr_scales.context = 0.5
    params = {"global": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
              "context": {"text": {"w": jnp.ones((2, 2))}}}  # fmt: skip
    grads = jax.tree_util.tree_map(lambda x: 1e-3 * jnp.ones_like(x), params)
    tx = optimizer.make_optimizer(c, params)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)  # step 0: the warmup's lr is 0
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["global"]["b"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["global"]["w"], -1e-3 * (1 + 0.1), rtol=1e-4)
    np.testing.assert_allclose(updates["context"]["text"]["w"], -0.5e-3 * (1 + 0.1), rtol=1e-4)
    # A finer key, unset in the base config, overrides its group once set (as from the CLI).
    assert c.lr_scales.context_image is None
    c.lr_scales.context_image = 2.0
    params["context"]["image"] = {"w": jnp.ones((2, 2))}
    grads = jax.tree_util.tree_map(lambda x: 1e-3 * jnp.ones_like(x), params)
    assert optimizer.labels(params, c)["context"] == {
        "text": {"w": "context"},
        "image": {"w": "context_image"},
    }
    tx = optimizer.make_optimizer(c, params)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["context"]["image"]["w"], -2e-3 * (1 + 0.1), rtol=1e-4)
    np.testing.assert_allclose(updates["context"]["text"]["w"], -0.5e-3 * (1 + 0.1), rtol=1e-4)
    # A frozen group keeps no Adam moments and never moves; the others step as before.
    c.freeze = "global"
    tx = optimizer.make_optimizer(c, params)
    state = tx.init(params)
    moments = [x.shape for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0]
    assert sorted(moments) == [(2, 2)] * 4  # mu and nu of the two context matrices
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    assert not any(np.any(u) for u in jax.tree_util.tree_leaves(updates["global"]))
    np.testing.assert_allclose(updates["context"]["image"]["w"], -2e-3 * (1 + 0.1), rtol=1e-4)


def test_optimizer_equals_per_group_adamw():
    """One AdamW with per-leaf step sizes gives what optax.multi_transform's one AdamW per
    group gives (clipping, decay, warmup-cosine schedule, an LR scale of 3), to 1e-6."""
    c = _config(20)
    c.optim.update(lr=2e-3, warmup_steps=3, schedule="cosine", grad_clip=0.5, weight_decay=0.1)
    c.lr_scales.context = 3.0
    r = np.random.default_rng(0)
    params = {"global": {"w": r.normal(size=(3, 4)), "b": r.normal(size=4)},
              "data": {"image": {"w": r.normal(size=(4, 4))}},
              "context": {"text": {"w": r.normal(size=(4, 2)), "b": r.normal(size=2)}}}  # fmt: skip
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    o, base = c.optim, optimizer.lr_schedule(c)
    tree_labels = optimizer.labels(params, c)
    reference = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.multi_transform(
            {
                g: optax.adamw(lambda t, s=s: base(t) * s, b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay,
                               mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p))
                for g, s in (("global", 1.0), ("data", 1.0), ("context", 3.0))
            },
            tree_labels,
        ),
    )  # fmt: skip
    finals = []
    for tx in (reference, optimizer.make_optimizer(c, params)):
        p, state = params, tx.init(params)
        for i in range(8):
            g = jax.tree_util.tree_map(lambda x, i=i: jnp.sin(x * (i + 1)), p)
            updates, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, updates)
        finals.append(p)
    # Same arithmetic; XLA may contract a multiply-add differently in the two graphs (1 ulp).
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), *finals)
    assert not np.array_equal(finals[1]["context"]["text"]["w"], params["context"]["text"]["w"])


@pytest.mark.slow
def test_context_only_raw_sampled_accumulated(tmp_path, jit_cache):
    """On-the-fly encoding (tiny VAE/CLIP, fake text VAE), sampled flows, grad accumulation,
    remat and a frozen global+data group: only context params move."""
    c = tiny.get_config("kind=raw,mode=sample,flows=text_to_image,levels=1")
    c.num_steps, c.checkpoint_every, c.peak_flops, c.sample_every = 2, 1000, 1.0, -1
    c.freeze = "global,data"
    c.optim.grad_accum_steps = 2
    c.remat.resnet, c.remat.transformer = "full", "dots_saveable"
    c.ema_decay = 0.0
    out = train_and_evaluate(c, str(tmp_path), mesh=_one_device())
    final = jax.device_get(out["state"]["params"])
    init = jax.device_get(out["trainer"].init_state()["params"])
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), init, final)
    assert not any(jax.tree.leaves(moved["global"])) and not any(jax.tree.leaves(moved["data"]))
    assert all(jax.tree.leaves(moved["context"]))
    assert np.isfinite(_losses(tmp_path)[2])


def test_init_from_another_run(tmp_path, run_4x2):
    """A single-flow fine-tune starts from a two-flow run's newest checkpoint (its EMA params):
    the parts it shares are copied, its optimizer starts fresh, a mismatched model is refused."""
    from vd_jax.train import init_from

    src = run_4x2["workdir"]
    c = tiny.get_config("flows=text_to_image,levels=1")  # run_4x2's model
    c.init_from, c.peak_flops = str(src), 1.0
    trainer = Trainer(c, mesh=_one_device())
    state = jax.device_get(trainer.init_state())
    ema = jax.device_get(run_4x2["state"]["ema_params"])
    assert sorted(state["params"]["data"]) == ["image"]  # text_to_image has no text data layers
    assert sorted(state["params"]["context"]) == ["text"]
    same = jax.tree.map(
        np.array_equal,
        state["params"],
        {"global": ema["global"], "data": {"image": ema["data"]["image"]},
         "context": {"text": ema["context"]["text"]}},
    )  # fmt: skip
    assert all(jax.tree.leaves(same))
    assert int(state["step"]) == 0
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0]
    assert moments and not any(np.any(x) for x in moments)  # Adam's mu, nu: fresh
    # Resuming that run under this config (other flows: another state) is refused, and the
    # message points to init_from.
    mngr = checkpoints.checkpoint_manager(c, str(src))
    with pytest.raises(ValueError, match=r"step 6 in .*holds another train state[\s\S]*init_from"):
        checkpoints.restore(mngr, trainer, mngr.latest_step())
    mngr.close()
    # Another width: refused before reading, naming a tensor and both shapes.
    c.model.model_channels *= 2
    msg = r"do not fit[\s\S]*\['norm'\]\['bias'\]: \(32,\) in the source, \(64,\) here"
    with pytest.raises(init_from.InitFromError, match=msg):
        Trainer(c, mesh=_one_device()).init_state()
    c.init_from = str(tmp_path)  # an empty folder: neither a run nor PyTorch weights
    with pytest.raises(Exception, match="neither a diffusers folder"):
        Trainer(c, mesh=_one_device()).init_state()


def test_pretrained_encoders_and_init_from_pytorch(tmp_path, tiny_vd, jit_cache):
    """Fine-tuning from converted PyTorch weights: the frozen VAE and CLIP towers come from a
    (tiny random) diffusers VD folder and encode images and captions on the fly, the diffuser
    starts from the folder's U-Net weights, and training moves them."""
    import dataclasses

    from vd_jax.convert.load import load_models

    folder = tiny_vd["folder"]
    flows = ("text_to_image", "image_variation")
    m = load_models(folder, flows)
    c = tiny.get_config("kind=raw,flows=" + "+".join(flows))
    c.model.update(dataclasses.asdict(m.diffuser_config))
    c.encoders.update(source="pretrained", folder=folder, text_vae="")
    c.image_size = m.vae_config.sample_size
    c.latent_size = m.image_sample_size
    c.init_from, c.ema_decay = folder, 0.0
    c.num_steps, c.checkpoint_every, c.peak_flops, c.sample_every = 3, 1000, 1.0, -1
    out = train_and_evaluate(c, str(tmp_path), mesh=_one_device())
    init = jax.device_get(out["trainer"].init_state()["params"])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, init, m.diffuser_params)))
    final = jax.device_get(out["state"]["params"])
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), init, final)
    assert all(jax.tree.leaves(moved["data"])) and all(jax.tree.leaves(moved["context"]))
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------- kill -9 and resume


def _train_cmd(workdir, steps: int, every: int) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), f"--config={REPO}/configs/tiny.py:{TINY_ARG}",
        f"--workdir={workdir}", f"--config.num_steps={steps}",
        f"--config.checkpoint_every={every}", "--config.peak_flops=1.0",
        "--config.sample_every=-1",
    ]  # fmt: skip


def _env(jit_cache):
    # One CPU device: the same programs as the in-process one-device runs (cache hits).
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": jit_cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(REPO)}  # fmt: skip


def _run_until(cmd, env, stop, timeout=240) -> int:
    """Runs cmd; kill -9 as soon as stop() is true. Returns the exit code."""
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    t0 = time.time()
    while p.poll() is None:
        if stop is not None and stop():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return -9
        if time.time() - t0 > timeout:
            p.kill()
            raise TimeoutError(cmd)
        time.sleep(0.01)
    return p.returncode


def _logged(workdir) -> int:
    f = Path(workdir) / "metrics.jsonl"
    return max(_losses(workdir), default=0) if f.exists() else 0


def _saving(workdir) -> bool:
    d = Path(workdir) / "checkpoints"
    return d.exists() and any("tmp" in p.name for p in d.iterdir())


@pytest.mark.slow
def test_kill9_resume_matches_uninterrupted(tmp_path, jit_cache):
    env, steps, every = _env(jit_cache), 10, 4
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _run_until(_train_cmd(ref, steps, every), env, None) == 0
    # 1) killed while the step-4 checkpoint is being written asynchronously.
    assert _run_until(_train_cmd(run, steps, every), env, lambda: _saving(run)) == -9
    # 2) restarted, killed mid-training after step 7 once checkpoint 4 is complete.
    mid = lambda: _logged(run) >= 7 and (run / "checkpoints" / "4").is_dir() and not _saving(run)
    assert _run_until(_train_cmd(run, steps, every), env, mid) == -9
    # 3) restarted with the same command: runs to the end.
    assert _run_until(_train_cmd(run, steps, every), env, None) == 0
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, steps + 1))
    err = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(f"resume: max rel loss diff vs uninterrupted {err:.2e}")
    assert err <= 1e-6


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path, jit_cache):
    cmd = _train_cmd(tmp_path, 1000, 1000)
    p = subprocess.Popen(cmd, env=_env(jit_cache), cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    t0 = time.time()
    while _logged(tmp_path) < 3 and time.time() - t0 < 240:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and saved[-1] >= 3
    rows = MetricsWriter.read_jsonl(tmp_path / "metrics.jsonl")
    assert json.dumps(rows[0])  # readable
