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


def test_a_moved_partitions_copy_replaces_what_the_receiving_copy_held_of_it():
    """Loading rows onto a server makes its copies hold those partitions whole (a load is
    a write past the cut); the source's copy of them, loaded next, replaces that."""
    from jaxps.ps.cow import CutCopy
    from jaxps.ps.store import PartitionStore

    opt = rowwise.make("adagrad", **HP["adagrad"])
    keys = np.arange(1, 9, dtype=np.uint64)
    ones = np.ones((8, 3), np.float32)
    source_store, target_store = PartitionStore(3, opt), PartitionStore(3, opt)
    source_store.push(keys, ones, 1)
    source = CutCopy(3, opt, 0.0, 0, num_partitions=4)
    source.keep(keys[:4], np.full(4, 2, np.int32), lambda pos: PSServer._store_rows(source_store, keys[:4][pos]))
    source_store.push(keys[:4], ones[:4], 5)  # a push past the cut changes 4 of the 8 rows
    want = source.export(2, source_store)

    target = CutCopy(3, opt, 0.0, 0, num_partitions=4)
    target_store.push(keys, 3 * ones, 1)  # what the receiving server held before the move
    target.materialize(2, target_store)
    target_store.load(source_store.export())  # the moved rows
    target.load_arrays(source.to_arrays({2}))
    got = target.export(2, target_store)
    order_w, order_g = np.argsort(want["keys"]), np.argsort(got["keys"])
    for k in want:
        np.testing.assert_array_equal(got[k][order_g], want[k][order_w])
    before = PartitionStore(3, opt)  # the cut: the rows after the step-1 push alone
    before.push(keys, ones, 1)
    np.testing.assert_array_equal(want["values"][order_w], before.pull(want["keys"][order_w]))
