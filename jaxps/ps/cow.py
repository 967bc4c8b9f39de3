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
from jaxps.ps.keyindex import KeyIndex, grown_capacity
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

    `rows` is a small store of its own (no admission, no eviction) whose keys are those
    pushes past the cut wrote: each holds the key's row at its first such write (its
    initial row when it was not stored then: `in_cut` False), then the late pushes of
    steps <= `at` applied by the store's own optimizer code (bit-identical to the live
    update; a late push puts the key in the cut). Every other key's row in the cut is its
    live row. `full`: `rows` holds the whole partition (one that may evict rows, a load)."""

    def __init__(self, store: PartitionStore) -> None:
        self.rows = self._empty(store)
        self.in_cut = np.zeros(16, bool)  # by slot of `rows`: the key is in the cut
        self.full = False

    @staticmethod
    def _empty(store: PartitionStore) -> PartitionStore:
        # small to start (it grows): every partition a push past the cut touches has one
        return PartitionStore(store.dim, store.optimizer, store.init_scale, store.seed, index=KeyIndex(capacity=16))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.in_cut.nbytes

    def _room(self) -> None:
        if self.in_cut.shape[0] < self.rows.size:
            grown = np.zeros(grown_capacity(self.in_cut.shape[0], self.rows.size, 16), bool)
            grown[:self.in_cut.shape[0]] = self.in_cut
            self.in_cut = grown

    def materialize(self, store: PartitionStore) -> None:
        """Hold the cut's whole partition now (a write is coming that pre-images cannot undo)."""
        if not self.full:
            whole = self.export(store)
            self.rows = self._empty(store)
            self.rows.load(whole)
            self.in_cut = np.ones(max(16, self.rows.size), bool)
            self.full = True

    def before_later_write(self, store: PartitionStore, keys: np.ndarray) -> None:
        """A push of a step past the cut is about to write unique `keys`: keep their rows."""
        if self.full:
            return
        if store.max_rows is not None:  # the write may evict rows the cut still holds
            self.materialize(store)
            return
        slots, is_new = self.rows.index.find_or_insert(keys)
        fresh = np.flatnonzero(is_new)
        if not fresh.size:  # every key kept already: one lookup
            return
        dst, first_keys = slots[fresh], np.asarray(keys, np.uint64)[fresh]
        live = store.index.find(first_keys)
        stored = np.flatnonzero(live >= 0)
        self.rows.put_new(dst, first_keys)  # initial rows and slots
        if stored.size:
            self.rows.put_rows(dst[stored], store, live[stored])
        self._room()
        self.in_cut[dst[stored]] = True

    def late_push(self, store: PartitionStore, keys: np.ndarray, grads: np.ndarray, step: int,
                  grad_rows: np.ndarray | None = None) -> None:
        """A push of a step <= the cut, applied to the live `store` already: apply it to the
        cut's rows of the keys pushes past the cut wrote (the others' live rows hold it).
        Keys the live store did not take (admission) are not taken here either."""
        keys = np.asarray(keys, np.uint64)
        if self.full:
            take = store.index.find(keys) >= 0 if store.min_count > 1 else np.ones(keys.shape[0], bool)
            slots = None
        else:
            slots = self.rows.index.find(keys)
            take = slots >= 0
            if store.min_count > 1:
                take &= store.index.find(keys) >= 0
        pick = np.flatnonzero(take)
        if not pick.size:
            return
        rows = pick if grad_rows is None else grad_rows[pick]
        self.rows.push(keys[pick], grads, step, rows, None if slots is None else slots[pick])
        self._room()
        self.in_cut[self.rows.index.find(keys[pick]) if slots is None else slots[pick]] = True

    def export(self, store: PartitionStore) -> dict[str, np.ndarray]:
        """The partition's rows at the cut (call once every push of a step <= `at` is in)."""
        mine = self.rows.export()
        inside = self.in_cut[:self.rows.size]
        if self.full:
            return mine if inside.all() else {k: v[inside] for k, v in mine.items()}
        rows = store.export()
        where = self.rows.index.find(rows["keys"])
        hit = np.flatnonzero(where >= 0)
        if not hit.size:
            return rows
        kept = inside[where[hit]]
        for k, a in rows.items():
            if k != "keys":
                a[hit[kept]] = take_rows(mine[k], where[hit[kept]])
        keep = np.ones(rows["keys"].shape[0], bool)
        keep[hit[~kept]] = False  # stored only since the cut
        return rows if keep.all() else {k: v[keep] for k, v in rows.items()}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything of the copy as plain arrays (a partition moving to another server)."""
        out = {f"rows/{k}": v for k, v in self.rows.export().items()}
        out.update(in_cut=self.in_cut[:self.rows.size].astype(np.uint8), full=np.array([self.full], np.uint8))
        return out

    @classmethod
    def from_arrays(cls, store: PartitionStore, data: dict[str, np.ndarray]) -> "CutCopy":
        copy = cls(store)
        copy.rows.load({k[len("rows/"):]: v for k, v in data.items() if k.startswith("rows/")})  # slots in order
        copy._room()
        copy.in_cut[:copy.rows.size] = np.asarray(data["in_cut"]).astype(bool)
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
