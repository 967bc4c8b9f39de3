"""`Table`: a namespace of embedding rows addressed by hashed 64-bit feature ids."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxps.hashing import mix64, seed_mask
from jaxps.optim.rowwise import Adagrad, RowOptimizer
from jaxps.placement import Placement, RowSharded


@dataclass(frozen=True)
class Table:
    """A table namespace.

    rows:      hash buckets (rounded up to a multiple of the shard count at build time)
    dim:       row width (1 for a linear model's weights)
    feature:   which id field of the batch feeds this table
    init_scale: rows start as N(0, init_scale^2); 0 gives zeros (the LR convention)
    capacity:  unique rows per shard per step. None = sized from the data and grown on
               overflow; each distinct capacity is one compiled step, so a generous
               fixed value avoids recompiles on skewed batches.
    """

    name: str
    rows: int
    dim: int = 1
    placement: Placement = field(default_factory=RowSharded)
    optimizer: RowOptimizer = field(default_factory=Adagrad)
    feature: str = "ids"
    init_scale: float = 0.0
    seed: int = 0
    capacity: int | None = None

    def __post_init__(self):
        if self.rows <= 0 or self.dim <= 0:
            raise ValueError(f"table {self.name!r}: rows and dim must be positive "
                             f"(rows={self.rows}, dim={self.dim})")

    def padded_rows(self, shards: int) -> int:
        return -(-self.rows // shards) * shards

    @property
    def salt(self) -> np.uint64:
        return seed_mask(self.seed)

    def rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Row index (int64) of each raw feature id; rows < self.rows. (The input pipeline
        computes the same inside its routing kernel; this is the numpy form.)"""
        h = mix64(np.asarray(ids, dtype=np.uint64) ^ self.salt)
        return (h % np.uint64(self.rows)).astype(np.int64)
