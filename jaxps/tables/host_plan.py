"""Host-side planning of a HostTable batch: its ids -> unique PS keys and the inverse, in
nogil numba passes.

The numpy form (keys = rows_for(ids), keys[mask], dedup, index.keys(), inverse[~mask] = 0,
inverse[mask] = ..., and for a process's share mix64 / argsort / bincount / cumsum /
fancy indexing) made ~10 passes over the ~160k ids of a batch on the input thread. Each
big numpy op may hand the GIL to the training thread, and getting it back can take up to
the 5 ms switch interval while that thread is busy; numba kernels that release the GIL
run through. Here one kernel hashes the ids to keys (hashed tables), skips masked
occurrences, dedups through the batch's `KeyIndex` (the strict repair later probes the
same index) and writes the int32 inverse; with several processes it also gives each new
key its owner process and its rank among that owner's keys, and a second kernel maps
this process's examples to their rows of the [processes * C] block and picks its keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from jaxps.hashing import hashed_row, mix64_scalar
from jaxps.memory import aligned_empty
from jaxps.ps.keyindex import KeyIndex, _slot_or_insert

_ONE = np.uint64(1)


@numba.njit(cache=True, nogil=True)
def _dedup_kernel(ids, mask, hashed, salt, num_rows, start, buckets, kbits, shift, tshift, skeys, size, limit,
                  inverse, owners, owner_of, rank_of, counts):
    """From occurrence `start` on: key = the id, or its row hash(id ^ salt) % num_rows;
    inverse[i] = the key's slot in first-seen order (0 where masked out), inserting new
    keys into the index arrays at size, size+1, ... With owners > 1 a new key's owner
    (mix64(key) % owners) and rank among that owner's keys go to owner_of / rank_of.
    Stops before the index passes `limit` keys; returns (occurrences done, new size)."""
    n = ids.shape[0]
    mask_b = buckets.shape[0] - 1
    smask = (_ONE << kbits) - _ONE
    for i in range(start, n):
        if not mask[i]:
            inverse[i] = 0
            continue
        k = np.uint64(ids[i])
        if hashed:
            k = hashed_row(k, salt, num_rows)
        s = _slot_or_insert(buckets, kbits, smask, mask_b, shift, tshift, skeys, k, size, limit)
        if s < 0:
            return i, size
        if s == size:
            size += 1
            if owners > 1:
                o = np.int64(mix64_scalar(k) % np.uint64(owners))
                owner_of[s] = o
                rank_of[s] = counts[o]
                counts[o] += 1
        inverse[i] = s
    return n, size


@numba.njit(cache=True, nogil=True)
def _share_kernel(slots, mask, lo, owner_of, rank_of, capacity, rank, skeys, size, inverse, mine):
    """inverse[i] = block row of occurrence lo + i: owner * capacity + rank (0 where masked
    out); mine[r] = the r-th key of process `rank`."""
    for i in range(inverse.shape[0]):
        j = lo + i
        if mask[j]:
            s = slots[j]
            inverse[i] = np.int32(owner_of[s] * capacity + rank_of[s])
        else:
            inverse[i] = 0
    for s in range(size):
        if owner_of[s] == rank:
            mine[rank_of[s]] = skeys[s]


@dataclass
class Dedup:
    """A batch's unique keys, planned for `counts.size` processes."""
    index: KeyIndex          # the unique keys, slots in first-seen order (`index.keys()`)
    slots: np.ndarray        # [n] int32 slot of each occurrence (0 where masked out)
    owner_of: np.ndarray     # [>= unique] int64 owning process of each slot (several processes)
    rank_of: np.ndarray      # [>= unique] int64 its place among its owner's keys
    counts: np.ndarray       # [processes] int64 keys per owner

    @property
    def unique(self) -> int:
        return self.index.size

    def share(self, mask: np.ndarray, lo: int, hi: int, capacity: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(process `rank`'s keys in first-seen order, the int32 block rows of occurrences
        [lo, hi): owner * capacity + rank among the owner's keys)."""
        inverse = aligned_empty(hi - lo, np.int32)
        mine = np.empty(int(self.counts[rank]), np.uint64)
        _share_kernel(self.slots, mask, lo, self.owner_of, self.rank_of, capacity, rank, self.index._skeys,
                      self.index.size, inverse, mine)
        return mine, inverse


def dedup_ids(ids: np.ndarray, mask: np.ndarray, num_rows: int | None = None, salt: np.uint64 | int = 0,
              owners: int = 1) -> Dedup:
    """Dedup a batch's flat ids where `mask` holds. num_rows/salt: ids are raw feature ids
    of a hashed table, keyed by their row hash(id ^ salt) % num_rows (`Table.rows_for`);
    None: the ids are the keys. owners > 1: rank the keys per owning process too."""
    ids = np.ascontiguousarray(ids).reshape(-1)
    if ids.dtype not in (np.int64, np.uint64):
        ids = ids.astype(np.uint64)
    mask = np.ascontiguousarray(mask, np.bool_).reshape(-1)
    if mask.shape != ids.shape:
        raise ValueError(f"mask has {mask.shape[0]} entries for {ids.shape[0]} ids")
    n = ids.shape[0]
    index = KeyIndex(capacity=max(16, n // 2))
    slots = aligned_empty(n, np.int32)
    many = owners > 1
    owner_of = np.empty(n if many else 0, np.int64)
    rank_of = np.empty(n if many else 0, np.int64)
    counts = np.zeros(owners, np.int64)
    hashed = num_rows is not None
    done = 0
    while done < n:
        done, index.size = _dedup_kernel(ids, mask, hashed, np.uint64(salt), np.uint64(num_rows or 1), done,
                                         index._buckets, index._kbits, index._shift, index._tshift, index._skeys,
                                         index.size, index.insert_limit(), slots, owners, owner_of, rank_of,
                                         counts)
        if done < n:
            index.make_room()
    return Dedup(index, slots, owner_of, rank_of, counts)
