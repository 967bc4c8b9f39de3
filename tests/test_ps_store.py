"""Partition store and key index internals: tagged buckets (uint32 and uint64), dense key
array, capacity growth and its memory bound, take/put row traffic equal to a plain model."""
import numpy as np
import pytest

from jaxps.optim import rowwise
from jaxps.ps import keyindex
from jaxps.ps.keyindex import KeyIndex, grown_capacity
from jaxps.ps.initrows import init_rows
from jaxps.ps.store import PartitionStore


def _keys(n, seed=0):
    rng = np.random.default_rng(seed)
    k = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True))
    rng.shuffle(k)
    return k


@pytest.mark.parametrize("wide_above", [None, 64])
def test_index_find_count_and_wide_buckets(monkeypatch, wide_above):
    if wide_above:  # uint64 buckets once the table passes 64 buckets
        monkeypatch.setattr(keyindex, "_MAX_BUCKETS_32", wide_above)
    keys = _keys(20000)
    index = KeyIndex(capacity=4)
    slots, new = index.find_or_insert(keys)
    assert new.all() and index.size == keys.size
    assert index._buckets.dtype == (np.uint64 if wide_above else np.uint32)
    np.testing.assert_array_equal(slots, np.arange(keys.size))  # insertion order
    absent = keys[:100] ^ np.uint64(0x5555)
    absent = absent[~np.isin(absent, keys)]
    probe = np.concatenate([keys[::7], absent])
    found, missing = index.find_count(probe)
    assert missing == absent.size
    np.testing.assert_array_equal(found[:keys[::7].size], slots[::7])
    assert (found[keys[::7].size:] == -1).all()
    np.testing.assert_array_equal(index.keys(), keys)
    assert index.find_count(np.zeros(0, np.uint64))[1] == 0


def test_index_memory_bound():
    index = KeyIndex()
    for chunk in np.array_split(_keys(300_000, 1), 37):
        index.find_or_insert(chunk)
    per_key = index.nbytes / index.size
    # keys: 8 B + <= 12.5% headroom; uint32 buckets at load in (0.375, 0.75]: <= 10.7 B
    assert per_key <= 8 * 1.125 + 4 / 0.375 + 1e-9, per_key
    assert grown_capacity(1000, 1001) == 1126 and grown_capacity(0, 5) == 64 and grown_capacity(10, 500) == 500


@pytest.mark.parametrize("opt", ["sgd", "adagrad", "ftrl"])
def test_store_matches_plain_model_across_growth(opt):
    """Many pushes (store grows many times), pulls with absent keys, vs dict-of-rows numpy."""
    dim, rng = 3, np.random.default_rng(2)
    o = rowwise.make(opt)
    store = PartitionStore(dim, o, init_scale=0.1, seed=5)
    universe = _keys(3000, 3)
    w = {}
    s = {name: {} for name in o.slots}
    for step in range(1, 30):
        pick = universe[np.unique(rng.choice(universe.size, rng.integers(1, 400), replace=False))]
        g = rng.normal(size=(pick.size, dim)).astype(np.float32)
        params = np.stack([w.get(int(k), init_rows(np.array([k], np.uint64), dim, 0.1, 5)[0]) for k in pick])
        state = {n: np.stack([s[n].get(int(k), np.full(dim, o.slot_init(n), np.float32)) for k in pick])
                 for n in o.slots}
        new_p, new_s = o.update(np, params, state, g, np.float32(step))
        for i, k in enumerate(pick.tolist()):
            w[k] = new_p[i]
            for n in o.slots:
                s[n][k] = new_s[n][i]
        store.push(pick, g, step)
        q = universe[rng.choice(universe.size, 200, replace=False)]
        expect = np.stack([w.get(int(k), init_rows(np.array([k], np.uint64), dim, 0.1, 5)[0]) for k in q])
        np.testing.assert_array_equal(store.pull(q), expect)
    assert store.size == len(w)
    assert store.capacity >= store.size and store.capacity <= max(64, 1.125 * store.size + 1)
    rows = store.size * dim * 4 * (1 + len(o.slots))
    assert store.nbytes == store.values.nbytes + sum(a.nbytes for a in store.slots.values()) + store.index.nbytes
    assert rows <= store.nbytes
    # never-pushed keys are not stored; an all-absent pull equals init_rows
    fresh = _keys(50, 9)
    np.testing.assert_array_equal(store.pull(fresh), init_rows(fresh, dim, 0.1, 5))
    assert store.size == len(w)
