"""Checkpoints (orbax) and preemption: what lets a run stop anywhere and continue.

A checkpoint holds the train state (params, optimizer state, EMA, step, rng), restored straight
into its shardings, and the data iterator's position. A SIGTERM becomes a flag the loop checks
between steps, so the run saves the current step and returns cleanly.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vd_jax.train.trainer import Trainer


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint_every,
        max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=config.async_checkpointing,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def save(mngr, step: int, state: dict, data_state: Any, force: bool = False) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    with jax.transfer_guard("allow"):  # orbax copies device -> host its own way
        return mngr.save(step, args=args, force=force)


def restore(mngr, trainer: Trainer, step: int) -> tuple[dict, Any]:
    """The state at `step`, restored straight into its shardings, and the iterator state."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        trainer.abstract_state,
        trainer.state_sh,
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    try:
        out = mngr.restore(step, args=args)
    except ValueError as e:
        if "tree structures do not match" not in str(e):
            raise
        # e.g. flows or model sizes changed, or a run from before the optimizer state lost
        # its per-group copies (2026-11-30): the params can still be carried over.
        found = str(e).split("If this mismatch")[0].strip()
        raise ValueError(
            f"the checkpoint of step {step} in {mngr.directory} holds another train state "
            f"than this config builds ({found}). Resume it with the config it was written "
            "with, or start a new --workdir from its params with --config.init_from=<that workdir>"
        ) from e
    return out["state"], out["data"]


class Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (agreed on by all hosts)."""

    def __init__(self):
        self.flag = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        with jax.transfer_guard("allow"):
            return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
