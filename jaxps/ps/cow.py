"""Copy-on-write snapshots of a partition: its rows at a mark, copied later.

A hot checkpoint needs the rows exactly as they were after one step's pushes, but copying
a whole table then would hold up the next step's push for as long as the copy takes
(tens to hundreds of milliseconds for a few hundred thousand rows). Instead the server
marks the partitions (instant) and writes go on: before a write changes a marked
partition, `PendingCopy.before_write` keeps the pre-images of the rows it is about to
change -- the first time each key is written since the mark -- and notes keys that were
not stored at the mark. The server's export of the mark later copies the partition and
`finish` puts those pre-images back, dropping the keys stored since: the result equals a
copy made at the mark.

A write the pre-images cannot describe (a partition that may evict rows, a load, a
clear, a move to another server) copies the whole partition first (`materialize`).
Everything here runs under the partition's lock, except `finish` of a copy taken under it.

`CutCopy` is the same idea for an SSP/ASP consistent cut (the rows once every worker group
completed step `at`, without any later step's push): pushes of later steps change the live
rows at once -- a fast group reads its own writes -- after the copy kept their pre-images,
and a slow group's push of a step <= `at` that arrives after them is applied to those
pre-images too, so the copy ends as the pushes of steps <= `at` applied in arrival order.
"""
from __future__ import annotations

import numpy as np

from jaxps.memory import take_rows
from jaxps.ps.keyindex import KeyIndex
from jaxps.ps.store import PartitionStore, join_rows


class PendingCopy:
    """One partition's rows at a mark, until they are copied."""

    def __init__(self) -> None:
        self.written = KeyIndex()                 # keys written since the mark
        self.old: list[dict[str, np.ndarray]] = []  # pre-images of keys stored at the mark
        self.full: dict[str, np.ndarray] | None = None  # the partition copied whole

    def materialize(self, store: PartitionStore) -> None:
        """Copy the partition now (a write is coming that pre-images cannot undo)."""
        if self.full is None:
            self.full = finish(store.export(), self)

    def before_write(self, store: PartitionStore, keys: np.ndarray) -> None:
        """Keep what a write of unique `keys` is about to change."""
        if self.full is not None:
            return
        if store.max_rows is not None:  # the write may evict rows the mark still holds
            self.materialize(store)
            return
        keys = np.ascontiguousarray(keys, np.uint64)
        _, is_new = self.written.find_or_insert(keys)
        first_keys = keys[np.flatnonzero(is_new)]
        slots = store.index.find(first_keys)
        stored = np.flatnonzero(slots >= 0)  # keys stored since the mark are in `written` already
        if stored.size:
            s = slots[stored]
            pre = {"keys": first_keys[stored], "values": take_rows(store.values, s)}
            pre.update({f"slot_{n}": take_rows(a, s) for n, a in store.slots.items()})
            self.old.append(pre)


def finish(rows: dict[str, np.ndarray], pending: PendingCopy) -> dict[str, np.ndarray]:
    """`rows` (a copy of the partition made after the mark) turned back into the rows at
    the mark: keys written since get their pre-images, keys stored since are dropped."""
    return _restore(rows, pending.written, join_rows(pending.old) if pending.old else None)


class CutCopy:
    """One partition's rows at a pending cut (`at`), kept while pushes past it go on.

    `rows` is a small store of its own (no admission, no eviction) holding the cut's rows
    of the keys pushes past the cut wrote (their pre-images, then the late pushes of steps
    <= `at` applied by the store's own optimizer code: bit-identical to the live update);
    every other key's row in the cut is its live row. `full`: `rows` holds the whole
    partition (a partition that may evict rows, a load)."""

    def __init__(self, store: PartitionStore) -> None:
        # small to start (they grow): every partition a push past the cut touches has one
        self.written = KeyIndex(capacity=16)   # keys pushes past the cut wrote
        self.rows = self._empty(store)
        self.full = False

    @staticmethod
    def _empty(store: PartitionStore) -> PartitionStore:
        return PartitionStore(store.dim, store.optimizer, store.init_scale, store.seed, index=KeyIndex(capacity=16))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.written.nbytes

    def materialize(self, store: PartitionStore) -> None:
        """Hold the cut's whole partition now (a write is coming that pre-images cannot undo)."""
        if not self.full:
            whole = self.export(store)
            self.rows = self._empty(store)
            self.rows.load(whole)
            self.full = True

    def before_later_write(self, store: PartitionStore, keys: np.ndarray) -> None:
        """A push of a step past the cut is about to write unique `keys`: keep their rows."""
        if self.full:
            return
        if store.max_rows is not None:  # the write may evict rows the cut still holds
            self.materialize(store)
            return
        keys = np.ascontiguousarray(keys, np.uint64)
        _, is_new = self.written.find_or_insert(keys)
        first_keys = keys[np.flatnonzero(is_new)]
        slots = store.index.find(first_keys)
        stored = np.flatnonzero(slots >= 0)  # keys not stored yet read as their initial rows
        if stored.size:
            s = slots[stored]
            pre = {"keys": first_keys[stored], "values": take_rows(store.values, s)}
            pre.update({f"slot_{n}": take_rows(a, s) for n, a in store.slots.items()})
            self.rows.load(pre)

    def late_push(self, store: PartitionStore, keys: np.ndarray, grads: np.ndarray, step: int,
                  grad_rows: np.ndarray | None = None) -> None:
        """A push of a step <= the cut, applied to the live `store` already: apply it to the
        cut's rows of the keys pushes past the cut wrote (the others' live rows hold it).
        Keys the live store did not take (admission) are not taken here either."""
        keys = np.ascontiguousarray(keys, np.uint64)
        take = store.index.find(keys) >= 0 if store.min_count > 1 else np.ones(keys.shape[0], bool)
        if not self.full:
            take &= self.written.find(keys) >= 0
        pick = np.flatnonzero(take)
        if pick.size:
            rows = pick if grad_rows is None else grad_rows[pick]
            self.rows.push(keys[pick], np.ascontiguousarray(take_rows(grads, rows)), step)

    def export(self, store: PartitionStore) -> dict[str, np.ndarray]:
        """The partition's rows at the cut (call once every push of a step <= `at` is in)."""
        if self.full:
            return self.rows.export()
        return _restore(store.export(), self.written, self.rows.export() if self.rows.size else None)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything of the copy as plain arrays (a partition moving to another server)."""
        out = {"written": self.written.keys()[:self.written.size].copy(),
               "full": np.array([self.full], np.uint8)}
        out.update({f"rows/{k}": v for k, v in self.rows.export().items()})
        return out

    @classmethod
    def from_arrays(cls, store: PartitionStore, data: dict[str, np.ndarray]) -> "CutCopy":
        copy = cls(store)
        copy.written.find_or_insert(np.ascontiguousarray(data["written"], np.uint64))
        copy.rows.load({k[len("rows/"):]: v for k, v in data.items() if k.startswith("rows/")})
        copy.full = bool(np.asarray(data["full"]).reshape(-1)[0])
        return copy


def _restore(rows: dict[str, np.ndarray], written: KeyIndex, old: dict[str, np.ndarray] | None
             ) -> dict[str, np.ndarray]:
    """`rows` (exported now) with every `written` key's row replaced by its row in `old`
    (unique keys), or dropped where `old` has none: the rows before those writes."""
    if written.size == 0:
        return rows
    since = written.find(rows["keys"]) >= 0
    if old is not None:
        at_mark = KeyIndex(capacity=max(16, 2 * old["keys"].shape[0]))
        at_mark.find_or_insert(old["keys"])  # slot i holds pre-image i (the keys are unique)
        where = at_mark.find(rows["keys"])
        hit = np.flatnonzero(where >= 0)
        for k, a in rows.items():
            if k != "keys":
                a[hit] = take_rows(old[k], where[hit])
        since[hit] = False  # stored at the mark: kept, with its pre-image
    keep = np.flatnonzero(~since)
    if keep.shape[0] < rows["keys"].shape[0]:
        rows = {k: (v[keep] if v.ndim == 1 else take_rows(v, keep)) for k, v in rows.items()}
    return rows
