"""What a model declares to the trainer: its table namespaces, its dense namespaces (a
Flax NNX module whose top-level attributes are the namespaces) and a forward pass.

Models know placements, not the trainer: moving a table between placements is a change
to the `Table` a model returns, nothing else.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxps.tables.table import Table


class Model(Protocol):
    def tables(self) -> Sequence[Table]:
        """Table namespaces (row-wise optimised, looked up by feature ids)."""
        ...

    def init_dense(self, rngs: nnx.Rngs) -> nnx.Module:
        """Dense namespaces (optax-optimised, data parallel)."""
        ...

    def logits(self, dense: nnx.Module, emb: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array]) -> jax.Array:
        """[B] logits. emb[name] is [B, F, dim], zero at padded feature slots, or [B, dim]
        already sum-pooled for a `Blocked` table (read it with `sum_pool`); batch holds
        `vals` [B, F], `mask` [B, F] and, when the data has them, `dense` [B, D]."""
        ...

    # Optional: `dense_partitioning() -> [(path regex, logical axes), ...]` splits dense
    # parameters over the mesh (tensor parallel; see jaxps.parallel.tensor). Without it
    # every dense namespace is replicated (data parallel).
    #
    # Optional: `summed_loss(dense, emb, batch, per_example) -> scalar`, the weighted sum
    # over the batch of per_example(logits, labels). A model defines it when its logits
    # never exist whole on one device outside the loss: a tower pipelined with a 1F1B
    # schedule runs forward and backward interleaved, so the loss head sits on its last
    # stage (see models/wide_deep.py). Without it the step computes the loss from `logits`.


def sum_pool(emb: jax.Array, vals: jax.Array) -> jax.Array:
    """[B, dim] val-weighted sum of an example's rows: from per-occurrence rows [B, F, dim],
    or as a `Blocked` table delivers it (already pooled across its blocks)."""
    if emb.ndim == 2:
        return emb
    return jnp.sum(emb * vals[..., None], axis=1)
