"""Re-iterable datasets: each `iter()` is one pass, so `fit` can run several epochs."""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

import numpy as np

from jaxps.data.batch import Batch
from jaxps.data.parse import CRITEO_INT_FIELDS, warm_up
from jaxps.data.readers import ReaderConfig, ReadStats, batches, lines_upper_bounds, prefetch


class FileDataset:
    """Fixed-size batches of this process's share of libsvm/Criteo files.

    With several processes, every process must run the same number of steps (each step is
    one SPMD program over all of them), but byte-range shards hold different line counts.
    Each process computes every process's line bound from newline counts, no messages
    needed, and pads its pass with weight-0 batches up to the common number of batches.
    """

    def __init__(self, paths: str | Sequence[str], reader: ReaderConfig, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 prefetch: int = 4):
        """prefetch: batches parsed ahead on a reader thread (the numba parser releases the
        GIL), so parsing overlaps the trainer's id planning and the device step; 0 = inline."""
        import jax  # only for the process topology; readers themselves never need JAX
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        if not self.paths:
            raise ValueError("FileDataset needs at least one file")
        self.reader, self.batch_size, self.prefetch = reader, batch_size, prefetch
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.stats = ReadStats()

        threading.Thread(target=warm_up, args=(reader.format,), daemon=True,
                         name="jaxps-parse-warmup").start()
        self.steps_per_pass: int | None = None
        if self.process_count > 1:
            bound = max(lines_upper_bounds(self.paths, self.process_count))
            self.steps_per_pass = -(-bound // batch_size)

    def __iter__(self) -> Iterator[Batch]:
        it = batches(self.paths, self.reader, self.batch_size, process_index=self.process_index,
                     process_count=self.process_count, stats=self.stats)
        it = it if self.steps_per_pass is None else self._padded(it)
        return prefetch(it, self.prefetch) if self.prefetch else it

    def _padded(self, it: Iterator[Batch]) -> Iterator[Batch]:
        """This process's batches, then weight-0 batches up to `steps_per_pass`."""
        n = 0
        for b in it:
            n += 1
            if n > self.steps_per_pass:
                raise RuntimeError(
                    f"process {self.process_index} of {self.process_count} read more than "
                    f"steps_per_pass={self.steps_per_pass} batches from {self.paths}: the line "
                    "bound is wrong, and the other processes would wait forever for this step")
            yield b
        for _ in range(self.steps_per_pass - n):
            yield self._padding_batch()  # fresh arrays: consumers may write into batches

    def _padding_batch(self) -> Batch:
        """An all-padding batch (weights 0), shaped from the config alone: a process whose
        share is empty must still join every step."""
        b, f = self.batch_size, self.reader.max_nnz
        dense = (np.zeros((b, CRITEO_INT_FIELDS), np.float32)
                 if self.reader.format == "criteo" else None)
        return Batch(np.zeros(b, np.float32), np.zeros((b, f), np.uint64),
                     np.zeros((b, f), np.float32), np.zeros((b, f), np.bool_),
                     np.zeros(b, np.float32), dense)
