"""Checkpoints with orbax's CheckpointManager: the whole TrainState plus the data iterator's state.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous steps intact. The state is saved as a flat {path: array} dict and restored into the
structure of a freshly built template, so any pytree the trainer holds (nnx.State, optax states) round-trips.
Leftover temporary directories of a crashed save are removed when the next run opens the directory.

Each checkpoint's `meta` item holds what the loop passes as `extra` (the model config and schedule it was written
with, the count of skipped steps); `restore_latest(..., check_meta=...)` lets the caller refuse a checkpoint by its
meta before its arrays are read (`train.run_setup`).

Fault injection (tests): `Checkpointer(..., debug_kill_in_save_at_step=s)` SIGKILLs the process inside the save
of step s, after every item is written to the temporary directory and before orbax commits (renames) it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _flat(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): x for p, x in leaves}


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit the current train state (another model config)."""


def _unflat(flat: dict[str, Any], template):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [jax.tree_util.keystr(p) for p, _ in leaves if jax.tree_util.keystr(p) not in flat]
    if missing:
        raise CheckpointMismatchError(f"checkpoint lacks {len(missing)} entries of the current train state, e.g. {missing[:3]}; "
                         f"was it written by a different model config?")
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in leaves])


class _KillInFinalizeHandler(ocp.JsonCheckpointHandler):
    """Tests only: an item whose finalize SIGKILLs the process. Orbax finalizes items only after every item of
    the step is written, and commits (renames) the step's temporary directory after that: dying here is a crash
    in the middle of a save."""

    def finalize(self, directory) -> None:  # noqa: ARG002
        os.kill(os.getpid(), signal.SIGKILL)


@ocp.args.register_with_handler(_KillInFinalizeHandler, for_save=True)
@dataclasses.dataclass
class _KillInFinalize(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(_KillInFinalizeHandler, for_restore=True)
@dataclasses.dataclass
class _KillInFinalizeRestore(ocp.args.CheckpointArgs):  # orbax wants a restore type for every handler
    item: dict | None = None


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int = 3,
                 debug_kill_in_save_at_step: int | None = None):
        self.directory = pathlib.Path(directory).absolute()
        self.every = every
        self.debug_kill_in_save_at_step = debug_kill_in_save_at_step
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True,
                                            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict | None, extra: dict | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(dict(extra or {}, step=int(step))))
        if self.debug_kill_in_save_at_step is not None and int(step) == self.debug_kill_in_save_at_step:
            args = ocp.args.Composite(**dict(args.items()), zz_debug_kill=_KillInFinalize({}))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The `meta` item of one checkpoint (JSON only; the arrays are not read)."""
        got = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(got["meta"] or {})

    def restore_latest(self, template, check_meta: Callable[[int, dict], None] | None = None
                       ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) from the newest checkpoint that restores; None when there is none.

        `check_meta(step, meta)`, when given, sees each candidate's meta before its arrays are read and may raise
        (CheckpointMismatchError for another model config): that stops the restore with nothing set aside.

        A checkpoint that fails to read (partial, corrupt) is reported and skipped; once an older one restores,
        the skipped ones are moved aside to `<directory>.corrupt/` (kept for inspection) so the run can write
        those steps anew. A checkpoint that reads but does not fit the current state (another model config)
        raises CheckpointMismatchError, and so does a directory where no checkpoint restores: neither should
        silently restart a run from step 0.
        """
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                                _flat(template))
        bad: list[int] = []
        for step in reversed(self.steps()):
            if check_meta is not None:
                try:
                    meta = self.read_meta(step)
                except Exception as e:  # noqa: BLE001 - an unreadable meta: the full restore reports it below
                    log.debug("meta of step %d unreadable: %s", step, e)
                else:
                    check_meta(step, meta)
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                msg = (f"checkpoint step {step} in {self.directory} could not be restored "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); falling back to the previous one")
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
                bad.append(step)
                continue
            state = _unflat(dict(got["state"]), template)
            self._set_aside(bad)
            return step, state, dict(got["data"] or {}), dict(got["meta"] or {})
        if bad:
            raise RuntimeError(f"no checkpoint in {self.directory} could be restored (steps {sorted(bad)}); "
                               f"move the directory away to start afresh")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:  # one process renames (the folder is shared); the others wait for it
            aside = self.directory.with_name(self.directory.name + ".corrupt")
            aside.mkdir(exist_ok=True)
            for step in steps:
                src = self.directory / str(step)
                if src.exists():
                    src.rename(aside / f"{step}-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("nemotron_jax checkpoint set-aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
