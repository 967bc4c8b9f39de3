"""HostTable namespaces in a step: dedup a batch's keys, pull their rows from the
parameter-server group, hand the device a fixed-shape block, push the row gradients back.

The device never holds the table: it receives `rows` [C, dim] (the batch's unique rows,
padded to a capacity C that grows like a routing bucket) and `inverse` [B, F], and returns
the summed gradient of each unique row. This increment is strict: the rows of step k+1
are pulled after step k's push was applied, so training equals the same model with its
tables on the mesh, step for step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxps.memory import aligned_empty
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.keyindex import dedup
from jaxps.ps.server import TableSpec
from jaxps.tables.routing import grown_capacity
from jaxps.tables.table import Table


def table_spec(t: Table) -> TableSpec:
    """How the servers see a HostTable namespace."""
    kind = t.placement.kind
    return TableSpec(t.name, t.dim, t.optimizer, kind=kind, rows=t.rows if kind == "hashed" else None,
                     init_scale=t.init_scale, seed=t.seed)


@dataclass
class HostPlan:
    keys: np.ndarray      # [U] unique uint64 keys (raw ids, or rows of a hashed table)
    inverse: np.ndarray   # [B, F] int32 slot of each occurrence in the [C] block
    capacity: int


class HostTables:
    """The host tables of one model, and the PS client that serves them."""

    def __init__(self, tables: list[Table], ps: PSClient | None = None):
        self.tables = {t.name: t for t in tables}
        self.ps = ps if ps is not None else embedded([table_spec(t) for t in tables])
        missing = set(self.tables) - set(self.ps.tables)
        if missing:
            raise ValueError(f"the parameter servers do not hold tables {sorted(missing)}")
        self.capacity = {t.name: t.capacity for t in tables}

    def plan(self, batch) -> dict[str, HostPlan]:
        plans = {}
        mask = batch.mask.reshape(-1)
        for name, t in self.tables.items():
            ids = getattr(batch, t.feature).reshape(-1)
            keys = t.rows_for(ids).astype(np.uint64) if t.placement.kind == "hashed" else ids
            uniq, inv = dedup(np.ascontiguousarray(keys[mask], np.uint64))
            inverse = aligned_empty(mask.shape[0], np.int32)
            inverse[~mask] = 0
            inverse[mask] = inv
            cap = self.capacity[name]
            if cap is None or uniq.shape[0] > cap:
                cap = self.capacity[name] = grown_capacity(uniq.shape[0])
            plans[name] = HostPlan(uniq, inverse.reshape(batch.mask.shape), cap)
        return plans

    def pull(self, plans: dict[str, HostPlan]) -> dict[str, np.ndarray]:
        """Each table's [C, dim] block: the pulled rows, then zeros."""
        out = {}
        for name, p in plans.items():
            block = aligned_empty((p.capacity, self.tables[name].dim), np.float32)
            block[:p.keys.shape[0]] = self.ps.pull(name, p.keys)
            block[p.keys.shape[0]:] = 0
            out[name] = block
        return out

    def push(self, plans: dict[str, HostPlan], grads: dict[str, np.ndarray], step: int) -> None:
        for name, p in plans.items():
            self.ps.push(name, p.keys, np.asarray(grads[name])[:p.keys.shape[0]], step)
