"""One partition of one table in a server: rows, optimizer slots, and the key index.

Rows live in dense arrays indexed by slot (grown by doubling), so pulls and pushes are
gathers/scatters on contiguous memory. A key never seen is not stored on pull: it reads
as its initial row, computed from (table seed, key) alone, so replicas, restores and a
device table of the same seed agree. A push stores it and applies the row-wise optimizer
(the same `jaxps.optim.rowwise` code the device step runs, with xp = numpy).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from jaxps.optim.rowwise import RowOptimizer
from jaxps.memory import row_view, take_rows
from jaxps.ps.fused import fused_update
from jaxps.ps.initrows import init_rows
from jaxps.ps.keyindex import KeyIndex, grown_capacity

FUSED = True  # use jaxps.ps.fused kernels where they equal the numpy update (tests turn it off)


def join_rows(pieces: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Exported rows (`PartitionStore.export`'s fields) of several pieces as one, field by
    field in piece order; a single piece is returned as it is (no copy)."""
    if len(pieces) == 1:
        return pieces[0]
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


@dataclass
class PartitionStore:
    """Rows `values[:size]` and optimizer slots `slots[name][:size]` ([capacity, dim]
    float32, capacity grown by 1.25x so at most a quarter is headroom), by the index's
    slot. A pull's index lookup and row gather are one numba call writing straight into
    the reply; a push with Adagrad or SGD updates its rows in place in one numba pass
    (`jaxps.ps.fused`, bit-identical to the optimizer's numpy update); other optimizers
    gather and scatter through np.take / np.put on one-void-per-row views of the arrays
    (3-10x faster than 2-D fancy indexing, PS_NOTES.md)."""

    dim: int
    optimizer: RowOptimizer
    init_scale: float = 0.0
    seed: int = 0
    min_count: int = 1            # admission: a key is stored from its min_count-th push on
    max_rows: int | None = None   # eviction: above this, the least recently pushed rows go
    index: KeyIndex = field(default_factory=KeyIndex)

    # Admission counts of candidate keys are kept for at most this many keys per
    # partition; past it they restart (a key then needs min_count fresh pushes).
    PROBATION_KEYS = 1 << 20

    def __post_init__(self):
        if self.min_count < 1 or (self.max_rows is not None and self.max_rows < 1):
            raise ValueError(f"min_count must be >= 1 and max_rows >= 1 or None "
                             f"(got {self.min_count}, {self.max_rows})")
        self.values = np.zeros((0, self.dim), np.float32)
        self.slots = {s: np.zeros((0, self.dim), np.float32) for s in self.optimizer.slots}
        self.last_step = np.zeros(0, np.int64)
        self._probation = KeyIndex()
        self._counts = np.zeros(0, np.int32)
        self.admitted = 0   # keys stored after reaching min_count pushes
        self.rejected = 0   # key pushes dropped while below min_count
        self.evicted = 0    # rows removed by the row budget
        self.epoch = 0      # bumped whenever stored keys may change slots (eviction rebuilds the index)
        self._layout = 0    # bumped whenever a row array or the index object is replaced
        self._views()
        self._fused = fused_update(self.optimizer) if FUSED else None

    def clone(self) -> "PartitionStore":
        """An independent copy: rows, slots, key index, admission counts and recency (it
        admits and evicts as this one would)."""
        other = PartitionStore(self.dim, self.optimizer, self.init_scale, self.seed, self.min_count, self.max_rows,
                               self.index.clone())
        other.values, other.last_step = self.values.copy(), self.last_step.copy()
        other.slots = {k: v.copy() for k, v in self.slots.items()}
        other._probation, other._counts = self._probation.clone(), self._counts.copy()
        other.admitted, other.rejected, other.evicted, other.epoch = self.admitted, self.rejected, self.evicted, self.epoch
        other._views()
        return other

    def _views(self) -> None:
        self._layout += 1
        self._vview = self._rows(self.values)
        self._sviews = {k: self._rows(v) for k, v in self.slots.items()}

    @staticmethod
    def _rows(a: np.ndarray) -> np.ndarray:
        return row_view(a)

    @property
    def layout(self) -> int:
        """Changes whenever an array the batched kernels hold (rows, slots, index buckets
        or keys) is replaced: their cached references are stale then."""
        return (self._layout << 32) | self.index.layout

    def reserve_new(self, n: int) -> None:
        """Room for `n` more keys in the index and the row arrays, without further growth."""
        self.index.reserve(n)
        self._reserve(self.size + n)

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def capacity(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held: row arrays at their capacity (headroom included) plus the index."""
        return self.values.nbytes + sum(a.nbytes for a in self.slots.values()) + self.index.nbytes

    def _gather(self, view: np.ndarray, slots: np.ndarray) -> np.ndarray:
        out = np.empty((slots.shape[0], self.dim), np.float32)
        np.take(view, slots, out=self._rows(out))
        return out

    def pull(self, keys: np.ndarray) -> np.ndarray:
        """Rows of `keys` [n, dim]; unseen keys read as their initial rows."""
        out = np.empty((keys.shape[0], self.dim), np.float32)
        self.pull_into(keys, out, np.arange(keys.shape[0]))
        return out

    def pull_into(self, keys: np.ndarray, out: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """out[pos[i]] = row of keys[i] (its initial row when unseen): index lookup and row
        gather in one numba call, straight into the caller's [N, dim] float32 buffer. Returns
        the keys' slots (-1: unseen), valid for `push(slots=...)` while `epoch` is unchanged."""
        slots, n_missing = self.index.find_gather(keys, self.values, out, pos)
        if n_missing:
            missing = np.flatnonzero(slots < 0)
            out[pos[missing]] = init_rows(np.asarray(keys, np.uint64)[missing], self.dim, self.init_scale,
                                          self.seed)
        return slots

    def _admit(self, keys: np.ndarray) -> np.ndarray | None:
        """Positions of the keys that may be stored now (None: all of them). A key not yet
        stored is counted per push; its gradients are dropped until its min_count-th."""
        slots, n_missing = self.index.find_count(keys)
        if not n_missing:
            return None
        missing = np.flatnonzero(slots < 0)
        if self._probation.size + missing.size > self.PROBATION_KEYS:
            self._probation, self._counts = KeyIndex(), np.zeros(0, np.int32)
        pslots, _ = self._probation.find_or_insert(keys[missing])
        if self._counts.shape[0] < self._probation.size:
            self._counts = np.concatenate([self._counts, np.zeros(
                grown_capacity(self._counts.shape[0], self._probation.size) - self._counts.shape[0], np.int32)])
        np.add.at(self._counts, pslots, 1)
        admit = self._counts[pslots] >= self.min_count
        self.admitted += int(admit.sum())
        self.rejected += int((~admit).sum())
        keep = np.ones(keys.shape[0], bool)
        keep[missing[~admit]] = False
        return np.flatnonzero(keep)

    def push(self, keys: np.ndarray, grads: np.ndarray, step: int, grad_rows: np.ndarray | None = None,
             slots: np.ndarray | None = None) -> None:
        """Apply summed gradients of unique `keys` with the row-wise optimizer: key i's is
        grads[i], or grads[grad_rows[i]] when given (a server passes its whole request's
        grads and the partition's positions in it, saving a permuted copy). `slots`: the
        keys' slots from a `pull_into` of this store at the current `epoch` (-1: unseen
        then; looked up again), which saves the index probes of stored keys."""
        keys = np.asarray(keys, np.uint64)
        if self.min_count > 1:  # admission counts every unstored key: the full lookup
            slots = None
            keep = self._admit(keys)
            if keep is not None:
                keys = keys[keep]
                if grad_rows is None:
                    grads = take_rows(grads, keep)
                else:
                    grad_rows = grad_rows[keep]
                if not keys.size:
                    return
        self._push(keys, grads, step, grad_rows, slots)
        if self.max_rows is not None and self.size > self.max_rows:
            self._evict()

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int, grad_rows: np.ndarray | None,
              known: np.ndarray | None = None) -> None:
        if known is None:
            slots, is_new = self.index.find_or_insert(keys)
            fresh = np.flatnonzero(is_new)
        elif known.min(initial=0) >= 0:  # the common case: every key was stored at the pull
            slots, fresh = known, None
        else:
            absent = np.flatnonzero(known < 0)
            slots = known.copy()
            slots[absent], is_new = self.index.find_or_insert(np.asarray(keys, np.uint64)[absent])
            fresh = absent[is_new]
        if fresh is not None and fresh.size:
            self.put_new(slots[fresh], np.asarray(keys, np.uint64)[fresh])
        if self._fused is not None:  # bit-identical to the numpy path below (jaxps.ps.fused)
            grads = np.ascontiguousarray(grads, np.float32)
            self._fused(self.values, self.slots, slots, grads,
                        np.arange(slots.shape[0]) if grad_rows is None else grad_rows)
        else:
            self._update_numpy(slots, grads if grad_rows is None else take_rows(grads, grad_rows), step)
        if self.max_rows is not None:  # only eviction reads it: a random write per row saved
            self.last_step[slots] = step

    def put_new(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """Initial rows and optimizer slots at `slots`, for `keys` just inserted there."""
        self._reserve(self.index.size)
        np.put(self._vview, slots, self._rows(init_rows(keys, self.dim, self.init_scale, self.seed)))
        for name, view in self._sviews.items():
            fill = np.full((slots.shape[0], self.dim), self.optimizer.slot_init(name), np.float32)
            np.put(view, slots, self._rows(fill))

    def put_rows(self, slots: np.ndarray, values: np.ndarray, slot_values: dict[str, np.ndarray]) -> None:
        """Rows [n, dim] and optimizer slots {name: [n, dim]} at `slots` of keys in the index."""
        self._reserve(self.index.size)
        np.put(self._vview, slots, self._rows(np.ascontiguousarray(values, np.float32)))
        for name, view in self._sviews.items():
            np.put(view, slots, self._rows(np.ascontiguousarray(slot_values[name], np.float32)))

    def stored_rows(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(stored [n] bool, rows [n, dim], {slot: [n, dim]}) of `keys`; rows of keys not
        stored are zeros (meaningless)."""
        slots = self.index.find(keys)
        stored = slots >= 0
        at = np.where(stored, slots, 0)
        if not stored.any():
            empty = np.zeros((keys.shape[0], self.dim), np.float32)
            return stored, empty, {n: empty for n in self.slots}
        return stored, take_rows(self.values, at), {n: take_rows(a, at) for n, a in self.slots.items()}

    def _update_numpy(self, slots: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Gather rows and slots, `optimizer.update(numpy, ...)`, scatter them back."""
        params = self._gather(self._vview, slots)
        state = {name: self._gather(view, slots) for name, view in self._sviews.items()}
        new_params, new_state = self.optimizer.update(np, params, state, grads.astype(np.float32, copy=False),
                                                      np.float32(step))
        np.put(self._vview, slots, self._rows(np.ascontiguousarray(new_params, np.float32)))
        for name, view in self._sviews.items():
            np.put(view, slots, self._rows(np.ascontiguousarray(new_state[name], np.float32)))

    def export(self) -> dict[str, np.ndarray]:
        """Every stored row: keys [n], values [n, dim], each optimizer slot [n, dim]."""
        n = self.size
        out = {"keys": self.index.keys()[:n].copy(), "values": self.values[:n].copy()}
        out.update({f"slot_{k}": v[:n].copy() for k, v in self.slots.items()})
        return out

    def load(self, rows: dict[str, np.ndarray], only_missing: bool = False) -> np.ndarray:
        """Store exported rows (overwriting rows of the same keys; with `only_missing`,
        keys already stored keep their rows: a first writer's initial values win).
        Returns the slots of the rows stored."""
        keys = np.asarray(rows["keys"], np.uint64)
        if only_missing:
            fresh = np.flatnonzero(self.index.find(keys) < 0)
            if fresh.size < keys.shape[0]:
                rows = {k: (v[fresh] if v.ndim == 1 else take_rows(v, fresh)) for k, v in rows.items()}
                keys = keys[fresh]
        slots, _ = self.index.find_or_insert(keys)
        self.put_rows(slots, rows["values"], {name: rows[f"slot_{name}"] for name in self.slots})
        return slots

    def _evict(self) -> None:
        """Keep the most recently pushed rows, down to 90% of the budget so evictions are
        rare (each rebuilds the partition: O(rows))."""
        size, keep_n = self.size, int(self.max_rows * 0.9)
        order = np.argsort(self.last_step[:size], kind="stable")  # least recent first
        keep = np.sort(order[size - keep_n:])
        kept_keys = self.index.keys()[keep]
        self.index = KeyIndex(capacity=keep_n)
        self._layout += 1
        self.index.find_or_insert(kept_keys)  # slots 0..keep_n-1 in the kept order
        self.values[:keep_n] = take_rows(self.values, keep)
        for arr in self.slots.values():
            arr[:keep_n] = take_rows(arr, keep)
        self.last_step[:keep_n] = self.last_step[keep]
        self.evicted += size - keep_n
        self.epoch += 1  # slots moved: pull memos of this store are void

    def _reserve(self, n: int) -> None:
        cap = self.values.shape[0]
        if n <= cap:
            return
        cap = grown_capacity(cap, n)

        def grow(a: np.ndarray) -> np.ndarray:
            b = np.empty((cap, self.dim), np.float32)
            b[:a.shape[0]] = a
            b[a.shape[0]:] = 0
            return b

        self.values = grow(self.values)
        self.slots = {k: grow(v) for k, v in self.slots.items()}
        steps = np.zeros(cap, np.int64)
        steps[:self.last_step.shape[0]] = self.last_step
        self.last_step = steps
        self._views()
