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
from jaxps.parallel.pipeline import pipeline_forward
from jaxps.placement import HostTable, Placement, Replicated, RowSharded, Staged
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
    # A deep tower of `deep_blocks` residual blocks of width `deep_width` instead of
    # `hidden` (0: the plain tower). Its placement: Replicated runs the blocks in turn on
    # every device; Staged(microbatches=M) pipelines them over the `stage` axis (one block
    # per stage: deep_blocks must equal the stage axis size). Same numbers either way.
    deep_blocks: int = 0
    deep_width: int = 128
    deep_placement: Placement = field(default_factory=Replicated)


def _residual(p, x):
    return x + jax.nn.relu(x @ p["w"] + p["b"])


class _Deep(nnx.Module):
    def __init__(self, c: WideDeepConfig, rngs: nnx.Rngs):
        width_in = c.num_slots * c.embed_dim + c.dense_features
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))
        if not c.deep_blocks:
            self.tower = _Tower(width_in, c.hidden, rngs)
            return
        d = c.deep_width
        self.proj = nnx.Linear(width_in, d, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.blocks_w = nnx.Param(jnp.stack([init(rngs.params(), (d, d)) for _ in range(c.deep_blocks)]))
        self.blocks_b = nnx.Param(jnp.zeros((c.deep_blocks, d), jnp.float32))
        self.out = nnx.Linear(d, 1, rngs=rngs)


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
        return wide + self._deep(dense, x) + dense.bias[...]

    def _deep(self, dense: nnx.Module, x: jax.Array) -> jax.Array:
        c = self.config
        if not c.deep_blocks:
            return dense.tower(x)
        h = dense.proj(x)
        blocks = {"w": dense.blocks_w[...], "b": dense.blocks_b[...]}
        if isinstance(c.deep_placement, Staged):
            m = c.deep_placement.microbatches
            h = pipeline_forward(_residual, blocks, h.reshape((m, h.shape[0] // m) + h.shape[1:])).reshape(h.shape)
        else:
            for i in range(c.deep_blocks):
                h = _residual(jax.tree.map(lambda a: a[i], blocks), h)
        return dense.out(h)[..., 0]

    def dense_partitioning(self) -> list[tuple[str, tuple]]:
        """A staged tower's blocks are split over `stage` (logical axis "layers")."""
        if self.config.deep_blocks and isinstance(self.config.deep_placement, Staged):
            return [("blocks_w", ("layers", None, None)), ("blocks_b", ("layers", None))]
        return []
