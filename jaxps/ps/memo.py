"""Pull memos: a push of exactly the keys a client pulled reuses the pull's routing and
key-index lookups instead of repeating them.

Why: a training step pushes the gradients of exactly the unique keys it pulled. On a table
much larger than the caches each index probe costs one or two cache misses per key (the
bucket, then the stored key), and routing a request to its partitions is a hash and a sort
of every key: the push would repeat all of it. Measured on a 20M-50M-row table (100k-key
batches): the push's probes were ~150-170 ns/key of ~800 for pull + push.

Correctness never rests on the client or on who pulled: a memo serves only a push whose keys
equal the memo's (compared in full), and a partition's slots only while that partition's
store is the same object at the same `epoch` (an eviction rebuilds the index and bumps it; a
clear or a ring change replaces the store). Slots of stored keys never move otherwise, and a
key absent at the pull is looked up (and inserted) again by the push, since another client
may have stored it meanwhile. A memo is used once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numba
import numpy as np


@numba.njit(cache=True)  # holds the GIL: ~20 us, less than handing the GIL over and back
def _same(a, b):
    for i in range(a.shape[0]):
        if a[i] != b[i]:
            return False
    return True


@dataclass
class PullMemo:
    """One pull's routing and lookups: the request's keys (a copy: callers may reuse their
    array), `partition_runs` of them, the keys in that order, per run the store and its
    epoch at the time of the pull, and every key's slot in that order (negative: absent at
    the pull; -1 - j when `fresh[j]` holds its initial row, computed by the pull, for key
    `fresh_keys[j]`: a push that stores the key copies it instead of computing it again;
    `jaxps.ps.batched.keep_fresh`)."""

    keys: np.ndarray
    order: np.ndarray
    parts: np.ndarray
    bounds: np.ndarray
    ordered_keys: np.ndarray
    stores: list
    epochs: list[int]
    slots: np.ndarray
    fresh_keys: np.ndarray
    fresh: np.ndarray

    def __post_init__(self):
        # `fresh` is sized for every key but filled only for the absent ones (np.empty: the
        # untouched pages are never resident), so the budget counts the filled rows only;
        # counting all would evict memos of a warm table long before `per_client`
        filled = int(np.count_nonzero(self.slots < 0))
        self.nbytes = (self.keys.nbytes + self.order.nbytes + self.ordered_keys.nbytes + self.slots.nbytes
                       + self.fresh_keys.nbytes + filled * self.fresh.strides[0])

    def slots_for(self, run: int, store) -> np.ndarray | None:
        """The pull's slots of run `run` if they are still valid in `store` (call with the
        partition's lock held), else None."""
        if self.stores[run] is store and store.epoch == self.epochs[run]:
            return self.slots[self.bounds[run]:self.bounds[run + 1]]
        return None


class PullMemos:
    """The last `per_client` pull memos of each (client, table), at most `max_bytes` of them
    in all (the least recently used (client, table) loses its oldest first). Thread-safe.

    per_client: a trainer pulls up to prefetch + 1 + in-flight pushes (3 + 1 + 2 by default)
    steps ahead of the push a memo serves; with 4 kept, a strict run (whose training thread
    waits in repairs while the input thread runs ahead) found 4 of 12 memos (12 of 12 at 8).
    A memo holds ~32 bytes per key (keys twice, order, slots) and 8 + 4 * dim more (room
    for the initial rows of keys absent at the pull and their keys): 256 MiB is 25-80
    pulls of 100k keys."""

    def __init__(self, per_client: int = 8, max_bytes: int = 256 << 20):
        self.per_client, self.max_bytes = per_client, max_bytes
        self._memos: OrderedDict[tuple[int, str], list[PullMemo]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def put(self, client: int, table: str, memo: PullMemo) -> None:
        with self._lock:
            memos = self._memos.pop((client, table), [])
            memos.append(memo)
            self._bytes += memo.nbytes
            self._memos[(client, table)] = memos   # most recently used last
            if len(memos) > self.per_client:
                self._bytes -= memos.pop(0).nbytes
            while self._bytes > self.max_bytes and self._memos:
                key, oldest = next(iter(self._memos.items()))
                if oldest:
                    self._bytes -= oldest.pop(0).nbytes
                if not oldest:
                    del self._memos[key]

    def take(self, client: int, table: str, keys: np.ndarray) -> PullMemo | None:
        """Remove and return the newest memo of (client, table) whose keys equal `keys`."""
        with self._lock:
            memos = self._memos.get((client, table), ())
            for i in range(len(memos) - 1, -1, -1):
                m = memos[i]
                if m.keys.shape == keys.shape and _same(m.keys, keys):
                    del memos[i]
                    if not memos:  # an empty list at the LRU's head would stall put's eviction
                        del self._memos[(client, table)]
                    self._bytes -= m.nbytes
                    self.hits += 1
                    return m
            self.misses += 1
            return None

    def clear(self) -> None:
        with self._lock:
            self._memos.clear()
            self._bytes = 0
