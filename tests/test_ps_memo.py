"""Pull memos (jaxps.ps.memo): a push of the keys a client pulled reuses the pull's slots,
and the tables stay identical to a server group that never uses a memo, through inserts by
other clients between pull and push, evictions, clears, reused key arrays, admission,
several servers and threads."""
import numpy as np
import pytest

from jaxps.optim import rowwise
from jaxps.ps import server as server_mod
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.server import TableSpec


def _groups(spec, servers=1, partitions=16, threads=1):
    """(a group using memos, the same group that never finds one), two clients each."""
    out = []
    for memos in (True, False):
        a = embedded([spec], servers=servers, num_partitions=partitions, threads=threads)
        b = PSClient(a.ring, a.transports, [spec])
        if not memos:
            for t in a.transports.values():
                t.server._memos.take = lambda *args: None
        out.append((a, b))
    return out


def _same(g1, g2, table="t"):
    x, y = g1[0].export(table), g2[0].export(table)
    ox, oy = np.argsort(x["keys"]), np.argsort(y["keys"])
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k][ox], y[k][oy], err_msg=k)


def _hits(group):
    return sum(t.server._memos.hits for t in group[0].transports.values())


@pytest.mark.parametrize("opt", ["adagrad", "sgd", "ftrl"])
@pytest.mark.parametrize("servers,threads", [(1, 1), (3, 1), (1, 2)])
def test_pull_then_push_equals_no_memo(opt, servers, threads, monkeypatch):
    monkeypatch.setattr(server_mod, "PARALLEL_KEYS", 16)  # small requests use the threads too
    spec = TableSpec("t", 3, rowwise.make(opt), init_scale=0.1, seed=5)
    memo, plain = _groups(spec, servers, threads=threads)
    rng = np.random.default_rng(0)
    universe = rng.integers(0, 2**64 - 1, 400, dtype=np.uint64, endpoint=True)
    for step in range(1, 12):
        keys = np.unique(universe[rng.integers(0, 400, 150)])
        rng.shuffle(keys)
        other = np.unique(universe[rng.integers(0, 400, 60)])  # some of `keys`, maybe unseen until now
        g, go = (rng.normal(size=(k.size, 3)).astype(np.float32) for k in (keys, other))
        pulled = []
        for a, b in (memo, plain):
            pulled.append(a.pull("t", keys))
            b.push("t", other, go, step)     # another client stores keys between pull and push
            a.push("t", keys, g, step)
        np.testing.assert_array_equal(*pulled)
        _same(memo, plain)
    assert _hits(memo) >= 11 and _hits(plain) == 0


def test_eviction_between_pull_and_push():
    spec = TableSpec("t", 2, rowwise.Adagrad(0.1), max_rows=40)
    memo, plain = _groups(spec, partitions=2)
    rng = np.random.default_rng(1)
    for step in range(1, 10):
        keys = np.unique(rng.integers(0, 200, 30).astype(np.uint64))
        new = np.arange(1000 * step, 1000 * step + 50, dtype=np.uint64)  # forces evictions
        g = rng.normal(size=(keys.size, 2)).astype(np.float32)
        for a, b in (memo, plain):
            a.pull("t", keys)
            b.push("t", new, np.ones((50, 2), np.float32), step)
            a.push("t", keys, g, step)
        _same(memo, plain)
    stores = list(memo[0].transports["ps-0"].server._stores.values())
    assert sum(s.epoch for s in stores) > 0 and sum(s.evicted for s in stores) > 0


def test_reused_key_array_clear_and_admission():
    spec = TableSpec("t", 2, rowwise.SGD(1.0), min_count=2)
    memo, plain = _groups(spec)
    keys = np.arange(1, 41, dtype=np.uint64)
    g = np.ones((40, 2), np.float32)
    for step in range(1, 5):
        for a, _ in (memo, plain):
            a.pull("t", keys)
            keys_again = keys.copy()
            keys_again[::2] += np.uint64(100)   # the caller changed its array after the pull
            a.push("t", keys_again, g, step)
            a.pull("t", keys)
            a.push("t", keys, g, step)          # below min_count at first: admission counts
        _same(memo, plain)
    for a, _ in (memo, plain):
        a.pull("t", keys)
        a.clear("t")                            # drops the stores the memo saw
        a.push("t", keys, g, 9)
        a.push("t", keys, g, 10)
    _same(memo, plain)
    assert memo[0].export("t")["keys"].size == 40


def test_memos_are_bounded_per_client_and_in_bytes():
    from jaxps.ps.memo import PullMemo, PullMemos

    def memo(n):
        k = np.arange(n, dtype=np.uint64)
        return PullMemo(k, np.arange(n), np.zeros(1, np.int64), np.array([0, n]), k.copy(), [None], [0],
                        np.arange(n), np.zeros(0, np.uint64), np.zeros((0, 4), np.float32))
    m = PullMemos(per_client=2, max_bytes=10 * 32 * 100)
    for i in range(3):
        m.put(1, "t", memo(100 + i))
    assert m.take(1, "t", np.arange(100, dtype=np.uint64)) is None        # the oldest went
    assert m.take(1, "t", np.arange(102, dtype=np.uint64)) is not None
    for c in range(20):                                                    # over the byte budget
        m.put(c + 10, "t", memo(100))
    assert m._bytes <= m.max_bytes and len(m._memos) <= 10
    assert m.take(29, "t", np.arange(100, dtype=np.uint64)) is not None   # the newest stays
    assert m.take(10, "t", np.arange(100, dtype=np.uint64)) is None


def test_a_client_whose_memos_were_all_taken_does_not_stall_eviction():
    """A push that takes a (client, table)'s last memo removes its entry: left empty at the
    head of the LRU it made every later over-budget put raise (seen with worker groups that
    finish at different times)."""
    from jaxps.ps.memo import PullMemo, PullMemos

    def memo(n):
        k = np.arange(n, dtype=np.uint64)
        return PullMemo(k, np.arange(n), np.zeros(1, np.int64), np.array([0, n]), k.copy(), [None], [0],
                        np.arange(n), np.zeros(0, np.uint64), np.zeros((0, 4), np.float32))
    m = PullMemos(per_client=2, max_bytes=3 * memo(100).nbytes)
    m.put(1, "t", memo(100))
    assert m.take(1, "t", np.arange(100, dtype=np.uint64)) is not None
    for c in range(10):  # over the budget from the fourth on: evictions
        m.put(c + 2, "t", memo(100))
    assert (1, "t") not in m._memos and m._bytes <= m.max_bytes
    assert m.take(11, "t", np.arange(100, dtype=np.uint64)) is not None


def test_grpc_pulls_without_a_memo_leave_none():
    """Over gRPC a pull made with memo=False (a strict repair's, an eval's) travels as client
    id 0 and leaves no memo at the server; a training pull leaves one."""
    from jaxps.ps.client import PSClient
    from jaxps.ps.grpc_transport import GrpcTransport, make_server
    from jaxps.ps.ring import Ring
    from jaxps.ps.server import PSServer, TableSpec
    from jaxps.optim import rowwise

    spec = TableSpec("t", 4, rowwise.make("adagrad"), kind="hashed", rows=1000)
    ring = Ring(num_partitions=16, servers=["s0"])
    server = PSServer("s0", ring, [spec])
    grpc_server, port = make_server(server)
    try:
        client = PSClient(ring, {"s0": GrpcTransport(f"127.0.0.1:{port}")}, [spec])
        assert client.client_id != 0
        keys = np.arange(50, dtype=np.uint64)
        client.pull("t", keys, memo=False)
        assert server._memos._bytes == 0
        client.pull("t", keys)
        assert server._memos._bytes > 0
    finally:
        grpc_server.stop(None)
