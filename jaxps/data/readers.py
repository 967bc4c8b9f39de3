"""Streaming libsvm/Criteo readers: files -> variable-size chunks -> fixed-size Batches.

Why this shape: files are read in large whole-line chunks and parsed by nogil numba
kernels (parse.py), so a background thread (`prefetch`) overlaps parsing with the device
step. Multi-process input is sharded without coordination: files round-robin when there
are enough of them, otherwise byte ranges aligned to line starts (gzip: lines dealt by
line number). Errors always name the exact file and 1-based line.
"""
from __future__ import annotations

import gzip
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from jaxps.data.batch import Batch, concat, pad_to
from jaxps.data.parse import CRITEO_FIELDS, REASONS, new_line_err, parse_buffer

T = TypeVar("T")
_MAX_ROWS = 1 << 16  # rows per yielded chunk: bounds memory for files of tiny lines
_TEXT_CHARS = 120
_FIRST_SKIPPED = 10


class DataError(ValueError):
    """A bad input line: ``"{path}:{line}: {reason}: {line text[:120]}"``."""

    def __init__(self, path: str, line: int, reason: str, text: str):
        self.path, self.line, self.reason, self.text = path, line, reason, text
        super().__init__(f"{path}:{line}: {reason}: {text}")


@dataclass
class ReaderConfig:
    """How to read input files (format, slots per row, bad-line policy, chunk size)."""

    format: str = "libsvm"  # or "criteo"
    max_nnz: int = 39
    skip_bad_lines: bool = False
    max_index: int | None = None
    chunk_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if self.format not in ("libsvm", "criteo"):
            raise ValueError(f"ReaderConfig.format must be 'libsvm' or 'criteo', got {self.format!r}")
        if not _is_int(self.max_nnz) or self.max_nnz < 1:
            raise ValueError(f"ReaderConfig.max_nnz must be a positive int, got {self.max_nnz!r}")
        if self.format == "criteo" and self.max_nnz < CRITEO_FIELDS:
            raise ValueError(f"ReaderConfig.max_nnz must be >= {CRITEO_FIELDS} for criteo "
                             f"(one slot per field), got {self.max_nnz}")
        if not isinstance(self.skip_bad_lines, (bool, np.bool_)):
            raise ValueError(f"ReaderConfig.skip_bad_lines must be a bool, got {self.skip_bad_lines!r}")
        if self.max_index is not None and (not _is_int(self.max_index) or self.max_index < 1):
            raise ValueError(f"ReaderConfig.max_index must be None or a positive int, got {self.max_index!r}")
        if not _is_int(self.chunk_bytes) or self.chunk_bytes < 1:
            raise ValueError(f"ReaderConfig.chunk_bytes must be a positive int, got {self.chunk_bytes!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass
class ReadStats:
    """Counts for one reader (this process only); skipped lines keep their first messages."""

    lines: int = 0
    examples: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    first_skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.lines} lines, {self.examples} examples, {self.skipped} skipped"
        if self.skipped_by_reason:
            s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())) + ")"
        for m in self.first_skipped:
            s += "\n  " + m
        return s


@dataclass
class _Source:
    """One file's share for this process: a byte range, or every `step`-th line (gzip)."""

    path: str
    start: int = 0
    end: int | None = None  # None: to end of file
    step: int = 1
    phase: int = 0


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _sources(paths: Sequence[str], process_index: int, process_count: int) -> list[_Source]:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    if len(paths) >= process_count:
        return [_Source(p) for p in paths[process_index::process_count]]
    out = []
    for p in paths:
        if p.endswith(".gz"):  # no random access: deal lines by number
            out.append(_Source(p, step=process_count, phase=process_index))
        else:
            size = os.path.getsize(p)
            out.append(_Source(p, size * process_index // process_count,
                               size * (process_index + 1) // process_count))
    return out


def lines_upper_bound(paths: str | Sequence[str], process_index: int, process_count: int,
                      *, cache: dict[str, int] | None = None) -> int:
    """An upper bound on the examples `process_index` reads, from newline counts (GB/s).

    Every process can compute it for every other one without talking to them, which is
    how multi-process datasets agree on a common number of steps. Plain files are counted
    only over this process's byte range; gzip files are counted decompressed, once per
    `cache` (pass the same dict to share counts between calls). Plain byte ranges are
    tight: at most one more than the lines the process reads.
    """
    files = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    cache = {} if cache is None else cache
    total = 0
    for src in _sources(files, process_index, process_count):
        if src.path.endswith(".gz"):  # whole file, or every step-th line of it
            n = cache.get(src.path)
            if n is None:
                n = cache[src.path] = _count_lines_gz(src.path)
            total += max(0, -(-(n - src.phase) // src.step))
        else:
            end = os.path.getsize(src.path) if src.end is None else src.end
            total += _range_line_bound(src.path, src.start, end)
    return total


def lines_upper_bounds(paths: str | Sequence[str], process_count: int) -> list[int]:
    """`lines_upper_bound` for every process, reading each byte / gzip file once in all."""
    cache: dict[str, int] = {}
    return [lines_upper_bound(paths, p, process_count, cache=cache) for p in range(process_count)]


def _count_lines_gz(path: str) -> int:
    """Lines of a gzip file as the reader numbers them (a last line without newline counts)."""
    n, last = 0, b"\n"
    with _open(path) as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _range_line_bound(path: str, start: int, end: int) -> int:
    """Bound on the lines that start in [start, end): the reader's share of a byte range.

    Lines starting there are those after a newline in [start-1, end-1) (plus line 0), so
    newlines in [start, end), plus one unless the range ends on a newline, bound them.
    """
    if end <= start:
        return 0
    n = _count_newlines(path, start, end)
    with open(path, "rb") as f:
        f.seek(end - 1)
        last = f.read(1)
    return n + (last != b"\n")


def _first_line_start(f, start: int) -> int:
    """Offset of the first line that begins at or after `start` (f is seekable)."""
    if start == 0:
        return 0
    f.seek(start - 1)
    pos = start - 1
    while True:
        block = f.read(1 << 16)
        if not block:
            return pos
        k = block.find(b"\n")
        if k >= 0:
            return pos + k + 1
        pos += len(block)


def _chunks(f, off: int, limit: int | None, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield (whole-line bytes, offset) from f at `off`; stop after the line holding limit-1."""
    carry = b""
    while True:
        block = f.read(chunk_bytes)
        data = carry + block if carry else block
        if limit is not None and off + len(data) >= limit:
            k = data.find(b"\n", max(limit - 1 - off, 0))
            if k >= 0 or not block:
                if data:
                    yield (data[:k + 1] if k >= 0 else data), off
                return
            carry = data
            continue
        if not block:
            if data:
                yield data, off
            return
        k = data.rfind(b"\n")
        if k < 0:
            carry = data
            continue
        yield data[:k + 1], off
        carry = data[k + 1:]
        off += k + 1


def _count_newlines(path: str, start: int, end: int) -> int:
    """Newlines in bytes [start, end) of an uncompressed file (reads only that range)."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, 16 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _line_text(data: bytes, nl: np.ndarray, line: int) -> str:
    s = 0 if line == 0 else int(nl[line - 1]) + 1
    e = int(nl[line]) if line < nl.size else len(data)
    return data[s:e].rstrip(b"\r").decode("utf-8", "replace")[:_TEXT_CHARS]


def _read_source(src: _Source, cfg: ReaderConfig, stats: ReadStats) -> Iterator[Batch]:
    with _open(src.path) as f:
        off = 0
        if src.end is not None:
            off = _first_line_start(f, src.start)
            if off >= src.end:
                return
            f.seek(off)
        base: list[int] = []  # lines in the file before `off`, counted only when needed

        def lineno(line_in_source: int) -> int:
            if not base:
                base.append(_count_newlines(src.path, 0, off) if off else 0)
            return base[0] + line_in_source + 1

        before = 0  # lines of this source before the current buffer
        sharded = src.step > 1
        for data, _ in _chunks(f, off, src.end, cfg.chunk_bytes):
            buf = np.frombuffer(data, np.uint8)
            line_err = new_line_err(buf)
            pos = line = 0
            while pos < buf.size:
                p = parse_buffer(buf, cfg.format, cfg.max_nnz, pos=pos, line=line,
                                 line_err=line_err, max_index=cfg.max_index,
                                 skip_bad=cfg.skip_bad_lines or sharded, max_rows=_MAX_ROWS)
                stop = p.err_line
                keep = slice(None)
                if sharded:
                    owned = (before + p.row_line) % src.step == src.phase
                    if not cfg.skip_bad_lines:
                        lo, hi = line, p.next_line
                        bad = np.flatnonzero(line_err[lo:hi]) + lo
                        bad = bad[(before + bad) % src.step == src.phase]
                        if bad.size:
                            stop = int(bad[0])
                            owned &= p.row_line < stop
                    keep = owned
                rows = Batch(p.labels[keep], p.ids[keep], p.vals[keep], p.mask[keep],
                             np.ones(int(np.count_nonzero(keep)) if sharded else p.labels.size,
                                     np.float32),
                             None if p.dense is None else p.dense[keep])
                if rows.size:
                    stats.examples += rows.size
                    yield rows
                if stop >= 0:
                    nl = np.flatnonzero(buf == 10)
                    raise DataError(src.path, lineno(before + stop),
                                    REASONS[int(line_err[stop])], _line_text(data, nl, stop))
                pos, line = p.next_pos, p.next_line
            nlines = line
            line_err = line_err[:nlines]
            if sharded:
                owned_lines = np.flatnonzero(np.arange(before, before + nlines) % src.step
                                             == src.phase)
                stats.lines += int(owned_lines.size)
                bad_lines = owned_lines[line_err[owned_lines] != 0]
            else:
                stats.lines += nlines
                bad_lines = np.flatnonzero(line_err)
            if bad_lines.size:
                stats.skipped += int(bad_lines.size)
                for code, cnt in zip(*np.unique(line_err[bad_lines], return_counts=True)):
                    r = REASONS[int(code)]
                    stats.skipped_by_reason[r] = stats.skipped_by_reason.get(r, 0) + int(cnt)
                room = _FIRST_SKIPPED - len(stats.first_skipped)
                if room > 0:
                    nl = np.flatnonzero(buf == 10)
                    for ln in bad_lines[:room]:
                        err = DataError(src.path, lineno(before + int(ln)),
                                        REASONS[int(line_err[ln])], _line_text(data, nl, int(ln)))
                        stats.first_skipped.append(str(err))
            before += nlines


def read_examples(paths: str | Sequence[str], cfg: ReaderConfig, *, process_index: int = 0,
                  process_count: int = 1, stats: ReadStats | None = None) -> Iterator[Batch]:
    """Stream this process's share of `paths` as variable-size chunks (weights 1).

    Raises DataError (after yielding every good row before the bad line) unless
    cfg.skip_bad_lines, in which case bad lines are counted in `stats`.
    """
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = [os.fspath(p) for p in files]
    stats = ReadStats() if stats is None else stats
    for src in _sources(files, process_index, process_count):
        yield from _read_source(src, cfg, stats)


def batches(paths: str | Sequence[str], cfg: ReaderConfig, batch_size: int, *,
            process_index: int = 0, process_count: int = 1, stats: ReadStats | None = None,
            epochs: int = 1, drop_remainder: bool = False) -> Iterator[Batch]:
    """Fixed-size batches over `epochs` passes (epochs run back to back without padding);
    the final short batch is padded with weight-0 rows unless drop_remainder.

    Note: with byte-range sharding processes may get different batch counts.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pending: list[Batch] = []  # the start of the next batch, carried across chunks
    have = 0
    for _ in range(epochs):
        for chunk in read_examples(paths, cfg, process_index=process_index,
                                   process_count=process_count, stats=stats):
            pos = 0
            if have:  # complete the carried batch: the only rows that are copied
                take = min(batch_size - have, chunk.size)
                pending.append(chunk.slice(0, take))
                have += take
                pos = take
                if have < batch_size:
                    continue
                yield concat(pending)
                pending, have = [], 0
            while chunk.size - pos >= batch_size:  # whole batches are views of the chunk
                yield chunk.slice(pos, pos + batch_size)
                pos += batch_size
            if pos < chunk.size:
                pending, have = [chunk.slice(pos, chunk.size)], chunk.size - pos
    if have and not drop_remainder:
        yield pad_to(concat(pending), batch_size)


_END = object()


def prefetch(iterator: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Run `iterator` in a background thread, `depth` items ahead (parsing is nogil).

    Exceptions are re-raised in the consumer at the position they occurred.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        it = iter(iterator)
        try:
            for x in it:
                if not put((x, None)):
                    break
            else:
                put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((_END, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None and stop.is_set():
                close()

    t = threading.Thread(target=work, name="jaxps-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is _END:
                return
            yield x
    finally:
        stop.set()
