"""`PSServer` (ps-lite's KVServer): holds the partitions the ring gives it, serves pulls,
applies pushes with the row-wise optimizer, exactly once per request id.

One lock per partition, not per key and not per server: pulls and pushes that touch
different partitions run in parallel (numpy and the numba index release the GIL).
Worker groups (`clock`): a pull from a group waits as its consistency model says
(`jaxps.ps.clock`); under BSP a group's push is held until every group pushed that step,
then all of them are summed per key and applied as one update. Partitions are the unit
a snapshot or a migration copies.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxps.memory import put_rows, take_rows
from jaxps.optim import rowwise
from jaxps.optim.rowwise import RowOptimizer
from jaxps.ps.clock import GroupClocks, Sync
from jaxps.ps.keyindex import dedup
from jaxps.ps.ring import Ring, partition_of
from jaxps.ps.store import PartitionStore


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


def partition_runs(keys: np.ndarray, num_partitions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group keys by partition: (order that sorts them by partition, the partitions present,
    run bounds [len(present) + 1]). A stable sort of 16-bit partition ids is a radix sort
    in numpy (O(n)); after one permutation every partition's keys are a contiguous run."""
    parts = partition_of(keys, num_partitions)
    parts = parts.astype(np.uint16 if num_partitions <= 1 << 16 else np.uint32)
    order = np.argsort(parts, kind="stable")
    ordered = parts[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if keys.size else \
        np.zeros(0, np.int64)
    return order, ordered[starts].astype(np.int64), np.append(starts, keys.shape[0])


SYNC_STATS = "__sync__"   # the key of the worker-group clocks in `stats()`


class PSServer:
    def __init__(self, name: str, ring: Ring, tables: Sequence[TableSpec], dedup_window: int = 1 << 16,
                 wait_timeout: float | None = 600.0):
        """dedup_window: how many recent push request ids are remembered for exactly-once
        application under client retries. wait_timeout: seconds a pull may wait for a slow
        worker group before it fails (naming the clocks), None = forever."""
        self.name, self.ring = name, ring
        self.clocks = GroupClocks()
        self.wait_timeout = wait_timeout
        self._held: dict[int, list[tuple[int, int, str, np.ndarray, np.ndarray]]] = {}  # BSP: step -> pushes
        self._held_seq = 0
        self._settle_lock = threading.Lock()
        self.tables = {t.name: t for t in tables}
        self._stores: dict[tuple[str, int], PartitionStore] = {}
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._meta_lock = threading.Lock()
        # request id -> None once applied, or the Event its first attempt sets when done
        self._applied: OrderedDict[tuple[int, int], threading.Event | None] = OrderedDict()
        self._dedup_window = dedup_window
        self._stats = {t: {"pulls": 0, "pushes": 0, "pulled_keys": 0, "pushed_keys": 0,
                           "duplicate_pushes": 0} for t in self.tables}

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
    def _store(self, table: str, part: int) -> tuple[PartitionStore, threading.Lock]:
        key = (table, part)
        store = self._stores.get(key)
        if store is None:
            with self._meta_lock:
                store = self._stores.get(key)
                if store is None:
                    spec = self.tables[table]
                    budget = None if spec.max_rows is None else -(-spec.max_rows // self.ring.num_partitions)
                    store = PartitionStore(spec.dim, spec.optimizer, spec.init_scale, spec.seed,
                                           spec.min_count, budget)
                    self._locks[key] = threading.Lock()
                    self._stores[key] = store
        return store, self._locks[key]

    def _check(self, table: str, keys: np.ndarray, part: int) -> None:
        owner = self.ring.servers[self.ring.owners()[part]] if self.ring.servers else None
        if owner != self.name:
            raise WrongOwner(f"server {self.name}: partition {part} of table {table!r} belongs to "
                          f"{owner} (ring version {self.ring.version})")

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
    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0) -> np.ndarray:
        """Rows [n, dim] float32 of `keys` (all in partitions this server owns). With a
        worker `group` (>= 0), first wait as the consistency model requires of a pull at
        `clock` (the steps that group completed)."""
        spec = self._validate(table, keys)
        if group >= 0:
            self.clocks.wait(group, clock, self.wait_timeout)
        order, parts, bounds = partition_runs(keys, self.ring.num_partitions)
        for part in parts:
            self._check(table, keys, int(part))
        ordered_keys = keys[order]
        ordered = np.empty((keys.shape[0], spec.dim), np.float32)
        for part, lo, hi in zip(parts.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            store, lock = self._store(table, part)
            with lock:
                ordered[lo:hi] = store.pull(ordered_keys[lo:hi])
        out = np.empty_like(ordered)
        put_rows(out, order, ordered)
        s = self._stats[table]
        s["pulls"] += 1
        s["pulled_keys"] += keys.shape[0]
        return out

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, request_id: tuple[int, int],
             step: int, group: int = -1) -> bool:
        """Apply summed gradients of unique keys once per request id. Returns False (and
        changes nothing) for a request id already applied: a client's retry. Under BSP a
        worker group's push (group >= 0) of `step` is held and applied, summed with every
        other group's push of that step, once all groups completed it."""
        spec = self._validate(table, keys)
        if grads.shape != (keys.shape[0], spec.dim) or grads.dtype != np.float32:
            raise PSError(f"table {table!r}: grads must be float32 [{keys.shape[0]}, {spec.dim}], "
                          f"got {grads.dtype}{list(grads.shape)}")
        while True:
            with self._meta_lock:
                if request_id not in self._applied:
                    mine = self._applied[request_id] = threading.Event()
                    while len(self._applied) > self._dedup_window:
                        self._applied.popitem(last=False)
                    break
                running = self._applied[request_id]
                if running is None:  # applied before: a client's retry
                    self._stats[table]["duplicate_pushes"] += 1
                    return False
            # the first attempt is still applying: its outcome decides (if it fails, its
            # id is removed and this retry applies the push itself)
            running.wait()
        try:
            if group >= 0 and self.clocks.sync is not None and self.clocks.sync.bsp:
                self._hold(table, keys, grads, step, group)
            else:
                self._apply(table, keys, grads, step)
        except BaseException:
            with self._meta_lock:  # not applied: a retry must be allowed through
                self._applied.pop(request_id, None)
            mine.set()
            raise
        with self._meta_lock:
            if request_id in self._applied:
                self._applied[request_id] = None
        mine.set()
        s = self._stats[table]
        s["pushes"] += 1
        s["pushed_keys"] += keys.shape[0]
        return True

    def _apply(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
        order, parts, bounds = partition_runs(keys, self.ring.num_partitions)
        for part in parts:
            self._check(table, keys, int(part))
        ordered_keys, ordered_grads = keys[order], take_rows(grads, order)
        for part, lo, hi in zip(parts.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            store, lock = self._store(table, part)
            with lock:
                store.push(ordered_keys[lo:hi], ordered_grads[lo:hi], step)

    def _hold(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int, group: int) -> None:
        """Keep a BSP push until its step settles (ownership is checked now)."""
        self.clocks._check(group)
        order, parts, bounds = partition_runs(keys, self.ring.num_partitions)
        for part in parts:
            self._check(table, keys, int(part))
        with self._settle_lock:
            if step <= self.clocks.settled:
                raise PSError(f"server {self.name}: group {group} pushed step {step} of table {table!r} "
                              f"after it settled (at {self.clocks.settled}): under BSP a group pushes a "
                              f"step before it advances its clock past it")
            self._held_seq += 1
            self._held.setdefault(step, []).append((group, self._held_seq, table, np.array(keys),
                                                    np.array(grads)))

    # ------------------------------------------------------------------ worker groups
    def clock(self, group: int, clock: int, groups: int, sync: Sync) -> int:
        """Worker `group` (of `groups`, under `sync`) completed `clock` steps (`DONE`: it
        finished). Under BSP, every step all groups have now completed is applied: each
        table's held pushes summed per key (in group order, so every replica sums alike)
        and applied once. Returns the steps settled."""
        self.clocks.configure(groups, sync)
        with self._settle_lock:
            settled, slowest = self.clocks.advance(group, clock)
            for step in sorted(s for s in self._held if s <= slowest):
                self._settle(step, self._held.pop(step))
            self.clocks.publish(slowest)
            return self.clocks.settled

    def _settle(self, step: int, held: list) -> None:
        by_table: dict[str, list] = {}
        for group, seq, table, keys, grads in sorted(held, key=lambda h: (h[0], h[1])):
            by_table.setdefault(table, []).append((keys, grads))
        for table, pushes in sorted(by_table.items()):
            keys = np.concatenate([k for k, _ in pushes])
            grads = np.concatenate([g for _, g in pushes])
            if len(pushes) > 1:
                keys, inverse = dedup(keys)
                summed = np.zeros((keys.shape[0], grads.shape[1]), np.float32)
                np.add.at(summed, inverse, grads)
                grads = summed
            self._apply(table, keys, grads, step)

    def export(self, table: str) -> dict[str, np.ndarray]:
        """A snapshot of every row this server stores for `table`, partition by partition
        under each partition's lock (a consistent cut when no push is in flight)."""
        spec = self.tables.get(table)
        if spec is None:
            raise PSError(f"server {self.name}: unknown table {table!r}")
        parts = []
        for (t, part), store in list(self._stores.items()):
            if t == table:
                with self._locks[(t, part)]:
                    parts.append(store.export())
        if not parts:
            empty = {"keys": np.zeros(0, np.uint64), "values": np.zeros((0, spec.dim), np.float32)}
            empty.update({f"slot_{n}": np.zeros((0, spec.dim), np.float32) for n in spec.optimizer.slots})
            return empty
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def load(self, table: str, rows: dict[str, np.ndarray], only_missing: bool = False) -> None:
        """Store snapshot rows whose partitions this server owns (any ring may have written
        them); `only_missing`: leave rows already stored as they are."""
        keys = np.asarray(rows["keys"], np.uint64)
        self._validate(table, keys)
        order, parts, bounds = partition_runs(keys, self.ring.num_partitions)
        for part in parts:
            self._check(table, keys, int(part))
        ordered = {k: (v[order] if v.ndim == 1 else take_rows(v, order)) for k, v in rows.items()}
        for part, lo, hi in zip(parts.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
            store, lock = self._store(table, part)
            with lock:
                store.load({k: v[lo:hi] for k, v in ordered.items()}, only_missing)

    def stats(self) -> dict:
        """Per table: counters and sizes; under `SYNC_STATS`, the worker-group clocks
        (when groups are configured)."""
        out = {}
        for table, s in self._stats.items():
            stores = [st for (t, _), st in self._stores.items() if t == table]
            out[table] = dict(s, keys=sum(st.size for st in stores), bytes=sum(st.nbytes for st in stores),
                              partitions=len(stores), admitted=sum(st.admitted for st in stores),
                              rejected=sum(st.rejected for st in stores),
                              evicted=sum(st.evicted for st in stores))
        if self.clocks.groups is not None:
            out[SYNC_STATS] = self.clocks.stats()
        return out
