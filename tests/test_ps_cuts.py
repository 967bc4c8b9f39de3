"""SSP/ASP consistent cuts: pushes past a pending cut are applied at once (a worker group
reads its own writes) while the cut's copy keeps what they change; late pushes of steps
at or before the cut reach the copy too. Checked against an independent float64
reference of the optimizer applied in arrival order: the live rows = every push, the
cut at step c = the pushes of steps <= c."""
import threading
import time

import numpy as np
import pytest

from jaxps.optim import rowwise
from jaxps.ps.clock import DONE, Sync, SyncTimeout
from jaxps.ps.ring import Ring
from jaxps.ps.server import PSServer, TableSpec
from reference import NumpyRowOptimizer

HP = {"adagrad": dict(learning_rate=0.3), "adam": dict(learning_rate=0.05)}
ASP = Sync(None)


def _server(name: str, opt: str, max_rows: int | None = None, wait_timeout: float = 20.0) -> PSServer:
    spec = TableSpec("t", 3, rowwise.make(opt, **HP[opt]), max_rows=max_rows)
    return PSServer(name, Ring(8, 8, [name]), [spec], wait_timeout=wait_timeout)


# Arrival order: group 0 runs ahead past the cuts at 2 and 4 before group 1 pushes steps 2-4
# (late for both cuts), then group 1 catches up; ("move",) copies every partition to a
# new server mid-way (variant "migrate"), which serves the rest.
EVENTS = [("push", 0, 1), ("clock", 0, 1), ("push", 1, 1), ("clock", 1, 1), ("push", 0, 2), ("clock", 0, 2),
          ("push", 0, 3), ("clock", 0, 3), ("push", 0, 4), ("clock", 0, 4), ("push", 0, 5), ("clock", 0, 5),
          ("move",), ("push", 1, 2), ("clock", 1, 2), ("push", 0, 6), ("clock", 0, 6), ("push", 1, 3),
          ("push", 1, 4), ("clock", 1, 3), ("clock", 1, 4), ("push", 0, 7), ("clock", 0, 7),
          ("clock", 0, DONE), ("push", 1, 5), ("push", 1, 6), ("clock", 1, 6), ("clock", 1, DONE)]


@pytest.mark.parametrize("opt", sorted(HP))
@pytest.mark.parametrize("variant", ["plain", "row-budget", "migrate", "unbatched"])
def test_cuts_equal_the_pushes_up_to_their_step_and_groups_read_their_own_writes(opt, variant, monkeypatch):
    """Adagrad pushes take the batched span path (the copy kept for a whole span at once),
    Adam the per-partition one; "row-budget" copies whole partitions (they may evict),
    "migrate" moves every partition with its copies to another server mid-way,
    "unbatched" reads the live rows partition by partition (as with uint64 buckets)."""
    if variant == "unbatched":
        from jaxps.ps.batched import PartitionArrays
        monkeypatch.setattr(PartitionArrays, "sync", lambda self, part, store: False)
    rng = np.random.default_rng(7)
    universe = rng.integers(0, 2**64 - 1, 40, dtype=np.uint64, endpoint=True)
    # a row budget the pushes never reach: the cut's copies then hold whole partitions
    server = _server("s", opt, max_rows=10_000 if variant == "row-budget" else None)
    for g in (0, 1):
        server.clock(g, 0, 2, ASP, cut_every=2)
    live = NumpyRowOptimizer(opt, len(universe), 3, **HP[opt])
    cuts = {at: NumpyRowOptimizer(opt, len(universe), 3, **HP[opt]) for at in (2, 4, 6)}
    pushed = {at: set() for at in cuts}
    seen, seq, checked = set(), 0, []
    where = {k: i for i, k in enumerate(universe.tolist())}

    def check_cuts_taken():  # read each cut once taken (a server keeps the latest two)
        for at, ref in cuts.items():
            if at <= server._cut_taken and at not in checked:
                cut = server.export_cut("t", at)
                rows = [where[k] for k in cut["keys"].tolist()]
                assert sorted(rows) == sorted(pushed[at]), at
                np.testing.assert_allclose(cut["values"], ref.w[rows], rtol=2e-5, atol=1e-6)
                checked.append(at)

    for event in EVENTS:
        if event[0] == "move":
            if variant == "migrate":
                moved = _server("t", opt)
                assert moved.load_partitions(server.export_partitions(range(8))) > 0
                assert moved.stats()["t"]["cut_copy_bytes"] > 0
                server = moved
            continue
        _, group, step = event
        if event[0] == "clock":
            server.clock(group, step, 2, ASP, cut_every=2)
            check_cuts_taken()
            continue
        pick = np.unique(rng.choice(len(universe), 14, replace=False))  # keys new and old
        grads = rng.normal(size=(pick.size, 3)).astype(np.float32)
        seq += 1
        assert server.push("t", universe[pick], grads, (group + 1, seq), step, group)
        live.apply(pick, grads.astype(np.float64), step)
        seen.update(pick.tolist())
        for at, ref in cuts.items():
            if step <= at:
                ref.apply(pick, grads.astype(np.float64), step)
                pushed[at].update(pick.tolist())
        if group == 0:  # the fast group's next pull holds every push so far, its own included
            np.testing.assert_allclose(server.pull("t", universe, 0, step), live.w, rtol=2e-5, atol=1e-6)
    assert checked == [2, 4, 6]
    stored = server.export("t")
    assert sorted(where[k] for k in stored["keys"].tolist()) == sorted(seen)
    np.testing.assert_allclose(server.pull("t", universe), live.w, rtol=2e-5, atol=1e-6)
    assert not server._cut_copies and server.stats()["t"]["cut_copy_bytes"] == 0


def test_a_push_more_than_the_pending_cut_bound_ahead_waits_for_the_slowest_group():
    """ASP never waits at the pull gate, but each pending cut costs a copy: a push that
    would leave more than MAX_PENDING_CUTS of them waits until the slowest group's clock
    lets a cut be taken, and fails naming the clocks after the server's wait limit."""
    server = _server("s", "adagrad", wait_timeout=0.3)
    keys = np.arange(4, dtype=np.uint64)
    grads = np.ones((4, 3), np.float32)
    for g in (0, 1):
        server.clock(g, 0, 2, ASP, cut_every=1)
    bound = server.MAX_PENDING_CUTS
    for step in range(1, bound + 2):  # cuts 1..bound pending: allowed
        assert not server.push_would_wait(step, 0)
        server.push("t", keys, grads, (1, step), step, 0)
        server.clock(0, step, 2, ASP, cut_every=1)
    assert server.push_would_wait(bound + 2, 0) and not server.push_would_wait(bound + 2, -1)
    with pytest.raises(SyncTimeout, match="clocks"):
        server.push("t", keys, grads, (1, bound + 2), bound + 2, 0)
    server.wait_timeout = 20.0
    done = threading.Event()

    def fast():
        server.push("t", keys, grads, (1, bound + 2), bound + 2, 0)
        done.set()
    t = threading.Thread(target=fast)
    t.start()
    time.sleep(0.2)
    assert not done.is_set()  # still waiting for the slow group
    server.push("t", keys, grads, (2, 1), 1, 1)
    server.clock(1, 1, 2, ASP, cut_every=1)  # the cut at 1 is taken: room for one more
    assert done.wait(10)
    t.join(10)
    assert not server.push_would_wait(bound + 2, 0)
    assert server.stats()["t"]["pushes"] == bound + 3


def test_over_grpc_a_push_past_the_bound_is_refused_and_retried_not_held_in_a_handler_thread():
    """Over gRPC no handler thread waits for a cut: the push is refused (CUTS_PENDING) and
    the transport sends it again until the slow group's clock lets the cut be taken."""
    from jaxps.ps.grpc_transport import GrpcTransport, PSServicer, start_grpc_server

    server = _server("s", "adagrad")
    servicer = PSServicer(server)
    srv, port = start_grpc_server(servicer.generic_handler(), "127.0.0.1", 0, "test PS", "s", 4)
    keys = np.arange(4, dtype=np.uint64)
    grads = np.ones((4, 3), np.float32)
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout=10, wait_timeout=20.0) as transport:
            for g in (0, 1):
                transport.clock(g, 0, 2, ASP, cut_every=1)
            last = server.MAX_PENDING_CUTS + 2
            for step in range(1, last):
                assert transport.push("t", keys, grads, (1, step), step, 0)
                transport.clock(0, step, 2, ASP, cut_every=1)
            landed = []
            pusher = threading.Thread(target=lambda: landed.append(transport.push("t", keys, grads, (1, last), last, 0)))
            pusher.start()
            deadline = time.monotonic() + 10
            while servicer.cut_refusals == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert servicer.cut_refusals >= 1 and not landed
            assert transport.push("t", keys, grads, (2, 1), 1, 1)  # the slow group still gets through
            transport.clock(1, 1, 2, ASP, cut_every=1)
            pusher.join(20)
            assert landed == [True]
            # every push once: the rows equal a plain server's after the same pushes in the same order
            plain = _server("p", "adagrad")
            for seq, step in enumerate(list(range(1, last)) + [1, last]):
                plain.push("t", keys, grads, (9, seq + 1), step)
            np.testing.assert_array_equal(transport.pull("t", keys), plain.pull("t", keys))
    finally:
        srv.stop(None)


def _clocks(server: PSServer, cut_every: int = 2) -> None:
    for g in (0, 1):
        server.clock(g, 0, 2, ASP, cut_every=cut_every)


def test_a_push_past_the_cut_arriving_while_it_is_taken_stays_out_of_it():
    """The first push past a cut may come while the cut is being copied out partition by
    partition (the slow group's clock took it): its rows are kept for the cut all the same."""
    s = _server("s", "adagrad", wait_timeout=10)
    _clocks(s)
    keys = np.arange(1, 65, dtype=np.uint64)
    ones = np.ones((64, 3), np.float32)
    for step in (1, 2):
        for g in (0, 1):
            s.push("t", keys, ones, (g + 1, step), step, g)
    s.clock(0, 1, 2, ASP, cut_every=2)
    s.clock(0, 2, 2, ASP, cut_every=2)
    s.clock(1, 1, 2, ASP, cut_every=2)
    want = s.export("t")  # every push of steps <= 2 is in
    real = s._primary_stores

    def during_the_take(table):  # the take lists the partitions, then a step-3 push lands
        s._primary_stores = real
        out = real(table)
        pusher = threading.Thread(target=s.push, args=("t", keys, 100 * ones, (1, 3), 3, 0))
        pusher.start()
        pusher.join(10)
        assert not pusher.is_alive()
        return out
    s._primary_stores = during_the_take
    s.clock(1, 2, 2, ASP, cut_every=2)  # takes the cut at 2
    cut = s.export_cut("t", 2)
    np.testing.assert_array_equal(cut["keys"], want["keys"])
    np.testing.assert_array_equal(cut["values"], want["values"])


def test_partitions_moved_to_a_server_with_pending_copies_keep_their_rows_in_the_cut():
    """Server b holds a copy of the pending cut at 2 (a push past it reached its rows);
    partitions come from server a, which holds none: the cut keeps every moved row."""
    from jaxps.ps.ring import partition_of
    a, b = _server("a", "adagrad", wait_timeout=5), _server("b", "adagrad", wait_timeout=5)
    keys = np.arange(1, 65, dtype=np.uint64)
    parts = partition_of(keys, 8)
    own = keys[parts == parts[0]]      # b's rows
    moving = keys[parts != parts[0]]   # a's rows, moving to b
    for server, k in ((a, moving), (b, own)):
        _clocks(server)
        for step in (1, 2):
            for g in (0, 1):
                server.push("t", k, np.ones((k.size, 3), np.float32), (g + 1, step), step, g)
        server.clock(0, 1, 2, ASP, cut_every=2)
        server.clock(0, 2, 2, ASP, cut_every=2)
        server.clock(1, 1, 2, ASP, cut_every=2)
    want = {"a": a.export("t"), "b": b.export("t")}
    b.push("t", own, np.ones((own.size, 3), np.float32), (1, 3), 3, 0)  # past the cut: b keeps a copy
    assert ("t", 2) in b._cut_copies and ("t", 2) not in a._cut_copies
    b.load_partitions(a.export_partitions(sorted(set(partition_of(moving, 8).tolist()))))
    b.clock(1, 2, 2, ASP, cut_every=2)
    cut = b.export_cut("t", 2)
    expect = {int(k): v for w in want.values() for k, v in zip(w["keys"].tolist(), w["values"])}
    assert sorted(cut["keys"].tolist()) == sorted(expect)
    for k, v in zip(cut["keys"].tolist(), cut["values"]):
        np.testing.assert_array_equal(v, expect[k])


def _replay(spec: TableSpec, pushes: list[tuple[int, int]]) -> list[int]:
    """The keys a server with no worker groups stores after single-key pushes (key, step)."""
    r = PSServer("r", Ring(8, 8, ["r"]), [spec])
    for i, (k, step) in enumerate(pushes):
        r.push("t", np.array([k], np.uint64), np.ones((1, 3), np.float32), (9, i + 1), step)
    return sorted(r.export("t")["keys"].tolist())


@pytest.mark.parametrize("kind", ["admission", "eviction"])
def test_a_cut_admits_and_evicts_as_the_pushes_up_to_its_step_alone_would(kind):
    """Partitions that admit (min_count) or evict (max_rows) rows are kept whole by their
    cut's copy: a push past the cut neither counts toward a key's admission in the cut nor
    keeps the cut from evicting a row."""
    from jaxps.ps.ring import partition_of
    opt = rowwise.make("adagrad", **HP["adagrad"])
    spec = (TableSpec("t", 3, opt, min_count=2) if kind == "admission"
            else TableSpec("t", 3, opt, max_rows=8))  # 8 partitions: one row each
    s = PSServer("s", Ring(8, 8, ["s"]), [spec], wait_timeout=5)
    _clocks(s)
    cand = np.arange(1, 200, dtype=np.uint64)
    a, b, c = cand[partition_of(cand, 8) == partition_of(cand[:1], 8)[0]][:3].tolist()  # one partition
    if kind == "admission":  # b: once at step 2 (late) and once past the cut
        pushes = [(0, a, 1), (0, a, 2), (0, b, 3), (1, b, 2)]
        want = _replay(spec, [(a, 1), (a, 2), (b, 2)])
    else:  # the late push of b evicts a in the cut
        pushes = [(0, a, 1), (0, c, 3), (1, b, 2)]
        want = _replay(spec, [(a, 1), (b, 2)])
    for i, (g, k, step) in enumerate(pushes):
        s.push("t", np.array([k], np.uint64), np.ones((1, 3), np.float32), (g + 1, i + 1), step, g)
        if g == 0:
            s.clock(0, step, 2, ASP, cut_every=2)
    s.clock(1, 2, 2, ASP, cut_every=2)
    assert sorted(s.export_cut("t", 2)["keys"].tolist()) == want


def test_pending_cut_copies_move_over_grpc_with_their_partitions():
    """A membership change copies partitions between server processes over the wire
    (`export_partitions` -> `load_partitions`), pending cuts' copies included: the server
    that takes them over cuts exactly as the one they came from."""
    from jaxps.ps.grpc_transport import GrpcTransport, PSServicer, start_grpc_server

    servers = {name: _server(name, "adagrad") for name in ("s", "t")}
    started = {name: start_grpc_server(PSServicer(s).generic_handler(), "127.0.0.1", 0, "test PS", name, 4)
               for name, s in servers.items()}
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 2**64 - 1, 40, dtype=np.uint64, endpoint=True)
    try:
        with GrpcTransport(f"127.0.0.1:{started['s'][1]}", timeout=10) as src, \
                GrpcTransport(f"127.0.0.1:{started['t'][1]}", timeout=10) as dst:
            for g in (0, 1):
                src.clock(g, 0, 2, ASP, cut_every=2)
            pushes = [(0, 1), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 2)]  # group 1's 2 is late for cuts 2, 4
            for seq, (group, step) in enumerate(pushes):
                pick = np.unique(rng.choice(keys, 16))
                assert src.push("t", pick, rng.normal(size=(pick.size, 3)).astype(np.float32), (group + 1, seq),
                                step, group)
                if group == 0:
                    src.clock(0, step, 2, ASP, cut_every=2)
            moving = src.export_partitions(list(range(8)))
            assert "cutcopy/2/t/rows/values" in moving and "cutcopy/4/t/in_cut" in moving
            assert dst.load_partitions(moving) > 0
            late = [(np.unique(rng.choice(keys, 16)), step) for step in (3, 4)]
            for transport in (src, dst):  # both get group 1's next pushes (as a primary and its backup)
                transport.clock(1, 2, 2, ASP, cut_every=2)  # the cut at 2 is taken
                for seq, (pick, step) in enumerate(late):
                    transport.push("t", pick, np.full((pick.size, 3), 0.5, np.float32), (2, 10 + seq), step, 1)
                transport.clock(1, 4, 2, ASP, cut_every=2)  # and the cut at 4
            for at in (2, 4):
                cuts = [t.export("t", at=at) for t in (src, dst)]  # rows in each store's own order
                by_key = [np.argsort(c["keys"]) for c in cuts]
                for field in cuts[0]:
                    np.testing.assert_array_equal(cuts[1][field][by_key[1]], cuts[0][field][by_key[0]])
            np.testing.assert_array_equal(dst.pull("t", keys), src.pull("t", keys))
    finally:
        for srv, _ in started.values():
            srv.stop(None)
