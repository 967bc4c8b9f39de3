"""The dense parameters of a multi-group job, held by the PS as one hashed table.

Each worker group pulls the whole table at the start of a step (waiting as the
consistency model says), unflattens it into the model's parameter tree on the device,
and pushes the dense gradient back flattened; the servers apply the row-wise form of the
dense optimizer (SGD, Adagrad and Adam are element-wise, so rows of `ROW_WIDTH` floats
update exactly as optax updates the whole arrays, up to Adagrad's epsilon placement).

A group of several processes splits the rows in contiguous blocks (`share`): process r
pulls and pushes block r, and the device sees the blocks in order as one [count * C]
array, so the parameters read straight off its first `size` floats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxps.optim import rowwise
from jaxps.ps.server import TableSpec

DENSE_TABLE = "__dense__"
ROW_WIDTH = 256  # floats per row: few keys per pull, little padding


@dataclass
class DenseTable:
    treedef: Any
    shapes: list[tuple[int, ...]]
    size: int
    spec: TableSpec

    @classmethod
    def of(cls, tree, optimizer: str, learning_rate: float) -> "DenseTable":
        leaves, treedef = jax.tree.flatten(tree)
        if any(np.dtype(l.dtype) != np.float32 for l in leaves):
            raise ValueError("dense parameters held by the PS must be float32")
        if optimizer not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"train.dense_optimizer {optimizer!r} has no row-wise form for a multi-group "
                             f"job; use sgd, adagrad or adam")
        size = sum(int(np.prod(l.shape)) for l in leaves)
        rows = max(1, -(-size // ROW_WIDTH))
        spec = TableSpec(DENSE_TABLE, ROW_WIDTH, rowwise.make(optimizer, learning_rate=learning_rate),
                         kind="hashed", rows=rows)
        return cls(treedef, [tuple(l.shape) for l in leaves], size, spec)

    @property
    def rows(self) -> int:
        return self.spec.rows

    @property
    def keys(self) -> np.ndarray:
        return np.arange(self.rows, dtype=np.uint64)

    def share(self, rank: int, count: int, multiple: int = 1) -> tuple[np.ndarray, int]:
        """(keys, C) of process `rank` of `count`: its block of C rows (C a multiple of
        `multiple`, its `data` shards; the same in every process) starts at rank * C, and
        the rows past the table's end are padding it neither pulls nor pushes."""
        cap = -(-self.rows // count)
        cap = -(-cap // multiple) * multiple
        return np.arange(min(rank * cap, self.rows), min((rank + 1) * cap, self.rows), dtype=np.uint64), cap

    def flatten(self, tree, rows: int | None = None) -> jax.Array:
        """[rows (default: the table's), ROW_WIDTH] (zero padded) of a parameter (or
        gradient) tree, on device."""
        rows = self.rows if rows is None else rows
        flat = jnp.concatenate([jnp.ravel(l) for l in jax.tree.leaves(tree)])
        return jnp.pad(flat, (0, rows * ROW_WIDTH - self.size)).reshape(rows, ROW_WIDTH)

    def unflatten(self, block: jax.Array):
        flat = block.reshape(-1)
        leaves, o = [], 0
        for shape in self.shapes:
            n = int(np.prod(shape))
            leaves.append(flat[o:o + n].reshape(shape))
            o += n
        return jax.tree.unflatten(self.treedef, leaves)

    def host_rows(self, tree) -> dict[str, np.ndarray]:
        """The tree as table rows for `PSClient.load` (slots at their initial values)."""
        flat = np.concatenate([np.asarray(l, np.float32).ravel() for l in jax.tree.leaves(tree)])
        values = np.zeros((self.rows, ROW_WIDTH), np.float32)
        values.reshape(-1)[:self.size] = flat
        out = {"keys": self.keys, "values": values}
        for s in self.spec.optimizer.slots:
            out[f"slot_{s}"] = np.full_like(values, self.spec.optimizer.slot_init(s))
        return out
