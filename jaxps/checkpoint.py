"""Checkpoints through Orbax `CheckpointManager`: asynchronous (training goes on while
it writes), keep-N retention, and restore onto any mesh by handing Orbax the target
shardings. Metadata (step, logical shapes, bucket capacities, data position) is JSON; the
PS snapshot, when there is one, is a third item of the same step (jaxps.snapshot), so a
step is on disk only once the device state and the PS rows are both written. Nothing is
pickled.
"""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxps.snapshot import Pieces, Snapshot, SnapshotHandler, SnapshotSave, read_rows

PS_ITEM = "ps"

# Orbax numbers the async saves of a process with one global operation id, so two managers
# saving at once in one process (worker groups run as threads) mix up each other's commit
# signals. A save here first waits for every other manager's save in this process.
_SAVE_LOCK = threading.Lock()
_LIVE: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def _fits_twice(tree: Any) -> bool:
    """A second copy of `tree`'s arrays fits in every local device's free memory (CPU
    devices report no limit)."""
    if not any(d.memory_stats() for d in jax.local_devices()):
        return True
    need: dict = {}
    for a in jax.tree.leaves(tree):
        for s in getattr(a, "addressable_shards", ()):
            need[s.device] = need.get(s.device, 0) + s.data.nbytes
    for d, n in need.items():
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats and n > stats["bytes_limit"] - stats.get("bytes_in_use", 0):
            return False
    return True


def _state_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's standard handler of the device state, writing its arrays without zstd.

    Why: a hot checkpoint's write shares the cores with training, and zstd (level 1) was
    a third of Orbax's CPU per save: 30 of 90 ms for a 15 MB Wide&Deep state on the 2-core
    box, for a checkpoint 2.2x smaller only because a young table's slots are zeros
    (trained float32 values barely compress). Restore reads either kind: tensorstore finds
    the codec in each array's metadata. (The handler stays a StandardCheckpointHandler --
    Orbax matches StandardSave/StandardRestore to that class -- with the PyTree handler it
    builds, less compression.)"""
    handler = ocp.StandardCheckpointHandler()
    if state_uncompressed():
        handler._impl = ocp.PyTreeCheckpointHandler(use_compression=False)
    return handler


def state_uncompressed() -> bool:
    """Whether this Orbax lets `_state_handler` write the device state without zstd. Orbax
    (0.12) has no public switch; `_impl` is private, so it is replaced only where it is what
    we expect: another Orbax keeps its default (compressed) instead of the save breaking."""
    return isinstance(getattr(ocp.StandardCheckpointHandler(), "_impl", None), ocp.PyTreeCheckpointHandler)


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True,
                 read_only: bool = False, background: bool = True):
        """read_only: look at another writer's checkpoints (e.g. group 0's) without
        creating, saving or cleaning anything. background: call Orbax's save on a
        checkpoint thread where that is safe (`save`)."""
        self.directory = os.path.abspath(directory)
        self.background = background and asynchronous
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxps-checkpoint")
        self._queued: Future | None = None
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, read_only=read_only,
                # a step a killed run was writing is left as a temporary directory: drop it
                cleanup_tmp_directories=not read_only),
            item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler(),
                           PS_ITEM: SnapshotHandler()},
        )
        _LIVE.add(self)

    def save(self, step: int, state: Any, meta: dict | None = None,
             ps: "Snapshot | Pieces | Future | None" = None) -> None:
        """Start writing `state` and `ps`, the host tables' rows or a future of them
        (awaited and written on Orbax's commit thread; the step appears once both are
        written). The caller only dispatches a copy of the device arrays (its next step
        may donate them) and queues the save: Orbax's own blocking work -- its threads and
        directories, the copy off the device -- runs on a checkpoint thread. Not so with
        several processes (Orbax's barriers there are device collectives, which must be
        issued in the same order everywhere) or where a second copy of the state would not
        fit a device: then Orbax is called here and returns once it copied the arrays."""
        self._drain()  # one save queued at a time
        if self.background and jax.process_count() == 1 and _fits_twice(state):
            # as Orbax's own save would: the previous step is on disk before this one is
            # started, so a crash right after loses at most this one (free once it is)
            self.manager.wait_until_finished()
            state = jax.tree.map(lambda a: jax.device_put(a, may_alias=False) if isinstance(a, jax.Array) else a,
                                 state)
            self._queued = self._saver.submit(self._save, step, state, meta, ps)
        else:
            self._save(step, state, meta, ps)

    def _save(self, step: int, state: Any, meta: dict | None, ps: "Snapshot | Pieces | Future | None") -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if ps is not None:
            items[PS_ITEM] = SnapshotSave(ps)
        with _SAVE_LOCK:
            for other in list(_LIVE):
                if other is not self:
                    other.manager.wait_until_finished()
            self.manager.save(step, args=ocp.args.Composite(**items))

    def _drain(self) -> None:
        """Wait until the queued save handed its items to Orbax (raises its error)."""
        queued, self._queued = self._queued, None
        if queued is not None:
            queued.result()

    def steps(self) -> list[int]:
        """Steps whose every item is written (a step still being written is not listed)."""
        self._drain()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        self._drain()
        return self.manager.latest_step()

    def has_ps(self, step: int) -> bool:
        self._drain()
        return os.path.isdir(os.path.join(self.directory, str(step), PS_ITEM))

    def ps_snapshot(self, step: int) -> Snapshot:
        """The PS rows of a (complete) step, read by this process alone: Orbax's restore
        is a collective of every process of the job, but one reader restores the servers
        (Trainer.restore) while the others need not read the rows at all."""
        self._drain()
        return read_rows(os.path.join(self.directory, str(step), PS_ITEM))

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

    def delete(self, step: int) -> None:
        self._drain()
        self.manager.delete(step)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def wait(self) -> None:
        """Until every save started is written."""
        self._drain()
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        self._saver.shutdown()
