"""The PS snapshot as an item of an Orbax checkpoint step: `<step>/ps/rows.npz`.

Orbax writes every item of a step in the background and renames the step directory into
place only once all of them are written, so a step that exists on disk has both the
device state and the PS rows, and keep-N retention drops them together. The rows are
plain arrays in an .npz (read back with allow_pickle=False); nothing is pickled.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from concurrent.futures import Future
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_args
from orbax.checkpoint import future as ocp_future

FILENAME = "rows.npz"
Snapshot = dict[str, dict[str, np.ndarray]]   # table -> {"keys", "values", "slot_<name>", ...}


def flatten(snapshot: Snapshot) -> dict[str, np.ndarray]:
    """{"<table>/<field>": array}: one flat namespace for np.savez."""
    return {f"{table}/{field}": a for table, rows in snapshot.items() for field, a in rows.items()}


def unflatten(arrays: dict[str, np.ndarray]) -> Snapshot:
    out: Snapshot = {}
    for key, a in arrays.items():
        table, field = key.split("/", 1)
        out.setdefault(table, {})[field] = a
    return out


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` (module-level so tests can slow it down)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class SnapshotHandler(ocp.handlers.AsyncCheckpointHandler):
    """Orbax handler of the PS item: the write runs on Orbax's commit thread, and so does
    the wait for a snapshot still being copied (`SnapshotSave(future)`): the caller's
    save returns without either."""

    async def _write(self, rows: "Snapshot | Future[Snapshot]", directory) -> None:
        if isinstance(rows, Future):
            rows = await asyncio.wrap_future(rows)
        if ocp.multihost.process_index() == 0:
            write_npz(os.path.join(os.fspath(directory), FILENAME), flatten(rows))

    async def async_save(self, directory, args: "SnapshotSave") -> list[Any]:
        return [ocp_future.CommitFutureAwaitingContractedSignals(self._write(args.rows, directory),
                                                                 name="jaxps_ps_snapshot")]

    def save(self, directory, args: "SnapshotSave") -> None:
        rows = args.rows.result() if isinstance(args.rows, Future) else args.rows
        if ocp.multihost.process_index() == 0:
            write_npz(os.path.join(os.fspath(directory), FILENAME), flatten(rows))

    def restore(self, directory, args: "SnapshotRestore | None" = None) -> dict[str, np.ndarray]:
        return read_npz(os.path.join(os.fspath(directory), FILENAME))


@checkpoint_args.register_with_handler(SnapshotHandler, for_save=True)
@dataclasses.dataclass
class SnapshotSave(ocp.args.CheckpointArgs):
    rows: "Snapshot | Future[Snapshot]"   # a future: the rows are still being copied


@checkpoint_args.register_with_handler(SnapshotHandler, for_restore=True)
@dataclasses.dataclass
class SnapshotRestore(ocp.args.CheckpointArgs):
    pass
