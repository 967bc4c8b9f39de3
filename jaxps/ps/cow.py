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

import threading

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


class CutCopy:
    """A table's rows at a pending cut (`at`): every worker group's pushes of steps <= at
    and none later, kept while pushes past it go on.

    `rows` (a store of its own: no admission, no eviction) indexes the keys pushes past the
    cut wrote, each with its row at the first such write (none when it was not stored then:
    `in_cut` False), then the late pushes of steps <= `at` applied by the store's own
    optimizer code (bit-identical to the live update; a late push puts the key in the cut,
    from its initial row if it had none). Every other key's row in the cut is its live row.
    A partition that admits or evicts rows is cloned whole at its first write past the cut
    (`whole`: the clone takes the late pushes and admits and evicts as the live store would
    have without the pushes past the cut).

    One copy per table, not per partition: a push's span of partitions is kept in a few
    vectorized calls (a copy per partition cost ~60 us of Python per partition and pending
    cut: 3x a push with two cuts pending). Its own lock: pushes of different partitions
    use it at once; callers hold the locks of the partitions whose keys they pass."""

    def __init__(self, like: PartitionStore) -> None:
        self.rows = PartitionStore(like.dim, like.optimizer, like.init_scale, like.seed)
        self.in_cut = np.zeros(0, bool)      # by slot of `rows`: the key is in the cut
        self.part = np.zeros(0, np.int32)    # by slot: the key's partition
        self.whole: dict[int, PartitionStore] = {}
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.in_cut.nbytes + self.part.nbytes + sum(s.nbytes for s in self.whole.values())

    def _room(self) -> None:
        n, have = self.rows.size, self.in_cut.shape[0]
        if have < n:
            cap = grown_capacity(have, n)
            self.in_cut = np.concatenate([self.in_cut, np.zeros(cap - have, bool)])
            self.part = np.concatenate([self.part, np.zeros(cap - have, np.int32)])

    def keep(self, keys: np.ndarray, parts: np.ndarray, read_live) -> None:
        """A push of a step past the cut is about to write unique `keys` (of partitions
        `parts`, which neither admit nor evict: `clone_whole` those): keep the rows of those
        not kept yet. read_live(positions) -> (stored [m] bool, values [m, dim], {slot: [m,
        dim]}) of keys[positions], read from the live stores."""
        with self.lock:
            slots, is_new = self.rows.index.find_or_insert(keys)
            fresh = np.flatnonzero(is_new)
            if not fresh.size:  # every key kept already: one lookup
                return
            dst = slots[fresh]
            self._room()
            self.part[dst] = parts[fresh]
            stored, values, slot_values = read_live(fresh)
            hit = np.flatnonzero(stored)  # (room for the others' rows too: a late push may need them)
            self.rows.put_rows(dst[hit], take_rows(values, hit), {n: take_rows(v, hit) for n, v in slot_values.items()})
            self.in_cut[dst[hit]] = True

    def clone_whole(self, part: int, store: PartitionStore) -> None:
        """Keep partition `part` whole (its live `store` admits or evicts rows), once."""
        with self.lock:
            if part not in self.whole:
                self.whole[part] = store.clone()

    def late_push(self, keys: np.ndarray, parts: np.ndarray, grads: np.ndarray, grad_rows: np.ndarray,
                  step: int) -> None:
        """A push of a step <= the cut (grads[grad_rows[i]] for keys[i]), applied to the live
        rows already: apply it to the kept rows (other keys' live rows hold it) and to the
        whole partitions."""
        with self.lock:
            if self.whole:
                for p in np.unique(parts).tolist():
                    clone = self.whole.get(p)
                    if clone is not None:
                        sel = np.flatnonzero(parts == p)
                        clone.push(keys[sel], grads, step, grad_rows[sel])
            if not self.rows.size:
                return
            slots = self.rows.index.find(keys)
            pick = np.flatnonzero(slots >= 0)
            if not pick.size:
                return
            known = slots[pick]
            rowless = np.flatnonzero(~self.in_cut[known])
            if rowless.size:  # not stored at their first write past the cut: from their initial rows
                self.rows.put_new(known[rowless], keys[pick[rowless]])
            self.rows.push(keys[pick], grads, step, grad_rows[pick], known)
            self.in_cut[known] = True

    def export(self, part: int, store: PartitionStore) -> dict[str, np.ndarray]:
        """Partition `part`'s rows at the cut (its live `store`; call once every push of a
        step <= `at` is in, with the partition's lock)."""
        with self.lock:
            if part in self.whole:
                return self.whole[part].export()
            rows = store.export()
            if not self.rows.size:  # no push past the cut wrote this table
                return rows
            where = self.rows.index.find(rows["keys"])
            hit = np.flatnonzero(where >= 0)
            kept = self.in_cut[where[hit]]
            for k, a in rows.items():
                if k != "keys":
                    a[hit[kept]] = take_rows(self._field(k), where[hit[kept]])
            keep = np.ones(rows["keys"].shape[0], bool)
            keep[hit[~kept]] = False  # stored only since the cut
            return rows if keep.all() else {k: v[keep] for k, v in rows.items()}

    def _field(self, name: str) -> np.ndarray:
        return self.rows.values if name == "values" else self.rows.slots[name[len("slot_"):]]

    def _rows_at(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = {"keys": self.rows.index.keys_at(idx), "values": take_rows(self.rows.values, idx)}
        out.update({f"slot_{n}": take_rows(a, idx) for n, a in self.rows.slots.items()})
        return out

    def drop(self, parts: list[int]) -> None:
        """Forget partitions `parts` (they leave this server, or another's copy of them
        comes): one rebuild."""
        with self.lock:
            for p in parts:
                self.whole.pop(p, None)
            n = self.rows.size
            keep = np.flatnonzero(~np.isin(self.part[:n], np.array(parts, np.int32)))
            if keep.size < n:
                kept, in_cut, part_of = self._rows_at(keep), self.in_cut[keep], self.part[keep]
                self.rows = PartitionStore(self.rows.dim, self.rows.optimizer, self.rows.init_scale, self.rows.seed)
                self.rows.load(kept)  # slots 0..m-1 in order
                self.in_cut, self.part = in_cut, part_of
                self._room()

    def to_arrays(self, parts: set[int]) -> dict[str, np.ndarray]:
        """What this copy holds of `parts` as plain arrays (partitions moving to another
        server; a whole partition as its rows: admission counts and recency stay, as with
        the live partitions' copies)."""
        with self.lock:
            n = self.rows.size
            idx = np.flatnonzero(np.isin(self.part[:n], np.array(sorted(parts), np.int32)))
            out = {f"rows/{k}": v for k, v in self._rows_at(idx).items()}
            out.update(in_cut=self.in_cut[idx].copy(), part=self.part[idx].copy(),  # wire dtypes
                       parts=np.array(sorted(parts), np.int32))
            for p in sorted(set(self.whole) & set(parts)):
                out.update({f"whole/{p}/{k}": v for k, v in self.whole[p].export().items()})
            return out

    def load_arrays(self, data: dict[str, np.ndarray], like: PartitionStore) -> None:
        """Take `to_arrays`'s partitions: what this copy held of them is replaced. `like`:
        an empty store of the table (whole partitions are rebuilt from their rows)."""
        self.drop(np.asarray(data["parts"]).tolist())
        with self.lock:
            slots = self.rows.load({k[len("rows/"):]: v for k, v in data.items() if k.startswith("rows/")})
            self._room()
            self.in_cut[slots] = np.asarray(data["in_cut"]).astype(bool)
            self.part[slots] = np.asarray(data["part"], np.int32)
            whole: dict[int, dict[str, np.ndarray]] = {}
            for name, value in data.items():
                if name.startswith("whole/"):
                    _, p, field = name.split("/", 2)
                    whole.setdefault(int(p), {})[field] = value
            for p, rows in whole.items():
                self.whole[p] = like.clone()
                self.whole[p].load(rows)
