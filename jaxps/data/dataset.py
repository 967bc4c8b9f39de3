"""Re-iterable datasets: each `iter()` is one pass, so `fit` can run several epochs."""
from __future__ import annotations

from typing import Iterator, Sequence

from jaxps.data.batch import Batch
from jaxps.data.readers import ReaderConfig, ReadStats, batches


class FileDataset:
    """Fixed-size batches of this process's share of libsvm/Criteo files."""

    def __init__(self, paths: str | Sequence[str], reader: ReaderConfig, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None):
        import jax  # only for the process topology; readers themselves never need JAX
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        if not self.paths:
            raise ValueError("FileDataset needs at least one file")
        self.reader, self.batch_size = reader, batch_size
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[Batch]:
        return batches(self.paths, self.reader, self.batch_size, process_index=self.process_index,
                       process_count=self.process_count, stats=self.stats)
