"""Realm 3: one example too wide for one device. The feature dimension is cut into
blocks over a mesh axis; each device holds its block of the weights *and of every
example*, computes a partial product, and one `psum` of the partials (a [batch] vector,
not rows or gradients) gives the full result. Each block's gradient stays on its device.

Sparse LR (and any sum-pooled table): the host splits each example's nonzeros by owner
block (`split_by_block`) and dedups each block's rows, so device b receives only block b's
ids of every example; `blocked_pool` is the device half, which the trainer runs for a
table placed `Blocked(axis)` (jaxps.step).
Dense: `blocked_dense` contracts x[:, block] with w[block, :] and sums the partials.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numba
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxps.optim.rowwise import RowOptimizer
from jaxps.tables.routing import Router, grown_capacity
from jaxps.tables.sharded import apply_rows, gather_unique


@dataclass
class BlockedBatch:
    """Per block b: rows [Bk, U] (its unique local rows, `rows_per_block` = padding),
    inverse [Bk, B, W] (slot in rows[b] of each of an example's ids in block b),
    vals [Bk, B, W] (0 in padding), and the per-block width W."""

    rows: np.ndarray
    inverse: np.ndarray
    vals: np.ndarray
    width: int


@numba.njit(cache=True, nogil=True)
def _count(slots, mask, cap, blocks, B, F, counts):
    for e in range(B):
        for f in range(F):
            if mask[e, f]:
                counts[slots[e, f] // cap, e] += 1


@numba.njit(cache=True, nogil=True)
def _pack(slots, vals, mask, cap, B, F, fill, inverse, out_vals):
    for e in range(B):
        for f in range(F):
            if mask[e, f]:
                b = slots[e, f] // cap
                r = fill[b, e]
                inverse[b, e, r] = slots[e, f] % cap
                out_vals[b, e, r] = vals[e, f]
                fill[b, e] = r + 1


def split_by_block(rows: np.ndarray, vals: np.ndarray, mask: np.ndarray, rows_per_block: int,
                   blocks: int, router: Router, width: int | None = None) -> BlockedBatch:
    """Split a batch's nonzeros (global rows [B, F]) by owner block and dedup per block.
    Two O(nonzeros) numba passes: count per (block, example), then pack."""
    plan = router.plan(rows, mask)
    B, F = rows.shape
    cap = plan.capacity
    slots = np.ascontiguousarray(plan.inverse.reshape(B, F))
    mask = np.ascontiguousarray(mask, np.bool_)
    counts = np.zeros((blocks, B), np.int64)
    _count(slots, mask, cap, blocks, B, F, counts)
    need = max(int(counts.max()), 1)
    width = width if width is not None and width >= need else grown_capacity(need, 1.0, 8)
    inverse = np.zeros((blocks, B, width), np.int32)
    out_vals = np.zeros((blocks, B, width), np.float32)
    _pack(slots, np.ascontiguousarray(vals, np.float32), mask, cap, B, F, np.zeros((blocks, B), np.int64),
          inverse, out_vals)
    return BlockedBatch(plan.owner_rows, inverse, out_vals, width)


def blocked_pool(unique: jax.Array, inverse: jax.Array, vals: jax.Array, mesh: Mesh, axis: str) -> jax.Array:
    """[B, dim]: each example's val-weighted sum of its rows. unique [Bk, U, dim] holds
    each block's gathered rows (split over `axis`), inverse/vals [Bk, B, W] each block's
    share of every example (over `axis`, the batch over `data`). Device b sums its share
    into a [B, dim] partial; one psum over `axis` adds the blocks. Differentiable: the
    gradient of block b's rows is computed on device b."""

    def local(u, inv, v):
        part = jnp.sum(jnp.take(u[0], inv[0], axis=0) * v[0][..., None], axis=1)  # [B, dim]
        return jax.lax.psum(part, axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis, "data"), P(axis, "data")),
                         out_specs=P("data"))(unique, inverse, vals)


def blocked_logits(table: jax.Array, rows: jax.Array, inverse: jax.Array, vals: jax.Array,
                   mesh: Mesh, axis: str) -> jax.Array:
    """[B] sum over blocks of each block's w[rows] . vals (table [R, 1] split by rows)."""
    return blocked_pool(gather_unique(table, rows, mesh, axis), inverse, vals, mesh, axis)[:, 0]


def blocked_lr_step(optimizer: RowOptimizer, table: jax.Array, slots: dict, bias: jax.Array,
                    rows: jax.Array, inverse: jax.Array, vals: jax.Array, labels: jax.Array,
                    weights: jax.Array, step: jax.Array, bias_lr: float, mesh: Mesh, axis: str):
    """One sparse-LR step on a blocked table, by the trainer's path for a `Blocked` table:
    gather each block's planned rows, partial logits summed across blocks (`blocked_pool`),
    the gradient w.r.t. the gathered rows, then each block updates its own touched rows
    with the row-wise optimizer (`apply_rows`). Summed logloss; SGD on the bias."""
    unique = gather_unique(table, rows, mesh, axis)

    def loss_fn(u, b):
        z = blocked_pool(u, inverse, vals, mesh, axis)[:, 0] + b
        return jnp.sum(weights * (jax.nn.softplus(z) - z * labels))

    loss, (g_u, g_b) = jax.value_and_grad(loss_fn, argnums=(0, 1))(unique, bias)
    table, slots = apply_rows(optimizer, table, slots, rows, g_u, step, mesh, axis)
    return table, slots, bias - bias_lr * g_b, loss


def blocked_dense(x: jax.Array, w: jax.Array, mesh: Mesh, axis: str) -> jax.Array:
    """x [B, D] @ w [D, N] with D split into blocks over `axis`: each device multiplies its
    block of the example by its block of the weights; one psum of the [B, N] partials."""

    def local(xb, wb):
        return jax.lax.psum(xb @ wb, axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P(axis)), out_specs=P(),
                         check_vma=False)(x, w)
