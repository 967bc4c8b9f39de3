"""`PSClient` (ps-lite's KVWorker): routes unique keys to their servers by the ring, talks
to all servers in parallel, and reassembles the rows in the caller's order.

Transports carry one request to one server; `InProcessTransport` is a direct call (the
embedded default). Request ids are (client id, sequence): a retry reuses its id, so a
server applies each push once.
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Protocol, Sequence

import numpy as np

from jaxps.memory import put_rows, take_rows
from jaxps.ps.clock import Sync
from jaxps.ps.ring import Ring, partition_of
from jaxps.ps.server import PSServer, TableSpec


class Transport(Protocol):
    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0) -> np.ndarray: ...
    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, request_id: tuple[int, int],
             step: int, group: int = -1) -> bool: ...
    def clock(self, group: int, clock: int, groups: int, sync: Sync) -> int: ...
    def stats(self) -> dict: ...
    def create_table(self, spec: TableSpec) -> bool: ...


class InProcessTransport:
    """A server in this process: calls go straight to it, arrays are not copied."""

    def __init__(self, server: PSServer):
        self.server = server

    def pull(self, table, keys, group=-1, clock=0):
        return self.server.pull(table, keys, group, clock)

    def push(self, table, keys, grads, request_id, step, group=-1):
        return self.server.push(table, keys, grads, request_id, step, group)

    def clock(self, group, clock, groups, sync):
        return self.server.clock(group, clock, groups, sync)

    def stats(self):
        return self.server.stats()

    def create_table(self, spec):
        return self.server.create_table(spec)

    def export(self, table):
        return self.server.export(table)

    def load(self, table, rows, only_missing=False):
        self.server.load(table, rows, only_missing)


class PSClient:
    def __init__(self, ring: Ring, transports: Mapping[str, Transport], tables: Sequence[TableSpec],
                 client_id: int | None = None):
        missing = set(ring.servers) - set(transports)
        if missing:
            raise ValueError(f"no transport for servers {sorted(missing)}")
        self.ring, self.transports = ring, dict(transports)
        self.tables = {t.name: t for t in tables}
        self.client_id = int.from_bytes(os.urandom(8), "little") >> 1 if client_id is None else client_id
        self._seq = itertools.count()
        # Pulls of a worker group may wait at the servers for other groups (and for this
        # group's own clock): pushes and clocks get their own threads so they never queue
        # behind a waiting pull.
        n = max(1, len(ring.servers))
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jaxps-ps-pull")
        self._push_pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="jaxps-ps-push")

    def _route(self, keys: np.ndarray) -> tuple[np.ndarray | None, list[tuple[str, int, int]]]:
        """(order grouping keys by server or None when there is one server, and
        (server, lo, hi) runs of the grouped keys)."""
        if len(self.ring.servers) == 1:
            return None, [(self.ring.servers[0], 0, keys.shape[0])]
        owners = self.ring.owners()[partition_of(keys, self.ring.num_partitions)].astype(np.uint16)
        order = np.argsort(owners, kind="stable")  # radix sort of 16-bit ids
        bounds = np.searchsorted(owners[order], np.arange(len(self.ring.servers) + 1))
        return order, [(name, int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(self.ring.servers)
                       if bounds[i + 1] > bounds[i]]

    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0) -> np.ndarray:
        """Rows [n, dim] of unique uint64 `keys`, in order. A worker `group` (>= 0) pulls
        at its `clock`: the servers answer once the consistency model allows."""
        keys = np.ascontiguousarray(keys, np.uint64)
        order, runs = self._route(keys)
        grouped = keys if order is None else keys[order]
        futures = [(lo, hi, self._pool.submit(self.transports[s].pull, table, grouped[lo:hi], group, clock))
                   for s, lo, hi in runs]
        if order is None:  # one server: its reply is the answer
            return futures[0][2].result() if futures else np.zeros((0, self.tables[table].dim), np.float32)
        rows = np.empty((keys.shape[0], self.tables[table].dim), np.float32)
        for lo, hi, f in futures:
            rows[lo:hi] = f.result()
        out = np.empty_like(rows)
        put_rows(out, order, rows)
        return out

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, step: int, group: int = -1) -> None:
        """Send summed gradients of unique keys; returns once every server applied them
        (under BSP, a worker group's push once every server holds it for its step)."""
        keys = np.ascontiguousarray(keys, np.uint64)
        grads = np.ascontiguousarray(grads, np.float32)
        order, runs = self._route(keys)
        if order is not None:
            keys, grads = keys[order], take_rows(grads, order)
        futures = [self._push_pool.submit(self.transports[s].push, table, keys[lo:hi], grads[lo:hi],
                                     (self.client_id, next(self._seq)), step, group)
                   for s, lo, hi in runs]
        for f in futures:
            f.result()

    def clock(self, group: int, clock: int, groups: int, sync: Sync) -> None:
        """Tell every server that worker `group` (of `groups`) completed `clock` steps
        (`jaxps.ps.clock.DONE`: it finished). Send it after that step's pushes returned."""
        futures = [self._push_pool.submit(t.clock, group, clock, groups, sync) for t in self.transports.values()]
        for f in futures:
            f.result()

    def create_tables(self, specs: Sequence[TableSpec]) -> None:
        """Make every server serve these tables (idempotent; a conflicting spec fails)."""
        for spec in specs:
            for t in self.transports.values():
                t.create_table(spec)
            self.tables[spec.name] = spec

    def export(self, table: str) -> dict[str, np.ndarray]:
        """Every stored row of `table` across the group (keys, values, optimizer slots)."""
        parts = [t.export(table) for t in self.transports.values()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def load(self, table: str, rows: dict[str, np.ndarray], only_missing: bool = False) -> None:
        """Spread snapshot rows over this group by its ring (any number of servers);
        `only_missing`: rows the servers already store keep their values."""
        keys = np.ascontiguousarray(rows["keys"], np.uint64)
        order, runs = self._route(keys)
        if order is not None:
            rows = {k: (v[order] if v.ndim == 1 else take_rows(v, order)) for k, v in rows.items()}
        for s, lo, hi in runs:
            self.transports[s].load(table, {k: v[lo:hi] for k, v in rows.items()}, only_missing)

    def stats(self) -> dict:
        return {name: t.stats() for name, t in self.transports.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._push_pool.shutdown(wait=True)


ENV_SERVERS = "JAXPS_PS_SERVERS"        # "ps-0=host:port,ps-1=host:port" (set by jaxps launch)
ENV_PARTITIONS = "JAXPS_PS_PARTITIONS"
ENV_TOKEN = "JAXPS_PS_TOKEN"


def from_env(num_partitions: int = 256, vnodes: int = 64) -> PSClient | None:
    """A client of the remote server group named by JAXPS_PS_SERVERS (None when unset)."""
    spec = os.environ.get(ENV_SERVERS, "").strip()
    if not spec:
        return None
    from jaxps.ps.grpc_transport import GrpcTransport
    addresses = dict(item.split("=", 1) for item in spec.split(",") if item)
    ring = Ring(int(os.environ.get(ENV_PARTITIONS, num_partitions)), vnodes, list(addresses))
    token = os.environ.get(ENV_TOKEN) or None
    return PSClient(ring, {n: GrpcTransport(a, token=token) for n, a in addresses.items()}, [])


def embedded(tables: Sequence[TableSpec], servers: int = 1, num_partitions: int = 256,
             vnodes: int = 64) -> PSClient:
    """A server group inside this process (the default for `jaxps train` with host tables)."""
    names = [f"ps-{i}" for i in range(servers)]
    ring = Ring(num_partitions, vnodes, names)
    return PSClient(ring, {n: InProcessTransport(PSServer(n, ring, tables)) for n in names}, tables)
