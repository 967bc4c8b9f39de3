"""`PSClient` (ps-lite's KVWorker): routes unique keys to their servers by the ring, talks
to all servers in parallel, and reassembles the rows in the caller's order.

Transports carry one request to one server; `InProcessTransport` is a direct call (the
embedded default). Request ids are (client id, sequence): a retry reuses its id, so a
server applies each push once.
"""
from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from jaxps.memory import put_rows, take_rows
from jaxps.ps.clock import Sync
from jaxps.ps.ring import Ring, partition_of
from jaxps.ps.server import Frozen, PSServer, TableSpec, WrongOwner
from jaxps.ps.store import join_rows


class Transport(Protocol):
    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0,
             ring_version: int = -1, client: int = -1) -> np.ndarray: ...
    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, request_id: tuple[int, int],
             step: int, group: int = -1, ring_version: int = -1) -> bool: ...
    def clock(self, group: int, clock: int, groups: int, sync: Sync, cut_every: int = 0) -> int: ...
    def stats(self) -> dict: ...
    def create_table(self, spec: TableSpec) -> bool: ...


class InProcessTransport:
    """A server in this process: calls go straight to it, arrays are not copied. `kill()`
    makes every later call fail as a dead server's would (tests, benchmarks)."""

    def __init__(self, server: PSServer):
        self._server = server
        self.alive = True

    @property
    def server(self) -> PSServer:
        if not self.alive:
            raise ConnectionError(f"PS server {self._server.name} is down")
        return self._server

    def kill(self) -> None:
        """Later calls fail, and so do pulls waiting at its clock gate (a gRPC call in
        flight to a SIGKILLed server fails the same way)."""
        self.alive = False
        self._server.clocks.fail(ConnectionError(f"PS server {self._server.name} is down"))

    def pull(self, table, keys, group=-1, clock=0, ring_version=-1, client=-1, out=None, slots_out=None):
        """`out`: write the rows there (no copy; only an in-process server can); `slots_out`:
        the optimizer slots too (`PSServer.pull`)."""
        return self.server.pull(table, keys, group, clock, ring_version, client, out, slots_out)

    def push(self, table, keys, grads, request_id, step, group=-1, ring_version=-1):
        return self.server.push(table, keys, grads, request_id, step, group, ring_version)

    def clock(self, group, clock, groups, sync, cut_every=0):
        return self.server.clock(group, clock, groups, sync, cut_every)

    def stats(self):
        return self.server.stats()

    def create_table(self, spec):
        return self.server.create_table(spec)

    def export(self, table, at=None, ticket=None):
        return self.server.export(table, ticket) if at is None else self.server.export_cut(table, at)

    def export_pieces(self, table, ticket=None):
        return self.server.export_pieces(table, ticket)

    def mark(self, table):
        return self.server.mark(table)

    def load(self, table, rows, only_missing=False):
        self.server.load(table, rows, only_missing)

    # membership (the server manager's calls)
    def ping(self) -> int:
        return self.server.ring.version

    def freeze(self):
        self.server.freeze()

    def unfreeze(self):
        self.server.unfreeze()

    def fence(self):
        self.server.fence()

    def set_ring(self, ring, drop=True):
        self.server.set_ring(ring, drop)

    def export_partitions(self, parts):
        return self.server.export_partitions(parts)

    def table_specs(self):
        return self.server.table_specs()

    def clear(self, table):
        self.server.clear(table)

    def load_partitions(self, data):
        return self.server.load_partitions(data)


RingView = tuple[Ring, Mapping[str, Transport]]


class DaemonPool:
    """`submit` as ThreadPoolExecutor's, on daemon threads. A worker group's pull may wait
    at the servers' clock gate for groups that never come (a dead or finished job);
    ThreadPoolExecutor joins its threads at interpreter exit, so such a pull would hold the
    process up for the gate's whole timeout (clock.GATE_TIMEOUT). Abandoning a waiting read is safe."""

    def __init__(self, max_workers: int, thread_name_prefix: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._max, self._prefix = max_workers, thread_name_prefix
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        with self._lock:  # threads start on demand, up to max_workers, and stay
            if len(self._threads) < self._max:
                t = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - the caller's .result() raises it
                future.set_exception(e)

    def shutdown(self, wait: bool = True) -> None:
        """Stop the threads once queued calls ran; `wait`: join those not stuck at a gate
        (each join is bounded: a thread waiting at a clock gate is left to exit with the process)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join(timeout=1.0)


def _start_all(pool: "ThreadPoolExecutor | DaemonPool", calls: Sequence[Callable[[], object]]) -> list[Future]:
    """Start `calls` in parallel, all but the last on `pool` and the last in this thread:
    a request to one server never waits for a pool thread to wake (with other processes
    on the cores a hand-off measured 2-5 ms per request, ~30 ns per key of a 100k-key pull)."""
    futures = [pool.submit(c) for c in calls[:-1]]
    if calls:
        done: Future = Future()
        try:
            done.set_result(calls[-1]())
        except Exception as e:  # noqa: BLE001 - raised by .result(), like a pool thread's
            done.set_exception(e)
        futures.append(done)
    return futures


def retryable(e: BaseException) -> bool:
    """A failure a newer ring may cure: a dead or frozen server, a moved partition."""
    if isinstance(e, (Frozen, WrongOwner, ConnectionError)):
        return True
    code = getattr(e, "code", None)  # PSRPCError (gRPC) without importing grpc here
    return getattr(code, "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION")


class PSClient:
    def __init__(self, ring: Ring, transports: Mapping[str, Transport], tables: Sequence[TableSpec],
                 client_id: int | None = None, replicas: int = 0,
                 ring_source: Callable[[], RingView] | None = None, retry_seconds: float = 120.0,
                 owns_transports: bool = False):
        """replicas: backups per partition (hot standby): each push goes to a partition's
        primary and its backups and returns once all applied it; pulls read the primary.
        ring_source: where a newer ring (and transports for new servers) comes from when a
        server dies, freezes or moves a partition (e.g. `ServerManager.view`); calls are
        then retried with the same request id for up to `retry_seconds`.
        owns_transports: `close` also closes the transports given here and the ring source
        (which closes those it made; `from_env` makes them all for this client alone)."""
        missing = set(ring.servers) - set(transports)
        if missing:
            raise ValueError(f"no transport for servers {sorted(missing)}")
        self.ring, self.transports = ring, dict(transports)
        self.replicas, self.ring_source, self.retry_seconds = replicas, ring_source, retry_seconds
        self._own = list(self.transports.values()) if owns_transports else None  # closed by `close`
        self.tables = {t.name: t for t in tables}
        # never 0: over gRPC a pull with client id 0 leaves no memo (a strict repair's, an eval's)
        self.client_id = (int.from_bytes(os.urandom(8), "little") >> 1 or 1) if client_id is None else client_id
        self._seq = itertools.count()
        self.retries = 0           # calls retried on a newer ring
        # Pulls of a worker group may wait at the servers for other groups (and for this
        # group's own clock): they get their own threads, and so do pushes, clocks and
        # ungated pulls (strict repairs, evaluation), which never queue behind a waiting pull.
        n = 16 if ring_source is not None else max(1, len(ring.servers))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jaxps-ps-pull")
        self._gated_pool = DaemonPool(max_workers=n, thread_name_prefix="jaxps-ps-gated-pull")
        self._push_pool = ThreadPoolExecutor(max_workers=n * (replicas + 1), thread_name_prefix="jaxps-ps-push")

    def _with_retries(self, what: str, call):
        """Run `call()`; on a failure a newer ring may cure, refresh the ring and retry."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.02
        while True:
            try:
                return call()
            except Exception as e:  # noqa: BLE001
                if self.ring_source is None or not retryable(e) or time.monotonic() > deadline:
                    raise
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                ring, transports = self.ring_source()
                self.transports.update(transports)
                self.ring = ring

    def _route(self, keys: np.ndarray, ring: Ring) -> tuple[np.ndarray | None, list[tuple[str, int, int]]]:
        """(order grouping keys by primary server or None when there is one server, and
        (server, lo, hi) runs of the grouped keys)."""
        if len(ring.servers) == 1:
            return None, [(ring.servers[0], 0, keys.shape[0])]
        owners = ring.owners()[partition_of(keys, ring.num_partitions)].astype(np.uint16)
        order = np.argsort(owners, kind="stable")  # radix sort of 16-bit ids
        bounds = np.searchsorted(owners[order], np.arange(len(ring.servers) + 1))
        return order, [(name, int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(ring.servers)
                       if bounds[i + 1] > bounds[i]]

    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0,
             out: np.ndarray | None = None, memo: bool = True) -> np.ndarray:
        """Rows [n, dim] of unique uint64 `keys`, in order, written into `out` when given (a
        C-contiguous float32 [n, dim] array: in-process servers write there directly, no
        copy of the rows). A worker `group` (>= 0) pulls at its `clock`: the servers answer
        once the consistency model allows. memo: the servers keep the pull's lookups for
        this client's push of exactly these keys (`jaxps.ps.memo`); False for pulls whose
        keys are never pushed as such (a strict repair's): their memos would push out the
        ones a push will use."""
        keys = np.ascontiguousarray(keys, np.uint64)
        if out is not None and (out.shape != (keys.shape[0], self.tables[table].dim) or out.dtype != np.float32
                                or not out.flags.c_contiguous):
            raise ValueError(f"table {table!r}: out must be a C-contiguous float32 "
                             f"[{keys.shape[0]}, {self.tables[table].dim}] array, got {out.dtype}{list(out.shape)}")
        client = self.client_id if memo else -1
        return self._with_retries("pull", lambda: self._pull(table, keys, group, clock, out, client))

    @property
    def reads_slots(self) -> bool:
        """Whether `pull_with_slots` works: one server, in this process."""
        return len(self.ring.servers) == 1 and isinstance(self.transports[self.ring.servers[0]],
                                                          InProcessTransport)

    def pull_with_slots(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows [n, dim] of unique `keys` and their optimizer slots, read together (a key's
        row and slots are of the same push), with no memo. Only where `reads_slots`."""
        if not self.reads_slots:
            raise ValueError("pull_with_slots needs one in-process server")
        keys = np.ascontiguousarray(keys, np.uint64)
        spec = self.tables[table]
        rows = np.empty((keys.shape[0], spec.dim), np.float32)
        slots = {name: np.empty((keys.shape[0], spec.dim), np.float32) for name in spec.optimizer.slots}
        def call():
            ring = self.ring  # read again on a retry, as `_pull` does
            v = ring.version if self.ring_source is not None else -1
            return self.transports[ring.servers[0]].pull(table, keys, -1, 0, v, -1, rows, slots)
        self._with_retries("pull", call)
        return rows, slots

    def _server_pull(self, server: str, table, keys, group, clock, v, client, out):
        """One server's reply, in `out` when given."""
        transport = self.transports[server]
        if out is None:
            return transport.pull(table, keys, group, clock, v, client)
        if isinstance(transport, InProcessTransport):
            return transport.pull(table, keys, group, clock, v, client, out)
        out[...] = transport.pull(table, keys, group, clock, v, client)
        return out

    def _pull(self, table, keys, group, clock, out, client):
        ring = self.ring
        order, runs = self._route(keys, ring)
        grouped = keys if order is None else keys[order]
        v = ring.version if self.ring_source is not None else -1  # checked where rings change
        pool = self._gated_pool if group >= 0 else self._pool  # a gate-waiting pull holds its thread
        if order is None:  # one server: its reply is the answer
            futures = _start_all(pool, [functools.partial(self._server_pull, s, table, grouped[lo:hi], group,
                                                          clock, v, client, out) for s, lo, hi in runs])
            if futures:
                return futures[0].result()
            return np.zeros((0, self.tables[table].dim), np.float32) if out is None else out
        # grouped by server: each reply lands in place
        rows = np.empty((keys.shape[0], self.tables[table].dim), np.float32)
        futures = _start_all(pool, [functools.partial(self._server_pull, s, table, grouped[lo:hi], group, clock, v,
                                                      client, rows[lo:hi]) for s, lo, hi in runs])
        for f in futures:
            f.result()
        if out is None:
            out = np.empty_like(rows)
        put_rows(out, order, rows)
        return out

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int, group: int = -1) -> None:
        """Send summed gradients of unique keys; returns once every server applied them
        (every replica of each key's partition; under BSP, a worker group's push once every
        server holds it for its step). One request id for all of it, kept across retries."""
        keys = np.ascontiguousarray(keys, np.uint64)
        grads = np.ascontiguousarray(grads, np.float32)
        request_id = (self.client_id, next(self._seq))
        self._with_retries("push", lambda: self._push(table, keys, grads, request_id, step, group))

    def _push(self, table, keys, grads, request_id, step, group):
        ring = self.ring
        v = ring.version if self.ring_source is not None else -1
        if self.replicas == 0 or len(ring.servers) == 1:
            order, runs = self._route(keys, ring)
            k, g = (keys, grads) if order is None else (keys[order], take_rows(grads, order))
            calls = [functools.partial(self.transports[s].push, table, k[lo:hi], g[lo:hi], request_id, step,
                                       group, v) for s, lo, hi in runs]
        else:  # each server gets the keys of every partition it replicates
            sets = ring.replicas(self.replicas)[partition_of(keys, ring.num_partitions)]
            calls = []
            for i, name in enumerate(ring.servers):
                sel = np.flatnonzero((sets == i).any(axis=1))
                if sel.size:
                    calls.append(functools.partial(self.transports[name].push, table, keys[sel],
                                                   take_rows(grads, sel), request_id, step, group, v))
        futures = _start_all(self._push_pool, calls)
        errors = []
        for f in futures:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - wait for all; the retry skips what landed
                errors.append(e)
        if errors:
            raise errors[0]

    def clock(self, group: int, clock: int, groups: int, sync: Sync, cut_every: int = 0) -> None:
        """Tell every server that worker `group` (of `groups`) completed `clock` steps
        (`jaxps.ps.clock.DONE`: it finished). Send it after that step's pushes returned.
        cut_every: under SSP/ASP, the servers copy the rows at every multiple of it that
        all groups completed (consistent cuts for hot checkpoints; 0: none)."""
        def call():
            futures = _start_all(self._push_pool, [functools.partial(self.transports[s].clock, group, clock,
                                                                     groups, sync, cut_every)
                                                   for s in self.ring.servers])
            for f in futures:
                f.result()
        self._with_retries("clock", call)

    def wait_clock(self, group: int, clock: int) -> None:
        """Block until every server would answer worker `group`'s pull at `clock` (an empty
        pull at each: the wait is all it does)."""
        empty = np.zeros(0, np.uint64)
        table = next(iter(self.tables), "")

        def call():
            for s in self.ring.servers:
                self.transports[s].pull(table, empty, group, clock)
        self._with_retries("wait-clock", call)

    def clear(self, table: str) -> None:
        """Drop every stored row of `table` on every server (before loading a snapshot)."""
        self._with_retries("clear", lambda: [self.transports[s].clear(table) for s in self.ring.servers])

    def create_tables(self, specs: Sequence[TableSpec]) -> None:
        """Make every server serve these tables (idempotent; a conflicting spec fails)."""
        for spec in specs:
            for s in self.ring.servers:
                self.transports[s].create_table(spec)
            self.tables[spec.name] = spec

    def export(self, table: str, at: int | None = None, marks: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Every stored row of `table` across the group (keys, values, optimizer slots):
        each server exports the partitions it is the primary of. `at`: the rows at that cut
        step (worker groups under SSP/ASP with cuts; waits until every group completed it).
        `marks`: the rows at those marks (`mark`), each server's by its ticket."""
        def call():
            if marks is not None:
                parts = [self.transports[s].export(table, ticket=t) for s, t in marks.items()]
            else:
                parts = [self.transports[s].export(table) if at is None else self.transports[s].export(table, at)
                         for s in self.ring.servers]
            return join_rows(parts)
        return self._with_retries("export", call)

    def export_pieces(self, table: str, marks: dict[str, int]) -> list[dict[str, np.ndarray]]:
        """`export(table, marks=...)` in pieces, not joined (a snapshot writer streams them to
        its files): a server in this process gives one per partition, a remote one a single
        piece (its reply)."""
        def call():
            return [p for s, t in marks.items() for p in self.transports[s].export_pieces(table, ticket=t)]
        return self._with_retries("export", call)

    def mark(self, table: str) -> dict[str, int]:
        """Snapshot `table` on every server now without copying it (copy-on-write, for
        `export(table, marks=...)` later). A mark lives on its server only: with a
        `ring_source` (servers may fail over) take `export` at once instead."""
        return {s: self.transports[s].mark(table) for s in self.ring.servers}

    def load(self, table: str, rows: dict[str, np.ndarray], only_missing: bool = False) -> None:
        """Spread snapshot rows over this group by its ring (any number of servers; every
        replica of a partition gets its rows); `only_missing`: rows the servers already
        store keep their values."""
        keys = np.ascontiguousarray(rows["keys"], np.uint64)
        ring = self.ring
        sets = ring.replicas(self.replicas)[partition_of(keys, ring.num_partitions)]
        for i, name in enumerate(ring.servers):
            sel = np.flatnonzero((sets == i).any(axis=1))
            if sel.size:
                self.transports[name].load(table, {k: (v[sel] if v.ndim == 1 else take_rows(v, sel))
                                                   for k, v in rows.items()}, only_missing)

    def stats(self) -> dict:
        return {name: self.transports[name].stats() for name in self.ring.servers}

    def close(self) -> None:
        """Stop this client's request threads; with `owns_transports`, close its transports
        and ring source too (otherwise they stay with whoever made them: several clients
        may share them). Idempotent."""
        self._pool.shutdown(wait=True)
        self._gated_pool.shutdown(wait=True)
        self._push_pool.shutdown(wait=True)
        own, self._own = self._own, None
        if own is None:
            return
        for transport in own:
            if hasattr(transport, "close"):
                transport.close()
        if hasattr(self.ring_source, "close"):  # it closes the transports it made
            self.ring_source.close()

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ENV_SERVERS = "JAXPS_PS_SERVERS"        # "ps-0=host:port,ps-1=host:port" (set by jaxps launch)
ENV_PARTITIONS = "JAXPS_PS_PARTITIONS"
ENV_TOKEN = "JAXPS_PS_TOKEN"
ENV_REPLICAS = "JAXPS_PS_REPLICAS"      # backups per partition the servers keep (default 0)
ENV_MANAGER = "JAXPS_PS_MANAGER"        # host:port of `jaxps ps-manager` (failover, elastic servers)


def from_env(num_partitions: int = 256, vnodes: int = 64) -> PSClient | None:
    """A client of the remote server group named by JAXPS_PS_SERVERS (None when unset)."""
    spec = os.environ.get(ENV_SERVERS, "").strip()
    if not spec:
        return None
    from jaxps.ps.grpc_transport import GrpcTransport
    addresses = dict(item.split("=", 1) for item in spec.split(",") if item)
    ring = Ring(int(os.environ.get(ENV_PARTITIONS, num_partitions)), vnodes, list(addresses))
    token = os.environ.get(ENV_TOKEN) or None
    source = None
    if os.environ.get(ENV_MANAGER, "").strip():
        from jaxps.ps.manager import RemoteRing
        source = RemoteRing(os.environ[ENV_MANAGER].strip(), token)
    return PSClient(ring, {n: GrpcTransport(a, token=token) for n, a in addresses.items()}, [],
                    replicas=int(os.environ.get(ENV_REPLICAS, "0")), ring_source=source, owns_transports=True)


def embedded(tables: Sequence[TableSpec], servers: int = 1, num_partitions: int = 256,
             vnodes: int = 64, replicas: int = 0, threads: int = 1) -> PSClient:
    """A server group inside this process (the default for `jaxps train` with host tables).
    threads: per server, for big requests (`PSServer`)."""
    names = [f"ps-{i}" for i in range(servers)]
    ring = Ring(num_partitions, vnodes, names)
    return PSClient(ring, {n: InProcessTransport(PSServer(n, ring, tables, replicas, threads=threads))
                           for n in names}, tables, replicas=replicas)
