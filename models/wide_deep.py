"""Wide & Deep (Cheng et al. 2016; the four-realms article's ref [1]).

wide: a linear model over the hashed feature ids (one weight per id, FTRL) — memorisation;
deep: per-slot embeddings, concatenated with the dense features, through an MLP tower
(a Flax NNX module) — generalisation. Both feed one logit.

The embedding table is the big namespace: by default it lives in the host parameter
server (`HostTable`, collisionless: one row per id ever seen), the wide table on the mesh.
Either moves between `HostTable`, `RowSharded` and `Replicated` by its placement only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxps.models.mlp import _Tower
from jaxps.optim.rowwise import FTRL, Adagrad, RowOptimizer
from jaxps.placement import HostTable, Placement, RowSharded
from jaxps.tables.table import Table


@dataclass
class WideDeepConfig:
    num_slots: int = 39                  # feature slots per example (one per Criteo field)
    dense_features: int = 0              # width of batch["dense"] (13 for Criteo TSV)
    embed_rows: int = 1 << 22            # hashed rows, or a planning estimate (collisionless)
    embed_dim: int = 16
    embed_placement: Placement = field(default_factory=HostTable)
    embed_optimizer: RowOptimizer = field(default_factory=lambda: Adagrad(0.05))
    init_scale: float = 0.05
    wide_rows: int = 1 << 22
    wide_placement: Placement = field(default_factory=RowSharded)
    wide_optimizer: RowOptimizer = field(default_factory=FTRL)
    hidden: tuple[int, ...] = (256, 128)


class _Deep(nnx.Module):
    def __init__(self, c: WideDeepConfig, rngs: nnx.Rngs):
        self.tower = _Tower(c.num_slots * c.embed_dim + c.dense_features, c.hidden, rngs)
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))


class WideDeep:
    def __init__(self, config: WideDeepConfig | None = None):
        self.config = config or WideDeepConfig()

    def tables(self) -> list[Table]:
        c = self.config
        return [Table("embed", rows=c.embed_rows, dim=c.embed_dim, placement=c.embed_placement,
                      optimizer=c.embed_optimizer, init_scale=c.init_scale, seed=1),
                Table("wide", rows=c.wide_rows, dim=1, placement=c.wide_placement,
                      optimizer=c.wide_optimizer, seed=2)]

    def init_dense(self, rngs: nnx.Rngs) -> nnx.Module:
        return _Deep(self.config, rngs)

    def logits(self, dense: nnx.Module, emb: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array]) -> jax.Array:
        c = self.config
        wide = jnp.sum(emb["wide"][..., 0] * batch["vals"], axis=-1)
        e = emb["embed"] * batch["vals"][..., None]          # [B, slots, dim], zero where padded
        x = e.reshape(e.shape[0], c.num_slots * c.embed_dim)
        if c.dense_features:
            x = jnp.concatenate([x, batch["dense"]], axis=-1)
        return wide + dense.tower(x) + dense.bias[...]
