"""What a model declares to the trainer: its table namespaces, its dense namespaces (a
Flax NNX module whose top-level attributes are the namespaces) and a forward pass.

Models know placements, not the trainer: moving a table between placements is a change
to the `Table` a model returns, nothing else.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import jax
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
        """[B] logits. emb[name] is [B, F, dim], zero at padded feature slots; batch holds
        `vals` [B, F], `mask` [B, F] and, when the data has them, `dense` [B, D]."""
        ...

    # Optional: `dense_partitioning() -> [(path regex, logical axes), ...]` splits dense
    # parameters over the mesh (tensor parallel; see jaxps.parallel.tensor). Without it
    # every dense namespace is replicated (data parallel).
