"""Checkpoints with orbax's CheckpointManager: the whole TrainState plus the data iterator's state.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous steps intact. The state is saved as a flat {path: array} dict and restored into the
structure of a freshly built template, so any pytree the trainer holds (nnx.State, optax states) round-trips.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

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


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, every: int, keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        self.every = every
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict | None, extra: dict | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(dict(extra or {}, step=int(step))))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, template) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) from the newest checkpoint that restores; None when there is none.

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
        aside = self.directory.with_name(self.directory.name + ".corrupt")
        aside.mkdir(exist_ok=True)
        for step in steps:
            src = self.directory / str(step)
            if src.exists():
                src.rename(aside / f"{step}-{int(time.time())}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
