"""One partition of one table in a server: rows, optimizer slots, and the key index.

Rows live in dense arrays indexed by slot (grown by doubling), so pulls and pushes are
gathers/scatters on contiguous memory. A key never seen is not stored on pull: it reads
as its initial row, computed from (table seed, key) alone, so replicas, restores and a
device table of the same seed agree. A push stores it and applies the row-wise optimizer
(the same `jaxps.optim.rowwise` code the device step runs, with xp = numpy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxps.hashing import GOLDEN, mix64
from jaxps.optim.rowwise import RowOptimizer
from jaxps.ps.keyindex import KeyIndex


def init_rows(keys: np.ndarray, dim: int, scale: float, seed: int) -> np.ndarray:
    """Initial rows [n, dim] float32: N(0, scale^2) from a counter-based hash of
    (seed, key, column), zeros when scale is 0 (a linear model's weights)."""
    if not scale:
        return np.zeros((keys.shape[0], dim), np.float32)
    base = mix64(np.asarray(keys, np.uint64) ^ mix64(np.array([seed], np.uint64) * GOLDEN))
    cols = np.arange(2 * dim, dtype=np.uint64)
    bits = mix64(base[:, None] + cols[None, :] * GOLDEN)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # (0, 1)
    u1, u2 = u[:, :dim], u[:, dim:]
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller
    return (scale * z).astype(np.float32)


@dataclass
class PartitionStore:
    dim: int
    optimizer: RowOptimizer
    init_scale: float = 0.0
    seed: int = 0
    index: KeyIndex = field(default_factory=KeyIndex)

    def __post_init__(self):
        self.values = np.zeros((0, self.dim), np.float32)
        self.slots = {s: np.zeros((0, self.dim), np.float32) for s in self.optimizer.slots}

    @property
    def size(self) -> int:
        return self.index.size

    @property
    def nbytes(self) -> int:
        rows = self.size * self.dim * 4 * (1 + len(self.slots))
        return rows + self.index.nbytes

    def pull(self, keys: np.ndarray) -> np.ndarray:
        """Rows of `keys` [n, dim]; unseen keys read as their initial rows."""
        slots = self.index.find(keys)
        out = self.values[np.maximum(slots, 0)] if self.size else np.zeros((keys.shape[0], self.dim), np.float32)
        missing = slots < 0
        if missing.any():
            out[missing] = init_rows(keys[missing], self.dim, self.init_scale, self.seed)
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Apply summed gradients [n, dim] of unique `keys` with the row-wise optimizer."""
        slots, is_new = self.index.find_or_insert(keys)
        self._reserve(self.index.size)
        if is_new.any():
            fresh = slots[is_new]
            self.values[fresh] = init_rows(keys[is_new], self.dim, self.init_scale, self.seed)
            for name, arr in self.slots.items():
                arr[fresh] = self.optimizer.slot_init(name)
        params = self.values[slots]
        state = {name: arr[slots] for name, arr in self.slots.items()}
        new_params, new_state = self.optimizer.update(np, params, state, grads.astype(np.float32),
                                                      np.float32(step))
        self.values[slots] = new_params
        for name, arr in self.slots.items():
            arr[slots] = new_state[name]

    def _reserve(self, n: int) -> None:
        cap = self.values.shape[0]
        if n <= cap:
            return
        cap = max(n, 2 * cap, 64)
        grow = lambda a: np.concatenate([a, np.zeros((cap - a.shape[0], self.dim), np.float32)])  # noqa: E731
        self.values = grow(self.values)
        self.slots = {k: grow(v) for k, v in self.slots.items()}
