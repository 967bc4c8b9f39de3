"""Sparse logistic regression (realm 2): one weight per hashed feature id, a dense bias.

logit(x) = bias + sum_f w[row(id_f)] * val_f. The weight table is the model's only
large namespace; its placement (row-sharded on the mesh by default) decides where it lives:
`Blocked("model")` splits every example's features over `model` as well (realm 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxps.model import sum_pool
from jaxps.optim.rowwise import FTRL, RowOptimizer
from jaxps.placement import Placement, RowSharded
from jaxps.tables.table import Table


@dataclass
class SparseLRConfig:
    rows: int = 1 << 22          # hash buckets of the weight table
    placement: Placement = field(default_factory=RowSharded)
    optimizer: RowOptimizer = field(default_factory=FTRL)
    capacity: int | None = None  # unique rows per shard per step (None: sized from data)
    hash_seed: int = 0


class _Bias(nnx.Module):
    def __init__(self):
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))


class SparseLR:
    def __init__(self, config: SparseLRConfig | None = None):
        self.config = config or SparseLRConfig()

    def tables(self) -> list[Table]:
        c = self.config
        return [Table("weights", rows=c.rows, dim=1, placement=c.placement,
                      optimizer=c.optimizer, capacity=c.capacity, seed=c.hash_seed)]

    def init_dense(self, rngs: nnx.Rngs) -> nnx.Module:
        return _Bias()

    def logits(self, dense: nnx.Module, emb: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array]) -> jax.Array:
        return sum_pool(emb["weights"], batch["vals"])[:, 0] + dense.bias[...]
