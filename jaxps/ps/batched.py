"""One numba call per request across all the partitions it touches (pull and push).

Why: a server request of 45k keys spans its ~256 partitions. Calling the per-partition
kernels from a Python loop costs tens of microseconds of interpreter work per partition,
and every nogil kernel call drops and retakes the GIL: inside a training process, where
the training thread runs Python between device steps, each retake can wait for that
thread (up to the interpreter's 5 ms switch interval). Measured on an H200 host: ~0.8 us
per key inside the trainer vs ~0.3 us replayed alone. Here the interpreter's part is one
lock pass and one kernel call per request (per thread span), and the kernel walks the
partitions itself.

numba does no bounds checks, so the kernels see every partition's arrays through typed
lists indexed by partition (`PartitionArrays`), refreshed whenever a store replaces an
array (`PartitionStore.layout`), and a push stops at a full partition, which Python grows
(`PartitionStore.reserve_new`) before it resumes. The kernels call the per-partition ones (key index
probes, initial rows, fused row updates): the arithmetic and its order are the same, so
results are bit-identical to the per-partition path.
"""
from __future__ import annotations

import numba
import numpy as np
from numba.typed import List

from jaxps.ps.fused import _adagrad, _sgd
from jaxps.ps.initrows import fill_row
from jaxps.ps.keyindex import _MAX_LOAD, _find_gather, _slot_or_insert

_ONE = np.uint64(1)
SGD_KIND, ADAGRAD_KIND = 0, 1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _init_row(key, salt, scale, out, row):
    """out[row] = key's initial row (zeros when scale is 0, as `init_rows`)."""
    if scale == 0.0:
        for j in range(out.shape[1]):
            out[row, j] = np.float32(0)
    else:
        fill_row(key, salt, scale, out, row)


@numba.njit(cache=True, nogil=True)
def keep_fresh(bounds, r0, r1, keys, pos, out, slots, fresh_keys, fresh):
    """For a pull memo: the initial rows a pull computed for its absent keys, packed from
    fresh[bounds[r0]] on (each thread's span of runs in its own region), and each such key's
    slot set to -1 - j, j its row in `fresh`."""
    j = bounds[r0]
    for i in range(bounds[r0], bounds[r1]):
        if slots[i] < 0:
            fresh_keys[j] = keys[i]
            for c in range(out.shape[1]):
                fresh[j, c] = out[pos[i], c]
            slots[i] = -1 - j
            j += 1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pull_runs(buckets, skeys, values, kbits, shift, tshift, parts, bounds, r0, r1, keys, pos, out, slots,
              fresh_keys, fresh, scale, salt, sink):
    """Runs r0..r1-1 of a request grouped by partition (`partition_runs`): for run r,
    partition parts[r] holds keys[bounds[r]:bounds[r+1]]; out[pos[i]] = row of keys[i]
    (its initial row when absent) and slots[i] = its slot or -1. With `fresh_keys` (a
    memo's): then `keep_fresh` of the span."""
    for r in range(r0, r1):
        p, lo, hi = parts[r], bounds[r], bounds[r + 1]
        m = _find_gather(buckets[p], kbits[p], shift[p], tshift[p], skeys[p], keys[lo:hi], values[p], out,
                         pos[lo:hi], slots[lo:hi], sink)
        if m:
            for i in range(lo, hi):
                if slots[i] < 0:
                    _init_row(keys[i], salt, scale, out, pos[i])
    if fresh_keys.shape[0]:
        keep_fresh(bounds, r0, r1, keys, pos, out, slots, fresh_keys, fresh)


@numba.njit(cache=True, nogil=True)
def gather_slot_runs(acc, parts, bounds, r0, r1, pos, slots, init, out):
    """out[pos[i]] = the optimizer slot row of keys[i] (slots[i] from `pull_runs`), `init`
    where the key is not stored, for runs r0..r1-1: a pull's slots with its rows."""
    dim = out.shape[1]
    for r in range(r0, r1):
        a = acc[parts[r]]
        for i in range(bounds[r], bounds[r + 1]):
            s = slots[i]
            if s >= 0:
                for j in range(dim):
                    out[pos[i], j] = a[s, j]
            else:
                for j in range(dim):
                    out[pos[i], j] = init


@numba.njit(cache=True, nogil=True, error_model="numpy")
def push_runs(buckets, skeys, values, acc, kbits, shift, tshift, sizes, limits, parts, bounds, r0, r1, apply,
              keys, grows, grads, slots, fresh_keys, fresh, scale, salt, slot_init, kind, lr, eps):
    """Apply grads[grows[i]] to keys[i] for the runs r0..r1-1 with apply[r]: keys with
    slots[i] < 0 are looked up and, when absent, stored at sizes[p], sizes[p]+1, ... with
    their initial row -- fresh[j] when j = -1 - slots[i] names a row of fresh_keys[j] ==
    keys[i] (a pull computed it), else computed -- and the optimizer's initial slot value;
    then the fused update of the run's rows (kind: SGD or Adagrad). Returns r1, or the run
    whose partition is full (sizes[p] == limits[p]: its keys so far have their slots, no
    row is updated yet): the caller makes room and calls again from that run."""
    for r in range(r0, r1):
        if not apply[r]:
            continue
        p, lo, hi = parts[r], bounds[r], bounds[r + 1]
        b, sk, v, a = buckets[p], skeys[p], values[p], acc[p]
        kb, sh, tsh = kbits[p], shift[p], tshift[p]
        mask = b.shape[0] - 1
        smask = (_ONE << kb) - _ONE
        size = sizes[p]
        for i in range(lo, hi):
            if slots[i] >= 0:
                continue
            k = keys[i]
            s = _slot_or_insert(b, kb, smask, mask, sh, tsh, sk, k, size, limits[p])
            if s < 0:
                sizes[p] = size
                return r
            if s == size:
                size += 1
                j = -1 - slots[i]
                if j < fresh_keys.shape[0] and fresh_keys[j] == k:
                    for c in range(v.shape[1]):
                        v[s, c] = fresh[j, c]
                else:
                    _init_row(k, salt, scale, v, s)
                if kind == ADAGRAD_KIND:
                    for c in range(a.shape[1]):
                        a[s, c] = slot_init
            slots[i] = s
        sizes[p] = size
        if kind == ADAGRAD_KIND:
            _adagrad(v, a, slots[lo:hi], grads, grows[lo:hi], lr, eps)
        else:
            _sgd(v, slots[lo:hi], grads, grows[lo:hi], lr)
    return r1


# Typed lists are made and changed through these cached kernels: the typed List's own
# Python methods compile on first use in every process (~1.2 s), these load from the cache.
@numba.njit(cache=True)
def _new_list(proto, n):
    out = List()
    for _ in range(n):
        out.append(proto.copy())
    return out


@numba.njit(cache=True)
def _set_item(lst, i, a):
    lst[i] = a


class PartitionArrays:
    """Every partition's arrays of one table on one server, as typed lists indexed by
    partition (a partition not stored here holds empty arrays, never read), for the
    kernels above. `sync(part, store)` (with the partition's lock) refreshes a partition
    whose store or arrays changed and returns whether the kernels can serve it (False:
    uint64 buckets, which the typed lists do not hold: the caller takes the per-partition path)."""

    def __init__(self, num_partitions: int, dim: int, slot: str | None):
        self.slot = slot
        self.dim = dim
        self.buckets = _new_list(np.zeros(0, np.uint32), num_partitions)
        self.skeys = _new_list(np.zeros(0, np.uint64), num_partitions)
        self.values = _new_list(np.zeros((0, dim), np.float32), num_partitions)
        self.acc = _new_list(np.zeros((0, dim), np.float32), num_partitions) if slot else self.values
        self.kbits = np.zeros(num_partitions, np.uint64)
        self.shift = np.zeros(num_partitions, np.uint64)
        self.tshift = np.zeros(num_partitions, np.uint64)
        self.sizes = np.zeros(num_partitions, np.int64)
        self.limits = np.zeros(num_partitions, np.int64)  # keys a partition holds before it must grow
        self._store: list = [None] * num_partitions
        self._layout = [-1] * num_partitions

    def sync(self, part: int, store) -> bool:
        index = store.index
        if self._store[part] is not store or self._layout[part] != store.layout:
            if index._buckets.dtype != np.uint32:
                self._store[part] = None
                return False
            _set_item(self.buckets, part, index._buckets)
            _set_item(self.skeys, part, index._skeys)
            _set_item(self.values, part, store.values)
            if self.slot:
                _set_item(self.acc, part, store.slots[self.slot])
            self.kbits[part], self.shift[part], self.tshift[part] = index._kbits, index._shift, index._tshift
            self.limits[part] = min(index._skeys.shape[0], int(index._buckets.shape[0] * _MAX_LOAD), store.capacity)
            self._store[part], self._layout[part] = store, store.layout
        self.sizes[part] = index.size
        return True

    def forget(self, part: int) -> None:
        """Drop the references to a dropped partition's arrays (their memory can go)."""
        if self._store[part] is not None:
            self._store[part], self._layout[part] = None, -1
            _set_item(self.buckets, part, np.zeros(0, np.uint32))
            _set_item(self.skeys, part, np.zeros(0, np.uint64))
            _set_item(self.values, part, np.zeros((0, self.dim), np.float32))
            if self.slot:
                _set_item(self.acc, part, np.zeros((0, self.dim), np.float32))
