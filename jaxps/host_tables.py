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

Worker groups (`group`): every pull of a training step carries the group's clock and
waits at the servers as the consistency model says; each step's pushes are followed by
a clock message, and under BSP the servers apply all groups' pushes of a step as one.
The clock gate replaces the strict repair. The model's dense parameters then live in
the PS too (`dense`: one table pulled whole each step, see jaxps.dense_table).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from jaxps.dense_table import DENSE_TABLE, DenseTable
from jaxps.groups import WorkerGroup
from jaxps.memory import aligned_empty
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.clock import DONE
from jaxps.ps.keyindex import dedup
from jaxps.ps.server import SYNC_STATS, TableSpec
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
                 max_inflight_pushes: int = 2, group: WorkerGroup | None = None,
                 dense: DenseTable | None = None):
        self.tables = {t.name: t for t in tables}
        self.group, self.dense = group, dense
        specs = [table_spec(t) for t in tables] + ([dense.spec] if dense is not None else [])
        self.ps = ps if ps is not None else embedded(specs)
        # servers may start empty: they learn the model's tables from this client
        self.ps.create_tables(specs)
        self._clock = 0                                    # steps this group completed (pull side)
        # SSP/ASP worker groups with periodic checkpoints: the servers cut every this many steps
        self.cut_every = 0
        self.pull_seconds = 0.0                            # a group's training pulls, waits included
        self.capacity = {t.name: t.capacity for t in tables}
        self.strict, self.max_inflight_pushes = strict, max_inflight_pushes
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxps-push")  # in order
        self._inflight: deque[Future] = deque()
        self._issued = 0                                   # pushes issued so far
        self._applied = 0                                  # pushes applied so far (they run in order)
        self._log: dict[int, tuple[Future, dict[str, np.ndarray]]] = {}  # push index -> (done, keys)
        self._lock = threading.Lock()
        self.repaired_rows = 0                             # rows pulled again by strict repairs

    @property
    def names(self) -> list[str]:
        """Every PS table of the model (the dense table last)."""
        return list(self.tables) + ([DENSE_TABLE] if self.dense is not None else [])

    def begin(self, step: int) -> None:
        """A worker group (re)starts at `step`: join the servers' clocks there."""
        self._clock = step
        if self.group is not None:
            self.ps.clock(self.group.index, step, self.group.count, self.group.policy, self.cut_every)

    def finish(self) -> None:
        """A worker group is done: its pushes land and it stops holding the others back."""
        self.flush()
        if self.group is not None:
            self.ps.clock(self.group.index, DONE, self.group.count, self.group.policy, self.cut_every)

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
        if self.dense is not None:
            plans[DENSE_TABLE] = HostPlan(self.dense.keys, None, self.dense.rows)
        return plans

    def pull(self, plans: dict[str, HostPlan], training: bool = True) -> tuple[dict[str, np.ndarray], int]:
        """Each table's [C, dim] block (the pulled rows, then zeros) and a mark: the
        number of pushes applied before the pull began (for `repair`: any later one, even
        one issued before the pull, may be missing from the rows). A worker group's
        training pulls are made at its clock (one step after the other, in order)."""
        with self._lock:
            mark = self._applied
        group, clock = -1, 0
        if self.group is not None and training:
            group, clock = self.group.index, self._clock
            self._clock += 1
        out = {}
        t0 = time.perf_counter()
        for name, p in plans.items():
            dim = self.dense.spec.dim if name == DENSE_TABLE else self.tables[name].dim
            block = aligned_empty((p.capacity, dim), np.float32)
            block[:p.keys.shape[0]] = self.ps.pull(name, p.keys, group, clock)
            block[p.keys.shape[0]:] = 0
            out[name] = block
        if group >= 0:
            self.pull_seconds += time.perf_counter() - t0
        return out, mark

    def pull_dense(self, final: bool = False) -> np.ndarray:
        """The dense table's rows now; `final`: once every group finished (BSP/SSP)."""
        group = self.group.index if final and self.group is not None else -1
        return self.ps.pull(DENSE_TABLE, self.dense.keys, group, DONE)

    def repair(self, plans: dict[str, HostPlan], rows: dict[str, np.ndarray], mark: int) -> None:
        """Strict mode: for pushes not applied at `mark`, wait for those that share keys with
        this batch and pull the shared keys again into `rows` (in place). For SSP/ASP worker
        groups that is read-my-writes (as in Bosen's SSP): a group's step sees all of its own
        earlier pushes, and only other groups' may be up to s steps stale."""
        if not self.strict or (self.group is not None and self.group.policy.bsp):
            return  # BSP groups: the clock gate already waited for every push of the last step
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

        group = self.group.index if self.group is not None else -1

        def send():
            for name, p in plans.items():
                self.ps.push(name, p.keys, np.asarray(grads[name])[:p.keys.shape[0]], step, group)
            if group >= 0:  # this step is complete: the servers may release the next pulls
                self.ps.clock(group, step, self.group.count, self.group.policy, self.cut_every)
            with self._lock:
                self._applied += 1

        with self._lock:
            future = self._pusher.submit(send)
            self._log[self._issued] = (future, {name: p.keys for name, p in plans.items()})
            self._log.pop(self._issued - self._KEEP_PUSHES, None)
            self._issued += 1
        self._inflight.append(future)

    def stats(self) -> dict:
        """Each table's server counters summed over the group, plus strict repairs."""
        out: dict = {}
        sync = []
        for per_server in self.ps.stats().values():
            if SYNC_STATS in per_server:
                sync.append(per_server.pop(SYNC_STATS))
            for table, counters in per_server.items():
                agg = out.setdefault(table, {})
                for k, v in counters.items():
                    agg[k] = agg.get(k, 0) + v
        for table in out:
            out[table]["repaired_rows"] = self.repaired_rows
        if sync:  # worker groups: clocks from the first server; waits summed over all
            out[SYNC_STATS] = dict(sync[0], waits=sum(s["waits"] for s in sync),
                                   wait_seconds=sum(s["wait_seconds"] for s in sync),
                                   max_gap=max(s["max_gap"] for s in sync),
                                   group_pull_seconds=self.pull_seconds)
        return out

    def snapshot(self, step: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Every table's stored rows, once every queued push has landed. A worker group
        passes the `step` it completed: the rows are read once every server settled it.
        Under BSP that is a consistent cut of the whole job: every group's pushes of steps
        <= step are applied, and none of step + 1 (they wait for this group's)."""
        self.flush()
        if self.group is not None and step is not None:
            if self.cut_every and step % self.cut_every == 0:  # SSP/ASP: the servers' cut at `step`
                return {name: self.ps.export(name, at=step) for name in self.names}
            self.wait_clock(step)
        return {name: self.ps.export(name) for name in self.names}

    def wait_clock(self, clock: int) -> None:
        """A worker group: block until every server would answer this group's pull at
        `clock`."""
        self.ps.wait_clock(self.group.index, clock)

    def wait_for_restore(self, step: int) -> None:
        """A resumed worker group other than group 0: wait until group 0 joined the clocks
        at `step`, which it does only after loading the PS snapshot (`begin`) -- so no group
        pulls rows the snapshot is about to overwrite. Needs a bound on staleness."""
        s = self.group.policy.staleness
        if s is None:
            raise ValueError(f"resuming {self.group.count} worker groups under asp: nothing makes the "
                             f"others wait for group 0 to load the PS snapshot; resume under bsp or ssp:N")
        self.wait_clock(step + s)  # ready once the slowest group (group 0, last) reached `step`

    def load(self, snapshot: dict[str, dict[str, np.ndarray]]) -> None:
        """Make the servers hold exactly the snapshot's rows (onto any number of servers:
        rows go where the ring says; rows stored since the snapshot are dropped first)."""
        for name in snapshot:
            if name not in self.names:
                raise ValueError(f"the snapshot has table {name!r}, the model does not")
        for name, rows in snapshot.items():
            self.ps.clear(name)
            self.ps.load(name, rows)

    def flush(self) -> None:
        """Wait until every queued push is applied (raises a push's error)."""
        while self._inflight:
            self._inflight.popleft().result()
