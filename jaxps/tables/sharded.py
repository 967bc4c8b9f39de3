"""Device side of a table step: gather the planned unique rows, apply the row-wise
optimizer to exactly those rows. Both run per shard under `jax.shard_map`, so each
device only touches its own rows, and nothing table-sized is ever materialised besides
the table and its slots themselves (donated and updated in place).

The occurrence gather `unique[inverse]` and its transpose (a scatter-add of occurrence
gradients into the unique slots, summed across data shards by XLA) happen in the
model's global view, in `jaxps.step`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxps.optim.rowwise import RowOptimizer

AxisNames = str | tuple[str, ...] | None


def _spec(axis: AxisNames) -> P:
    return P(axis) if axis is not None else P()


def gather_unique(table: jax.Array, owner_rows: jax.Array, mesh: Mesh, axis: AxisNames) -> jax.Array:
    """[R, dim] table, [S, C] plan -> [S, C, dim] rows (zeros in empty slots)."""

    def local(t, rows):
        return jnp.take(t, rows[0], axis=0, mode="fill", fill_value=0)[None]

    return jax.shard_map(local, mesh=mesh, in_specs=(_spec(axis), _spec(axis)),
                         out_specs=_spec(axis), check_vma=False)(table, owner_rows)


def apply_rows(optimizer: RowOptimizer, table: jax.Array, slots: dict[str, jax.Array],
               owner_rows: jax.Array, grads: jax.Array, step: jax.Array, mesh: Mesh,
               axis: AxisNames) -> tuple[jax.Array, dict[str, Any]]:
    """Row-wise optimizer on the planned rows only; grads are [S, C, dim] summed per row."""
    names = tuple(sorted(slots))

    def local(t, rows, g, step, *slot_arrays):
        r = rows[0]
        take = lambda a: jnp.take(a, r, axis=0, mode="fill", fill_value=0)
        new_t, new_slots = optimizer.update(
            jnp, take(t), {n: take(s) for n, s in zip(names, slot_arrays)}, g[0], step)
        put = lambda a, v: a.at[r].set(v.astype(a.dtype), mode="drop")
        return (put(t, new_t),) + tuple(put(s, new_slots[n]) for n, s in zip(names, slot_arrays))

    spec = _spec(axis)
    out = jax.shard_map(local, mesh=mesh,
                        in_specs=(spec, spec, spec, P()) + (spec,) * len(names),
                        out_specs=(spec,) * (1 + len(names)), check_vma=False)(
        table, owner_rows, grads, step, *(slots[n] for n in names))
    return out[0], dict(zip(names, out[1:]))
