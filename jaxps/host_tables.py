"""HostTable namespaces in a step: dedup a batch's keys, pull their rows from the
parameter-server group, hand the device a fixed-shape block, push the row gradients back.

The device never holds the table: it receives `rows` [C, dim] (the batch's unique rows,
padded to a capacity C that grows like a routing bucket) and `inverse` [B, F], and returns
the summed gradient of each unique row.

Overlap: rows are pulled on the input thread, steps ahead, and pushes run on a background
thread (at most `max_inflight_pushes` queued), so the PS round trips hide behind device
steps. A prefetched pull may miss pushes issued after it started. `strict` repairs
exactly that: before a step, the keys it shares with those pushes are pulled again once
the pushes are applied, so training equals sequential pull -> step -> push (and the same
model with its tables on the mesh) step for step; without `strict` such rows are at most
a few steps stale, as in an SSP parameter server.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from jaxps.memory import aligned_empty
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.keyindex import dedup
from jaxps.ps.server import TableSpec
from jaxps.tables.routing import grown_capacity
from jaxps.tables.table import Table


def table_spec(t: Table) -> TableSpec:
    """How the servers see a HostTable namespace."""
    p = t.placement
    return TableSpec(t.name, t.dim, t.optimizer, kind=p.kind, rows=t.rows if p.kind == "hashed" else None,
                     init_scale=t.init_scale, seed=t.seed, min_count=p.min_count, max_rows=p.max_rows)


@dataclass
class HostPlan:
    keys: np.ndarray      # [U] unique uint64 keys (raw ids, or rows of a hashed table)
    inverse: np.ndarray   # [B, F] int32 slot of each occurrence in the [C] block
    capacity: int


class HostTables:
    """The host tables of one model, and the PS client that serves them."""

    _KEEP_PUSHES = 64  # push key sets remembered for repairs; older marks re-pull everything

    def __init__(self, tables: list[Table], ps: PSClient | None = None, strict: bool = True,
                 max_inflight_pushes: int = 2):
        self.tables = {t.name: t for t in tables}
        self.ps = ps if ps is not None else embedded([table_spec(t) for t in tables])
        # servers may start empty: they learn the model's tables from this client
        self.ps.create_tables([table_spec(t) for t in tables])
        self.capacity = {t.name: t.capacity for t in tables}
        self.strict, self.max_inflight_pushes = strict, max_inflight_pushes
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxps-push")  # in order
        self._inflight: deque[Future] = deque()
        self._issued = 0                                   # pushes issued so far
        self._log: dict[int, tuple[Future, dict[str, np.ndarray]]] = {}  # push index -> (done, keys)
        self._lock = threading.Lock()
        self.repaired_rows = 0                             # rows pulled again by strict repairs

    def plan(self, batch) -> dict[str, HostPlan]:
        plans = {}
        mask = batch.mask.reshape(-1)
        for name, t in self.tables.items():
            ids = getattr(batch, t.feature).reshape(-1)
            keys = t.rows_for(ids).astype(np.uint64) if t.placement.kind == "hashed" else ids
            uniq, inv = dedup(np.ascontiguousarray(keys[mask], np.uint64))
            inverse = aligned_empty(mask.shape[0], np.int32)
            inverse[~mask] = 0
            inverse[mask] = inv
            cap = self.capacity[name]
            if cap is None or uniq.shape[0] > cap:
                cap = self.capacity[name] = grown_capacity(uniq.shape[0])
            plans[name] = HostPlan(uniq, inverse.reshape(batch.mask.shape), cap)
        return plans

    def pull(self, plans: dict[str, HostPlan]) -> tuple[dict[str, np.ndarray], int]:
        """Each table's [C, dim] block (the pulled rows, then zeros) and a mark: the
        number of pushes issued before the pull began (for `repair`)."""
        with self._lock:
            mark = self._issued
        out = {}
        for name, p in plans.items():
            block = aligned_empty((p.capacity, self.tables[name].dim), np.float32)
            block[:p.keys.shape[0]] = self.ps.pull(name, p.keys)
            block[p.keys.shape[0]:] = 0
            out[name] = block
        return out, mark

    def repair(self, plans: dict[str, HostPlan], rows: dict[str, np.ndarray], mark: int) -> None:
        """Strict mode: for pushes issued since `mark`, wait for those that share keys with
        this batch and pull the shared keys again into `rows` (in place)."""
        if not self.strict:
            return
        with self._lock:
            issued = self._issued
            log = dict(self._log)
        if issued == mark:
            return
        for name, p in plans.items():
            since = [log.get(i) for i in range(mark, issued)]
            if any(entry is None for entry in since):  # too old to know: pull the batch again
                shared = np.ones(p.keys.shape[0], bool)
                for f in list(self._inflight):
                    f.result()
            else:
                shared = np.zeros(p.keys.shape[0], bool)
                for done, keys in since:
                    hit = np.isin(p.keys, keys[name], assume_unique=True)
                    if hit.any():
                        done.result()  # pushes run in order: earlier ones are applied too
                        shared |= hit
            if shared.any():
                idx = np.flatnonzero(shared)
                rows[name][idx] = self.ps.pull(name, p.keys[idx])
                self.repaired_rows += idx.size

    def push(self, plans: dict[str, HostPlan], grads: dict, step: int) -> None:
        """Queue the push of this step's row gradients (device arrays are read on the push
        thread, so the caller does not wait for the step). Blocks only while
        `max_inflight_pushes` pushes are queued."""
        while len(self._inflight) >= self.max_inflight_pushes:
            self._inflight.popleft().result()

        def send():
            for name, p in plans.items():
                self.ps.push(name, p.keys, np.asarray(grads[name])[:p.keys.shape[0]], step)

        with self._lock:
            future = self._pusher.submit(send)
            self._log[self._issued] = (future, {name: p.keys for name, p in plans.items()})
            self._log.pop(self._issued - self._KEEP_PUSHES, None)
            self._issued += 1
        self._inflight.append(future)

    def stats(self) -> dict:
        """Each table's server counters summed over the group, plus strict repairs."""
        out: dict = {}
        for per_server in self.ps.stats().values():
            for table, counters in per_server.items():
                agg = out.setdefault(table, {})
                for k, v in counters.items():
                    agg[k] = agg.get(k, 0) + v
        for table in out:
            out[table]["repaired_rows"] = self.repaired_rows
        return out

    def snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """Every table's stored rows, once every queued push has landed."""
        self.flush()
        return {name: self.ps.export(name) for name in self.tables}

    def load(self, snapshot: dict[str, dict[str, np.ndarray]]) -> None:
        """Put snapshot rows back (onto any number of servers: rows go where the ring says)."""
        for name, rows in snapshot.items():
            if name not in self.tables:
                raise ValueError(f"the snapshot has table {name!r}, the model does not")
            self.ps.load(name, rows)

    def flush(self) -> None:
        """Wait until every queued push is applied (raises a push's error)."""
        while self._inflight:
            self._inflight.popleft().result()
