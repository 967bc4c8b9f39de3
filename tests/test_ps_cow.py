"""Copy-on-write snapshots (`PSServer.mark`, jaxps.ps.cow): pushes after a mark go on, and
the rows exported for the mark equal a copy made at the mark, field by field -- rows
updated since get their pre-images, rows stored since are left out, partitions that may
evict or are loaded into are copied whole first -- while the live rows are those of a
server that was never marked."""
import numpy as np
import pytest

from jaxps.optim import rowwise
from jaxps.ps.client import embedded
from jaxps.ps.server import PSError, TableSpec


def _by_key(rows):
    order = np.argsort(rows["keys"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


def _assert_rows_equal(got, want):
    got, want = _by_key(got), _by_key(want)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


SPECS = {
    "adagrad": TableSpec("t", 4, rowwise.make("adagrad", learning_rate=0.3), init_scale=0.1, seed=3),
    "ftrl-hashed": TableSpec("t", 3, rowwise.make("ftrl", learning_rate=0.2, l1=0.01), kind="hashed", rows=5000),
    "adam-admission": TableSpec("t", 2, rowwise.make("adam", learning_rate=0.1), min_count=2),
    "sgd-evicting": TableSpec("t", 2, rowwise.make("sgd", learning_rate=0.5), max_rows=1500),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_rows_exported_for_a_mark_equal_a_copy_made_at_the_mark(case):
    spec = SPECS[case]
    marked, plain = embedded([spec], servers=2, num_partitions=32), embedded([spec], servers=2, num_partitions=32)
    rng = np.random.default_rng(7)
    universe = np.arange(4000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) % np.uint64(5000)
    universe = np.unique(universe)

    def push(step, lo, hi):  # a step's unique keys from a sliding window: old, updated and new rows
        keys = rng.permutation(universe[lo:hi])[: (hi - lo) // 2]
        grads = rng.normal(size=(keys.size, spec.dim)).astype(np.float32)
        for c in (marked, plain):
            c.push("t", keys, grads, step)

    for step in range(1, 4):
        push(step, 0, 2000)
    at_first = marked.export("t")
    first = marked.mark("t")
    push(4, 1000, 3000)
    at_second = marked.export("t")
    second = marked.mark("t")  # two marks pending at once
    push(5, 500, 3500)
    loaded = {k: v[:50].copy() for k, v in marked.export("t").items()}
    loaded["values"] += 1.0
    for c in (marked, plain):  # a load into marked partitions: they are copied whole first
        c.load("t", loaded)
    push(6, 0, 4000)
    _assert_rows_equal(marked.export("t", marks=second), at_second)
    _assert_rows_equal(marked.export("t", marks=first), at_first)
    assert np.setdiff1d(at_second["keys"], at_first["keys"]).size  # rows were stored after the first mark
    _assert_rows_equal(marked.export("t"), plain.export("t"))  # marks never change the live rows
    with pytest.raises(PSError, match="no marked snapshot"):  # a mark is exported once
        marked.export("t", marks=first)


def test_a_cleared_table_still_exports_its_marked_rows_and_old_marks_expire():
    spec = SPECS["adagrad"]
    client = embedded([spec], servers=1, num_partitions=8)
    keys = np.arange(100, dtype=np.uint64)
    client.push("t", keys, np.ones((100, 4), np.float32), 1)
    want = client.export("t")
    mark = client.mark("t")
    client.clear("t")
    client.push("t", keys[:10], np.ones((10, 4), np.float32), 2)
    _assert_rows_equal(client.export("t", marks=mark), want)
    server = client.transports["ps-0"].server
    marks = [client.mark("t") for _ in range(server.MAX_MARKS + 1)]
    with pytest.raises(PSError, match="no marked snapshot"):
        client.export("t", marks=marks[0])
    assert client.export("t", marks=marks[-1])["keys"].size == 10


def test_marks_are_kept_per_table():
    """A checkpoint marks every table of a model: with more tables than MAX_MARKS, the
    first table's mark of the same checkpoint must still export."""
    from jaxps.ps.server import PSServer, TableSpec
    specs = [TableSpec(f"t{i}", 4, SPECS["adagrad"].optimizer, kind="hashed", rows=64)
             for i in range(PSServer.MAX_MARKS + 1)]
    client = embedded(specs, servers=1, num_partitions=8)
    keys = np.arange(10, dtype=np.uint64)
    for spec in specs:
        client.push(spec.name, keys, np.ones((10, 4), np.float32), 1)
    marks = {spec.name: client.mark(spec.name) for spec in specs}
    for spec in specs:
        client.push(spec.name, keys, np.ones((10, 4), np.float32), 2)
    for spec in specs:
        assert client.export(spec.name, marks=marks[spec.name])["keys"].size == 10
