"""Batched PS kernels (jaxps.ps.batched): one call per request across partitions gives the
rows of a flat numpy table updated by the optimizer's numpy code, bit for bit, and the same
tables as the per-partition path, through partition growth between calls, keys spread over
many partitions, absent keys, memo hits and misses, uint64 buckets and server threads."""
import numpy as np
import pytest

from jaxps.hashing import mix64
from jaxps.optim import rowwise
from jaxps.ps import keyindex
from jaxps.ps import server as server_mod
from jaxps.ps.batched import PartitionArrays
from jaxps.ps.client import InProcessTransport, PSClient, embedded
from jaxps.ps.fused import numpy_reference
from jaxps.ps.initrows import init_rows
from jaxps.ps.ring import partition_of
from jaxps.ps.server import TableSpec
from jaxps.ps.store import PartitionStore
from jaxps.host_tables import HostPlan
from reference import assert_same_rows, sorted_rows

DIM = 4
PARTS = 64


def _export_sorted(client, table="t"):
    return sorted_rows(client.export(table))


@pytest.mark.parametrize("opt,scale", [("adagrad", 0.1), ("sgd", 0.0), ("adagrad", 0.0)])
@pytest.mark.parametrize("threads,wide", [(1, False), (2, False), (1, True)])
def test_batched_requests_equal_numpy_and_the_per_partition_path(monkeypatch, opt, scale, threads, wide):
    monkeypatch.setattr(server_mod, "PARALLEL_KEYS", 16)  # small requests use the threads too
    parts = PARTS
    if wide:  # 2 partitions, whose indexes switch to uint64 buckets past 1536 keys as they grow:
        parts = 2  # from then on they take the per-partition path
        monkeypatch.setattr(keyindex, "_MAX_BUCKETS_32", 2048)
    o = rowwise.make(opt, learning_rate=0.3)
    spec = TableSpec("t", DIM, o, init_scale=scale, seed=7)
    batched = embedded([spec], num_partitions=parts, threads=threads)
    other = PSClient(batched.ring, batched.transports, [spec])  # pushes without a memo
    plain = embedded([spec], num_partitions=parts, threads=threads)
    rng = np.random.default_rng(3)
    universe = mix64(np.arange(1, 6001, dtype=np.uint64))
    assert np.unique(partition_of(universe, parts)).size == parts
    # the reference: a flat numpy table of every key, rows initialised as the servers do
    values = init_rows(universe, DIM, scale, 7)
    state = {n: np.full((universe.size, DIM), o.slot_init(n), np.float32) for n in o.slots}
    layouts = []
    for step in range(1, 16):
        pick = np.unique(rng.integers(0, 600 * step if step < 10 else universe.size, 900))
        rng.shuffle(pick)
        keys = universe[pick]
        grads = rng.normal(size=(pick.size, DIM)).astype(np.float32)
        out = np.full((pick.size, DIM), np.nan, np.float32)
        for c, use_batched in ((batched, True), (plain, False)):
            monkeypatch.setattr(server_mod, "BATCHED", use_batched)
            if step % 3 == 0 and c is batched:
                got = c.pull("t", keys, out=out)
                assert got is out
            else:
                got = c.pull("t", keys)
            np.testing.assert_array_equal(got.view(np.uint32), values[pick].view(np.uint32))
            pusher = other if (step % 4 == 0 and c is batched) else c  # a push no pull of it memoised
            pusher.push("t", keys, grads, step)
        numpy_reference(o, values, state, pick, grads, np.arange(pick.size), step)
        server = batched.transports["ps-0"].server
        layouts.append({p: st.layout for (_, p), st in server._stores.items()})
    grown = [p for p in layouts[-1] if p in layouts[2] and layouts[2][p] != layouts[-1][p]]
    assert len(grown) > parts // 2  # most partitions grew between calls
    assert server._memos.hits > 0
    if wide:
        assert {st.index._buckets.dtype for st in server._stores.values()} == {np.dtype(np.uint64)}
    a, b = _export_sorted(batched), _export_sorted(plain)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    pushed = np.flatnonzero(np.isin(universe, a["keys"]))
    order = np.argsort(universe[pushed])
    np.testing.assert_array_equal(a["values"], values[pushed][order])
    for n in o.slots:
        np.testing.assert_array_equal(a[f"slot_{n}"], state[n][pushed][order])


def test_partition_arrays_follow_growth_wide_buckets_and_drops(monkeypatch):
    store = PartitionStore(DIM, rowwise.make("adagrad"))
    arrays = PartitionArrays(8, DIM, "accumulator")
    assert arrays.sync(3, store)
    before = store.layout
    store.reserve_new(5000)  # grows the index and the row arrays
    assert store.layout != before
    assert arrays.sync(3, store)
    assert arrays.values[3].ctypes.data == store.values.ctypes.data
    assert arrays.acc[3].ctypes.data == store.slots["accumulator"].ctypes.data
    assert arrays.buckets[3].ctypes.data == store.index._buckets.ctypes.data
    assert arrays.skeys[3].ctypes.data == store.index._skeys.ctypes.data
    assert arrays.sizes[3] == store.size == 0
    arrays.forget(3)
    assert arrays.values[3].shape[0] == 0
    monkeypatch.setattr(keyindex, "_MAX_BUCKETS_32", 64)
    wide = PartitionStore(DIM, rowwise.make("sgd"))
    wide.reserve_new(1000)
    assert wide.index._buckets.dtype == np.uint64 and not arrays.sync(5, wide)


def test_repair_marks_equal_isin():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 50_000, 20_000).astype(np.uint64))
    rng.shuffle(keys)
    plan = HostPlan(keys, np.zeros((1, 1), np.int32), keys.size)
    shared = np.zeros(keys.size, bool)
    want = np.zeros(keys.size, bool)
    for seed in (1, 2):  # marks accumulate over pushes
        other = np.unique(np.random.default_rng(seed).integers(0, 50_000, 20_000).astype(np.uint64))
        assert plan.mark_shared(other, shared)
        want |= np.isin(keys, other)
        np.testing.assert_array_equal(shared, want)
    assert not plan.mark_shared(np.zeros(0, np.uint64), shared)
    assert not plan.mark_shared(np.array([50_001], np.uint64), shared)
    np.testing.assert_array_equal(shared, want)


class _CopyingTransport:
    """A transport that cannot write into the caller's buffer (as gRPC's): no `out`."""

    def __init__(self, inner: InProcessTransport):
        self.server = inner.server

    def pull(self, table, keys, group=-1, clock=0, ring_version=-1, client=-1):
        return self.server.pull(table, keys, group, clock, ring_version, client)


@pytest.mark.parametrize("servers", [1, 3])
def test_pull_into_a_callers_buffer(servers):
    spec = TableSpec("t", DIM, rowwise.make("adagrad"), init_scale=0.1)
    c = embedded([spec], servers=servers, num_partitions=32)
    keys = mix64(np.arange(1, 3001, dtype=np.uint64))
    c.push("t", keys[::2], np.ones((1500, DIM), np.float32), 1)
    want = c.pull("t", keys)
    block = np.zeros((4000, DIM), np.float32)
    assert c.pull("t", keys, out=block[:3000]) is not None
    np.testing.assert_array_equal(block[:3000], want)
    assert not block[3000:].any()
    copying = PSClient(c.ring, {n: _CopyingTransport(t) for n, t in c.transports.items()}, [spec])
    out = np.empty_like(want)
    np.testing.assert_array_equal(copying.pull("t", keys, out=out), want)
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="C-contiguous"):
        c.pull("t", keys, out=np.empty((3000, DIM + 1), np.float32))


def test_pulls_without_memo_leave_the_pushs_memo_in_place():
    """A strict repair's pulls (memo=False) must not push out the memo its push will use:
    with 4 memos per client, 4 prefetched pulls and one repair pull, the first went."""
    spec = TableSpec("t", DIM, rowwise.make("adagrad"))
    c = embedded([spec], num_partitions=16)
    memos = c.transports["ps-0"].server._memos
    memos.per_client = 4
    batches = [mix64(np.arange(1 + 100 * i, 101 + 100 * i, dtype=np.uint64)) for i in range(4)]
    for k in batches:
        c.pull("t", k)
    c.pull("t", batches[0][:10], memo=False)
    c.push("t", batches[0], np.ones((100, DIM), np.float32), 1)
    assert (memos.hits, memos.misses) == (1, 0)
    c.pull("t", batches[1][:10])  # with memos: 5 of this client's, the oldest (batches[1]'s) goes
    c.pull("t", batches[2][:10])
    c.push("t", batches[1], np.ones((100, DIM), np.float32), 2)
    assert (memos.hits, memos.misses) == (1, 1)


class _LosesReply:
    """A server's transport whose next push lands (on the keys `lands` picks) and then fails
    as a lost reply would: the client retries the whole push with the same request id."""

    def __init__(self, inner: InProcessTransport):
        self.inner, self.lands = inner, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def push(self, table, keys, grads, request_id, step, group=-1, ring_version=-1):
        lands, self.lands = self.lands, None
        if lands is None:
            return self.inner.push(table, keys, grads, request_id, step, group, ring_version)
        sel = lands(keys)
        self.inner.push(table, keys[sel], grads[sel], request_id, step, group, ring_version)
        raise ConnectionError("reply lost")


def test_retried_and_replicated_pushes_with_a_pending_mark_equal_numpy_on_both_paths(monkeypatch):
    """The batched and the per-partition push share the exactly-once claim and the
    copy-on-write step: pushes to primaries and backups (replicas=1), retries whose first
    attempt landed on a whole server or on some of its partitions, and a mark pending
    meanwhile give every replica the rows of a flat numpy table that applied each push
    once, bit for bit, on both paths; the mark exports the rows it was taken at."""
    opt = rowwise.make("adagrad", learning_rate=0.3)
    spec = TableSpec("t", DIM, opt, init_scale=0.1, seed=5)
    kernel_calls = []
    push_runs = server_mod.push_runs
    monkeypatch.setattr(server_mod, "push_runs", lambda *a: kernel_calls.append(1) or push_runs(*a))
    universe = mix64(np.arange(1, 3001, dtype=np.uint64))
    for use_batched in (True, False):
        monkeypatch.setattr(server_mod, "BATCHED", use_batched)
        group = embedded([spec], servers=3, num_partitions=32, replicas=1)
        flaky = {n: _LosesReply(t) for n, t in group.transports.items()}
        client = PSClient(group.ring, flaky, [spec], replicas=1, ring_source=lambda: (group.ring, flaky))
        values = init_rows(universe, DIM, 0.1, 5)
        state = {"accumulator": np.full((universe.size, DIM), opt.slot_init("accumulator"), np.float32)}
        rng = np.random.default_rng(11)
        kernel_calls.clear()
        for step in range(1, 8):
            pick = rng.permutation(universe.size)[:800]
            keys = universe[pick]
            grads = rng.normal(size=(pick.size, DIM)).astype(np.float32)
            client.pull("t", keys)  # memos on the primaries (a backup's push misses them)
            if step == 3:
                at_mark = client.export("t")
                mark = client.mark("t")
            if step == 4:  # ps-0 applied all of it, ps-1 the keys of its even partitions
                flaky["ps-0"].lands = lambda k: np.ones(k.size, bool)
                flaky["ps-1"].lands = lambda k: partition_of(k, 32) % 2 == 0
            client.push("t", keys, grads, step)
            numpy_reference(opt, values, state, pick, grads, np.arange(pick.size), step)
        assert client.retries == 1
        servers = [t.server for t in group.transports.values()]
        # the retry: nothing new to ps-0 and ps-2 (whose first attempt succeeded), ps-1's odd partitions
        assert [s.stats()["t"]["duplicate_pushes"] for s in servers] == [1, 0, 1]
        assert bool(kernel_calls) == use_batched
        stored = np.zeros(universe.size, np.int64)  # replicas of each key over the servers
        for s in servers:  # every replica, primary or backup
            rows = s.export_partitions(range(32))
            where = np.searchsorted(universe, rows["rows/t/keys"], sorter=np.argsort(universe))
            where = np.argsort(universe)[where]
            np.testing.assert_array_equal(universe[where], rows["rows/t/keys"])
            np.testing.assert_array_equal(rows["rows/t/values"], values[where])
            np.testing.assert_array_equal(rows["rows/t/slot_accumulator"], state["accumulator"][where])
            stored[where] += 1
        assert set(stored[stored > 0].tolist()) == {2}
        assert_same_rows(client.export("t", marks=mark), at_mark, "t at its mark")
