"""`PSServer` (ps-lite's KVServer): holds the partitions the ring gives it, serves pulls,
applies pushes with the row-wise optimizer, exactly once per request id.

One lock per partition, not per key and not per server: pulls and pushes that touch
different partitions run in parallel (numpy and the numba index release the GIL). A
request takes the locks of its partitions (per thread span, in ascending order) and
serves them in one numba call (`jaxps.ps.batched`): one GIL hand-off per request instead
of one per partition. Tables with admission, eviction or an optimizer without a fused
kernel push partition by partition.
Worker groups (`clock`): a pull from a group waits as its consistency model says
(`jaxps.ps.clock`); under BSP a group's push is held until every group pushed that step,
then all of them are summed per key and applied as one update; under SSP/ASP with
periodic checkpoints, pushes are applied at once and each pending cut (every group's
pushes up to a checkpoint step) is a copy-on-write copy (`jaxps.ps.cow.CutCopy`).
Partitions are the unit a snapshot or a migration copies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxps.memory import take_rows
from jaxps.optim import rowwise
from jaxps.optim.rowwise import RowOptimizer
from jaxps.ps import store as store_mod
from jaxps.ps.batched import (ADAGRAD_KIND, SGD_KIND, PartitionArrays, gather_slot_runs, keep_fresh, pull_runs,
                               push_runs)
from jaxps.ps.clock import DONE, GATE_TIMEOUT, GroupClocks, Sync, SyncTimeout
from jaxps.ps.cow import CutCopy, PendingCopy, finish
from jaxps.ps.fused import fused_update
from jaxps.ps.initrows import init_salt
from jaxps.ps.keyindex import dedup
from jaxps.ps.memo import PullMemo, PullMemos
from jaxps.ps.ring import Ring, partition_runs, partition_runs_keys
from jaxps.ps.store import PartitionStore, join_rows


class PSError(ValueError):
    """A request the server refuses (unknown table, wrong owner, bad shapes)."""


class WrongOwner(PSError):
    """The key's partition belongs to another server: the client's ring is stale."""


@dataclass(frozen=True)
class TableSpec:
    """A table as the servers see it. kind: "collisionless" (keys are raw 64-bit ids,
    storage grows with the keys seen) or "hashed" (keys are row numbers < rows)."""

    name: str
    dim: int
    optimizer: RowOptimizer
    kind: str = "collisionless"
    rows: int | None = None
    init_scale: float = 0.0
    seed: int = 0
    min_count: int = 1            # admission: store a key from its min_count-th push on
    max_rows: int | None = None   # eviction: row budget of the whole table (all servers)

    def __post_init__(self):
        if not self.name or "/" in self.name:  # partition copies name their arrays "<kind>/<table>/..."
            raise ValueError(f"table name {self.name!r}: must be non-empty and without '/'")
        if self.kind not in ("collisionless", "hashed"):
            raise ValueError(f"table {self.name!r}: kind must be 'collisionless' or 'hashed'")
        if self.kind == "hashed" and not self.rows:
            raise ValueError(f"table {self.name!r}: a hashed table needs rows")

    def to_json(self) -> dict:
        """Plain JSON fields; the optimizer as {"name": ..., hyper-parameters...}."""
        opt = {f.name: getattr(self.optimizer, f.name) for f in dataclasses.fields(self.optimizer)}
        return {"name": self.name, "dim": self.dim, "kind": self.kind, "rows": self.rows,
                "init_scale": self.init_scale, "seed": self.seed, "min_count": self.min_count,
                "max_rows": self.max_rows,
                "optimizer": dict(opt, name=self.optimizer.name)}

    @classmethod
    def from_json(cls, e: dict, where: str = "table") -> "TableSpec":
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {type(e).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(e) - known
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = {"name", "dim", "optimizer"} - set(e)
        if missing:
            raise ValueError(f"{where}: missing field(s) {sorted(missing)}")
        opt = dict(e["optimizer"]) if isinstance(e["optimizer"], dict) else {"name": e["optimizer"]}
        return cls(**dict(e, optimizer=rowwise.make(opt.pop("name"), **opt)))


SYNC_STATS = "__sync__"   # the key of the worker-group clocks in `stats()`

# A request splits its partitions over the server's threads from this many keys on: below
# it a thread hand-off (~20-100 us) costs more than the ~100 ns per key it could overlap.
PARALLEL_KEYS = 16384

BATCHED = True  # one kernel call per request span (jaxps.ps.batched); tests turn it off



class Frozen(PSError):
    """The server is frozen for a membership change: retry after refreshing the ring."""


def _pack_pushes(out: dict[str, np.ndarray], prefix: str, pushes: list[tuple]) -> None:
    """Held pushes (step, group, table, partition, client id, seq, keys, grads) as a
    partition copy's arrays: per table, `{prefix}/{table}/meta` (one row of step, group,
    partition, client id, seq, key count a push), `.../keys` and `.../grads` (joined)."""
    for table in sorted({p[2] for p in pushes}):
        mine = [p for p in pushes if p[2] == table]
        out[f"{prefix}/{table}/meta"] = np.array([[step, g, part, cid, seq, keys.shape[0]]
                                                  for step, g, _, part, cid, seq, keys, _ in mine], np.int64)
        out[f"{prefix}/{table}/keys"] = np.concatenate([p[6] for p in mine])
        out[f"{prefix}/{table}/grads"] = np.concatenate([p[7] for p in mine])


def _unpack_pushes(data: dict[str, np.ndarray], prefix: str) -> list[tuple]:
    """`_pack_pushes`'s arrays back as held pushes (each its own copy of keys and grads),
    in the order they were packed."""
    pushes = []
    for key in [k for k in data if k.startswith(f"{prefix}/") and k.endswith("/meta")]:
        table = key[len(prefix) + 1:-len("/meta")]
        keys = np.asarray(data[f"{prefix}/{table}/keys"], np.uint64)
        grads = np.asarray(data[f"{prefix}/{table}/grads"], np.float32)
        o = 0
        for step, g, part, cid, seq, n in np.asarray(data[key], np.int64).reshape(-1, 6).tolist():
            pushes.append((step, g, table, part, cid, seq, keys[o:o + n].copy(), grads[o:o + n].copy()))
            o += n
    return pushes


class PSServer:
    def __init__(self, name: str, ring: Ring, tables: Sequence[TableSpec], replicas: int = 0,
                 wait_timeout: float | None = GATE_TIMEOUT, threads: int = 1):
        """threads: a pull or push of at least `PARALLEL_KEYS` keys splits its partitions over
        this many threads (the numba kernels release the GIL; partitions have their own
        locks): a second core adds memory-level parallelism where one is free. Default 1:
        the embedded server shares the cores with the device step, and on the 2-core dev
        VMs (other jobs running) 2 threads measured 0.39-0.55x the floor vs 0.41-0.45x
        with 1 in interleaved A/B rounds: no reliable gain there.

        replicas: backups per partition (hot standby); the server stores every partition
        whose replica set (`Ring.replicas`) names it, and serves pulls of those it is the
        primary of. wait_timeout: seconds a pull may wait for a slow worker group before it
        fails (naming the clocks), None = forever.

        Exactly once: a client's pushes carry (client id, seq) with seq increasing per
        client, and a client sends its next push only after the previous one was applied
        everywhere; so each partition keeps the highest seq applied per client, and a
        retry (seq not above it) is skipped. That mark travels with the partition when it
        is copied to another server."""
        self.name, self.ring, self.replicas = name, ring, replicas
        if threads < 1:
            raise ValueError(f"server {name}: threads must be >= 1, got {threads}")
        self.threads = threads
        self._helpers = ThreadPoolExecutor(threads - 1, thread_name_prefix=f"jaxps-{name}") if threads > 1 else None
        self.clocks = GroupClocks()
        self.wait_timeout = wait_timeout
        # BSP: step -> held pushes (group, table, partition, client id, seq, keys, grads)
        self._held: dict[int, list[tuple[int, str, int, int, int, np.ndarray, np.ndarray]]] = {}
        self._held_through = 0     # steps whose held pushes were taken for applying
        # SSP/ASP consistent cuts every `cut_every` steps: pushes of later steps are applied at
        # once, each partition's `CutCopy` of a pending cut keeping what they change (and
        # taking late pushes of steps <= the cut), until every group completed the cut step
        self.cut_every = 0
        self._cut_taken = 0
        self._last_clock = 0       # the highest real (not DONE) clock any group reported
        self._cut_copies: dict[tuple[str, int], CutCopy] = {}  # (table, cut step) -> copy (with _cut_cond)
        self._cuts: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        self._cut_cond = threading.Condition()
        self._held_lock = threading.Lock()    # a leaf lock (taken last)
        self._settle_lock = threading.Lock()
        self.tables = {t.name: t for t in tables}
        self._stores: dict[tuple[str, int], PartitionStore] = {}
        self._memos = PullMemos()  # recent pulls' routing and slots, for the pushes of their keys
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._arrays: dict[str, PartitionArrays] = {}  # per table: the batched kernels' view
        self._sink = np.zeros(1, np.uint64)  # the kernels' prefetch results (never read)
        self._marks: dict[tuple[str, int], dict[int, int]] = {}   # (table, part) -> client -> last seq
        self._meta_lock = threading.Lock()
        # copy-on-write snapshots (`mark`): (table, part) -> ticket -> its rows at the mark
        self._pending: dict[tuple[str, int], dict[int, PendingCopy]] = {}
        self._tickets: dict[int, tuple[str, dict[int, PendingCopy]]] = {}  # ticket -> (table, part -> copy)
        self._next_ticket = 1
        self._gate = threading.Condition()
        self._frozen = False
        self._fenced = False       # declared dead by the manager: refuses everything, for good
        self._writes = 0           # pushes and clocks in progress (a freeze waits for them)
        self._stats = {t: {"pulls": 0, "pushes": 0, "pulled_keys": 0, "pushed_keys": 0,
                           "duplicate_pushes": 0} for t in self.tables}

    # ------------------------------------------------------------------ membership
    def freeze(self, timeout: float = 60.0) -> None:
        """Refuse new pushes and clocks (`Frozen`, which clients retry) and wait until those
        in progress finish: partitions can then be copied consistently."""
        with self._gate:
            self._frozen = True
            if not self._gate.wait_for(lambda: self._writes == 0, timeout):
                self._frozen = False  # the caller gives up on this freeze: do not stay frozen
                raise TimeoutError(f"server {self.name}: writes still running after {timeout}s")

    def unfreeze(self) -> None:
        with self._gate:
            self._frozen = self._fenced  # a fenced server stays frozen

    def fence(self) -> None:
        """The manager declared this server dead and moved its partitions away: refuse every
        later request, reads too (`Frozen`: a client refreshes its ring and goes elsewhere),
        so a server that was only slow neither takes writes nor serves rows nobody updates."""
        with self._gate:
            self._fenced = self._frozen = True

    def _check_fence(self) -> None:
        if self._fenced:
            raise Frozen(f"server {self.name} was declared dead and fenced (ring version {self.ring.version}): "
                         "refresh the ring and retry")

    @contextlib.contextmanager
    def _writing(self):
        with self._gate:
            if self._frozen:
                raise Frozen(f"server {self.name} is frozen for a membership change (ring version "
                             f"{self.ring.version}): refresh the ring and retry")
            self._writes += 1
        try:
            yield
        finally:
            with self._gate:
                self._writes -= 1
                self._gate.notify_all()

    def clear(self, table: str) -> None:
        """Drop every row of `table` (its spec stays): a restore then holds exactly the
        snapshot's rows, not also rows pushed after it."""
        if table not in self.tables:
            raise PSError(f"server {self.name}: unknown table {table!r}")
        with self._meta_lock:
            self._drop_all([k for k in self._stores if k[0] == table])
            self._memos.clear()  # they would keep the dropped stores alive

    def table_specs(self) -> list[TableSpec]:
        """The tables this server serves (a joining server learns them from a member)."""
        with self._meta_lock:
            return list(self.tables.values())

    def set_ring(self, ring: Ring, drop: bool = True) -> None:
        """Adopt a ring version (not an older one than this server's); `drop`: also drop the
        partitions it no longer replicates. A membership change adopts with drop=False on
        every server first and drops only once all of them hold the new ring, so a change
        that fails half-way loses no partition (`ServerManager._reconfigure`)."""
        if ring.num_partitions != self.ring.num_partitions:
            raise PSError(f"server {self.name}: a ring of {ring.num_partitions} partitions, this group has "
                          f"{self.ring.num_partitions}")
        if ring.version < self.ring.version:
            raise PSError(f"server {self.name}: ring version {ring.version} is older than its {self.ring.version}")
        with self._meta_lock:
            self.ring = ring
            if drop:
                mine = self._replicated_parts()
                self._drop_all([k for k in self._stores if k[1] not in mine])
            self._memos.clear()

    def _drop_all(self, keys: list[tuple[str, int]]) -> None:
        """Forget partitions (with the meta lock): marked snapshots copy each first; pending
        cuts' copies forget them, one rebuild per table."""
        for key in keys:
            self._drop(key)
        for table in {t for t, _ in keys}:
            for copy in self._copies_of(table):
                copy.drop([p for t, p in keys if t == table])

    def _drop(self, key: tuple[str, int]) -> None:
        with self._locks[key]:
            self._before_write(key, self._stores[key])
            self._pending.pop(key, None)
            if key[0] in self._arrays:
                self._arrays[key[0]].forget(key[1])
        del self._stores[key], self._locks[key]
        self._marks.pop(key, None)

    def _primary_stores(self, table: str) -> list[tuple[tuple[str, int], PartitionStore]]:
        """((table, partition), store) of each stored partition of `table` this server is
        the primary of: those a snapshot (`export`, `mark`) takes; backups hold copies."""
        owners = self.ring.owners()
        me = self.ring.servers.index(self.name) if self.name in self.ring.servers else -1
        return [(key, store) for key, store in list(self._stores.items()) if key[0] == table and owners[key[1]] == me]

    def _replicated_parts(self) -> set[int]:
        if self.name not in self.ring.servers:
            return set()
        i = self.ring.servers.index(self.name)
        return set(np.flatnonzero((self.ring.replicas(self.replicas) == i).any(axis=1)).tolist())

    def create_table(self, spec: TableSpec) -> bool:
        """Serve a new table (servers can start empty and learn their tables from the
        first client). Idempotent for an identical spec; a different one is refused."""
        with self._meta_lock:
            have = self.tables.get(spec.name)
            if have is not None:
                if have != spec:
                    raise PSError(f"server {self.name}: table {spec.name!r} exists with another "
                                  f"spec: {have.to_json()} vs {spec.to_json()}")
                return False
            self.tables[spec.name] = spec
            self._stats[spec.name] = {"pulls": 0, "pushes": 0, "pulled_keys": 0, "pushed_keys": 0,
                                      "duplicate_pushes": 0}
            return True

    # ------------------------------------------------------------------ partitions
    def _make_once(self, cache: dict, key, make):
        """cache[key] after a lock-free miss: made by `make()` under the meta lock unless
        another thread made it meanwhile (double-checked: once made, the request path
        finds it without a shared lock)."""
        with self._meta_lock:
            value = cache.get(key)
            if value is None:
                value = cache[key] = make()
        return value

    def _store(self, table: str, part: int) -> tuple[PartitionStore, threading.Lock]:
        key = (table, part)
        store = self._stores.get(key)
        if store is None:
            store = self._make_once(self._stores, key, functools.partial(self._new_store, key))
        return store, self._locks[key]

    def _new_store(self, key: tuple[str, int]) -> PartitionStore:
        self._locks[key] = threading.Lock()  # before the store is seen: its readers take this lock next
        return self._empty_store(key[0])

    def _empty_store(self, table: str) -> PartitionStore:
        """A partition store of `table` as the spec makes it (its row budget is per partition)."""
        spec = self.tables[table]
        budget = None if spec.max_rows is None else -(-spec.max_rows // self.ring.num_partitions)
        return PartitionStore(spec.dim, spec.optimizer, spec.init_scale, spec.seed, spec.min_count, budget)

    def _check_parts(self, table: str, parts: np.ndarray, write: bool = False) -> None:
        """`_check` of every partition of a request at once (one numpy test, not one
        Python call per partition: requests touch hundreds)."""
        if self.ring.servers and self.name in self.ring.servers:
            sets = self.ring.replicas(self.replicas)[parts]
            me = self.ring.servers.index(self.name)
            if ((sets == me).any(axis=1) if write else (sets[:, 0] == me)).all():
                return
        for part in parts.tolist():  # the first bad one raises, naming its owners
            self._check(table, int(part), write)

    def _check(self, table: str, part: int, write: bool = False) -> None:
        """Pulls go to a partition's primary; writes (pushes, loads) to any of its replicas."""
        if not self.ring.servers:
            raise WrongOwner(f"server {self.name}: no ring")
        sets = self.ring.replicas(self.replicas)[part]
        names = [self.ring.servers[i] for i in sets]
        if (self.name not in names) if write else (names[0] != self.name):
            raise WrongOwner(f"server {self.name}: partition {part} of table {table!r} belongs to "
                             f"{names[0]}{' with backups ' + ', '.join(names[1:]) if len(names) > 1 else ''} "
                             f"(ring version {self.ring.version})")

    def _validate(self, table: str, keys: np.ndarray) -> TableSpec:
        spec = self.tables.get(table)
        if spec is None:
            raise PSError(f"server {self.name}: unknown table {table!r}")
        if keys.ndim != 1 or keys.dtype != np.uint64:
            raise PSError(f"table {table!r}: keys must be a 1-D uint64 array, got {keys.dtype}{keys.shape}")
        if spec.kind == "hashed" and keys.size and keys.max() >= np.uint64(spec.rows):
            raise PSError(f"table {table!r}: row {int(keys.max())} out of range [0, {spec.rows})")
        return spec

    # ------------------------------------------------------------------ requests
    def _spans(self, bounds: np.ndarray) -> list[tuple[int, int]]:
        """A request's runs [r0, r1) per thread: one span, or (from `PARALLEL_KEYS` keys on,
        with `threads` > 1) `threads` spans of about equal keys."""
        n_runs = bounds.shape[0] - 1
        if self._helpers is None or bounds[-1] < PARALLEL_KEYS or n_runs < 2:
            return [(0, n_runs)]
        cuts = np.searchsorted(bounds, np.linspace(0, bounds[-1], self.threads + 1)[1:-1]).tolist()
        return [(a, b) for a, b in zip([0] + cuts, cuts + [n_runs]) if b > a]

    def _each_span(self, spans: list[tuple[int, int]], body) -> list:
        """[body(r0, r1) for each span], the first in this thread, the others on helpers."""
        futures = [self._helpers.submit(body, a, b) for a, b in spans[1:]]
        try:
            out = [body(*spans[0])]
        finally:  # never leave a span running past the request (it may raise too)
            rest = [f.result() for f in futures]
        return out + rest

    def _each_run(self, bounds: np.ndarray, body) -> list:
        """[body(i) for each run i of a request's `bounds`]; a big request's runs are cut
        into `threads` spans of about equal keys, each on its own thread (this one included)."""
        if bounds.shape[0] < 2:
            return []
        return [x for part in self._each_span(self._spans(bounds), lambda a, b: [body(i) for i in range(a, b)])
                for x in part]

    @staticmethod
    @contextlib.contextmanager
    def _holding(locks: list[threading.Lock]):
        """Hold every lock of a span of runs. Runs come in ascending partition order and
        every request takes its locks in that order, so two requests never deadlock."""
        taken = 0
        try:
            for lock in locks:
                lock.acquire()
                taken += 1
            yield
        finally:
            for lock in locks[:taken]:
                lock.release()

    def _table_arrays(self, table: str) -> PartitionArrays:
        arrays = self._arrays.get(table)
        if arrays is None:
            spec = self.tables[table]
            kernel = self._push_kernel(spec)
            arrays = self._make_once(self._arrays, table, functools.partial(
                PartitionArrays, self.ring.num_partitions, spec.dim, None if kernel is None else kernel[3]))
        return arrays

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _push_kernel(spec: TableSpec) -> tuple | None:
        """(kind, lr, eps, slot name, slot init) of `jaxps.ps.batched.push_runs` for the
        table's pushes, or None: they take the per-partition path (admission, eviction, an
        optimizer without a fused kernel; callers check `store.FUSED`, which tests turn off)."""
        if spec.min_count > 1 or spec.max_rows is not None:
            return None
        opt = spec.optimizer
        if fused_update(opt) is None:
            return None
        if type(opt) is rowwise.Adagrad:
            return (ADAGRAD_KIND, np.float32(opt.learning_rate), np.float32(opt.epsilon), "accumulator",
                    np.float32(opt.slot_init("accumulator")))
        if type(opt) is rowwise.SGD:
            return SGD_KIND, np.float32(opt.learning_rate), np.float32(0), None, np.float32(0)
        return None

    def _fresh(self, ring_version: int) -> None:
        if 0 <= ring_version < self.ring.version:
            raise WrongOwner(f"server {self.name}: the request was routed by ring version {ring_version}, "
                             f"the group is at {self.ring.version}: refresh the ring")

    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0,
             ring_version: int = -1, client: int = -1, out: np.ndarray | None = None,
             slots_out: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Rows [n, dim] float32 of `keys` (all in partitions this server owns), written into
        `out` when given (a C-contiguous [n, dim] float32 array; returned). With a
        worker `group` (>= 0), first wait as the consistency model requires of a pull at
        `clock` (the steps that group completed). `client` (>= 0): the id the client's
        pushes carry; its push of exactly these keys then reuses this pull's routing and
        index lookups (`jaxps.ps.memo`). `slots_out` ({optimizer slot: [n, dim] float32}):
        also the keys' optimizer slots, read under the same locks as the rows (an unseen
        key's are the optimizer's initial values), for a client that computes a push's
        outcome itself (`HostTables`' strict local apply)."""
        self._check_fence()
        spec = self._validate(table, keys)
        if slots_out is not None and (set(slots_out) != set(spec.optimizer.slots) or any(
                a.shape != (keys.shape[0], spec.dim) or a.dtype != np.float32 or not a.flags.c_contiguous
                for a in slots_out.values())):
            raise PSError(f"table {table!r}: slots_out must map the optimizer's slots {spec.optimizer.slots} to "
                          f"C-contiguous float32 [{keys.shape[0]}, {spec.dim}] arrays")
        if group >= 0:
            self.clocks.wait(group, clock, self.wait_timeout)
        self._fresh(ring_version)
        order, parts, bounds, ordered_keys = partition_runs_keys(keys, self.ring.num_partitions)
        self._check_parts(table, parts)
        n = keys.shape[0]
        if out is None:
            out = np.empty((n, spec.dim), np.float32)
        elif out.shape != (n, spec.dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise PSError(f"table {table!r}: out must be a C-contiguous float32 [{n}, {spec.dim}] "
                          f"array, got {out.dtype}{list(out.shape)}")
        part_list, lo_list = parts.tolist(), bounds.tolist()
        held = [self._store(table, p) for p in part_list]  # made before any lock is taken
        slots = np.empty(n, np.int64)
        memo = client >= 0 and n > 0  # absent keys' initial rows go with it: the push need not recompute them
        fresh_keys = np.zeros(n if memo else 0, np.uint64)
        fresh = np.empty((n if memo else 0, spec.dim), np.float32)
        arrays = self._table_arrays(table)
        salt = init_salt(spec.seed)

        def pull_span(r0: int, r1: int) -> list[int]:
            with self._holding([lock for _, lock in held[r0:r1]]):
                batched = BATCHED and all([arrays.sync(part_list[r], held[r][0]) for r in range(r0, r1)])
                if batched:
                    pull_runs(arrays.buckets, arrays.skeys, arrays.values, arrays.kbits, arrays.shift,
                              arrays.tshift, parts, bounds, r0, r1, ordered_keys, order, out, slots,
                              fresh_keys, fresh, float(spec.init_scale), salt, self._sink)
                else:  # uint64 buckets somewhere: partition by partition
                    for r in range(r0, r1):
                        lo, hi = lo_list[r], lo_list[r + 1]
                        slots[lo:hi] = held[r][0].pull_into(ordered_keys[lo:hi], out, order[lo:hi])
                    if memo:
                        keep_fresh(bounds, r0, r1, ordered_keys, order, out, slots, fresh_keys, fresh)
                if slots_out is not None and batched and arrays.slot is not None:  # a fused kernel's one slot
                    gather_slot_runs(arrays.acc, parts, bounds, r0, r1, order, slots,
                                     np.float32(spec.optimizer.slot_init(arrays.slot)), slots_out[arrays.slot])
                elif slots_out is not None:  # a Python pass per partition (~10x slower)
                    self._gather_slots(held, lo_list, r0, r1, slots, order, slots_out, spec.optimizer)
                return [held[r][0].epoch for r in range(r0, r1)]
        epochs = [e for span in self._each_span(self._spans(bounds), pull_span) for e in span]
        if memo:
            self._memos.put(client, table, PullMemo(keys.copy(), order, parts, bounds, ordered_keys,
                                                    [st for st, _ in held], epochs, slots, fresh_keys, fresh))
        s = self._stats[table]
        s["pulls"] += 1
        s["pulled_keys"] += keys.shape[0]
        return out

    @staticmethod
    def _gather_slots(held, lo_list, r0: int, r1: int, slots: np.ndarray, order: np.ndarray,
                      slots_out: dict[str, np.ndarray], optimizer) -> None:
        """slots_out[name][order[i]] = slot `name` of the i-th key in partition order (its
        initial value where the key is not stored: slots[i] < 0), for partitions r0..r1."""
        lo, hi = lo_list[r0], lo_list[r1]
        where, pos = slots[lo:hi], order[lo:hi]
        absent = where < 0
        for name, dst in slots_out.items():
            dst[pos[absent]] = optimizer.slot_init(name)
        for r in range(r0, r1):
            a, b = lo_list[r], lo_list[r + 1]
            s = slots[a:b]
            stored = s >= 0
            if stored.any():
                for name, dst in slots_out.items():
                    dst[order[a:b][stored]] = held[r][0].slots[name][s[stored]]

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, request_id: tuple[int, int],
             step: int, group: int = -1, ring_version: int = -1) -> bool:
        """Apply summed gradients of unique keys once per request id. Returns False (and
        changes nothing) for a request id already applied: a client's retry. Under BSP a
        worker group's push (group >= 0) of `step` is held and applied, summed with every
        other group's push of that step, once all groups completed it."""
        spec = self._validate(table, keys)
        if grads.shape != (keys.shape[0], spec.dim) or grads.dtype != np.float32:
            raise PSError(f"table {table!r}: grads must be float32 [{keys.shape[0]}, {spec.dim}], "
                          f"got {grads.dtype}{list(grads.shape)}")
        hold = group >= 0 and self.clocks.sync is not None and self.clocks.sync.bsp
        if hold:
            self.clocks._check(group)
        cutting = self._cutting(group)
        if cutting:
            self._wait_for_cuts(step, group)
        cid, seq = request_id
        with self._writing():
            self._fresh(ring_version)
            memo = self._memos.take(cid, table, keys) if keys.shape[0] else None
            if memo is None:
                order, parts, bounds, ordered_keys = partition_runs_keys(keys, self.ring.num_partitions)
            else:  # the pull of these keys routed them and found their slots already
                order, parts, bounds, ordered_keys = memo.order, memo.parts, memo.bounds, memo.ordered_keys
            self._check_parts(table, parts, write=True)
            part_list, lo_list = parts.tolist(), bounds.tolist()

            def push_run(run: int) -> bool:
                part, lo, hi = part_list[run], lo_list[run], lo_list[run + 1]
                store, lock = self._store(table, part)
                with lock:
                    if self._retry((table, part), cid, seq):
                        return False
                    if hold:  # BSP: kept until every group completed `step`
                        with self._held_lock:
                            if step <= self._held_through:
                                raise PSError(f"server {self.name}: group {group} pushed step {step} of table "
                                              f"{table!r} after it settled (at {self._held_through}): under "
                                              f"BSP a group pushes a step before it advances its clock past it")
                            self._held.setdefault(step, []).append(
                                (group, table, part, cid, seq, ordered_keys[lo:hi].copy(),
                                 take_rows(grads, order[lo:hi])))
                    else:  # grads stay where they are: the store reads rows order[lo:hi]
                        keys_run, rows_run = ordered_keys[lo:hi], order[lo:hi]
                        parts_run = np.full(hi - lo, part, np.int32) if cutting else None
                        if cutting:  # SSP/ASP: applied now; pending cuts keep what it changes
                            whole = store.max_rows is not None or store.min_count > 1
                            self._cut_keep(table, step, keys_run, parts_run,
                                           lambda pos: store.stored_rows(keys_run[pos]),
                                           (part, store) if whole else None)
                        self._before_write((table, part), store, keys_run)
                        store.push(keys_run, grads, step, rows_run, None if memo is None else memo.slots_for(run, store))
                        if cutting:
                            self._cut_late(table, step, keys_run, parts_run, grads, rows_run)
                    self._landed((table, part), cid, seq)
                    return True
            kernel = self._push_kernel(spec) if store_mod.FUSED and BATCHED else None
            if kernel is not None and not hold and keys.shape[0]:
                applied = self._push_batched(table, spec, kernel, grads, seq, cid, step, memo, order, parts, bounds,
                                             ordered_keys, cutting)
            else:
                applied = any(self._each_run(bounds, push_run))
        s = self._stats[table]
        if not applied and keys.shape[0]:
            s["duplicate_pushes"] += 1
            return False
        s["pushes"] += 1
        s["pushed_keys"] += keys.shape[0]
        return True

    def _push_batched(self, table: str, spec: TableSpec, kernel: tuple, grads: np.ndarray, seq: int, cid: int,
                      step: int, memo: PullMemo | None, order: np.ndarray, parts: np.ndarray, bounds: np.ndarray,
                      ordered_keys: np.ndarray, cutting: bool) -> bool:
        """`push` (not held for a worker group) of a table with a fused update: per span of
        runs, with all its partitions' locks, the exactly-once marks, copy-on-write
        pre-images (snapshots' and, `cutting`, pending cuts') and room for new keys in
        Python, then one `push_runs` call, then the pending cuts' late pushes. Returns
        whether any partition applied it (False: a retry)."""
        kind, lr, eps, _, slot_init = kernel
        part_list, lo_list = parts.tolist(), bounds.tolist()
        held = [self._store(table, p) for p in part_list]  # made before any lock is taken
        arrays = self._table_arrays(table)
        if memo is not None:  # the kernel completes them in place (a memo is used once)
            slots, fresh_keys, fresh = memo.slots, memo.fresh_keys, memo.fresh
        else:
            fresh_keys, fresh = np.zeros(0, np.uint64), np.zeros((0, spec.dim), np.float32)
            slots = np.full(ordered_keys.shape[0], -1, np.int64)
        no_fresh = -1 - fresh_keys.shape[0]  # a slot naming no pulled initial row
        apply = np.zeros(len(part_list), bool)
        salt, scale = init_salt(spec.seed), float(spec.init_scale)

        def push_span(r0: int, r1: int) -> bool:
            with self._holding([lock for _, lock in held[r0:r1]]):
                batched = True
                for r in range(r0, r1):
                    part, store = part_list[r], held[r][0]
                    if self._retry((table, part), cid, seq):
                        continue
                    apply[r] = True
                    batched = arrays.sync(part, store) and batched
                    if memo is not None and memo.slots_for(r, store) is None:  # stale: looked up again
                        slots[lo_list[r]:lo_list[r + 1]] = no_fresh
                    self._before_write((table, part), store, ordered_keys[lo_list[r]:lo_list[r + 1]])
                if not apply[r0:r1].any():
                    return False
                if cutting:  # SSP/ASP: pending cuts keep what the push changes, the whole span at once
                    at, span_parts = self._span_keys(parts, bounds, r0, r1, apply)
                    span_keys = ordered_keys[at]
                    self._cut_keep(table, step, span_keys, span_parts, lambda pos: self._live_rows(
                        spec, arrays, parts, bounds, r0, r1, at[pos], span_keys[pos], batched))
                done = r0  # runs below it are applied by the kernel
                while batched and done < r1:
                    done = push_runs(arrays.buckets, arrays.skeys, arrays.values, arrays.acc, arrays.kbits,
                                     arrays.shift, arrays.tshift, arrays.sizes, arrays.limits, parts, bounds, done,
                                     r1, apply, ordered_keys, order, grads, slots, fresh_keys, fresh, scale, salt,
                                     slot_init, kind, lr, eps)
                    if done < r1:  # its partition is full: grow it (room for the whole run), resume there
                        part, store = part_list[done], held[done][0]
                        store.index.size = int(arrays.sizes[part])
                        store.reserve_new(lo_list[done + 1] - lo_list[done])
                        batched = arrays.sync(part, store)
                for r in range(r0, r1):
                    if not apply[r]:
                        continue
                    part, store = part_list[r], held[r][0]
                    if r < done:
                        store.index.size = int(arrays.sizes[part])
                    else:  # uint64 buckets: partition by partition (keys the kernel stored are found)
                        lo, hi = lo_list[r], lo_list[r + 1]
                        store.push(ordered_keys[lo:hi], grads, step, order[lo:hi],
                                   None if memo is None else memo.slots_for(r, store))
                    self._landed((table, part), cid, seq)
                if cutting:
                    self._cut_late(table, step, span_keys, span_parts, grads, order[at])
                return True
        return any(self._each_span(self._spans(bounds), push_span))

    # Cuts a push may run ahead of (SSP/ASP with cuts): each pending cut costs up to one
    # copy of the rows pushes past it wrote, so a group this many cut intervals ahead of the
    # slowest waits at its next push (backpressure; SSP with s < 4 * cut_every never does).
    MAX_PENDING_CUTS = 4

    def push_would_wait(self, step: int, group: int) -> bool:
        """Whether a worker group's push of `step` would now wait for pending cuts (the gRPC
        servicer refuses it instead, CUTS_PENDING, rather than hold a handler thread; the
        answer only turns False as cuts are taken)."""
        return self._cutting(group) and not self._cut_room(step)

    def _cutting(self, group: int) -> bool:
        """Whether a worker group's push goes through the pending cuts (SSP/ASP with cuts)."""
        return group >= 0 and self.cut_every > 0 and not (self.clocks.sync is not None and self.clocks.sync.bsp)

    def _cut_room(self, step: int) -> bool:
        return (step - 1) // self.cut_every - self._cut_taken // self.cut_every <= self.MAX_PENDING_CUTS

    def _wait_for_cuts(self, step: int, group: int) -> None:
        """Before a push of `step`: wait while it would leave more than MAX_PENDING_CUTS cuts
        pending (outside every lock, so a freeze and the slow groups' pushes go on)."""
        if self._cut_room(step):
            return
        with self._cut_cond:
            if not self._cut_cond.wait_for(lambda: self._cut_room(step), self.wait_timeout):
                raise SyncTimeout(f"server {self.name}: group {group}'s push of step {step} waited "
                                  f"{self.wait_timeout}s for the cut at step {self._cut_taken + self.cut_every} "
                                  f"(at most {self.MAX_PENDING_CUTS} cuts pending); clocks {self.clocks.clocks()}")

    # A worker group's push under SSP/ASP with cuts is applied to the live rows at once, so
    # the group reads its own writes, between these two (with the partitions' locks):

    def _cut_keep(self, table: str, step: int, keys: np.ndarray, parts: np.ndarray, read_live=None,
                  whole: tuple[int, PartitionStore] | None = None) -> None:
        """Each pending cut before `step` keeps the rows of `keys` (of `parts`) first, read
        by `read_live` (`CutCopy.keep`), or the `whole` (partition, store) of a partition
        that admits or evicts rows (its `CutCopy` is made by the first push past it)."""
        for at in range(self._cut_taken + self.cut_every, step, self.cut_every):
            copy = self._cut_copy(table, at)
            if copy is None:
                continue  # taken meanwhile
            if whole is not None:
                copy.clone_whole(*whole)
            else:
                copy.keep(keys, parts, read_live)

    def _cut_late(self, table: str, step: int, keys: np.ndarray, parts: np.ndarray, grads: np.ndarray,
                  grad_rows: np.ndarray) -> None:
        """The copy of each pending cut at or after `step` (made by an earlier push past it)
        takes the push too."""
        for copy in self._copies_of(table, since=step):
            copy.late_push(keys, parts, grads, grad_rows, step)

    def _cut_copy(self, table: str, at: int) -> CutCopy | None:
        """The copy of pending cut `at` of `table` (made now if new); None once it is taken."""
        with self._cut_cond:
            if at <= self._cut_taken:
                return None
            copy = self._cut_copies.get((table, at))
            if copy is None:
                copy = self._cut_copies[(table, at)] = CutCopy(self._empty_store(table))
            return copy

    def _copies_of(self, table: str, since: int = 0) -> list[CutCopy]:
        """The copies of `table`'s pending cuts at steps >= `since`."""
        with self._cut_cond:
            return [c for (t, at), c in self._cut_copies.items() if t == table and at >= since]

    @staticmethod
    def _span_keys(parts: np.ndarray, bounds: np.ndarray, r0: int, r1: int, apply: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(request positions of the keys of runs r0..r1-1 a push applies to, ascending;
        their partitions)."""
        counts = np.diff(bounds[r0:r1 + 1])
        mask = np.repeat(apply[r0:r1], counts)
        at = bounds[r0] + np.flatnonzero(mask)
        return at, np.repeat(parts[r0:r1].astype(np.int32), counts)[mask]

    def _live_rows(self, spec: TableSpec, arrays: PartitionArrays, parts: np.ndarray, bounds: np.ndarray,
                   r0: int, r1: int, at: np.ndarray, keys: np.ndarray, batched: bool) -> tuple:
        """`PartitionStore.stored_rows` of `keys` (at request positions `at`, ascending, in
        runs r0..r1-1): one `pull_runs` (and one slot gather) over all their partitions,
        or partition by partition where a store's buckets are not the kernels' (not
        `batched`)."""
        runs = r1 - r0
        sub_bounds = np.searchsorted(at, bounds[r0:r1 + 1])
        sub_parts = np.ascontiguousarray(parts[r0:r1])
        if not batched:
            stored = np.zeros(at.shape[0], bool)
            values = np.empty((at.shape[0], spec.dim), np.float32)
            slot_values = {n: np.empty((at.shape[0], spec.dim), np.float32) for n in spec.optimizer.slots}
            for r in range(runs):
                lo, hi = sub_bounds[r], sub_bounds[r + 1]
                if hi > lo:
                    st, v, sv = self._stores[(spec.name, int(sub_parts[r]))].stored_rows(keys[lo:hi])
                    stored[lo:hi], values[lo:hi] = st, v
                    for n in slot_values:
                        slot_values[n][lo:hi] = sv[n]
            return stored, values, slot_values
        out = np.empty((at.shape[0], spec.dim), np.float32)
        slots = np.empty(at.shape[0], np.int64)
        order = np.arange(at.shape[0])
        pull_runs(arrays.buckets, arrays.skeys, arrays.values, arrays.kbits, arrays.shift, arrays.tshift,
                  sub_parts, sub_bounds, 0, runs, np.ascontiguousarray(keys), order, out, slots,
                  np.zeros(0, np.uint64), np.zeros((0, spec.dim), np.float32), float(spec.init_scale),
                  init_salt(spec.seed), self._sink)
        slot_values = {}
        if arrays.slot is not None:
            slot_values[arrays.slot] = np.empty((at.shape[0], spec.dim), np.float32)
            gather_slot_runs(arrays.acc, sub_parts, sub_bounds, 0, runs, order, slots,
                             np.float32(spec.optimizer.slot_init(arrays.slot)), slot_values[arrays.slot])
        return slots >= 0, out, slot_values

    def _take_cuts(self, slowest: int) -> None:
        """Every cut step all groups have completed: copy the rows there (the cut; called
        with the settle lock, so every push of a step <= it is in)."""
        slowest = min(slowest, self._last_clock)  # all done: no cuts past the last real step
        while self.cut_every and slowest >= self._cut_taken + self.cut_every:
            at = self._cut_taken + self.cut_every
            cut = {table: self._export_cut_rows(table, at) for table in list(self.tables)}
            with self._cut_cond:
                self._cuts[at] = cut
                for old in sorted(self._cuts)[:-2]:  # the latest two are kept for readers
                    del self._cuts[old]
                self._cut_taken = at  # no copy of `at` is made after this (`_cut_copy`)
                for key in [k for k in self._cut_copies if k[1] <= at]:
                    del self._cut_copies[key]
                self._cut_cond.notify_all()

    def _export_cut_rows(self, table: str, at: int) -> dict[str, np.ndarray]:
        """The rows of `table` (primary partitions) at cut `at`, each partition under its lock."""
        copy = self._cut_copy(table, at)  # made now if no push past `at` came yet: one may come meanwhile
        pieces = []
        for key, store in self._primary_stores(table):
            with self._locks[key]:
                pieces.append(copy.export(key[1], store))
        return join_rows(pieces or [self._no_rows(table)])

    def _apply(self, table: str, part: int, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Apply a push that was held (summed for a BSP step) to one partition, under its
        lock; marked snapshots keep their pre-images first."""
        store, lock = self._store(table, part)
        with lock:
            self._before_write((table, part), store, keys)
            store.push(keys, grads, step)

    def export_cut(self, table: str, at: int) -> dict[str, np.ndarray]:
        """The rows of `table` (primary partitions) at cut step `at`: once every group
        completed it, without any push of a later step (SSP/ASP hot checkpoints)."""
        if not self.cut_every or at % self.cut_every:
            raise PSError(f"server {self.name}: no cut at step {at} (cuts every {self.cut_every} steps)")
        with self._cut_cond:
            if not self._cut_cond.wait_for(lambda: at in self._cuts or self._cut_taken > at + self.cut_every,
                                           self.wait_timeout):
                raise SyncTimeout(f"server {self.name}: the cut at step {at} waited {self.wait_timeout}s for the "
                                  f"slowest group; clocks {self.clocks.clocks()}")
            if at not in self._cuts:
                raise PSError(f"server {self.name}: the cut at step {at} is gone (cuts kept: {sorted(self._cuts)})")
            return self._cuts[at][table]

    def _apply_held(self, step: int, held: list) -> None:
        """Sum every group's held push of `step` per key (in group order, so all replicas sum
        alike) and apply it once, partition by partition."""
        runs: dict[tuple[str, int], list] = {}
        for group, table, part, cid, seq, keys, grads in sorted(held, key=lambda h: (h[0], h[1], h[2], h[3], h[4])):
            runs.setdefault((table, part), []).append((keys, grads))
        for (table, part), pushes in sorted(runs.items()):
            keys = np.concatenate([k for k, _ in pushes])
            grads = np.concatenate([g for _, g in pushes])
            if len(pushes) > 1:
                keys, inverse = dedup(keys)
                summed = np.zeros((keys.shape[0], grads.shape[1]), np.float32)
                np.add.at(summed, inverse, grads)
                grads = summed
            self._apply(table, part, keys, grads, step)

    # ------------------------------------------------------------------ worker groups
    def clock(self, group: int, clock: int, groups: int, sync: Sync, cut_every: int = 0) -> int:
        """Worker `group` (of `groups`, under `sync`) completed `clock` steps (`DONE`: it
        finished). Under BSP, every step all groups have now completed is applied: each
        partition's held pushes summed per key and applied once. Under SSP/ASP with
        `cut_every`, the rows are copied at every multiple of it all groups completed.
        Returns the steps settled."""
        self.clocks.configure(groups, sync)
        if cut_every != self.cut_every:
            if self.cut_every and cut_every:
                raise PSError(f"server {self.name}: cuts every {self.cut_every} steps, a client asked for "
                              f"every {cut_every}")
            self.cut_every = self.cut_every or cut_every
        with self._writing(), self._settle_lock:
            slowest = self.clocks.advance(group, clock)
            if clock < DONE:
                self._last_clock = max(self._last_clock, clock)
            with self._held_lock:
                steps = sorted(s for s in self._held if s <= slowest)
                taken = [(s, self._held.pop(s)) for s in steps]
                self._held_through = max(self._held_through, min(slowest, DONE - 1))
            for step, held in taken:
                self._apply_held(step, held)
            self._take_cuts(slowest)
            self.clocks.publish(slowest)
            return self.clocks.settled

    MAX_MARKS = 4  # marked snapshots kept at once per table; a newer mark drops that table's oldest

    def mark(self, table: str) -> int:
        """Take a snapshot of `table` (the partitions this server is the primary of) now,
        without copying it: `export(table, ticket)` copies it later, as it was at the mark,
        while pushes go on (copy-on-write, jaxps.ps.cow). Returns the ticket."""
        if table not in self.tables:
            raise PSError(f"server {self.name}: unknown table {table!r}")
        with self._meta_lock:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            copies: dict[int, PendingCopy] = {}
            for key, _ in self._primary_stores(table):
                with self._locks[key]:
                    copies[key[1]] = self._pending.setdefault(key, {})[ticket] = PendingCopy()
            self._tickets[ticket] = (table, copies)
            # per table: a checkpoint marks every table of a model, so a cap over all tables
            # dropped the first table's mark of the same checkpoint once it had > MAX_MARKS
            mine = sorted(t for t, (name, _) in self._tickets.items() if name == table)
            for old in mine[:-self.MAX_MARKS]:  # abandoned: stop keeping pre-images
                name, dropped = self._tickets.pop(old)
                for part in dropped:
                    if (name, part) in self._locks:
                        with self._locks[(name, part)]:
                            self._pending.get((name, part), {}).pop(old, None)
            return ticket

    def _retry(self, key: tuple[str, int], cid: int, seq: int) -> bool:
        """(With the partition's lock.) Whether push request (cid, seq) reached partition
        `key` before (applied or held there): a client's retry, which both push paths skip."""
        return seq <= self._marks.get(key, {}).get(cid, -1)

    def _landed(self, key: tuple[str, int], cid: int, seq: int) -> None:
        """(With the partition's lock.) Push request (cid, seq) was applied or held at
        partition `key`: its retries are skipped (`_retry`)."""
        self._marks.setdefault(key, {})[cid] = seq

    def _before_write(self, key: tuple[str, int], store: PartitionStore, keys: np.ndarray | None = None) -> None:
        """(With the partition's lock.) Marked snapshots of the partition keep what a write
        of unique `keys` changes; `keys` None (a load, a drop): they copy it whole first.
        Nothing to do (one dict lookup) while the partition has no pending mark. (Pending
        cuts' copies are kept by the pushes; a load or drop is not a push past a cut: a
        drop forgets a partition, a migration brings its copies along, and a restore's
        rows are the cut's, a restart's clocks being fresh.)"""
        marked = self._pending.get(key)
        for pending in marked.values() if marked else ():
            if keys is None:
                pending.materialize(store)
            else:
                pending.before_write(store, keys)

    def _collect(self, table: str, ticket: int) -> list[dict[str, np.ndarray]]:
        """The rows of every partition of a `mark`, as they were at the mark: each is
        copied under its lock (marks stop there), then its pre-images are put back."""
        with self._meta_lock:
            entry = self._tickets.pop(ticket, None)
        if entry is None or entry[0] != table:
            raise PSError(f"server {self.name}: no marked snapshot {ticket} of table {table!r} (exported "
                          f"already, or dropped: the latest {self.MAX_MARKS} marks of a table are kept)")
        parts = []
        for part, pending in sorted(entry[1].items()):
            key = (table, part)
            rows = None
            lock = self._locks.get(key)
            if lock is not None:
                with lock:
                    self._pending.get(key, {}).pop(ticket, None)
                    if pending.full is None and key in self._stores:
                        rows = self._stores[key].export()
            parts.append(pending.full if rows is None else finish(rows, pending))
        return parts

    def export(self, table: str, ticket: int | None = None) -> dict[str, np.ndarray]:
        """A snapshot of every row of `table` in the partitions this server is the primary of
        (backups hold copies), partition by partition under each partition's lock (a
        consistent cut when no push is in flight); `ticket`: the rows at that `mark`."""
        return join_rows(self.export_pieces(table, ticket))

    def export_pieces(self, table: str, ticket: int | None = None) -> list[dict[str, np.ndarray]]:
        """`export`'s rows as one piece per partition, not joined: a snapshot writer streams
        them to its files one after the other (no rows: one empty piece, for the shapes)."""
        spec = self.tables.get(table)
        if spec is None:
            raise PSError(f"server {self.name}: unknown table {table!r}")
        if ticket is not None:
            parts = self._collect(table, ticket)
        else:
            parts = []
            for key, store in self._primary_stores(table):
                with self._locks[key]:
                    parts.append(store.export())
        return parts or [self._no_rows(table)]

    def _no_rows(self, table: str) -> dict[str, np.ndarray]:
        """An export of no rows of `table` (the fields with their shapes)."""
        spec = self.tables[table]
        empty = {"keys": np.zeros(0, np.uint64), "values": np.zeros((0, spec.dim), np.float32)}
        empty.update({f"slot_{n}": np.zeros((0, spec.dim), np.float32) for n in spec.optimizer.slots})
        return empty

    def load(self, table: str, rows: dict[str, np.ndarray], only_missing: bool = False) -> None:
        """Store snapshot rows whose partitions this server owns (any ring may have written
        them); `only_missing`: leave rows already stored as they are. The fields must be
        exactly `keys` [n] and `values` and each optimizer slot `slot_<name>` as float32
        [n, dim] (a snapshot of another dim or optimizer is refused, not reinterpreted)."""
        if "keys" not in rows:
            raise PSError(f"table {table!r}: snapshot rows have no 'keys'")
        spec = self._validate(table, np.asarray(rows["keys"], np.uint64))
        want = {"keys", "values"} | {f"slot_{s}" for s in spec.optimizer.slots}
        if set(rows) != want:
            raise PSError(f"table {table!r}: snapshot fields {sorted(rows)}, expected {sorted(want)}")
        n = rows["keys"].shape[0]
        for name in want - {"keys"}:
            a = rows[name]
            if a.dtype != np.float32 or a.shape != (n, spec.dim):
                raise PSError(f"table {table!r}: snapshot field {name!r} is {a.dtype}{list(a.shape)}, expected "
                              f"float32[{n}, {spec.dim}]")
        self._load_rows(table, rows, only_missing, check=True)

    def _load_rows(self, table: str, rows: dict[str, np.ndarray], only_missing: bool = False,
                   check: bool = False) -> int:
        """Store exported rows partition by partition, each under its lock (marked snapshots
        copy a partition whole first). `check`: refuse them, before storing any, if a
        partition is not one this server replicates. Returns the partitions written."""
        keys = np.asarray(rows["keys"], np.uint64)
        order, parts, bounds = partition_runs(keys, self.ring.num_partitions)
        if check:
            for part in parts:
                self._check(table, int(part), write=True)
        ordered = {k: (v[order] if v.ndim == 1 else take_rows(v, order)) for k, v in rows.items()}
        for part, lo, hi in zip(parts.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            store, lock = self._store(table, part)
            with lock:
                self._before_write((table, part), store)
                store.load({k: v[lo:hi] for k, v in ordered.items()}, only_missing)
        return parts.shape[0]

    # ------------------------------------------------------------------ partition copies
    def export_partitions(self, parts: Sequence[int]) -> dict[str, np.ndarray]:
        """Everything of `parts` (every table): rows with optimizer slots, the per-client
        exactly-once marks, the held (BSP) pushes and the pending cuts' copies (SSP/ASP), as
        plain named arrays — what a new replica needs to take over. Call it frozen, so
        nothing changes meanwhile."""
        want = set(int(p) for p in parts)
        out: dict[str, np.ndarray] = {}
        rows: dict[str, list[dict[str, np.ndarray]]] = {}
        marks: dict[str, list[tuple[int, int, int]]] = {}
        for (table, part), store in sorted(self._stores.items()):
            if part not in want:
                continue
            with self._locks[(table, part)]:
                rows.setdefault(table, []).append(store.export())
                marks.setdefault(table, []).extend(
                    (part, cid, seq) for cid, seq in self._marks.get((table, part), {}).items())
        for table, pieces in rows.items():  # one array per field: the receiver re-splits by key
            for field, joined in join_rows(pieces).items():
                out[f"rows/{table}/{field}"] = joined
            out[f"marks/{table}"] = np.array(marks.get(table, []), np.uint64).reshape(-1, 3)
        with self._held_lock:
            held = [(step, g, t, part, cid, seq, keys, grads) for step, hs in self._held.items()
                    for g, t, part, cid, seq, keys, grads in hs if part in want]
        _pack_pushes(out, "held", held)
        with self._cut_cond:
            copies = sorted(self._cut_copies.items())
        for (table, at), copy in copies:
            out.update({f"cutcopy/{at}/{table}/{k}": v for k, v in copy.to_arrays(want).items()})
        out["moved"] = np.array(sorted(want), np.int64)  # the receiver's own copies forget these
        if self.clocks.groups is not None:  # a new replica must gate pulls as the others do
            st = self.clocks.sync.staleness
            out["clocks/config"] = np.array([self.clocks.groups, -1 if st is None else st, self.clocks.settled,
                                             self.cut_every, self._cut_taken], np.int64)
            out["clocks/values"] = np.array(self.clocks.clocks(), np.int64)
        return out

    def load_partitions(self, data: dict[str, np.ndarray]) -> int:
        """Take over partitions exported by another replica (rows, marks, held pushes, cut
        copies) during a membership change (the ring that makes this server their replica comes next).
        Returns the number of (table, partition) pieces loaded."""
        pieces = 0
        settled = None
        if "clocks/config" in data:
            groups, staleness, settled, cut_every, cut_taken = np.asarray(data["clocks/config"]).tolist()
            self.clocks.configure(groups, Sync(None if staleness < 0 else staleness))
            self.cut_every = self.cut_every or cut_every
            with self._cut_cond:
                self._cut_taken = max(self._cut_taken, cut_taken)
            for g, c in enumerate(np.asarray(data["clocks/values"]).tolist()):
                self.clocks.advance(g, c)
            with self._held_lock:
                self._held_through = max(self._held_through, settled)
            # the source's settled step is published only after the pushes held here for it
            # are applied (below): a BSP pull released by it must read them
        rows: dict[str, dict[str, np.ndarray]] = {}
        for key, value in data.items():
            kind, *rest = key.split("/")
            if kind == "rows":
                rows.setdefault(rest[0], {})["/".join(rest[1:])] = value
            elif kind == "marks":
                with self._meta_lock:
                    for part, cid, seq in np.asarray(value, np.uint64).reshape(-1, 3).tolist():
                        marks = self._marks.setdefault((rest[0], part), {})
                        marks[cid] = max(marks.get(cid, -1), seq)
        for table, r in rows.items():  # the manager decides: it sets the new ring next
            pieces += self._load_rows(table, r)
        self._load_cut_copies(data)
        held = _unpack_pushes(data, "held")
        with self._held_lock:
            for step, *push in held:
                self._held.setdefault(step, []).append(tuple(push))
        self._apply_overdue(settled)
        return pieces

    def _load_cut_copies(self, data: dict[str, np.ndarray]) -> None:
        """Take the pending cuts' copies of `export_partitions`: what this server's copies
        held of the moved partitions is replaced by the source's."""
        moved = np.asarray(data.get("moved", np.zeros(0, np.int64))).tolist()
        with self._cut_cond:
            for key in [k for k in self._cut_copies if k[1] <= self._cut_taken]:  # taken at the source
                del self._cut_copies[key]
            mine = list(self._cut_copies.values())
        for copy in mine:
            copy.drop(moved)
        fields: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for name, value in data.items():
            if name.startswith("cutcopy/"):
                _, at, table, field = name.split("/", 3)  # cutcopy/<at>/<table>/<field, maybe with '/'>
                fields.setdefault((table, int(at)), {})[field] = value
        for (table, at), arrays in sorted(fields.items()):
            copy = self._cut_copy(table, at)
            if copy is not None:
                copy.load_arrays(arrays, self._empty_store(table))

    def _apply_overdue(self, settled: int | None = None) -> None:
        """Held pushes whose steps are settled -- here already (this server's clock messages
        arrived before the source's) or at the source (`settled`, published only now) --:
        apply them before any pull of the next step can read these partitions."""
        with self._settle_lock:
            upto = self.clocks.settled if settled is None else max(self.clocks.settled, settled)
            with self._held_lock:
                due = sorted(s for s in self._held if s <= upto)
                taken = [(s, self._held.pop(s)) for s in due]
            for step, held in taken:
                self._apply_held(step, held)
            if settled is not None:
                self.clocks.publish(settled)

    def stats(self) -> dict:
        """Per table: counters and sizes; under `SYNC_STATS`, the worker-group clocks
        (when groups are configured)."""
        out = {}
        every = list(self._stores.items())  # one copy: a load may add stores meanwhile
        with self._cut_cond:
            copies = [(table, c) for (table, _), c in self._cut_copies.items()]
        for table, s in list(self._stats.items()):
            stores = [st for (t, _), st in every if t == table]
            out[table] = dict(s, keys=sum(st.size for st in stores), bytes=sum(st.nbytes for st in stores),
                              cut_copy_bytes=sum(c.nbytes for t, c in copies if t == table),
                              partitions=len(stores), admitted=sum(st.admitted for st in stores),
                              rejected=sum(st.rejected for st in stores),
                              evicted=sum(st.evicted for st in stores))
        if self.clocks.groups is not None:
            out[SYNC_STATS] = self.clocks.stats()
        return out
