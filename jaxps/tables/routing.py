"""Host-side id routing: hash ids to rows, dedup them, bucket them by owner shard.

XLA's CPU sort is slow (~45 ms for 106k keys), while one hash-map pass over the same ids
on the host costs ~1-2 ms and overlaps the device step in the input pipeline; this is
also where jax-tpu-embedding does it. The result is a `LookupPlan` of fixed shapes:

    owner_rows [S, C]  local row index of each unique row, bucketed by owner shard;
                       empty slots hold `rows_per_shard` (out of range: gathers read
                       zeros and scatters drop it)
    inverse    [B, F]  slot (in the flattened S*C) of every id occurrence

Buckets have a fixed capacity C. A batch that needs more is detected exactly (the count
of every bucket is known) and re-planned with a larger capacity, so the answer stays
exact; the cost is one extra compile for the new shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from jaxps.hashing import hashed_row
from jaxps.memory import aligned_empty, aligned_full


@numba.njit(cache=True, nogil=True)
def _plan_kernel(keys_in, mask, hashed, salt, num_rows, rows_per_shard, capacity,
                 owner_rows, inverse, counts, hkeys, hslots, used):
    """One pass: row = hash(id) % num_rows (or the key itself), dedup through an open
    addressing map (hkeys/hslots, all -1 on entry and on exit), bucket by owner."""
    n = keys_in.shape[0]
    hmask = np.uint64(hkeys.shape[0] - 1)
    log2 = 0
    while (1 << log2) < hkeys.shape[0]:
        log2 += 1
    hshift = np.uint64(64 - log2)
    max_used = hkeys.shape[0] // 2  # keep load <= 0.5; past it, give up and retry bigger
    n_used = 0
    bad = -1
    for i in range(n):
        if not mask[i]:
            inverse[i] = 0
            continue
        if hashed:
            r = np.int64(hashed_row(keys_in[i], salt, num_rows))
        else:
            r = np.int64(keys_in[i])
            if r < 0 or r >= num_rows:
                bad = i
                break
        # Fibonacci hashing: one multiply; the top bits of r * 2^64/phi spread rows well
        h = np.int64((np.uint64(r) * np.uint64(0x9E3779B97F4A7C15)) >> hshift)
        while True:
            k = hkeys[h]
            if k == r:
                inverse[i] = hslots[h]
                break
            if k == -1:
                owner = r // rows_per_shard
                c = counts[owner]
                counts[owner] = c + 1
                slot = -1
                if c < capacity:
                    owner_rows[owner, c] = r - owner * rows_per_shard
                    slot = owner * capacity + c
                hkeys[h] = r
                hslots[h] = slot
                used[n_used] = h
                n_used += 1
                inverse[i] = slot
                break
            h = (h + 1) & np.int64(hmask)
        if n_used > max_used:
            bad = -2
            break
    for j in range(n_used):  # leave the map empty for the next batch: O(unique), no memset
        hkeys[used[j]] = -1
    return bad


@dataclass
class LookupPlan:
    owner_rows: np.ndarray  # [S, C] int32
    inverse: np.ndarray     # [B, F] int32
    counts: np.ndarray      # [S] int64 unique rows per owner shard
    capacity: int

    @property
    def unique(self) -> int:
        return int(self.counts.sum())


def _align(n: int, to: int) -> int:
    return max(to, -(-n // to) * to)


def grown_capacity(needed: int, slack: float = 1.25, align: int = 128) -> int:
    """A bucket capacity for `needed` entries: head-room so the next batches fit too, and
    a multiple of `align` so nearby sizes share one compiled step."""
    return _align(int(needed * slack) + 1, align)


class Router:
    """Plans lookups for one table; remembers the bucket capacity across batches.

    num_rows/salt: when given, keys are raw feature ids hashed to rows in the kernel
        (`Table.rows_for` is the numpy twin); otherwise keys are row indices.
    slack: head-room over the largest bucket seen when the capacity is (re)sized.
    align: capacities are multiples of this, so nearby sizes share one compiled step.
    Not thread-safe: each input pipeline owns its routers.
    """

    def __init__(self, rows_per_shard: int, shards: int, capacity: int | None = None,
                 slack: float = 1.25, align: int = 128, num_rows: int | None = None,
                 salt: np.uint64 | None = None):
        self.rows_per_shard = int(rows_per_shard)
        self.shards = int(shards)
        self.capacity = capacity
        self.slack = slack
        self.align = align
        self.hashed = num_rows is not None
        self.num_rows = int(num_rows) if self.hashed else self.rows_per_shard * self.shards
        self.salt = np.uint64(salt if salt is not None else 0)
        self.overflows = 0  # batches whose buckets did not fit the capacity in force
        self._hkeys = np.full(0, -1, np.int64)
        self._reserve(0)

    def plan(self, keys: np.ndarray, mask: np.ndarray) -> LookupPlan:
        flat_keys = np.ascontiguousarray(keys).reshape(-1)
        if flat_keys.dtype not in (np.int64, np.uint64):
            flat_keys = flat_keys.astype(np.int64)
        flat_mask = np.ascontiguousarray(mask, dtype=np.bool_).reshape(-1)
        if self.capacity is None:
            counts = self._run(flat_keys, flat_mask, 0)[2]
            self.capacity = self._size_for(int(counts.max()))
        owner_rows, inverse, counts = self._run(flat_keys, flat_mask, self.capacity)
        if counts.max() > self.capacity:
            self.overflows += 1
            self.capacity = self._size_for(int(counts.max()))
            owner_rows, inverse, counts = self._run(flat_keys, flat_mask, self.capacity)
        return LookupPlan(owner_rows, inverse.reshape(np.shape(keys)), counts, self.capacity)

    def _reserve(self, unique: int) -> None:
        """A hash map with room for `unique` keys at load <= 0.5, kept across batches.

        Sized by the unique keys seen, not the occurrences: with skewed ids a batch has a
        few times fewer unique rows than ids, and a map that stays in cache is what makes
        this pass fast (a 2x-occurrences map was ~3x slower here)."""
        size = 1024
        while size < 2.5 * unique:
            size *= 2
        if self._hkeys.shape[0] < size:
            self._hkeys = np.full(size, -1, np.int64)
            self._hslots = np.empty(size, np.int32)
            self._used = np.empty(size // 2 + 1, np.int64)

    def _size_for(self, max_count: int) -> int:
        return grown_capacity(max_count, self.slack, self.align)

    def _run(self, keys, mask, capacity):
        owner_rows = aligned_full((self.shards, max(capacity, 0)), self.rows_per_shard, np.int32)
        inverse = aligned_empty(keys.shape[0], np.int32)
        counts = np.zeros(self.shards, np.int64)
        while True:
            bad = _plan_kernel(keys, mask, self.hashed, self.salt, self.num_rows, self.rows_per_shard,
                               capacity, owner_rows, inverse, counts, self._hkeys, self._hslots,
                               self._used)
            if bad != -2:
                break
            # more unique keys than the map holds at load 0.5: grow it and redo the batch
            self._reserve(self._hkeys.shape[0])
            owner_rows.fill(self.rows_per_shard)
            counts.fill(0)
        if bad >= 0:
            self._hkeys.fill(-1)
            raise ValueError(f"row ids must lie in [0, {self.num_rows}), got {keys[bad]}")
        return owner_rows, inverse, counts


def warm_up() -> None:
    """Load the routing kernel from numba's cache on a tiny input (see data.parse.warm_up)."""
    Router(4, 1, num_rows=4).plan(np.ones((1, 1), np.uint64), np.ones((1, 1), bool))
