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
    if pending.written.size == 0:
        return rows
    since = pending.written.find(rows["keys"]) >= 0
    if pending.old:
        old = join_rows(pending.old)
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
