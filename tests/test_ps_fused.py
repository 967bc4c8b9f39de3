"""The PS's fused numba row updates (jaxps.ps.fused) equal the shared rowwise optimizer's
numpy update bit for bit, and a store using them equals one running the numpy path."""
import numpy as np
import pytest

from jaxps.optim import rowwise
from jaxps.ps import fused, store as store_mod
from jaxps.ps.store import PartitionStore

HP = {"sgd": [{}, {"learning_rate": 0.3}], "adagrad": [{}, {"learning_rate": 0.2, "epsilon": 1e-3,
                                                              "initial_accumulator_value": 0.5}]}


def _batch(opt, n_rows, n, dim, seed, scale=1.0, repeats=True):
    rng = np.random.default_rng(seed)
    values = (rng.normal(size=(n_rows, dim)) * scale).astype(np.float32)
    state = {s: (np.abs(rng.normal(size=(n_rows, dim))) * scale).astype(np.float32) + np.float32(opt.slot_init(s))
             for s in opt.slots}
    slots = (rng.integers(0, n_rows, n) if repeats else rng.permutation(n_rows)[:n]).astype(np.int64)
    grads = (rng.normal(size=(n + 7, dim)) * scale).astype(np.float32)
    grows = rng.permutation(n + 7)[:n].astype(np.int64)
    return values, state, slots, grads, grows


@pytest.mark.parametrize("name,i", [(k, i) for k, v in HP.items() for i in range(len(v))])
@pytest.mark.parametrize("dim", [1, 8, 16, 33])
@pytest.mark.parametrize("repeats", [True, False])  # the kernels' scratch and in-place paths
def test_fused_update_equals_rowwise_numpy(name, i, dim, repeats):
    opt = rowwise.make(name, **HP[name][i])
    kernel = fused.fused_update(opt)
    assert kernel is not None
    for seed, scale in [(0, 1.0), (1, 1e-20), (2, 1e20), (3, 1e-3)]:
        batch = _batch(opt, 500, 300, dim, seed, scale, repeats)
        assert (len(np.unique(batch[2])) < 300) == repeats
        assert fused.equal_to_numpy(opt, kernel, batch), (seed, scale)


def test_no_kernel_for_other_optimizers():
    assert fused.fused_update(rowwise.FTRL()) is None and fused.fused_update(rowwise.Adam()) is None

    class MyAdagrad(rowwise.Adagrad):  # a subclass may change the update: numpy path
        pass
    assert fused.fused_update(MyAdagrad()) is None


@pytest.mark.parametrize("opt", ["sgd", "adagrad", "ftrl"])
def test_store_fused_equals_store_numpy(monkeypatch, opt):
    """Same pushes (grads by row index and plain, growth, admission) into a store using the
    fused kernels and one forced onto the numpy update: identical rows and slots."""
    o = rowwise.make(opt)
    rng = np.random.default_rng(4)
    stores = []
    for use in (True, False):
        monkeypatch.setattr(store_mod, "FUSED", use)
        stores.append(PartitionStore(4, o, init_scale=0.1, seed=3, min_count=2 if opt == "sgd" else 1))
    assert (stores[0]._fused is not None) == (opt != "ftrl") and stores[1]._fused is None
    universe = rng.integers(0, 2**63, 2000, dtype=np.uint64)
    for step in range(1, 25):
        keys = np.unique(universe[rng.integers(0, universe.size, 300)])
        rng.shuffle(keys)
        grads = rng.normal(size=(keys.size + 5, 4)).astype(np.float32)
        rows = rng.permutation(keys.size + 5)[:keys.size]
        for s in stores:
            if step % 2:
                s.push(keys, grads, step, rows)
            else:
                s.push(keys, grads[rows], step)
    a, b = stores[0].export(), stores[1].export()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    q = universe[:500]
    np.testing.assert_array_equal(stores[0].pull(q), stores[1].pull(q))
