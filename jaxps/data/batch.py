"""Fixed-shape host batches: what every reader produces and every step consumes.

JAX compiles one program per shape, so a batch always has `batch_size` rows and
`max_nnz` feature slots per row; unused slots and rows are padded and masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Batch:
    """One batch of examples held in host memory (numpy), local to this process.

    labels:  [B] float32 in {0, 1}
    ids:     [B, F] uint64 raw 64-bit feature ids (0 where mask is False)
    vals:    [B, F] float32 feature values (0 where mask is False)
    mask:    [B, F] bool, True for a real feature slot
    weights: [B] float32, 1 for a real example, 0 for a padding row
    dense:   [B, D] float32 dense features or None (Criteo's 13 integer fields, log1p)
    """

    labels: np.ndarray
    ids: np.ndarray
    vals: np.ndarray
    mask: np.ndarray
    weights: np.ndarray
    dense: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_real(self) -> int:
        return int(self.weights.sum())

    def slice(self, start: int, stop: int) -> "Batch":
        return Batch(
            self.labels[start:stop], self.ids[start:stop], self.vals[start:stop],
            self.mask[start:stop], self.weights[start:stop],
            None if self.dense is None else self.dense[start:stop],
        )


def concat(batches: list[Batch]) -> Batch:
    """Concatenate variable-length chunks (all with the same max_nnz) row-wise."""
    if len(batches) == 1:
        return batches[0]
    dense = None if batches[0].dense is None else np.concatenate([b.dense for b in batches])
    return Batch(
        np.concatenate([b.labels for b in batches]),
        np.concatenate([b.ids for b in batches]),
        np.concatenate([b.vals for b in batches]),
        np.concatenate([b.mask for b in batches]),
        np.concatenate([b.weights for b in batches]),
        dense,
    )


def pad_to(batch: Batch, size: int) -> Batch:
    """Pad a short batch with masked rows up to `size` rows (the last batch of a file)."""
    n = batch.size
    if n == size:
        return batch
    if n > size:
        raise ValueError(f"batch of {n} rows is larger than the batch size {size}")
    extra = size - n

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)])

    return Batch(pad(batch.labels), pad(batch.ids), pad(batch.vals), pad(batch.mask),
                 pad(batch.weights), None if batch.dense is None else pad(batch.dense))
