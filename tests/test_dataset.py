"""FileDataset sharding: equal batch counts per process and every line read exactly once.

Processes are simulated with explicit process_index/process_count (prefetch=0 runs the
reader inline), which is all the multi-process path needs: it computes every process's
bound locally.
"""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from jaxps.data import FileDataset, ReaderConfig
from jaxps.data.readers import lines_upper_bound, lines_upper_bounds


def _lines(first: int, n: int) -> list[bytes]:
    """libsvm lines whose single feature id is a global line number (first+1 ... first+n);
    lengths vary so byte ranges cut lines at different places."""
    return [b"%d %d:%s" % (i % 2, first + i + 1, b"1" * (1 + i % 5)) for i in range(n)]


def _write(path, lines: list[bytes], trailing_newline: bool = True) -> str:
    data = b"\n".join(lines) + (b"\n" if lines and trailing_newline else b"")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def _run(paths, count: int, batch_size: int, cfg: ReaderConfig | None = None):
    cfg = cfg or ReaderConfig(max_nnz=2)
    steps, ids, real = [], [], []
    for p in range(count):
        ds = FileDataset(paths, cfg, batch_size, process_index=p, process_count=count, prefetch=0)
        n, got = 0, []
        for b in ds:
            n += 1
            assert b.size == batch_size and b.ids.shape == (batch_size, cfg.max_nnz)
            got.append(b.ids[b.weights > 0, 0])
        steps.append(n)
        mine = np.concatenate(got) if got else np.zeros(0, np.uint64)
        ids.append(mine)
        real.append(mine.size)
        assert ds.stats.examples == mine.size
    return steps, ids, real


def _check(paths, count: int, batch_size: int, total: int, plain: bool):
    steps, ids, real = _run(paths, count, batch_size)
    assert len(set(steps)) == 1, steps  # same number of steps everywhere: no deadlock
    allids = np.sort(np.concatenate(ids))
    np.testing.assert_array_equal(allids, np.arange(1, total + 1))  # each line exactly once
    bounds = lines_upper_bounds(paths, count)
    for p in range(count):
        assert bounds[p] == lines_upper_bound(paths, p, count)
        assert bounds[p] >= real[p], (p, bounds, real)
        if plain:
            assert bounds[p] <= real[p] + 1, (p, bounds, real)
        else:  # gzip counts are exact line counts
            assert bounds[p] == real[p], (p, bounds, real)
    assert steps[0] == -(-max(bounds) // batch_size)
    return steps, real


@pytest.mark.parametrize("n,batch_size,trailing", [(100, 7, True), (100, 7, False),
                                                   (31, 4, True), (5, 2, False)])
def test_plain_file_byte_ranges_three_processes(tmp_path, n, batch_size, trailing):
    path = _write(tmp_path / "a.svm", _lines(0, n), trailing)
    _check([path], 3, batch_size, n, plain=True)


def test_plain_files_many_cut_points(tmp_path):
    # every process count up to 9 over a small file: bounds hold at every cut
    path = _write(tmp_path / "a.svm", _lines(0, 23))
    for count in range(2, 10):
        _check([path], count, 3, 23, plain=True)


def test_two_gz_files_two_processes_unequal(tmp_path):
    a = _write(tmp_path / "a.svm.gz", _lines(0, 37))
    b = _write(tmp_path / "b.svm.gz", _lines(37, 85), trailing_newline=False)
    steps, real = _check([a, b], 2, 8, 122, plain=False)
    assert real == [37, 85] and steps == [11, 11]


def test_one_gz_file_three_processes_dealt_by_line(tmp_path):
    path = _write(tmp_path / "a.svm.gz", _lines(0, 50))
    steps, real = _check([path], 3, 4, 50, plain=False)
    assert real == [17, 17, 16]


def test_empty_file_and_nonempty_file(tmp_path):
    empty = _write(tmp_path / "empty.svm", [])
    full = _write(tmp_path / "full.svm", _lines(0, 20))
    steps, real = _check([empty, full], 2, 6, 20, plain=True)
    assert real == [0, 20] and steps == [4, 4]


def test_fewer_lines_than_processes(tmp_path):
    path = _write(tmp_path / "a.svm", _lines(0, 2))
    steps, real = _check([path], 4, 3, 2, plain=True)
    assert sum(real) == 2 and 0 in real


def test_fewer_gz_lines_than_processes(tmp_path):
    path = _write(tmp_path / "a.svm.gz", _lines(0, 2))
    steps, real = _check([path], 4, 3, 2, plain=False)
    assert real == [1, 1, 0, 0] and steps == [1, 1, 1, 1]


def test_padding_batch_shaped_from_config_criteo(tmp_path):
    empty = _write(tmp_path / "empty.tsv", [])
    row = b"\t".join([b"1"] + [b"3"] * 13 + [b"a1"] * 26)
    full = _write(tmp_path / "full.tsv", [row] * 5)
    cfg = ReaderConfig(format="criteo", max_nnz=40)
    got = list(FileDataset([empty, full], cfg, 4, process_index=0, process_count=2, prefetch=0))
    assert len(got) == 2
    for b in got:
        assert b.weights.dtype == np.float32 and not b.weights.any()
        assert b.labels.shape == (4,) and b.labels.dtype == np.float32 and not b.labels.any()
        assert b.ids.shape == (4, 40) and b.ids.dtype == np.uint64 and not b.ids.any()
        assert b.vals.dtype == np.float32 and b.mask.dtype == np.bool_ and not b.mask.any()
        assert b.dense.shape == (4, 13) and b.dense.dtype == np.float32 and not b.dense.any()
    other = list(FileDataset([empty, full], cfg, 4, process_index=1, process_count=2, prefetch=0))
    assert len(other) == 2 and other[0].dense.shape == (4, 13)


def test_padding_batch_libsvm_has_no_dense(tmp_path):
    empty = _write(tmp_path / "empty.svm", [])
    full = _write(tmp_path / "full.svm", _lines(0, 3))
    (b,) = FileDataset([empty, full], ReaderConfig(max_nnz=5), 8, process_index=0,
                       process_count=2, prefetch=0)
    assert b.dense is None and b.ids.shape == (8, 5) and b.weights.sum() == 0


def test_more_batches_than_steps_per_pass_raises(tmp_path):
    path = _write(tmp_path / "a.svm", _lines(0, 40))
    ds = FileDataset([path], ReaderConfig(max_nnz=2), 4, process_index=0, process_count=2,
                     prefetch=0)
    ds.steps_per_pass = 2  # as if the line bound were wrong
    with pytest.raises(RuntimeError, match="steps_per_pass=2"):
        list(ds)


def test_prefetch_thread_gives_the_same_batches(tmp_path):
    path = _write(tmp_path / "a.svm", _lines(0, 30))
    cfg = ReaderConfig(max_nnz=2)
    for p in range(3):
        inline = list(FileDataset([path], cfg, 4, process_index=p, process_count=3, prefetch=0))
        ahead = list(FileDataset([path], cfg, 4, process_index=p, process_count=3, prefetch=2))
        assert len(inline) == len(ahead)
        for x, y in zip(inline, ahead):
            np.testing.assert_array_equal(x.ids, y.ids)
            np.testing.assert_array_equal(x.weights, y.weights)
