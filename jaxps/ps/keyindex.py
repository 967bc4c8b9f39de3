"""Collisionless key index: 64-bit keys (the full uint64 range) -> dense row slots.

Open addressing with linear probing at load <= 0.5 over a power-of-two table; a key's
home is the top bits of its splitmix hash times the golden ratio. Occupancy is kept in
the slot array (-1 = empty), so every uint64 value is a valid key. numba kernels release
the GIL: partitions on different threads index in parallel. (PS_NOTES: numba lookups
cost 23-52 ns/key up to 50M keys, ~2x faster than vectorised numpy.)
"""
from __future__ import annotations

import numba
import numpy as np

from jaxps.hashing import mix64_scalar

_GOLD = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True, inline="always")
def _home(key, shift):
    return np.int64((mix64_scalar(key) * _GOLD) >> shift)


@numba.njit(cache=True, nogil=True)
def _find(hkeys, hslots, shift, keys, out):
    mask = hkeys.shape[0] - 1
    for i in range(keys.shape[0]):
        k = keys[i]
        h = _home(k, shift)
        while True:
            s = hslots[h]
            if s < 0:
                out[i] = -1
                break
            if hkeys[h] == k:
                out[i] = s
                break
            h = (h + 1) & mask


@numba.njit(cache=True, nogil=True)
def _find_or_insert(hkeys, hslots, shift, keys, out, is_new, size, limit):
    """Slots of keys, inserting missing ones at size, size+1, ... Stops before the table
    passes `limit` entries and returns the number of keys done (the caller grows, resumes)."""
    mask = hkeys.shape[0] - 1
    for i in range(keys.shape[0]):
        k = keys[i]
        h = _home(k, shift)
        while True:
            s = hslots[h]
            if s < 0:
                if size >= limit:
                    return i, size
                hkeys[h] = k
                hslots[h] = size
                out[i] = size
                is_new[i] = True
                size += 1
                break
            if hkeys[h] == k:
                out[i] = s
                is_new[i] = False
                break
            h = (h + 1) & mask
    return keys.shape[0], size


@numba.njit(cache=True, nogil=True)
def _reinsert(hkeys, hslots, shift, old_keys, old_slots):
    mask = hkeys.shape[0] - 1
    for j in range(old_slots.shape[0]):
        s = old_slots[j]
        if s < 0:
            continue
        k = old_keys[j]
        h = _home(k, shift)
        while hslots[h] >= 0:
            h = (h + 1) & mask
        hkeys[h] = k
        hslots[h] = s


class KeyIndex:
    """Maps uint64 keys to slots 0..size-1 in insertion order. Not thread-safe: one
    index per partition, guarded by the partition's lock."""

    def __init__(self, capacity: int = 1024):
        self.size = 0
        self._alloc(max(16, 1 << int(np.ceil(np.log2(max(2 * capacity, 2))))))

    def _alloc(self, n: int) -> None:
        self._hkeys = np.zeros(n, np.uint64)
        self._hslots = np.full(n, -1, np.int64)
        self._shift = np.uint64(64 - int(np.log2(n)))

    def _grow(self) -> None:
        old_keys, old_slots = self._hkeys, self._hslots
        self._alloc(2 * old_keys.shape[0])
        _reinsert(self._hkeys, self._hslots, self._shift, old_keys, old_slots)

    @property
    def nbytes(self) -> int:
        return self._hkeys.nbytes + self._hslots.nbytes

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(keys.shape[0], np.int64)
        _find(self._hkeys, self._hslots, self._shift, keys, out)
        return out

    def find_or_insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot of each key, whether this call inserted it). A key repeated within the
        call gets one slot; only its first occurrence counts as new."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty(keys.shape[0], np.int64)
        is_new = np.zeros(keys.shape[0], np.bool_)
        done = 0
        while done < keys.shape[0]:
            limit = self._hkeys.shape[0] // 2
            n, self.size = _find_or_insert(self._hkeys, self._hslots, self._shift, keys[done:],
                                           out[done:], is_new[done:], self.size, limit)
            done += n
            if done < keys.shape[0]:
                self._grow()
        return out, is_new

    def keys(self) -> np.ndarray:
        """Every key, ordered by slot."""
        occupied = self._hslots >= 0
        out = np.empty(self.size, np.uint64)
        out[self._hslots[occupied]] = self._hkeys[occupied]
        return out


def dedup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique keys in first-seen order, inverse) for one batch of uint64 keys."""
    index = KeyIndex(capacity=max(16, keys.size // 2))
    inverse, _ = index.find_or_insert(keys.reshape(-1))
    return index.keys(), inverse.reshape(keys.shape)
