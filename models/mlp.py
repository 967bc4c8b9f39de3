"""A small MLP classifier (realm 1): everything fits one device and is replicated.

Hashed feature ids share a small replicated embedding table (sum-pooled per example,
weighted by value), concatenated with the dense features when the data has them, then an
MLP. Data parallel: the batch is split over `data`, gradients are summed by XLA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxps.model import sum_pool
from jaxps.optim.rowwise import Adagrad, RowOptimizer
from jaxps.placement import Placement, Replicated
from jaxps.tables.table import Table


@dataclass
class MLPConfig:
    rows: int = 1 << 16
    embed_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    dense_features: int = 0      # width of batch["dense"] (13 for Criteo TSV), 0 for none
    placement: Placement = field(default_factory=Replicated)
    optimizer: RowOptimizer = field(default_factory=lambda: Adagrad(0.05))
    init_scale: float = 0.05
    tensor_parallel: bool = False  # split the tower's hidden units over `model` (Megatron)


def tower_partitioning(prefix: str, depth: int) -> list[tuple[str, tuple]]:
    """Megatron pairs for a _Tower: even layers column-split (their hidden units over
    `model`), odd layers row-split (their inputs), so each pair needs one all-reduce; the
    output layer is row-split after an even layer, replicated after an odd one."""
    rules = []
    for i in range(depth):
        col = i % 2 == 0
        rules.append((f"{prefix}layers/{i}/kernel", ("embed", "mlp") if col else ("mlp", "embed")))
        rules.append((f"{prefix}layers/{i}/bias", ("mlp",) if col else (None,)))
    if depth % 2:
        rules.append((f"{prefix}out/kernel", ("mlp", None)))
    return rules


class _Tower(nnx.Module):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], rngs: nnx.Rngs):
        dims = (in_dim,) + tuple(hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.out = nnx.Linear(dims[-1], 1, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(x)[..., 0]


class _Dense(nnx.Module):
    def __init__(self, c: MLPConfig, rngs: nnx.Rngs):
        self.mlp = _Tower(c.embed_dim + c.dense_features, c.hidden, rngs)


class MLPClassifier:
    def __init__(self, config: MLPConfig | None = None):
        self.config = config or MLPConfig()

    def tables(self) -> list[Table]:
        c = self.config
        return [Table("embed", rows=c.rows, dim=c.embed_dim, placement=c.placement,
                      optimizer=c.optimizer, init_scale=c.init_scale)]

    def init_dense(self, rngs: nnx.Rngs) -> nnx.Module:
        return _Dense(self.config, rngs)

    def dense_partitioning(self) -> list[tuple[str, tuple]]:
        return tower_partitioning("mlp/", len(self.config.hidden)) if self.config.tensor_parallel else []

    def logits(self, dense: nnx.Module, emb: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array]) -> jax.Array:
        # sum pooling: a mean would shrink each field's signal by the number of fields
        pooled = sum_pool(emb["embed"], batch["vals"])  # a Blocked table arrives pooled
        x = pooled
        if self.config.dense_features:
            x = jnp.concatenate([pooled, batch["dense"]], axis=-1)
        return dense.mlp(x)
