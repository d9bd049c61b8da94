"""Checkpoints (orbax) and preemption: what lets a run stop anywhere and continue.

A checkpoint holds the train state (params, optimizer state, EMA, step, rng), restored straight
into its shardings (orbax reshards it when the mesh or the host count changed), and the data
iterator's position (one global position, the same on every host: `vd_jax.data.input_pipeline`).
The workdir may be a local path or any `etils.epath` URL (``gs://bucket/run``).

Preemption: a SIGTERM to any host makes every host save the same step and return cleanly.
With several processes that is JAX's preemption sync manager (through orbax's
`reached_preemption`): the notice travels through the coordination service and the hosts
agree on a step without a collective per step. One process just turns the signal into a flag.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vd_jax.convert import run_folder
from vd_jax.convert.encoders_folder import EncodersFolder, is_encoders_folder, write_encoders_folder
from vd_jax.train.objective import noise_schedule
from vd_jax.train.trainer import Trainer


def workdir_path(workdir: str) -> epath.Path:
    """The run's directory: a URL as given, a local path made absolute (orbax needs that)."""
    if "://" in str(workdir):
        return epath.Path(workdir)
    return epath.Path(os.path.abspath(workdir))


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint_every,
        max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=config.async_checkpointing,
    )
    handlers = {"state": state_handler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(
        workdir_path(workdir) / "checkpoints", options=options, item_handlers=handlers
    )


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: orbax's standard one (the files `StandardSave` writes, which
    `StandardRestore` and `init_from` read), without replica-parallel saving in one process.

    Replica-parallel saving splits each shard that several devices hold among them, so that
    the hosts holding copies each write a part. Every part is cut out by a jitted slice: one
    compile per shape and device, one dispatch per part. The tiny config's 2,276 arrays on a
    4x2 mesh (every shard on 4 or 8 devices) blocked the loop ~29 s at a process's first save
    and ~6 s at later ones, nearly all of it slicing (docs/benchmarks.md). In one process
    every copy is on the same host, so there is nothing to share out: each shard is written
    whole, from its first copy. Several processes keep orbax's default for their platform.
    """
    arrays = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=None if jax.process_count() > 1 else False,
        # The per-array metadata file orbax's default handler writes.
        array_metadata_store=ocp.v1.options.ArrayOptions.Saving().array_metadata_store,
    )
    scalars = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalars),
        (float, scalars),
        (np.number, scalars),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, arrays),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def write_run_record(config, trainer: Trainer, workdir: str) -> None:
    """`vd_model.json` (vd_jax.convert.run_folder): what sampling and export need besides the
    checkpoints. Random encoders (tests) are saved into `workdir/encoders` with it. Process 0
    writes; every start rewrites it (a resumed run may have moved)."""
    if jax.process_index() != 0:
        return
    kind, folder = _encoders_source(config, trainer, workdir)
    record = run_folder.make_record(
        trainer.dcfg, noise_schedule(config), trainer.flows,
        image_size=config.image_size, latent_size=config.latent_size,
        encoders_kind=kind, encoders_folder=folder, init_from=_absolute(config.init_from),
    )  # fmt: skip
    run_folder.write_record(workdir, record)


def _absolute(path: str) -> str:
    return path if not path or "://" in path else os.path.abspath(path)


def _encoders_source(config, trainer: Trainer, workdir: str) -> tuple[str, str]:
    """The record's (encoders kind, folder): a pretrained folder, a saved folder, or none."""
    e, enc = config.encoders, trainer.encoders
    if e.source == "pretrained":
        return "folder", _absolute(e.folder)
    if e.source == "demo":  # the demo's pre-trained encoders, beside its VD run
        folder = _absolute(e.folder)
        if "://" in folder or "://" in str(workdir):
            return "saved", folder
        return "saved", os.path.relpath(folder, os.path.abspath(workdir))
    if enc.vae is None and enc.clip_text is None:
        return "none", ""
    dest = workdir_path(workdir) / "encoders"
    if not is_encoders_folder(dest):
        write_encoders_folder(dest, _random_encoders(enc))
    return "saved", "encoders"


def _random_encoders(enc) -> EncodersFolder:
    """The trainer's random encoders (VAE, CLIP towers when present) as an encoders folder."""
    configs, params = {}, {}
    if enc.vae is not None:
        configs["vae"], params["vae"] = enc.vae.config, enc.params["vae"]
    if enc.clip_text is not None:
        configs["clip_text"] = enc.clip_text.config
        configs["clip_vision"] = enc.clip_vision.config
        params["clip"] = {"text": enc.params["clip_text"], "vision": enc.params["clip_vision"]}
    return EncodersFolder(configs=configs, params=params)


def save(mngr, step: int, state: dict, data_state: Any, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state))
    with jax.transfer_guard("allow"):  # orbax copies device -> host its own way
        return mngr.save(step, args=args, force=force)


def restore(mngr, trainer: Trainer, step: int) -> tuple[dict, Any]:
    """The state at `step`, restored straight into its shardings, and the iterator state."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        trainer.abstract_state,
        trainer.state_sh,
    )
    state_args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
    )
    args = ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore())
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
    """Whether a preemption notice (SIGTERM) asks the run to save `step` and stop.

    Call `reached(step)` after every step on every host. Several processes: orbax's
    `reached_preemption` (JAX's preemption sync manager, which handles SIGTERM itself, agrees
    on the first step every host can still reach). One process: a SIGTERM handler's flag.
    """

    def __init__(self, mngr: ocp.CheckpointManager):
        self.mngr, self.flag, self._old = mngr, False, None
        if jax.process_count() > 1:
            return  # a Python handler would replace the sync manager's own
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        self.flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.mngr.reached_preemption(step)
        return self.flag

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
