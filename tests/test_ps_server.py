"""Host PS: server-side row-wise updates equal numpy, exactly-once pushes, routing over a
group of servers, deterministic initial rows."""
import numpy as np
import pytest

from jaxps.hashing import GOLDEN, mix64
from jaxps.optim import rowwise
from jaxps.ps.client import embedded
from jaxps.ps.ring import Ring, partition_of
from jaxps.ps.initrows import init_rows
from jaxps.ps.server import PSError, PSServer, TableSpec
from reference import NumpyRowOptimizer

HP = {"sgd": dict(learning_rate=0.5), "adagrad": dict(learning_rate=0.3),
      "adam": dict(learning_rate=0.05), "ftrl": dict(learning_rate=0.3, l1=0.01, l2=0.01, beta=0.5)}


@pytest.mark.parametrize("opt", sorted(HP))
@pytest.mark.parametrize("servers", [1, 3])
def test_pushes_equal_numpy_reference(opt, servers):
    rng = np.random.default_rng(0)
    dim = 4
    client = embedded([TableSpec("t", dim, rowwise.make(opt, **HP[opt]))], servers=servers, num_partitions=64)
    universe = rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True)
    ref = NumpyRowOptimizer(opt, len(universe), dim, **HP[opt])
    pushed = set()
    for step in range(1, 6):
        pick = np.unique(rng.choice(len(universe), 120, replace=False))
        pushed.update(pick.tolist())
        grads = rng.normal(size=(len(pick), dim)).astype(np.float32)
        client.push("t", universe[pick], grads, step)
        ref.apply(pick, grads.astype(np.float64), step)
    np.testing.assert_allclose(client.pull("t", universe), ref.w, rtol=2e-5, atol=1e-6)
    stats = client.stats()
    assert sum(s["t"]["keys"] for s in stats.values()) == len(pushed)  # stored on push only
    assert sum(s["t"]["pushed_keys"] for s in stats.values()) == 5 * 120


def test_exactly_once_and_retry_after_failure():
    ring = Ring(16, 8, ["a"])
    server = PSServer("a", ring, [TableSpec("t", 2, rowwise.SGD(1.0))])
    keys = np.array([1, 2**63], np.uint64)
    g = np.ones((2, 2), np.float32)
    assert server.push("t", keys, g, (7, 0), 1)
    assert not server.push("t", keys, g, (7, 0), 1)  # a retry: not applied again
    np.testing.assert_array_equal(server.pull("t", keys), -np.ones((2, 2)))
    assert server.stats()["t"]["duplicate_pushes"] == 1
    with pytest.raises(PSError, match="grads must be float32"):
        server.push("t", keys, g.astype(np.float64), (7, 1), 1)
    assert server.push("t", keys, g, (7, 1), 1)  # the failed request id may be retried
    np.testing.assert_array_equal(server.pull("t", keys), -2 * np.ones((2, 2)))


def test_wrong_owner_unknown_table_and_hashed_range():
    ring = Ring(64, 8, ["a", "b"])
    a = PSServer("a", ring, [TableSpec("h", 1, rowwise.SGD(), kind="hashed", rows=100)])
    keys = np.arange(100, dtype=np.uint64)
    with pytest.raises(PSError, match="belongs to b"):
        a.pull("h", keys)
    with pytest.raises(PSError, match="unknown table"):
        a.pull("nope", keys[:1])
    mine = keys[ring.owners()[partition_of(keys, 64)] == 0]
    with pytest.raises(PSError, match="out of range"):
        a.pull("h", np.array([100], np.uint64))
    assert a.pull("h", mine).shape == (len(mine), 1)


def test_initial_rows_are_deterministic_and_unseen_keys_are_not_stored():
    keys = np.array([3, 2**64 - 1, 12345], np.uint64)
    a = init_rows(keys, 8, 0.1, seed=1)
    np.testing.assert_array_equal(a, init_rows(keys, 8, 0.1, seed=1))
    assert not np.allclose(a, init_rows(keys, 8, 0.1, seed=2))
    big = init_rows(np.arange(20000, dtype=np.uint64), 8, 0.1, seed=0)
    assert abs(big.std() - 0.1) < 0.005 and abs(big.mean()) < 0.005
    client = embedded([TableSpec("e", 8, rowwise.Adagrad(), init_scale=0.1, seed=1)], servers=2)
    np.testing.assert_array_equal(client.pull("e", keys), a)
    assert sum(s["e"]["keys"] for s in client.stats().values()) == 0


def _numpy_init_rows(keys, dim, scale, seed):
    """The definition, in plain numpy: Box-Muller on splitmix64 bits of (seed, key, column)."""
    base = mix64(np.asarray(keys, np.uint64) ^ mix64(np.array([seed], np.uint64) * GOLDEN))
    bits = mix64(base[:, None] + np.arange(2 * dim, dtype=np.uint64)[None, :] * GOLDEN)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return (scale * np.sqrt(-2.0 * np.log(u[:, :dim])) * np.cos(2.0 * np.pi * u[:, dim:])).astype(np.float32)


def test_initial_rows_kernel_equals_the_numpy_definition():
    keys = np.concatenate([np.random.default_rng(0).integers(0, 2**63, 5000, dtype=np.uint64),
                           np.array([0, 1, 2**64 - 1, 2**63], np.uint64)])
    for dim, scale, seed in ((16, 0.05, 3), (7, 1.0, 0)):
        np.testing.assert_allclose(init_rows(keys, dim, scale, seed), _numpy_init_rows(keys, dim, scale, seed),
                                   rtol=2e-6, atol=1e-7)
    assert not init_rows(keys[:3], 4, 0.0, 1).any()


def test_a_retry_waits_for_the_first_attempt_in_flight():
    """A retry arriving while the first attempt still applies must not report success
    early: both wait on the partition, and exactly one of them applies the push."""
    import threading
    ring = Ring(16, 8, ["a"])
    server = PSServer("a", ring, [TableSpec("t", 1, rowwise.SGD(1.0))])
    keys = np.array([5], np.uint64)
    g = np.ones((1, 1), np.float32)
    store, lock = server._store("t", int(partition_of(keys, 16)[0]))
    lock.acquire()  # hold the partition: the first attempt blocks inside push
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", server.push("t", keys, g, (1, 0), 1)))
    first.start()
    retry = threading.Thread(target=lambda: results.setdefault("retry", server.push("t", keys, g, (1, 0), 1)))
    retry.start()
    retry.join(timeout=0.3)
    assert retry.is_alive()  # the retry waits instead of answering "applied"
    lock.release()
    first.join(timeout=5)
    retry.join(timeout=5)
    assert sorted(results.values()) == [False, True]  # whichever got the partition first applied it
    np.testing.assert_array_equal(server.pull("t", keys), [[-1.0]])


def test_admission_by_min_count_is_counted():
    client = embedded([TableSpec("t", 2, rowwise.SGD(1.0), min_count=3)], servers=2, num_partitions=16)
    key = np.array([2**64 - 5], np.uint64)
    g = np.ones((1, 2), np.float32)
    for step in (1, 2):  # below the count: nothing stored, gradients dropped
        client.push("t", key, g, step)
        np.testing.assert_array_equal(client.pull("t", key), [[0.0, 0.0]])
    client.push("t", key, g, 3)  # the third push admits the key and applies its gradient
    np.testing.assert_array_equal(client.pull("t", key), [[-1.0, -1.0]])
    stats = {k: sum(s["t"][k] for s in client.stats().values()) for k in ("keys", "admitted", "rejected")}
    assert stats == {"keys": 1, "admitted": 1, "rejected": 2}


def test_eviction_keeps_the_budget_and_the_most_recent_rows():
    client = embedded([TableSpec("t", 1, rowwise.SGD(1.0), max_rows=100)], servers=1, num_partitions=1)
    keys = np.arange(1, 1001, dtype=np.uint64)
    for step, chunk in enumerate(np.split(keys, 20), start=1):  # 50 new keys per step
        client.push("t", chunk, np.ones((50, 1), np.float32), step)
    stats = client.stats()["ps-0"]["t"]
    assert stats["keys"] <= 100 and stats["evicted"] == 1000 - stats["keys"]
    recent = client.pull("t", keys[-50:])   # pushed last: kept
    old = client.pull("t", keys[:50])       # pushed first: evicted, read as initial rows
    np.testing.assert_array_equal(recent, -np.ones((50, 1)))
    np.testing.assert_array_equal(old, np.zeros((50, 1)))


@pytest.mark.parametrize("sync", ["bsp", "ssp-cuts"])
def test_held_pushes_of_two_tables_travel_with_a_partition_copy(sync):
    """Pushes held for a BSP step, or an SSP cut's copy (pushes past the cut applied, a
    late push of a step before it), in two tables, copied to a new replica
    (`export_partitions` -> `load_partitions`): once both groups complete the step, the
    copy holds the source's rows bit for bit, each push applied once (SGD with lr 1: a
    row is minus the sum of its gradients), and the cut read from the two servers'
    primaries holds exactly the pushes of steps <= 2."""
    from jaxps.ps.clock import Sync

    mode, cut_every = (Sync(0), 0) if sync == "bsp" else (Sync(3), 2)
    specs = [TableSpec(n, 2, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=64) for n in ("a", "b")]
    ring = Ring(8, 8, ["s", "t"])
    source, target = PSServer("s", ring, specs, replicas=1), PSServer("t", ring, specs, replicas=1)
    for g in (0, 1):
        source.clock(g, 0, 2, mode, cut_every)
    rng = np.random.default_rng(4)
    want = {n: np.zeros((64, 2), np.float32) for n in ("a", "b")}
    want_cut = {n: np.zeros((64, 2), np.float32) for n in ("a", "b")}
    pushed = {n: set() for n in ("a", "b")}
    pushed_cut = {n: set() for n in ("a", "b")}
    # (group, step): BSP holds every step-1 push; with cuts every 2 steps, pushes of steps past 2 are
    # applied with the cut's copy keeping their pre-images, and the late (1, 1) updates the copy too
    pushes = [(0, 1), (1, 1)] if sync == "bsp" else [(0, 1), (0, 3), (1, 4), (1, 1)]
    for seq, (group, step) in enumerate(pushes):
        for name in ("a", "b"):
            keys = np.unique(rng.integers(0, 64, 40)).astype(np.uint64)
            grads = rng.integers(-4, 5, (keys.size, 2)).astype(np.float32)  # small integers: sums are exact
            assert source.push(name, keys, grads, (group, seq), step, group)
            want[name][keys.astype(np.int64)] -= grads
            pushed[name].update(keys.tolist())
            if step <= 2:
                want_cut[name][keys.astype(np.int64)] -= grads
                pushed_cut[name].update(keys.tolist())
    copied = source.export_partitions(range(8))
    assert ("held/b/meta" if sync == "bsp" else "cutcopy/2/b/rows/values") in copied
    target.load_partitions(copied)
    for server in (source, target):
        for g in (0, 1):
            server.clock(g, 2, 2, mode, cut_every)
    got = {s.name: s.export_partitions(range(8)) for s in (source, target)}
    for name in ("a", "b"):
        for s in (source, target):
            rows = got[s.name]
            keys = rows[f"rows/{name}/keys"].astype(np.int64)
            assert sorted(keys.tolist()) == sorted(pushed[name])
            np.testing.assert_array_equal(rows[f"rows/{name}/values"], want[name][keys])
        if sync != "bsp":  # each server is the primary of half the partitions; the copies travelled
            cut = [s.export_cut(name, 2) for s in (source, target)]
            keys = np.concatenate([c["keys"] for c in cut]).astype(np.int64)
            assert sorted(keys.tolist()) == sorted(pushed_cut[name])
            np.testing.assert_array_equal(np.concatenate([c["values"] for c in cut]), want_cut[name][keys])


def test_load_refuses_rows_of_another_dim_dtype_or_optimizer():
    """A snapshot of another embedding width, dtype or optimizer is refused whole, naming the
    field, and what is stored stays; the table's own export loads back."""
    ring = Ring(8, 8, ["a"])
    a = PSServer("a", ring, [TableSpec("t", 4, rowwise.Adagrad())])
    keys = np.arange(5, dtype=np.uint64)
    a.push("t", keys, np.ones((5, 4), np.float32), (1, 1), 1)
    good = a.export("t")
    bad = [dict(good, values=good["values"].astype(np.float64)),          # dtype
           dict(good, values=np.zeros((5, 8), np.float32)),                # width
           {k: v for k, v in good.items() if k != "slot_accumulator"},     # optimizer slots
           dict(good, extra=np.zeros((5, 4), np.float32))]
    for rows in bad:
        with pytest.raises(PSError, match="snapshot field"):
            a.load("t", rows)
    np.testing.assert_array_equal(a.export("t")["values"], good["values"])
    a.load("t", good)
    np.testing.assert_array_equal(a.export("t")["values"], good["values"])


def test_a_freeze_that_times_out_leaves_the_server_writable():
    ring = Ring(8, 8, ["a"])
    a = PSServer("a", ring, [TableSpec("t", 4, rowwise.SGD())])
    with a._gate:
        a._writes += 1  # a write in progress that does not finish in time
    with pytest.raises(TimeoutError):
        a.freeze(timeout=0.01)
    with a._gate:
        a._writes -= 1
    a.push("t", np.arange(3, dtype=np.uint64), np.ones((3, 4), np.float32), (1, 1), 1)
    assert a.export("t")["keys"].size == 3


def test_a_copied_settled_step_is_published_after_the_pushes_held_for_it():
    """A replica that takes over partitions learns the source's settled BSP step; pushes it
    holds itself for that step are applied before the step is published, so no pull it
    releases reads the rows without them."""
    from jaxps.ps.clock import Sync

    specs = [TableSpec("a", 2, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=64)]
    ring = Ring(8, 8, ["s", "t"])
    source, target = PSServer("s", ring, specs, replicas=1), PSServer("t", ring, specs, replicas=1)
    for server in (source, target):
        for g in (0, 1):
            server.clock(g, 0, 2, Sync(0))
    every = np.arange(64, dtype=np.uint64)
    keys = every[ring.owners()[partition_of(every, 8)] == 1]  # the target's own partitions
    n = keys.size
    for g in (0, 1):  # held at the target: BSP applies step 1 once both groups completed it
        assert target.push("a", keys, np.ones((n, 2), np.float32), (g, 1), 1, g)
    for g in (0, 1):  # the source saw both clocks already
        source.clock(g, 1, 2, Sync(0))
    seen = []
    apply_held = target._apply_held

    def recording(step, held):
        seen.append((step, target.clocks.settled))
        return apply_held(step, held)

    target._apply_held = recording
    target.load_partitions(source.export_partitions(range(8)))
    assert seen and all(settled < step for step, settled in seen), seen
    assert target.clocks.settled == 1
    np.testing.assert_array_equal(target.pull("a", keys), np.full((n, 2), -2.0, np.float32))
