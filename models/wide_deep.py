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

from jaxps.model import sum_pool
from jaxps.models.mlp import _Tower
from jaxps.optim.rowwise import FTRL, Adagrad, RowOptimizer
from jaxps.parallel.pipeline import from_microbatches, pipeline_forward, pipelined_loss, to_microbatches
from jaxps.parallel.schedule import build
from jaxps.placement import Blocked, HostTable, Placement, Replicated, RowSharded, Staged
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
    # every device; Staged(microbatches=M, schedule=...) pipelines them over the `stage`
    # axis (one block per stage: deep_blocks must equal the stage axis size) with the
    # schedule table it names, the loss head on the last stage. Same numbers either way.
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
        if isinstance(self.config.embed_placement, Blocked):
            raise ValueError("Wide&Deep concatenates its embeddings slot by slot; a Blocked table reaches "
                             "the model sum-pooled: place the embeddings row_sharded, host or replicated")

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
        return self._wide(dense, emb, batch) + self._deep(dense, self._deep_input(emb, batch))

    def summed_loss(self, dense: nnx.Module, emb: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                    per_example) -> jax.Array:
        """sum_i w_i * per_example(logit_i, y_i). A staged tower runs its placement's schedule
        (1F1B interleaves forwards and backwards, so no logits exist before the loss): the
        output layer and the loss are the pipeline's head on the last stage, and the wide
        part's logits (with the bias) enter it as an input it differentiates."""
        c = self.config
        if not (c.deep_blocks and isinstance(c.deep_placement, Staged)):
            return jnp.sum(batch["weights"] * per_example(self.logits(dense, emb, batch), batch["labels"]))
        m = c.deep_placement.microbatches

        def head_loss(head, h, y):
            logits = (h @ head["kernel"] + head["bias"])[..., 0] + y["offset"]
            return jnp.sum(y["weights"] * per_example(logits, y["labels"]))

        stages = jax.sharding.get_abstract_mesh().shape[c.deep_placement.axis]
        tower = pipelined_loss(_residual, head_loss, build(c.deep_placement.schedule, stages, m))
        side = {"offset": self._wide(dense, emb, batch), "labels": batch["labels"], "weights": batch["weights"]}
        return tower(self._blocks(dense), {"kernel": dense.out.kernel[...], "bias": dense.out.bias[...]},
                     to_microbatches(dense.proj(self._deep_input(emb, batch)), m),
                     jax.tree.map(lambda a: to_microbatches(a, m), side))

    def _wide(self, dense: nnx.Module, emb: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> jax.Array:
        """The wide logits plus the shared bias."""
        return sum_pool(emb["wide"], batch["vals"])[:, 0] + dense.bias[...]

    def _deep_input(self, emb: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> jax.Array:
        c = self.config
        e = emb["embed"] * batch["vals"][..., None]          # [B, slots, dim], zero where padded
        x = e.reshape(e.shape[0], c.num_slots * c.embed_dim)
        if c.dense_features:
            x = jnp.concatenate([x, batch["dense"]], axis=-1)
        return x

    @staticmethod
    def _blocks(dense: nnx.Module) -> dict[str, jax.Array]:
        return {"w": dense.blocks_w[...], "b": dense.blocks_b[...]}

    def _deep(self, dense: nnx.Module, x: jax.Array) -> jax.Array:
        c = self.config
        if not c.deep_blocks:
            return dense.tower(x)
        h = dense.proj(x)
        blocks = self._blocks(dense)
        if isinstance(c.deep_placement, Staged):  # forward only here (eval); training: summed_loss
            m = c.deep_placement.microbatches
            h = from_microbatches(pipeline_forward(_residual, blocks, to_microbatches(h, m)))
        else:
            for i in range(c.deep_blocks):
                h = _residual(jax.tree.map(lambda a: a[i], blocks), h)
        return dense.out(h)[..., 0]

    def dense_partitioning(self) -> list[tuple[str, tuple]]:
        """A staged tower's blocks are split over `stage` (logical axis "layers")."""
        if self.config.deep_blocks and isinstance(self.config.deep_placement, Staged):
            return [("blocks_w", ("layers", None, None)), ("blocks_b", ("layers", None))]
        return []
