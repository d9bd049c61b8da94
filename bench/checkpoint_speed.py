r"""Checkpoint save / restore time of the trainer's state, next to its step time.

  python bench/checkpoint_speed.py                                  # tiny, 4x2 mesh
  python bench/checkpoint_speed.py --config=configs/tiny.py:levels=1 --mesh=1,1
  python bench/checkpoint_speed.py --config=small --restore_mesh=2,2 --steps=0

Builds the `Trainer` of a config on a ('data', 'fsdp') mesh of host-platform devices (8 of
them unless XLA_FLAGS says otherwise), creates its state and times, --repeats times,
`vd_jax.train.checkpoints.save` as the loop calls it (under the loop's transfer guard): the
seconds the call blocks the loop, and until `wait_until_finished` (the async write done);
then `checkpoints.restore` into the trainer's shardings, on --restore_mesh if given (a
second trainer; the restore reshards), and checks the restored state equals the saved one.
With --steps > 0 it also times that many train steps after one compiling step. `small` is
configs/tiny.py at 64 channels: 4x the bytes in the same number of arrays.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

# Before jax starts its backend: 8 host-platform devices for the meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vd_jax.data.input_pipeline import make_iterator  # noqa: E402
from vd_jax.train import checkpoints  # noqa: E402
from vd_jax.train import sharding as shd  # noqa: E402
from vd_jax.train.trainer import Trainer  # noqa: E402

# Named configs: (config file with its arg, overrides).
PRESETS = {"small": ("configs/tiny.py", {"model.model_channels": 64})}


def load_config(spec: str):
    """'configs/tiny.py[:arg]' or a PRESETS name -> the config."""
    spec, overrides = PRESETS.get(spec, (spec, {}))
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def trainer_on(config, mesh_shape: str):
    """A Trainer on the first devices that make up `mesh_shape`."""
    data, fsdp = shd.parse_mesh_shape(mesh_shape)
    return Trainer(config, shd.make_mesh(mesh_shape, jax.devices()[: data * fsdp]))


def time_steps(trainer, state, steps: int) -> tuple[dict, float, float]:
    """(state, compile + first step s, mean s of the next `steps` steps)."""
    it = make_iterator(trainer.config, process_index=0, process_count=1)
    batches = [trainer.global_batch(next(it)) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batches[0], None)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches[1:]:
        state, metrics = trainer.step(state, batch, None)
    jax.block_until_ready(metrics)
    return state, first, (time.perf_counter() - t0) / max(steps, 1)


def time_save(mngr, step: int, state: dict) -> tuple[float, float]:
    """(s the save call blocks the loop, s until the write is finished)."""
    t0 = time.perf_counter()
    with jax.transfer_guard("disallow"):  # as in the loop: a save may not copy implicitly
        checkpoints.save(mngr, step, state, {"position": step}, force=True)
    blocked = time.perf_counter() - t0
    # orbax then logs this wait as the next save's "Waiting for previous save": harmless.
    mngr.wait_until_finished()
    return blocked, time.perf_counter() - t0


def time_restore(mngr, trainer, step: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    state, _ = checkpoints.restore(mngr, trainer, step)
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0


def time_checkpoints(config, state, restorer, repeats: int, parent: str | None):
    """Rows (save blocks s, save total s, restore s) and whether the last restore was exact."""
    rows, exact = [], True
    with tempfile.TemporaryDirectory(dir=parent) as workdir:
        mngr = checkpoints.checkpoint_manager(config, workdir)
        for i in range(repeats):
            blocked, total = time_save(mngr, i + 1, state)
            restored, restore_s = time_restore(mngr, restorer, i + 1)
            rows.append((blocked, total, restore_s))
        if repeats:
            exact = same_values(state, restored)
        mngr.close()
    return rows, exact


def same_values(a: dict, b: dict) -> bool:
    """Whether two states hold the same values, whatever their shardings."""
    with jax.transfer_guard("allow"):
        pairs = zip(
            jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True
        )
    return all(np.array_equal(x, y) for x, y in pairs)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/tiny.py", help="file[:arg] or " + ",".join(PRESETS))
    p.add_argument("--mesh", default="4,2", help="data,fsdp")
    p.add_argument("--restore_mesh", default="", help="restore on this mesh (default --mesh)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="train steps timed (0: none)")
    p.add_argument("--sync", action="store_true", help="config.async_checkpointing=False")
    p.add_argument("--workdir", default="", help="default: a temporary directory")
    a = p.parse_args()

    config = load_config(a.config)
    config.mesh_shape = a.mesh
    config.async_checkpointing = not a.sync
    trainer = trainer_on(config, a.mesh)
    state = trainer.init_state()
    jax.block_until_ready(state)
    leaves = jax.tree.leaves(state)
    n_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    first = step_s = float("nan")
    if a.steps:
        state, first, step_s = time_steps(trainer, state, a.steps)

    restorer = trainer_on(config, a.restore_mesh) if a.restore_mesh else trainer
    rows, exact = time_checkpoints(config, state, restorer, a.repeats, a.workdir or None)
    print(f"\n$ python bench/{os.path.basename(__file__)} " + " ".join(sys.argv[1:]))
    print(
        f"config {a.config}, mesh {a.mesh} -> restore on {a.restore_mesh or a.mesh}, "
        f"{'sync' if a.sync else 'async'} save: {len(leaves)} arrays, {n_bytes / 2**20:.1f} MiB; "
        f"restored state equal to the saved one: {exact}"
    )
    if a.steps:
        print(f"step: {step_s:.2f} s (mean of {a.steps}; compile + first step {first:.1f} s)")
    print("| repeat | save blocks s | save total s | restore s |")
    print("|---|---|---|---|")
    for i, (blocked, total, restore_s) in enumerate(rows):
        print(f"| {i + 1} | {blocked:.2f} | {total:.2f} | {restore_s:.2f} |")
    if rows:
        best = np.min(np.asarray(rows), axis=0)
        print(f"| best | {best[0]:.2f} | {best[1]:.2f} | {best[2]:.2f} |")
    if not exact:
        sys.exit("restored state differs from the saved one")


if __name__ == "__main__":
    main()
