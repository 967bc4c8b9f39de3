"""Worker groups through the PS clocks: BSP sums every group's push of a step into one
update (so G groups equal one group on the combined batch), SSP never lets a group run
more than s steps ahead, ASP never waits."""
import threading
import time

import jax
import numpy as np
import pytest

from jaxps.data.batch import Batch
from jaxps.groups import WorkerGroup
from jaxps.host_tables import table_spec
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import rowwise
from jaxps.placement import HostTable
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.clock import DONE, Sync, SyncTimeout
from jaxps.ps.ring import Ring
from jaxps.ps.server import PSServer, TableSpec
from jaxps.trainer import TrainConfig, Trainer
from reference import run_concurrently
from test_sparse_lr_exact import ROWS, make_batches


def _server(sync: Sync, groups: int, opt=None) -> PSServer:
    spec = TableSpec("t", 2, opt or rowwise.Adagrad(learning_rate=0.1), kind="hashed", rows=64)
    server = PSServer("ps-0", Ring(16, 8, ["ps-0"]), [spec], wait_timeout=10.0)
    for g in range(groups):
        server.clock(g, 0, groups, sync)
    return server


def test_bsp_holds_pushes_until_every_group_completed_the_step_then_applies_their_sum():
    opt = rowwise.Adagrad(learning_rate=0.1)
    server = _server(Sync(0), 2, opt)
    k0, k1 = np.array([1, 2, 3], np.uint64), np.array([3, 4], np.uint64)
    g0 = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    g1 = -np.ones((2, 2), np.float32) * 0.5
    server.push("t", k0, g0, (1, 0), step=1, group=0)
    server.clock(0, 1, 2, Sync(0))
    assert not server.pull("t", np.arange(1, 5, dtype=np.uint64)).any()  # held, nothing applied
    server.push("t", k1, g1, (2, 0), step=1, group=1)
    assert server.clock(1, 1, 2, Sync(0)) == 1
    # reference: one Adagrad update with the per-key sum of both groups' gradients
    summed = np.zeros((5, 2), np.float32)
    summed[[1, 2, 3]] += g0
    summed[[3, 4]] += g1
    keys = np.arange(1, 5)
    acc = 0.1 + summed[keys] ** 2
    want = -0.1 * summed[keys] / (np.sqrt(acc) + 1e-7)
    np.testing.assert_allclose(server.pull("t", keys.astype(np.uint64)), want, rtol=1e-6)
    # a push of a settled step is refused (it would be lost)
    with pytest.raises(ValueError, match="after it settled"):
        server.push("t", k0, g0, (1, 1), step=1, group=0)


def _run_groups(server: PSServer, sync: Sync, delays: list[float], steps: int) -> list[list[int]]:
    """Groups that pull at their clock, sleep, push and tick; returns, per group, the gap
    between its clock and the slowest clock at the moment each of its pulls returned."""
    gaps = [[] for _ in delays]
    keys = np.arange(8, dtype=np.uint64)
    errors = []

    def group(g):
        try:
            for c in range(steps):
                server.pull("t", keys, g, c)
                gaps[g].append(c - min(server.clocks.clocks()))
                time.sleep(delays[g])
                server.push("t", keys, np.full((8, 2), 0.01, np.float32), (g, c), c + 1, g)
                server.clock(g, c + 1, len(delays), sync)
            server.clock(g, DONE, len(delays), sync)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=group, args=(g,)) for g in range(len(delays))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    return gaps


@pytest.mark.parametrize("s", [0, 1, 3])
def test_ssp_bound_is_never_exceeded_and_the_straggler_is_waited_for(s):
    server = _server(Sync(s), 3)
    gaps = _run_groups(server, Sync(s), [0.0, 0.0, 0.004], steps=12)
    assert max(max(g) for g in gaps) <= s
    assert max(gaps[0]) == s  # the fast groups ran exactly as far ahead as allowed
    st = server.stats()["__sync__"]
    assert st["waits"] > 0 and st["max_gap"] <= s + 1  # (max_gap is seen before the wait)
    # every push landed: 3 groups x 12 steps of the same keys
    assert server.stats()["t"]["pushes"] == 36


def test_asp_never_waits():
    server = _server(Sync(None), 3)
    gaps = _run_groups(server, Sync(None), [0.0, 0.0, 0.004], steps=12)
    assert server.stats()["__sync__"]["waits"] == 0
    assert max(gaps[0]) > 3  # the fast groups ran ahead of the straggler


def test_a_pull_waiting_for_a_dead_group_times_out_naming_the_clocks():
    server = _server(Sync(0), 2)
    server.wait_timeout = 0.2
    server.clock(0, 1, 2, Sync(0))
    with pytest.raises(SyncTimeout, match=r"clocks \[1, 0\]"):
        server.pull("t", np.arange(3, dtype=np.uint64), 0, 1)
    with pytest.raises(ValueError, match="2 worker groups under bsp"):
        server.clock(0, 1, 3, Sync(0))
    assert Sync.parse("ssp(3)") == Sync(3) and str(Sync.parse("asp")) == "asp"
    with pytest.raises(ValueError, match="ssp:N"):
        Sync.parse("ssp:-1")


def test_killing_an_in_process_server_fails_the_pulls_waiting_at_its_gate():
    """A pull blocked at a server's clock gate when the server dies gets a retryable
    ConnectionError within a bounded time (a gRPC call to a SIGKILLed process fails so),
    and so does every later call through that transport."""
    from jaxps.ps.client import InProcessTransport

    server = _server(Sync(0), 2)
    transport = InProcessTransport(server)
    server.clock(0, 1, 2, Sync(0))  # group 1 has not completed step 1: a pull at 1 waits
    errors: list[BaseException] = []

    def pull():
        try:
            transport.pull("t", np.arange(3, dtype=np.uint64), 0, 1)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    waiter = threading.Thread(target=pull)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not errors  # blocked at the gate: group 1 never reports
    transport.kill()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionError), errors
    with pytest.raises(ConnectionError, match="down"):
        transport.pull("t", np.arange(3, dtype=np.uint64))


def _sparse_lr(opt="adagrad"):
    return SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                   optimizer=rowwise.make(opt, learning_rate=0.05)))


def _config(out_dir):
    return TrainConfig(progress=False, tensorboard=False, checkpoint=False, dense_optimizer="sgd",
                       dense_learning_rate=0.01, compilation_cache="", out_dir=str(out_dir))


def _concat(a: Batch, b: Batch) -> Batch:
    return Batch(*(np.concatenate([x, y]) for x, y in zip((a.labels, a.ids, a.vals, a.mask, a.weights),
                                                            (b.labels, b.ids, b.vals, b.mask, b.weights))))


@pytest.mark.parametrize("opt", ["adagrad", "ftrl"])
def test_bsp_groups_equal_one_group_on_the_combined_batch(tmp_path, opt):
    """Two worker groups (each its own 4-device mesh, in threads) share an embedded PS under
    BSP; a single trainer on the concatenated batches is the reference: losses per step,
    the table and the dense bias agree."""
    shards = [make_batches(6, seed=21), make_batches(6, seed=22)]
    combined = [_concat(a, b) for a, b in zip(*shards)]
    ref_model = _sparse_lr(opt)
    ref = Trainer(ref_model, make_mesh(MeshConfig(), jax.devices()[:4]), _config(tmp_path / "ref"),
                  ps=embedded([table_spec(t) for t in ref_model.tables()]))
    ref.fit(combined)

    ps = embedded([], servers=2)  # each group has its own client of the same two servers
    trainers = [Trainer(_sparse_lr(opt), make_mesh(MeshConfig(), jax.devices()[4 * g:4 * g + 4]),
                        _config(tmp_path / "groups"), ps=PSClient(ps.ring, ps.transports, []),
                        group=WorkerGroup(g, 2, "bsp"))
                for g in range(2)]
    results, errors = run_concurrently([lambda g=g: trainers[g].fit(shards[g]) for g in range(2)])
    assert not errors, errors
    keys = np.arange(ROWS, dtype=np.uint64)
    want = ref.steps.host.ps.pull("weights", keys)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(trainers[0].steps.host.ps.pull("weights", keys), want, rtol=2e-5, atol=1e-7)
    for t in trainers:  # both groups end with the same (final) dense parameters
        np.testing.assert_allclose(np.asarray(t.state["dense"]["bias"]), np.asarray(ref.state["dense"]["bias"]),
                                   rtol=1e-5, atol=1e-7)
    # each group's loss is the mean over its half; their average is the combined batch's
    # (equal real weights per step except the padded last one)
    for k in range(5):
        got = (trainers[0].history[k]["loss"] + trainers[1].history[k]["loss"]) / 2
        np.testing.assert_allclose(got, ref.history[k]["loss"], rtol=1e-5)
    sync = results[0]["ps"]["__sync__"]
    assert sync["sync"] == "bsp" and sync["clocks"] == ["done", "done"]
    assert (tmp_path / "groups" / "group-1" / "metrics.json").exists()


def test_an_ssp_group_reads_its_own_writes(tmp_path):
    """Under ssp:3 a group's pulls run (prefetched) steps ahead of its own pushes; strict mode
    re-pulls the rows those pushes touch once they landed (read-my-writes), so a group whose
    peer finished trains exactly as a single trainer: sequential pull, step, push. (Without
    strict mode this run differs: tested by hand.)"""
    batches = make_batches(6, seed=23)
    ref_model = _sparse_lr()
    ref = Trainer(ref_model, make_mesh(MeshConfig(), jax.devices()[:4]), _config(tmp_path / "ref"),
                  ps=embedded([table_spec(t) for t in ref_model.tables()]))
    ref.fit(batches)

    ps = embedded([], servers=2)
    ps.clock(1, DONE, 2, Sync(3))  # group 1 finished before it began: it holds nobody back
    group = Trainer(_sparse_lr(), make_mesh(MeshConfig(), jax.devices()[4:]), _config(tmp_path / "g"),
                    ps=PSClient(ps.ring, ps.transports, []), group=WorkerGroup(0, 2, "ssp:3"))
    result = group.fit(batches)
    keys = np.arange(ROWS, dtype=np.uint64)
    want = ref.steps.host.ps.pull("weights", keys)
    np.testing.assert_allclose(group.steps.host.ps.pull("weights", keys), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(group.state["dense"]["bias"]), np.asarray(ref.state["dense"]["bias"]),
                               rtol=1e-5, atol=1e-7)
    for k in range(6):
        np.testing.assert_allclose(group.history[k]["loss"], ref.history[k]["loss"], rtol=1e-5)
    assert result["ps"]["weights"]["repaired_rows"] > 0  # the prefetched pulls did miss own pushes


def test_an_asp_group_running_past_pending_cuts_reads_its_own_writes(tmp_path):
    """ASP with checkpoints every 2 steps; group 1 stays at clock 0 until group 0 completed
    step 3, so group 0 runs past the servers' pending cut at 2 (its checkpoint at 4 waits
    for the one at 2 to be written: Orbax runs one save at a time), then group 1
    finishes. Group 0's pushes past a pending cut are applied at once (the cut's copy keeps
    what they change), so in strict mode it trains exactly as a single trainer, and its
    checkpoints at 2 and 4 (the servers' cuts) hold the single trainer's rows there."""
    import dataclasses
    asp = Sync(None)
    batches = make_batches(6, seed=29)
    ref_model = _sparse_lr()
    ref = Trainer(ref_model, make_mesh(MeshConfig(), jax.devices()[:4]),
                  dataclasses.replace(_config(tmp_path / "ref"), checkpoint=True, checkpoint_every=2),
                  ps=embedded([table_spec(t) for t in ref_model.tables()]))
    ref.fit(batches)

    ps = embedded([], servers=2)
    ps.clock(1, 0, 2, asp, cut_every=2)  # group 1 joined at clock 0 and lags there
    group = Trainer(_sparse_lr(), make_mesh(MeshConfig(), jax.devices()[4:]),
                    dataclasses.replace(_config(tmp_path / "g"), checkpoint=True, checkpoint_every=2),
                    ps=PSClient(ps.ring, ps.transports, []), group=WorkerGroup(0, 2, "asp"))
    servers = [t.server for t in ps.transports.values()]
    ahead = []

    def lagging_group():
        deadline = time.monotonic() + 120
        while min(s.clocks.clocks()[0] for s in servers) < 3:
            assert time.monotonic() < deadline, "group 0 never reached step 3"
            time.sleep(0.01)
        ahead.append(sum(len(s._cut_copies) for s in servers))
        ps.clock(1, DONE, 2, asp, cut_every=2)

    _, errors = run_concurrently([lagging_group, lambda: group.fit(batches)])
    assert not errors, errors
    assert ahead and ahead[0] > 0  # group 0 did run past pending cuts
    keys = np.arange(ROWS, dtype=np.uint64)
    np.testing.assert_allclose(group.steps.host.ps.pull("weights", keys), ref.steps.host.ps.pull("weights", keys),
                               rtol=2e-5, atol=1e-7)
    for k in range(6):
        np.testing.assert_allclose(group.history[k]["loss"], ref.history[k]["loss"], rtol=1e-5)
    for step in (2, 4):
        got, want = group.checkpointer.ps_snapshot(step)["weights"], ref.checkpointer.ps_snapshot(step)["weights"]
        order_g, order_w = np.argsort(got["keys"]), np.argsort(want["keys"])
        np.testing.assert_array_equal(got["keys"][order_g], want["keys"][order_w])
        np.testing.assert_allclose(got["values"][order_g], want["values"][order_w], rtol=2e-5, atol=1e-7)


def test_a_sync_looser_than_the_pending_cut_bound_is_warned_about(tmp_path):
    """Periodic checkpoints under SSP/ASP: a group more than MAX_PENDING_CUTS checkpoint
    intervals ahead waits at its push. A sync that allows more (asp, or ssp:s with s above
    the bound) is told so when the trainer starts; one within it is not."""
    import dataclasses
    import warnings
    config = dataclasses.replace(_config(tmp_path), checkpoint=True, checkpoint_every=2)
    bound = PSServer.MAX_PENDING_CUTS * 2
    for policy, warned in (("asp", True), (f"ssp:{bound + 1}", True), (f"ssp:{bound}", False)):
        ps = embedded([], servers=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(_sparse_lr(), make_mesh(MeshConfig(), jax.devices()[:4]), config,
                    ps=PSClient(ps.ring, ps.transports, []), group=WorkerGroup(0, 2, policy)).close()
        assert any("pending cuts" in str(w.message) for w in caught) == warned, policy


@pytest.mark.parametrize("sync", [Sync(1), Sync(None)])
def test_ssp_and_asp_apply_each_push_at_bsp_scale(sync):
    """SSP/ASP apply every group's push on its own, unscaled: with SGD (linear) one round of
    pushes moves the rows exactly as BSP's summed update does, so the update per example
    matches BSP's and no 1/G factor belongs on the pushes; with Adagrad each push is
    normalised by its own accumulator (numpy reference), which no gradient scale undoes."""
    keys = np.array([1, 2, 3], np.uint64)
    grads = [np.full((3, 2), 0.5, np.float32), np.full((3, 2), -0.2, np.float32) + np.arange(3)[:, None]]
    for opt in (rowwise.SGD(learning_rate=0.1), rowwise.Adagrad(learning_rate=0.1)):
        rows = {}
        for s in (Sync(0), sync):
            server = _server(s, 2, opt)
            for g in range(2):
                server.push("t", keys, grads[g].astype(np.float32), (g, 0), step=1, group=g)
                server.clock(g, 1, 2, s)
            rows[str(s)] = server.pull("t", keys)
        if opt.name == "sgd":
            np.testing.assert_allclose(rows[str(sync)], -0.1 * (grads[0] + grads[1]), rtol=1e-6)
            np.testing.assert_allclose(rows[str(sync)], rows["bsp"], rtol=1e-6)
        else:  # each push normalised by the accumulator it finds
            acc, w = np.full((3, 2), 0.1), np.zeros((3, 2))
            for g in grads:
                acc += g.astype(np.float64) ** 2
                w -= 0.1 * g / (np.sqrt(acc) + 1e-7)
            np.testing.assert_allclose(rows[str(sync)], w, rtol=1e-5)


_STUCK_PULL = """
import threading, time
import numpy as np
from jaxps.optim import rowwise
from jaxps.ps.client import embedded
from jaxps.ps.clock import Sync
from jaxps.ps.server import TableSpec
client = embedded([TableSpec("t", 2, rowwise.SGD(learning_rate=0.1), kind="hashed", rows=4096)], servers=3)
for g in range(2):
    client.clock(g, 0, 2, Sync(0))
keys = np.arange(4096, dtype=np.uint64)  # rows on every server: the pull fans out to pool threads
threading.Thread(target=client.pull, args=("t", keys, 0, 1), daemon=True).start()  # waits for group 1
time.sleep(0.5)
print("exiting", flush=True)
"""


def test_a_pull_waiting_at_the_clock_gate_does_not_hold_up_interpreter_exit():
    """Group 1 never comes, so group 0's pull at clock 1 waits at the gate (up to the servers'
    600 s timeout); the process must still exit at once when its main thread ends."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _STUCK_PULL], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exiting" in proc.stdout


def test_a_group_of_several_processes_settles_a_step_once_every_process_reported_it():
    """Groups of 2 processes each keep one server clock per process (WorkerGroup.clock_id):
    BSP applies nothing of a step until all 4 processes pushed their shares and clocked it,
    then the sum of the 4 pushes once (SGD: -lr * sum, closed form)."""
    members = [WorkerGroup(g, 2, "bsp", processes=2, process=p) for g in range(2) for p in range(2)]
    assert [m.clock_id for m in members] == [0, 1, 2, 3] and {m.clocks for m in members} == {4}
    with pytest.raises(ValueError, match="process 2 of 2"):
        WorkerGroup(0, 2, processes=2, process=2)
    server = _server(Sync(0), 4, rowwise.SGD(learning_rate=0.1))
    keys = np.arange(4, dtype=np.uint64)
    grads = [np.full((2, 2), m.clock_id + 1, np.float32) for m in members]
    for m in members:  # process p of each group pushes its share: keys p and p + 2
        server.push("t", keys[m.process::2], grads[m.clock_id], (m.clock_id, 0), step=1, group=m.clock_id)
    for m in members[:3]:
        server.clock(m.clock_id, 1, m.clocks, Sync(0))
        assert server.clocks.settled == 0 and not server.pull("t", keys).any()  # group 1 is half done
    assert server.clock(members[3].clock_id, 1, 4, Sync(0)) == 1
    want = np.zeros((4, 2), np.float32)
    for m in members:
        want[m.process::2] += -0.1 * grads[m.clock_id]
    np.testing.assert_allclose(server.pull("t", keys), want, rtol=1e-6)



def test_dense_table_shares_cover_every_row_once_in_contiguous_blocks():
    """The dense table split over a group's processes: block r of C rows starts at r * C, C
    a multiple of each process's data shards, every row pulled and pushed by one process;
    and the parameters read back from the [count * C] block (padding after the rows)."""
    from jaxps.dense_table import DenseTable
    tree = {"w": np.arange(700, dtype=np.float32).reshape(7, 100), "b": np.float32(-1.0)}
    table = DenseTable.of(tree, "sgd", 0.1)
    assert table.rows == 3  # 701 floats in rows of 256
    for count, multiple in ((1, 1), (2, 2), (4, 1), (4, 2)):
        shares = [table.share(r, count, multiple) for r in range(count)]
        cap = shares[0][1]
        assert {c for _, c in shares} == {cap} and cap % multiple == 0 and cap * count >= table.rows
        for r, (keys, _) in enumerate(shares):
            np.testing.assert_array_equal(keys, np.arange(r * cap, min((r + 1) * cap, table.rows)))
        np.testing.assert_array_equal(np.concatenate([k for k, _ in shares]), table.keys)
        block = np.asarray(table.flatten(tree, count * cap))
        assert block.shape == (count * cap, 256)
        back = table.unflatten(block)
        np.testing.assert_array_equal(np.asarray(back["w"]), tree["w"])
        assert float(back["b"]) == -1.0


def test_pulls_beyond_the_gate_slots_are_refused_and_retried_not_queued():
    """A gRPC server lets at most `gate_slots` worker-group pulls wait at its clock gate, so
    the pushes and clocks that open it always find a handler thread; a pull beyond that is
    refused (GATE_BUSY) and the client sends it again until the gate opens."""
    from jaxps.ps.grpc_transport import GrpcTransport, PSServicer, start_grpc_server

    server = _server(Sync(0), 2)
    servicer = PSServicer(server, gate_slots=1)
    srv, port = start_grpc_server(servicer.generic_handler(), "127.0.0.1", 0, "test PS", "t", 4)
    try:
        server.clock(0, 1, 2, Sync(0))  # group 1 has not completed step 1: pulls at 1 wait
        transport = GrpcTransport(f"127.0.0.1:{port}", wait_timeout=20.0)
        rows: list[np.ndarray] = []
        pullers = [threading.Thread(target=lambda: rows.append(transport.pull("t", np.arange(3, dtype=np.uint64),
                                                                              0, 1))) for _ in range(2)]
        for p in pullers:
            p.start()
        deadline = time.monotonic() + 10
        while servicer.gate_refusals == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servicer.gate_refusals >= 1 and not rows  # one waits in the slot, one is refused
        assert transport.stats()  # another call still finds a handler thread
        server.clock(1, 1, 2, Sync(0))  # the gate opens
        for p in pullers:
            p.join(10)
        assert len(rows) == 2 and all(r.shape == (3, 2) for r in rows)
    finally:
        srv.stop(None)


def test_clock_messages_are_bounded():
    """A clock message cannot make a server allocate an unbounded clock table, and a bool is
    not a staleness (it would pass for 0 or 1)."""
    from jaxps.ps.clock import MAX_CLOCKS
    server = PSServer("ps-0", Ring(16, 8, ["ps-0"]), [TableSpec("t", 2, rowwise.SGD())])
    with pytest.raises(ValueError, match="clocks"):
        server.clock(0, 0, MAX_CLOCKS + 1, Sync(0))
    with pytest.raises(ValueError, match="staleness"):
        Sync(True)
    assert server.clock(0, 0, 2, Sync(1)) == 0  # the server still configures a sane one


def test_a_gate_timeout_over_grpc_is_final_not_retried():
    """The gate's own limit passing is an answer (ABORTED, naming the clocks), not a
    transient failure the transport and client would retry for many more gate limits."""
    import grpc

    from jaxps.ps.grpc_transport import GrpcTransport, PSRPCError, make_server
    server = _server(Sync(0), 2)
    server.wait_timeout = 0.2
    server.clock(0, 1, 2, Sync(0))
    srv, port = make_server(server)
    try:
        t0 = time.monotonic()
        with pytest.raises(PSRPCError, match=r"clocks \[1, 0\]") as e:
            GrpcTransport(f"127.0.0.1:{port}", wait_timeout=5.0).pull("t", np.arange(3, dtype=np.uint64), 0, 1)
        assert e.value.code == grpc.StatusCode.ABORTED and time.monotonic() - t0 < 3.0
    finally:
        srv.stop(None)
