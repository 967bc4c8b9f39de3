"""Collisionless key index: 64-bit keys (the full uint64 range) -> dense row slots.

Keys are stored once, densely by slot (`keys()` is a slice); the hash table holds only
one integer per bucket: `(tag << k) | (slot + 1)`, 0 = empty, over 2^k buckets. The tag
is the top bits of the key's splitmix hash, so a probe reads the key array (a second
cache miss) only when the tag matches: 1 in 2^(32-k) mismatched probes. Buckets are
uint32 while the table has <= 2^24 buckets (>= 8 tag bits), uint64 above. A key's home
is the top k bits of its hash times the golden ratio; linear probing at load <= 0.75
(the tags make the longer probe runs cheap: 16 uint32 buckets share a cache line).
Memory: 8 B/key for the keys (+ <= 12.5% growth headroom) and 5.3-10.7 B/key for uint32
buckets, versus 24-48 B/key for separate key and slot arrays at load <= 0.5. Arrays of
1 MiB and more lie in 2 MiB huge pages where they cover whole ones (`jaxps.memory.huge_zeros`:
fewer TLB misses on the random reads); 1-2 MiB of buckets become one full huge page of them
(twice the buckets: up to 21 B/key in that band, and shorter probes).

numba kernels release the GIL: partitions on different threads index in parallel.
(PS_NOTES: numba lookups cost 23-52 ns/key up to 50M keys, ~2x faster than numpy.)
"""
from __future__ import annotations

import numba
import numpy as np

from jaxps.hashing import mix64_scalar
from jaxps.memory import huge_capacity, huge_zeros

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_ONE = np.uint64(1)
_MAX_BUCKETS_32 = 1 << 24  # uint32 buckets up to here: k <= 24 leaves >= 8 tag bits
_GROWTH = 1.125  # key-array (and the store's row arrays') growth factor: <= 12.5% slack
_MAX_LOAD = 0.75  # buckets in use before the table doubles; tags keep long probes cheap


def grown_capacity(cap: int, need: int, minimum: int = 64) -> int:
    """New capacity of a dense array that must hold `need` rows: geometric growth by 1.125
    (amortised O(1) copies per row, at most 12.5% unused capacity)."""
    return max(need, int(cap * _GROWTH) + 1, minimum)


@numba.njit(cache=True, nogil=True, inline="always")
def _hash(key, shift, tshift):
    m = mix64_scalar(key)
    return np.int64((m * _GOLD) >> shift), m >> tshift


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch(buckets, kbits, shift, tshift, skeys, keys):
    """Touch every key's home bucket, then the key of its first tag match, in passes of
    independent loads: the cache misses overlap (memory-level parallelism) instead of
    each probe waiting on the previous key's misses. Returns a value only so the loads
    are not optimised away."""
    mask = buckets.shape[0] - 1
    smask = (_ONE << kbits) - _ONE
    acc = np.uint64(0)
    for i in range(keys.shape[0]):
        h, tag = _hash(keys[i], shift, tshift)
        acc ^= np.uint64(buckets[h])
    for i in range(keys.shape[0]):
        h, tag = _hash(keys[i], shift, tshift)
        while True:
            e = np.uint64(buckets[h])
            if e == 0:
                break
            if (e >> kbits) == tag:
                acc ^= skeys[np.int64(e & smask) - 1]
                break
            h = (h + 1) & mask
    return acc


@numba.njit(cache=True, nogil=True, inline="always")
def _probe(buckets, kbits, smask, mask, skeys, k, h, tag):
    """Walk k's probe sequence from its home h: (k's slot, h) if present, else (-1, the
    empty bucket where it would go)."""
    while True:
        e = np.uint64(buckets[h])
        if e == 0:
            return -1, h
        if (e >> kbits) == tag:
            s = np.int64(e & smask) - 1
            if skeys[s] == k:
                return s, h
        h = (h + 1) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def _slot_or_insert(buckets, kbits, smask, mask, shift, tshift, skeys, k, size, limit):
    """k's slot, storing k at slot `size` when absent (so the slot is `size` exactly when
    k is new: the caller counts it). Absent with the index at `limit` keys: -1, nothing
    stored (the caller grows it, resumes). The one find-or-insert step of every inserting
    kernel (here, `jaxps.tables.host_plan`, `jaxps.ps.batched`)."""
    h, tag = _hash(k, shift, tshift)
    s, h = _probe(buckets, kbits, smask, mask, skeys, k, h, tag)
    if s >= 0:
        return s
    if size >= limit:
        return -1
    buckets[h] = (tag << kbits) | np.uint64(size + 1)
    skeys[size] = k
    return size


@numba.njit(cache=True, nogil=True)
def _find(buckets, kbits, shift, tshift, skeys, keys, out, sink):
    """out[i] = slot of keys[i] or -1; returns the number of absent keys."""
    mask = buckets.shape[0] - 1
    smask = (_ONE << kbits) - _ONE
    missing = 0
    if keys.shape[0] > 1:
        sink[0] = _prefetch(buckets, kbits, shift, tshift, skeys, keys)
    for i in range(keys.shape[0]):
        h, tag = _hash(keys[i], shift, tshift)
        s, _ = _probe(buckets, kbits, smask, mask, skeys, keys[i], h, tag)
        out[i] = s
        if s < 0:
            missing += 1
    return missing


@numba.njit(cache=True, nogil=True)
def _mark_found(buckets, kbits, shift, tshift, skeys, keys, flags, sink):
    """flags[slot of keys[i]] = True for every stored key; returns how many were stored."""
    mask = buckets.shape[0] - 1
    smask = (_ONE << kbits) - _ONE
    if keys.shape[0] > 1:
        sink[0] = _prefetch(buckets, kbits, shift, tshift, skeys, keys)
    hits = 0
    for i in range(keys.shape[0]):
        h, tag = _hash(keys[i], shift, tshift)
        s, _ = _probe(buckets, kbits, smask, mask, skeys, keys[i], h, tag)
        if s >= 0:
            flags[s] = True
            hits += 1
    return hits


@numba.njit(cache=True, nogil=True)
def _find_or_insert(buckets, kbits, shift, tshift, skeys, keys, out, is_new, size, limit, sink):
    """Slots of keys, inserting missing ones at size, size+1, ... Stops before the table
    passes `limit` entries and returns (keys done, new size): the caller grows, resumes."""
    mask = buckets.shape[0] - 1
    smask = (_ONE << kbits) - _ONE
    if keys.shape[0] > 1:
        sink[0] = _prefetch(buckets, kbits, shift, tshift, skeys, keys)
    for i in range(keys.shape[0]):
        s = _slot_or_insert(buckets, kbits, smask, mask, shift, tshift, skeys, keys[i], size, limit)
        if s < 0:
            return i, size
        out[i] = s
        is_new[i] = s == size
        if s == size:
            size += 1
    return keys.shape[0], size


@numba.njit(cache=True, nogil=True)
def _rebuild(buckets, kbits, shift, tshift, skeys, size):
    mask = buckets.shape[0] - 1
    for s in range(size):
        h, tag = _hash(skeys[s], shift, tshift)
        while buckets[h] != 0:
            h = (h + 1) & mask
        buckets[h] = (tag << kbits) | np.uint64(s + 1)


@numba.njit(cache=True, nogil=True)
def _find_gather(buckets, kbits, shift, tshift, skeys, keys, values, out, pos, slots, sink):
    """A pull's partition in one call: slots[i] = slot of keys[i] or -1, and
    out[pos[i]] = values[slots[i]] for the stored ones (absent rows are left to the
    caller). A touch pass over the rows first overlaps their cache misses. Returns the
    number of absent keys."""
    missing = _find(buckets, kbits, shift, tshift, skeys, keys, slots, sink)
    dim = values.shape[1]
    t = np.float32(0)
    for i in range(keys.shape[0]):
        if slots[i] >= 0:
            t += values[slots[i], 0]
    for i in range(keys.shape[0]):
        s = slots[i]
        if s >= 0:
            p = pos[i]
            for j in range(dim):
                out[p, j] = values[s, j]
    sink[0] = np.uint64(t != 0)
    return missing


class KeyIndex:
    """Maps uint64 keys to slots 0..size-1 in insertion order. Not thread-safe: one
    index per partition, guarded by the partition's lock."""

    def __init__(self, capacity: int = 1024):
        self.size = 0
        self.layout = 0  # bumped whenever the bucket or key array is replaced (growth)
        self._sink = np.zeros(1, np.uint64)  # the prefetch passes' result goes here
        self._skeys = huge_zeros(max(16, capacity), np.uint64)
        self._alloc(max(16, 1 << int(np.ceil(np.log2(max(capacity / _MAX_LOAD, 2))))))

    def _alloc(self, n: int) -> None:
        wide = n > _MAX_BUCKETS_32
        bits = 64 if wide else 32
        n = huge_capacity(n, bits // 8)  # 1-2 MiB of buckets: more of them, in one huge page
        k = int(n).bit_length() - 1
        self._buckets = huge_zeros(n, np.uint64 if wide else np.uint32)
        self.layout += 1
        self._kbits = np.uint64(k)
        self._shift = np.uint64(64 - k)
        self._tshift = np.uint64(64 - (bits - k))

    def _grow(self) -> None:
        self._alloc(2 * self._buckets.shape[0])  # (a power of two stays one after huge_capacity)
        _rebuild(self._buckets, self._kbits, self._shift, self._tshift, self._skeys, self.size)

    def _grow_keys(self, need: int) -> None:
        new = huge_zeros(grown_capacity(self._skeys.shape[0], need, 16), np.uint64)
        new[:self.size] = self._skeys[:self.size]
        self._skeys = new
        self.layout += 1

    def reserve(self, n: int) -> None:
        """Grow now so that `n` more keys fit without growing: a kernel that inserts into
        the arrays directly (jaxps.ps.batched) cannot grow them."""
        need = self.size + n
        while int(self._buckets.shape[0] * _MAX_LOAD) < need:
            self._grow()
        if self._skeys.shape[0] < need:
            self._grow_keys(need)

    @property
    def nbytes(self) -> int:
        """Bytes held: buckets plus the dense key array (with its growth headroom)."""
        return self._buckets.nbytes + self._skeys.nbytes

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        return self.find_count(keys)[0]

    def find_count(self, keys: np.ndarray) -> tuple[np.ndarray, int]:
        """(slot of each key or -1, number of absent keys)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(keys.shape[0], np.int64)
        missing = _find(self._buckets, self._kbits, self._shift, self._tshift, self._skeys, keys, out, self._sink)
        return out, int(missing)

    def mark_found(self, keys: np.ndarray, flags: np.ndarray) -> int:
        """flags[slot] = True for the slot of each stored key of `keys` (a bool array of at
        least `size`), in one nogil call with no temporaries; returns how many were stored."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if flags.dtype != np.bool_ or flags.shape[0] < self.size:
            raise ValueError(f"flags must be a bool array of >= {self.size} entries, got {flags.dtype}{flags.shape}")
        return int(_mark_found(self._buckets, self._kbits, self._shift, self._tshift, self._skeys, keys, flags,
                               self._sink))

    def find_or_insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot of each key, whether this call inserted it). A key repeated within the
        call gets one slot; only its first occurrence counts as new."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        n_keys = keys.shape[0]
        out = np.empty(n_keys, np.int64)
        is_new = np.empty(n_keys, np.bool_)
        done = 0
        while done < n_keys:
            n, self.size = _find_or_insert(self._buckets, self._kbits, self._shift, self._tshift,
                                           self._skeys, keys[done:], out[done:], is_new[done:],
                                           self.size, self.insert_limit(), self._sink)
            done += n
            if done < n_keys:
                self.make_room(n_keys - done)
        return out, is_new

    def insert_limit(self) -> int:
        """Keys the index may hold before it must grow: an inserting kernel stops there and
        the caller resumes after `make_room()`."""
        return min(int(self._buckets.shape[0] * _MAX_LOAD), self._skeys.shape[0])

    def make_room(self, pending: int = 1) -> None:
        """Grow whichever of the buckets and the key array is full (at `insert_limit`); the
        key array by at least the `pending` keys still to insert (a small index, e.g. a cut
        copy's, grew by one or two keys a step: a kernel call and a copy each)."""
        if self.size >= int(self._buckets.shape[0] * _MAX_LOAD):
            self._grow()
        if self.size >= self._skeys.shape[0]:
            self._grow_keys(self.size + pending)

    def find_gather(self, keys: np.ndarray, values: np.ndarray, out: np.ndarray,
                    pos: np.ndarray) -> tuple[np.ndarray, int]:
        """out[pos[i]] = values[slot of keys[i]] for every stored key, in one numba call;
        returns (slot of each key or -1, number of absent keys: their rows are not written)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        slots = np.empty(keys.shape[0], np.int64)
        missing = _find_gather(self._buckets, self._kbits, self._shift, self._tshift, self._skeys, keys,
                               values, out, pos, slots, self._sink)
        return slots, int(missing)

    def keys(self) -> np.ndarray:
        """Every key, ordered by slot."""
        return self._skeys[:self.size].copy()

    def clone(self) -> "KeyIndex":
        """An independent copy (same slots)."""
        other = KeyIndex.__new__(KeyIndex)
        other.__dict__.update(self.__dict__)
        other._buckets, other._skeys, other._sink = self._buckets.copy(), self._skeys.copy(), np.zeros(1, np.uint64)
        return other

    def keys_at(self, slots: np.ndarray) -> np.ndarray:
        """The keys at `slots` (each < size)."""
        return self._skeys[slots]


def dedup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys in first-seen order, inverse) for one batch of uint64 keys."""
    index = KeyIndex(capacity=max(16, keys.size // 2))
    inverse, _ = index.find_or_insert(keys.reshape(-1))
    return index.keys(), inverse.reshape(keys.shape)
