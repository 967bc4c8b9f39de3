"""Re-iterable datasets: each `iter()` is one pass, so `fit` can run several epochs."""
from __future__ import annotations

import threading
from typing import Iterator, Sequence

from jaxps.data.batch import Batch, pad_to
from jaxps.data.parse import warm_up
from jaxps.data.readers import ReaderConfig, ReadStats, batches, lines_upper_bound, prefetch


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
            bound = max(lines_upper_bound(self.paths, p, self.process_count)
                        for p in range(self.process_count))
            self.steps_per_pass = -(-bound // batch_size)

    def __iter__(self) -> Iterator[Batch]:
        it = batches(self.paths, self.reader, self.batch_size, process_index=self.process_index,
                     process_count=self.process_count, stats=self.stats)
        it = it if self.steps_per_pass is None else self._padded(it)
        return prefetch(it, self.prefetch) if self.prefetch else it

    def _padded(self, it: Iterator[Batch]) -> Iterator[Batch]:
        n, last = 0, None
        for b in it:
            n += 1
            last = b
            yield b
        while n < self.steps_per_pass:
            if last is None:
                raise ValueError(f"process {self.process_index} has no data in {self.paths} "
                                 "to shape its padding batches from")
            empty = pad_to(last.slice(0, 0), self.batch_size)
            n += 1
            yield empty
