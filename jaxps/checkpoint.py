"""Checkpoints through Orbax `CheckpointManager`: asynchronous (training goes on while
it writes), keep-N retention, and restore onto any mesh by handing Orbax the target
shardings. Metadata (step, logical shapes, bucket capacities) is JSON; nothing is pickled.
(The data position is not saved yet: resuming mid-pass comes with hot checkpoints.)
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 enable_async_checkpointing=asynchronous),
        )

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Start writing `state` (returns once the device arrays are copied)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with a step (the latest by default)."""
        step = self._step(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def restore(self, like: Any, step: int | None = None, pad_rows: bool = False) -> tuple[Any, dict]:
        """Restore into the shapes, dtypes and shardings of `like` (arrays or
        ShapeDtypeStructs), whatever mesh the checkpoint was written from.

        pad_rows: let Orbax pad or truncate arrays whose stored shape differs (table rows
        are padded to a multiple of the shard count, which changes with the mesh); the
        caller checks first that only such padding differs."""
        step = self._step(step)
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract, strict=not pad_rows), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"] or {})

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
