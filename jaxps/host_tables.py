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
the PS too (`dense`: one table pulled whole each step, see jaxps.dense_table). A group of
several processes reports one clock per process (`WorkerGroup.clock_id`), each pulling
and pushing its share of every table, the dense one included (rows split in contiguous
blocks: each dense row's gradient, summed over the group's whole batch, is pushed once).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxps.dense_table import DENSE_TABLE, DenseTable
from jaxps.groups import WorkerGroup
from jaxps.memory import aligned_empty
from jaxps.ps.client import DaemonPool, PSClient, embedded, retryable
from jaxps.ps.clock import DONE, GATE_TIMEOUT, SyncTimeout
from jaxps.ps.keyindex import KeyIndex
from jaxps.ps.server import SYNC_STATS, TableSpec
from jaxps.snapshot import Pieces, Snapshot, joined
from jaxps.tables.host_plan import Dedup, dedup_ids
from jaxps.tables.routing import grown_capacity
from jaxps.tables.table import Table


def table_spec(t: Table) -> TableSpec:
    """How the servers see a HostTable namespace."""
    p = t.placement
    return TableSpec(t.name, t.dim, t.optimizer, kind=p.kind, rows=t.rows if p.kind == "hashed" else None,
                     init_scale=t.init_scale, seed=t.seed, min_count=p.min_count, max_rows=p.max_rows)


CLIENT_STATS = "__client__"  # the key of this client's time split in `stats()`


@dataclass
class HostPlan:
    keys: np.ndarray      # [U] unique uint64 keys (raw ids, or rows of a hashed table)
    inverse: np.ndarray   # [B, F] int32 slot of each occurrence in the [C] block
    capacity: int
    index: KeyIndex | None = None  # keys -> their place in `keys` (dedup's; built on demand)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Each key's place in `self.keys` (-1 where absent)."""
        self._ensure_index()
        return self.index.find(keys)

    def _ensure_index(self) -> None:
        if self.index is None:
            self.index = KeyIndex(capacity=max(16, self.keys.shape[0]))
            self.index.find_or_insert(self.keys)

    def mark_shared(self, keys: np.ndarray, shared: np.ndarray) -> bool:
        """shared[i] = True where self.keys[i] is one of `keys`; whether any is: a strict
        repair's overlap test, one nogil numba probe (np.isin sorts both sets under the
        GIL: ~10x slower; a find plus numpy passes handed the GIL over 3 times)."""
        self._ensure_index()
        return self.index.mark_found(keys, shared) > 0


@dataclass
class ProcessShare:
    """One process's view of a step of a program that spans several processes. Every
    process dedups the keys of the whole batch alike and pulls and pushes only the keys it
    owns (by a hash of the key: a key stays with one process, so its pushes and the strict
    repair of its pulls stay in that process); the device sees a [processes * C, dim] block
    split over `data`, process `rank`'s C rows at rank * C, and each row's gradient summed
    over every process's examples comes back in the owner's rows."""
    rank: int                          # this process's place along `data` (its block)
    count: int                         # processes
    local_shards: int                  # this process's `data` shards: C is a multiple of it
    mask: np.ndarray                   # [global B, F] of the whole batch
    ids: Callable[[str], np.ndarray]   # feature -> its [global B, F] ids
    lo: int                            # this process's first example in the whole batch


@dataclass
class LocalApply:
    """A strict repair's request to the push thread: before it sends push `index`, compute
    that push's outcome for the keys the next step shares with it (`keys`, per table), so
    the next step need not wait for the servers to apply it (`HostTables.repair`)."""
    keys: dict[str, np.ndarray]
    where: dict[str, np.ndarray]             # their places in the next step's plan
    rows: Future[dict[str, np.ndarray]]      # -> {table: the new rows of `keys`}


def _dedup(t: Table, ids: np.ndarray, mask: np.ndarray, owners: int = 1) -> Dedup:
    """A batch's unique PS keys of a table: the raw ids, or a hashed table's rows."""
    if t.placement.kind == "hashed":
        return dedup_ids(ids, mask, t.rows, t.salt, owners)
    return dedup_ids(ids, mask, owners=owners)


class HostTables:
    """The host tables of one model, and the PS client that serves them."""

    _KEEP_PUSHES = 64  # push key sets remembered for repairs; older marks re-pull everything

    def __init__(self, tables: list[Table], ps: PSClient | None = None, strict: bool = True,
                 max_inflight_pushes: int = 2, group: WorkerGroup | None = None,
                 dense: DenseTable | None = None, ps_threads: int = 1):
        """ps: the server group (default: an embedded one of one server with `ps_threads`
        threads per request, see TrainConfig.ps_threads)."""
        self.tables = {t.name: t for t in tables}
        self.group, self.dense = group, dense
        specs = [table_spec(t) for t in tables] + ([dense.spec] if dense is not None else [])
        self.ps = ps if ps is not None else embedded(specs, threads=ps_threads)
        self._owns_ps = ps is None  # close() closes only the group it made
        # servers may start empty: they learn the model's tables from this client
        self.ps.create_tables(specs)
        self._clock = 0                                    # steps this group completed (pull side)
        # SSP/ASP worker groups with periodic checkpoints: the servers cut every this many steps
        self.cut_every = 0
        self.pull_seconds = 0.0                            # a group's training pulls, waits included
        # Where the host path's time goes (seconds, summed; `stats()["__client__"]`). On a
        # fast accelerator these, not the device step, set the step time of a HostTable model:
        # plan and pull (input thread), repair_probe/repair_wait/repair_pull (training thread,
        # strict: finding the keys shared with pushes in flight, waiting for them -- or for
        # a local apply's rows --, pulling those keys again), local_apply (push thread, with
        # ps_local_apply: reading and updating the rows the next step shares), push_blocked
        # (training thread, at the in-flight bound), grads_wait (push thread: the step's
        # gradients come off the device) and push (push thread: the servers apply them).
        self.seconds = dict.fromkeys(("plan", "pull", "repair_probe", "repair_wait", "repair_pull", "push_blocked",
                                      "grads_wait", "local_apply", "push"), 0.0)
        self.capacity = {t.name: t.capacity for t in tables}
        self.strict, self.max_inflight_pushes = strict, max_inflight_pushes
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxps-push")  # in order
        # daemon: an SSP/ASP cut waits at the servers for every group, and a dead group's
        # never comes; that wait must not hold up the process's exit (a finished job waits
        # for its checkpoints itself, in Trainer.fit)
        self._copier = DaemonPool(max_workers=1, thread_name_prefix="jaxps-snapshot")
        self._inflight: deque[Future] = deque()
        self._issued = 0                                   # pushes issued so far
        self._applied = 0                                  # pushes applied so far (they run in order)
        self._log: dict[int, tuple[Future, dict[str, np.ndarray]]] = {}  # push index -> (done, keys)
        self._lock = threading.Lock()
        self.repaired_rows = 0                             # rows pulled again by strict repairs
        self.local_rows_applied = 0                        # rows a strict repair took from a local apply
        # Strict local apply (opt-in, TrainConfig.ps_local_apply): a strict repair needs the
        # previous step's push applied to the rows the next step shares with it. Instead of
        # waiting for the servers (the push of every row of the step, then a re-pull), the
        # push thread reads those rows and their optimizer slots before it sends the push
        # and runs the same row-wise update (`RowOptimizer.update(numpy, ...)`, which the
        # servers' fused kernels equal bit for bit). Exact only where this client is the
        # rows' one writer and the servers store every pushed key as the update says: one
        # in-process server (the embedded default), no worker group, no admission or
        # eviction (`local_apply_eligible`).
        self.local_apply_eligible = (strict and group is None and dense is None and self.ps.reads_slots
                                     and self.ps.ring_source is None
                                     and all(t.placement.min_count == 1 and t.placement.max_rows is None
                                             for t in tables))
        self.local_apply = False
        self._claims: dict[int, LocalApply] = {}          # push index -> its local apply request
        self._decided = 0                                  # pushes whose send passed the claim check
        # a gradient block's rows of this process (several processes: its shards' rows)
        self.local_rows: Callable[[object], np.ndarray] = np.asarray

    @property
    def names(self) -> list[str]:
        """Every PS table of the model (the dense table last)."""
        return list(self.tables) + ([DENSE_TABLE] if self.dense is not None else [])

    def begin(self, step: int) -> None:
        """A worker group (re)starts at `step`: join the servers' clocks there."""
        self._clock = step
        if self.group is not None:
            self.ps.clock(self.group.clock_id, step, self.group.clocks, self.group.policy, self.cut_every)

    def finish(self) -> None:
        """A worker group is done: its pushes land and it stops holding the others back."""
        self.flush()
        if self.group is not None:
            self.ps.clock(self.group.clock_id, DONE, self.group.clocks, self.group.policy, self.cut_every)

    def plan(self, batch, share: ProcessShare | None = None) -> dict[str, HostPlan]:
        """Each table's unique keys and inverse; `share`: of this process's share of a
        multi-process step. One nogil numba pass per table (jaxps.tables.host_plan): this
        runs on the input thread, and every GIL hand-off can wait for the training thread."""
        t0 = time.perf_counter()
        plans = {}
        for name, t in self.tables.items():
            if share is not None:
                plans[name] = self._plan_share(name, t, batch.mask.shape[0], share)
                continue
            d = _dedup(t, getattr(batch, t.feature), batch.mask)
            plans[name] = HostPlan(d.index.keys(), d.slots.reshape(batch.mask.shape),
                                   self._capacity(name, d.unique), d.index)
        if self.dense is not None:
            if share is None:
                plans[DENSE_TABLE] = HostPlan(self.dense.keys, None, self.dense.rows)
            else:  # this process's contiguous block of the dense rows
                keys, cap = self.dense.share(share.rank, share.count, share.local_shards)
                plans[DENSE_TABLE] = HostPlan(keys, None, cap)
        self.seconds["plan"] += time.perf_counter() - t0
        return plans

    def _capacity(self, name: str, needed: int, multiple: int = 1) -> int:
        """The block capacity C of a table for `needed` rows: kept while they fit, grown
        (a new compiled step) when not; a multiple of `multiple` (a process's data shards)."""
        cap = self.capacity[name]
        if cap is None or needed > cap:
            cap = grown_capacity(needed)
        cap = self.capacity[name] = -(-cap // multiple) * multiple
        return cap

    def _plan_share(self, name: str, t: Table, rows: int, share: ProcessShare) -> HostPlan:
        """This process's plan of a table in a multi-process step (ProcessShare): its owned
        keys, the inverse of its `rows` examples into the whole [count * C] block, and a
        capacity C every process computes alike (from the same whole batch)."""
        d = _dedup(t, share.ids(t.feature), share.mask, share.count)  # alike in every process
        cap = self._capacity(name, int(d.counts.max(initial=0)), share.local_shards)
        width = int(np.prod(share.mask.shape[1:]))  # occurrences per example
        mine, inverse = d.share(share.mask.reshape(-1), share.lo * width, (share.lo + rows) * width, cap, share.rank)
        return HostPlan(mine, inverse.reshape((rows,) + share.mask.shape[1:]), cap)

    def pull(self, plans: dict[str, HostPlan], training: bool = True) -> tuple[dict[str, np.ndarray], int]:
        """Each table's [C, dim] block (the pulled rows, then zeros) and a mark: the
        number of pushes applied before the pull began (for `repair`: any later one, even
        one issued before the pull, may be missing from the rows). A worker group's
        training pulls are made at its clock (one step after the other, in order)."""
        with self._lock:
            mark = self._applied
        group, clock = -1, 0
        if self.group is not None and training:
            group, clock = self.group.clock_id, self._clock
            self._clock += 1
        out = {}
        t0 = time.perf_counter()
        for name, p in plans.items():
            dim = self.dense.spec.dim if name == DENSE_TABLE else self.tables[name].dim
            block = aligned_empty((p.capacity, dim), np.float32)
            # the rows land in place; a training pull's lookups serve its push (jaxps.ps.memo)
            self.ps.pull(name, p.keys, group, clock, out=block[:p.keys.shape[0]], memo=training)
            block[p.keys.shape[0]:] = 0
            out[name] = block
        took = time.perf_counter() - t0
        self.seconds["pull"] += took
        if group >= 0:
            self.pull_seconds += took
        return out, mark

    def pull_dense(self, final: bool = False) -> np.ndarray:
        """The dense table's rows now; `final`: once every group finished (BSP/SSP)."""
        group = self.group.clock_id if final and self.group is not None else -1
        return self.ps.pull(DENSE_TABLE, self.dense.keys, group, DONE)

    def repair(self, plans: dict[str, HostPlan], rows: dict[str, np.ndarray], mark: int) -> None:
        """Strict mode: for pushes not applied at `mark`, wait for those that share keys with
        this batch and pull the shared keys again into `rows` (in place); with the local
        apply (see __init__), the newest push's outcome on the shared keys comes from the
        push thread instead, computed before that push is sent. For SSP/ASP worker groups
        that is read-my-writes (as in Bosen's SSP): a group's step sees all of its own
        earlier pushes, and only other groups' may be up to s steps stale."""
        if not self.strict or (self.group is not None and self.group.policy.bsp):
            return  # BSP groups: the clock gate already waited for every push of the last step
        with self._lock:
            issued = self._issued
            log = dict(self._log)
        if issued == mark:
            return
        since = [log.get(i) for i in range(mark, issued)]
        local = self.local_apply and self.local_apply_eligible
        claim = self._claim_local_apply(plans, since[-1] and since[-1][1], issued - 1) if local else None
        waited = since[:-1] if claim is not None else since  # the last push: applied locally
        for name, p in plans.items():
            # too old to know, or the dense table (every push carries all of its rows): pull
            # the batch again, with no per-step index of keys that are all shared anyway
            if name == DENSE_TABLE or any(entry is None for entry in waited):
                shared = np.ones(p.keys.shape[0], bool)
                for f in list(self._inflight):
                    f.result()
            else:
                # Probe every push first, then wait once: the probes (~1 ms per 45k keys,
                # more on a busy host) overlap the pushes still running instead of lying
                # between the last push landing and the step (strict steps wait for it)
                t0 = time.perf_counter()
                shared = np.zeros(p.keys.shape[0], bool)
                hits = [done for done, keys in waited if p.mark_shared(keys[name], shared)]
                if claim is not None:  # the local apply reads these after every older push landed
                    shared[claim.where[name]] = False
                t1 = time.perf_counter()
                self.seconds["repair_probe"] += t1 - t0
                for done in reversed(hits if shared.any() else []):  # pushes run in order: once the
                    done.result()  # last one is applied the others are (this raises their errors)
                self.seconds["repair_wait"] += time.perf_counter() - t1
            if shared.any():
                t0 = time.perf_counter()
                idx = np.flatnonzero(shared)
                rows[name][idx] = self.ps.pull(name, p.keys[idx], memo=False)
                self.repaired_rows += idx.size
                self.seconds["repair_pull"] += time.perf_counter() - t0
        if claim is not None:  # after the re-pulls: the last push's outcome is the newest
            t0 = time.perf_counter()
            new_rows = claim.rows.result()
            self.seconds["repair_wait"] += time.perf_counter() - t0
            for name, where in claim.where.items():
                rows[name][where] = new_rows[name]
                self.local_rows_applied += where.shape[0]

    def _claim_local_apply(self, plans: dict[str, HostPlan], last_keys: dict[str, np.ndarray] | None,
                           index: int) -> LocalApply | None:
        """Ask push `index` (the newest; `last_keys` its keys per table) for its outcome on
        the keys these plans share with it; None where it is already being sent, is
        forgotten, or shares nothing."""
        if last_keys is None:
            return None
        t0 = time.perf_counter()
        keys, where = {}, {}
        for name, p in plans.items():
            shared = np.zeros(p.keys.shape[0], bool)
            p.mark_shared(last_keys[name], shared)
            where[name] = np.flatnonzero(shared)
            keys[name] = p.keys[where[name]]
        self.seconds["repair_probe"] += time.perf_counter() - t0
        if not any(w.size for w in where.values()):
            return None  # nothing shared: the step need not wait for that push at all
        claim = LocalApply(keys, where, Future())
        with self._lock:
            if self._decided > index:
                return None
            self._claims[index] = claim
        return claim

    def _apply_locally(self, plans: dict[str, HostPlan], host_grads: dict[str, np.ndarray],
                       keys: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """The rows `keys` will hold once this step's push is applied: their rows and
        optimizer slots as the servers hold them now (every earlier push of this client is
        applied: pushes are sent in order), updated as a server updates them."""
        out = {}
        for name, k in keys.items():
            if not k.size:
                out[name] = np.zeros((0, self.ps.tables[name].dim), np.float32)
                continue
            rows, slots = self.ps.pull_with_slots(name, k)
            pos = plans[name].positions(k)
            assert pos.min(initial=0) >= 0, "a shared key missing from its own push's plan"
            grads = np.ascontiguousarray(host_grads[name][pos], np.float32)
            new, _ = self.ps.tables[name].optimizer.update(np, rows, slots, grads, np.float32(step))
            out[name] = np.asarray(new, np.float32)
        return out

    def push(self, plans: dict[str, HostPlan], grads: dict, step: int) -> None:
        """Queue the push of this step's row gradients (device arrays are read on the push
        thread, so the caller does not wait for the step). Blocks only while
        `max_inflight_pushes` pushes are queued."""
        t0 = time.perf_counter()
        while len(self._inflight) >= self.max_inflight_pushes:
            self._inflight.popleft().result()
        self.seconds["push_blocked"] += time.perf_counter() - t0

        group = self.group.clock_id if self.group is not None else -1

        def send():
            claim, error = None, None
            try:
                t0 = time.perf_counter()
                host_grads = {name: self.local_rows(grads[name]) for name in plans}  # waits for the step
                t1 = time.perf_counter()
                with self._lock:  # from here on a repair no longer asks this push for a local apply
                    claim = self._claims.pop(index, None)
                    self._decided = index + 1
                if claim is not None:
                    # the servers' rows must hold every earlier push: one that failed (sends run
                    # in order, so it is done) fails this local apply with its error
                    earlier = self._log.get(index - 1)
                    failed = earlier[0].exception() if earlier is not None else None
                    if failed is not None:
                        raise failed
                    claim.rows.set_result(self._apply_locally(plans, host_grads, claim.keys, step))
                t2 = time.perf_counter()
                for name, p in plans.items():
                    self.ps.push(name, p.keys, host_grads[name][:p.keys.shape[0]], step, group)
                self.seconds["grads_wait"] += t1 - t0
                self.seconds["local_apply"] += t2 - t1
                self.seconds["push"] += time.perf_counter() - t2
                if group >= 0:  # this step is complete: the servers may release the next pulls
                    self.ps.clock(group, step, self.group.clocks, self.group.policy, self.cut_every)
                with self._lock:
                    self._applied += 1
            except BaseException as e:
                error = e
                raise
            finally:  # a repair waiting on this push's local apply must not wait forever
                with self._lock:
                    self._decided = max(self._decided, index + 1)
                    late = self._claims.pop(index, None)
                for c in (claim, late):
                    if c is not None and not c.rows.done():
                        c.rows.set_exception(error or RuntimeError(f"push {index} ended before its local apply"))

        with self._lock:
            index = self._issued
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
            out[table]["local_rows_applied"] = self.local_rows_applied
        out[CLIENT_STATS] = {f"{k}_seconds": v for k, v in self.seconds.items()}
        if sync:  # worker groups: clocks from the first server; waits summed over all
            out[SYNC_STATS] = dict(sync[0], waits=sum(s["waits"] for s in sync),
                                   wait_seconds=sum(s["wait_seconds"] for s in sync),
                                   max_gap=max(s["max_gap"] for s in sync),
                                   group_pull_seconds=self.pull_seconds)
        return out

    def snapshot(self, step: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Every table's stored rows once every queued push has landed (`snapshot_async`,
        waited for, its pieces joined)."""
        return joined(self.snapshot_async(step).result())

    def snapshot_async(self, step: int | None = None, wait_for_mark: bool = False) -> "Future[Snapshot | Pieces]":
        """Every table's stored rows right after the pushes queued so far, without making
        the training thread or the next pushes wait for a copy. The push thread runs
        pushes one at a time, in order: between the last queued push and the next one it
        marks the tables on the servers (instant); a copy thread then copies the marked
        rows while pushes go on, the servers keeping the pre-images of rows pushed since
        (jaxps.ps.cow). So the snapshot holds exactly the pushes queued before it.

        A worker group passes the `step` it completed: the rows are read once every server
        settled it. Under BSP that is a consistent cut of the whole job: every group's
        pushes of steps <= step are applied, and none of step + 1 (they wait for this
        group's, which queues behind the mark). Servers that may fail over (`ring_source`)
        are copied at once on the push thread: a mark would die with its server.
        wait_for_mark: return once the rows are marked (not copied). A table's rows may come
        in pieces (one per partition: jaxps.snapshot writes them without joining them)."""
        marked = self._pusher.submit(self._mark, step, list(self._inflight))
        if wait_for_mark:
            marked.result()
        return self._copier.submit(lambda: marked.result()())

    def _mark(self, step: int | None, before: list[Future]):
        """(On the push thread.) Snapshot the tables after the pushes `before` -- raising the
        error of any of them, so a snapshot never misses a failed push -- and return the
        function that copies the rows."""
        for f in before:
            f.result()  # done already: they ran earlier on this thread
        if self.group is not None and step is not None:
            if self.cut_every and step % self.cut_every == 0:  # SSP/ASP: the servers' cut at `step`
                return lambda: {name: self.ps.export(name, at=step) for name in self.names}
            self.wait_clock(step)
        if self.ps.ring_source is not None:
            rows = {name: self.ps.export(name) for name in self.names}
            return lambda: rows
        marks = {name: self.ps.mark(name) for name in self.names}
        return lambda: {name: self.ps.export_pieces(name, marks=m) for name, m in marks.items()}

    def wait_clock(self, clock: int) -> None:
        """A worker group: block until every server would answer this group's pull at
        `clock`."""
        self.ps.wait_clock(self.group.clock_id, clock)

    RESTORE_TIMEOUT = GATE_TIMEOUT  # seconds a resumed process waits for the others

    def wait_for_restore(self, step: int) -> None:
        """A resumed worker-group process (of any group; after `begin(step)`): wait until
        every process of every group joined the servers' clocks at `step`. Group 0 joins
        only after loading the PS snapshot, so no group pulls rows the load is about to
        overwrite (and drop: `load` clears first) -- under asp too, which has no gate. And
        no pull is made while fresh servers still count a process that has not announced
        itself at clock 0 (its clock is `step`): the gaps they record (`max_gap`) stay
        those of the training, not of the restart. The servers' clocks are polled (their
        gate cannot wait for a clock to reach `step` under asp); once per resume. The
        servers must be fresh ones (`jaxps launch` starts them with the job): servers that
        kept running hold the old clocks, already past `step`, and would not hold anyone."""
        deadline = time.monotonic() + self.RESTORE_TIMEOUT
        clocks: list = []
        while True:
            try:
                clocks = [st[SYNC_STATS]["clocks"] for st in self.ps.stats().values()]
            except Exception as e:  # noqa: BLE001 -- a server briefly unreachable: poll again
                if not retryable(e):
                    raise
            else:
                if all(c == "done" or c >= step for per_server in clocks for c in per_server):
                    return
            if time.monotonic() > deadline:
                raise SyncTimeout(f"worker group {self.group.index} waited {self.RESTORE_TIMEOUT:.0f} s for every "
                                  f"process to resume at step {step} (group 0 loads the PS snapshot first); "
                                  f"clocks {clocks}")
            time.sleep(0.02)

    def load(self, snapshot: dict[str, dict[str, np.ndarray]]) -> None:
        """Make the servers hold exactly the snapshot's rows (onto any number of servers:
        rows go where the ring says; rows stored since the snapshot are dropped first)."""
        for name in snapshot:
            if name not in self.names:
                raise ValueError(f"the snapshot has table {name!r}, the model does not")
        for name, rows in snapshot.items():
            self.ps.clear(name)
            self.ps.load(name, rows)

    def close(self) -> None:
        """Let queued pushes land, then stop the push and snapshot threads and, if this made
        its own (embedded) server group, that group's client. Idempotent."""
        try:
            self.flush()
        finally:
            self._pusher.shutdown(wait=True)
            self._copier.shutdown(wait=True)
            if self._owns_ps:
                self._owns_ps = False
                self.ps.close()

    def flush(self) -> None:
        """Wait until every queued push is applied (raises a push's error)."""
        while self._inflight:
            self._inflight.popleft().result()
