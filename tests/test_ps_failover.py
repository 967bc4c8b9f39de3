"""Hot standby: every partition has a primary and k backups; a push is acknowledged once
all of them applied it, so when servers die the manager promotes backups, copies
partitions to restore k, and training goes on to the same parameters as a fault-free run."""
import numpy as np
import pytest

from jaxps.host_tables import table_spec
from jaxps.launch.local import stop_processes
from jaxps.mesh import MeshConfig
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import rowwise
from jaxps.placement import HostTable
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.manager import ServerManager
from jaxps.ps.ring import partition_of
from jaxps.trainer import TrainConfig, Trainer
from reference import ring_move_spread, run_concurrently
from test_sparse_lr_exact import ROWS, make_batches


def _model():
    return SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                   optimizer=rowwise.make("adagrad", learning_rate=0.05)))


def _trainer(ps, tmp_path):
    return Trainer(_model(), MeshConfig(), TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                                       dense_optimizer="sgd", dense_learning_rate=0.01,
                                                       compilation_cache="", out_dir=str(tmp_path)), ps=ps)


def _killing(batches, after: int, kill):
    for k, b in enumerate(batches):
        if k == after:
            kill()
        yield b


@pytest.mark.parametrize("killed", [1, 2])
def test_killing_servers_mid_run_loses_nothing(tmp_path, killed):
    """4 servers, k = 2 backups: kill `killed` servers at once (one of them the primary of
    many partitions) mid-run; the manager fails over and the final table and bias equal a
    fault-free run's exactly (retries are applied once)."""
    batches = make_batches(8, seed=31)
    ref = _trainer(embedded([table_spec(t) for t in _model().tables()]), tmp_path / "ref")
    ref.fit(batches)

    group = embedded([], servers=4, replicas=2)
    manager = ServerManager(group.ring, group.transports, replicas=2, heartbeat=0.02, misses=2).start()
    ps = PSClient(group.ring, group.transports, [], replicas=2, ring_source=manager.view)
    t = _trainer(ps, tmp_path / "ha")
    victims = group.ring.servers[:killed]
    try:
        t.fit(_killing(batches, 3, lambda: [group.transports[v].kill() for v in victims]))
    finally:
        manager.stop()
    assert [c.kind for c in manager.changes] and all(c.kind == "failover" for c in manager.changes)
    assert not any(c.lost for c in manager.changes)
    assert set(victims).isdisjoint(manager.ring.servers) and len(manager.ring.servers) == 4 - killed
    keys = np.arange(ROWS, dtype=np.uint64)
    want = ref.steps.host.ps.pull("weights", keys)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_array_equal(ps.pull("weights", keys), want)
    np.testing.assert_array_equal(np.asarray(t.state["dense"]["bias"]), np.asarray(ref.state["dense"]["bias"]))
    # every live partition is back to k + 1 = 3 copies (or all servers, when fewer remain)
    copies = sum(s.server.stats()["weights"]["partitions"] for n, s in group.transports.items()
                 if n in manager.ring.servers)
    touched = sum(s.server.stats()["weights"]["partitions"] for n, s in group.transports.items()
                  if n == manager.ring.servers[0])
    assert copies >= touched
    assert ps.retries > 0


def _spy_copies(transports: dict) -> set:
    """The (partition, target server) pairs a manager copies through these transports (it
    exports partitions from one source, then loads them into one target, pair by pair)."""
    copied, exported = set(), []

    def spy(name, t):
        export, load = t.export_partitions, t.load_partitions

        def exporting(parts):
            exported.append([int(p) for p in parts])
            return export(parts)

        def loading(data):
            copied.update((p, name) for p in exported.pop())
            return load(data)
        t.export_partitions, t.load_partitions = exporting, loading

    for name, t in transports.items():
        spy(name, t)
    return copied


def test_join_and_leave_copy_exactly_the_replicas_that_change_hands(tmp_path):
    """A server joins and another leaves while training runs: equal final parameters, and
    each change copies exactly the (partition, replica) pairs whose holder changed between
    the rings before and after it (`Ring.gains`): the joiner gains the partitions whose new
    replica set holds it, the leaver's partitions one new holder each, no other partition
    moves. Their fraction of all pairs is 1/n within the 3-sigma band the ring's vnodes and
    partitions allow (`reference.ring_move_spread`; here +-33% for n = 5, 64 vnodes, 256
    partitions, one backup)."""
    batches = make_batches(8, seed=32)
    ref = _trainer(embedded([table_spec(t) for t in _model().tables()]), tmp_path / "ref")
    ref.fit(batches)

    group = embedded([], servers=4, replicas=1)
    spare = embedded([], servers=5, replicas=1)  # its ps-4 joins later (same tables, fresh)
    manager = ServerManager(group.ring, group.transports, replicas=1, heartbeat=0.05)
    ps = PSClient(group.ring, group.transports, [], replicas=1, ring_source=manager.view)
    t = _trainer(ps, tmp_path / "elastic")
    joiner = spare.transports["ps-4"]
    joiner.server.set_ring(group.ring)  # it learns the real ring from the manager on join
    copied = _spy_copies({**group.transports, "ps-4": joiner})
    rings, seen = [group.ring], []

    def changes():
        joiner.server.create_table(table_spec(_model().tables()[0]))
        for spec in ps.tables.values():
            joiner.server.create_table(spec)
        for change in (lambda: manager.join("ps-4", joiner), lambda: manager.remove(["ps-1"])):
            change()
            rings.append(manager.ring)
            seen.append(set(copied))
            copied.clear()

    t.fit(_killing(batches, 4, changes))
    join, leave = manager.changes
    assert (join.kind, leave.kind) == ("join", "leave")
    k, parts = 1, group.ring.num_partitions
    for i, (c, who) in enumerate(((join, "ps-4"), (leave, "ps-1"))):
        before, after = rings[i], rings[i + 1]
        want = {(p, s) for p, new in before.gains(after, k).items() for s in new}
        assert seen[i] == want and c.copied == len(want), c.kind
        # from the rings' replica sets directly: who gains what
        if c.kind == "join":
            holds = {p for p in range(parts) if after.servers.index(who) in after.replicas(k)[p]}
            assert want == {(p, who) for p in holds}
        else:
            held = {p for p in range(parts) if before.servers.index(who) in before.replicas(k)[p]}
            assert {p for p, _ in want} == held and len(want) == len(held)  # one new holder each
        n = 5  # servers of the larger ring: the joiner's or leaver's share is 1/5
        frac = c.copied / (parts * (k + 1))
        assert abs(frac * n - 1) < 3 * ring_move_spread(n, k + 1, group.ring.vnodes, parts), (c.kind, frac)
    keys = np.arange(ROWS, dtype=np.uint64)
    np.testing.assert_array_equal(ps.pull("weights", keys), ref.steps.host.ps.pull("weights", keys))


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 2])
def test_sigkill_server_processes_mid_run_over_grpc(tmp_path, killed):
    """Four real server processes (gRPC, loopback, token), k = 2: SIGKILL the primary of
    most partitions mid-run (killed = 2: it and the next busiest, at once). The manager's
    heartbeat notices, promotes backups and re-replicates; the run ends with exactly the
    fault-free parameters."""
    import os
    import select
    import signal
    import subprocess
    import sys

    from jaxps.ps.grpc_transport import GrpcTransport
    from jaxps.ps.ring import Ring

    token, names = "failover-token", [f"ps-{i}" for i in range(4)]
    procs, transports = {}, {}
    env = dict(os.environ, JAXPS_PS_TOKEN=token)
    try:
        for name in names:
            p = subprocess.Popen([sys.executable, "-m", "jaxps.ps.serve", "--name", name, "--servers", ",".join(names),
                                  "--partitions", "64", "--replicas", "2", "--token-env", "JAXPS_PS_TOKEN",
                                  "--grace", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True)
            procs[name] = p
            ready, _, _ = select.select([p.stdout], [], [], 30)
            line = p.stdout.readline() if ready else ""
            assert " listening on " in line, line
            transports[name] = GrpcTransport(line.rsplit(" ", 1)[1].strip(), token=token, timeout=10)
        ring = Ring(64, 64, names)
        manager = ServerManager(ring, transports, replicas=2, heartbeat=0.05, misses=2).start()
        ps = PSClient(ring, transports, [], replicas=2, ring_source=manager.view)
        batches = make_batches(8, seed=33)
        victims = [names[i] for i in np.argsort(-np.bincount(ring.owners(), minlength=4), kind="stable")[:killed]]
        t = _trainer(ps, tmp_path / "ha")
        try:
            t.fit(_killing(batches, 3, lambda: [procs[v].send_signal(signal.SIGKILL) for v in victims]))
        finally:
            manager.stop()
        ref = _trainer(embedded([table_spec(tb) for tb in _model().tables()]), tmp_path / "ref")
        ref.fit(batches)
        assert manager.changes and all(c.kind == "failover" and not c.lost for c in manager.changes)
        assert sorted(v for c in manager.changes for v in c.servers) == sorted(victims)
        keys = np.arange(ROWS, dtype=np.uint64)
        np.testing.assert_array_equal(ps.pull("weights", keys), ref.steps.host.ps.pull("weights", keys))
        np.testing.assert_array_equal(np.asarray(t.state["dense"]["bias"]), np.asarray(ref.state["dense"]["bias"]))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


@pytest.mark.parametrize("killed", [1, 2])
def test_bsp_worker_groups_survive_killed_servers(tmp_path, killed):
    """Two BSP worker groups, k = 2; one server, or two at once, die while pushes of a step
    are held (not yet applied) and the other group's pull may be waiting at a dead server's
    clock gate (it must fail over, not wait for clocks that cannot arrive: that hung ~1 run
    in 7 with two killed): the held pushes travel with the partitions, and the final model
    equals the fault-free two-group run's."""
    import jax

    from jaxps.groups import WorkerGroup
    from jaxps.mesh import make_mesh

    shards = [make_batches(6, seed=41), make_batches(6, seed=42)]

    def run(replicas, kill_at=None):
        group = embedded([], servers=4, replicas=replicas)
        manager = ServerManager(group.ring, group.transports, replicas=replicas, heartbeat=0.02,
                                misses=2).start() if replicas else None
        source = manager.view if manager else None
        trainers = [Trainer(_model(), make_mesh(MeshConfig(), jax.devices()[4 * g:4 * g + 4]),
                            TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                        dense_optimizer="sgd", dense_learning_rate=0.01, compilation_cache="",
                                        out_dir=str(tmp_path / f"r{replicas}")),
                            ps=PSClient(group.ring, group.transports, [], replicas=replicas, ring_source=source),
                            group=WorkerGroup(g, 2, "bsp")) for g in range(2)]
        data = [shards[0] if kill_at is None else
                _killing(shards[0], kill_at, lambda: [group.transports[f"ps-{2 + i}"].kill() for i in range(killed)]),
                shards[1]]
        _, errors = run_concurrently([lambda g=g: trainers[g].fit(data[g]) for g in range(2)])
        if manager:
            manager.stop()
        assert not errors, errors
        return trainers[1].steps.host.ps.pull("weights", np.arange(ROWS, dtype=np.uint64)), manager

    want, _ = run(0)
    got, manager = run(2, kill_at=3)
    assert manager.changes and manager.changes[0].kind == "failover"
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_server_processes_join_and_leave_through_the_manager_process(tmp_path):
    """Three server processes (k = 1) and a `jaxps ps-manager` process; the trainer learns
    the ring from the manager. Mid-run a fourth server process joins and the first leaves
    (`jaxps ps-manager join|leave`): training never stops and ends with exactly the
    fault-free parameters."""
    import os
    import select
    import subprocess
    import sys

    from jaxps.ps.grpc_transport import GrpcTransport
    from jaxps.ps.manager import RemoteRing

    token = "elastic-token"
    env = dict(os.environ, JAXPS_PS_TOKEN=token)
    procs = []

    def start(args, marker):
        p = subprocess.Popen([sys.executable, "-m"] + args, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 30)
        line = p.stdout.readline() if ready else ""
        assert marker in line, line
        return line.rsplit(" ", 1)[1].strip()

    def server(name, members):
        return start(["jaxps.ps.serve", "--name", name, "--servers", members, "--partitions", "64",
                      "--replicas", "1", "--token-env", "JAXPS_PS_TOKEN", "--grace", "1"], " listening on ")

    try:
        names = ["ps-0", "ps-1", "ps-2"]
        addresses = {n: server(n, ",".join(names)) for n in names}
        manager = start(["jaxps.ps.manager", "--servers", ",".join(f"{n}={a}" for n, a in addresses.items()),
                         "--partitions", "64", "--replicas", "1", "--heartbeat", "0.1",
                         "--token-env", "JAXPS_PS_TOKEN"], "listening on")
        source = RemoteRing(manager, token)
        ring, transports = source()
        ps = PSClient(ring, transports, [], replicas=1, ring_source=source)

        def change():
            joiner = server("ps-3", "ps-3")
            subprocess.run([sys.executable, "-m", "jaxps.ps.manager", "join", "--manager", manager, "--name",
                            "ps-3", "--address", joiner, "--token-env", "JAXPS_PS_TOKEN"], env=env, check=True,
                           timeout=60, capture_output=True)
            subprocess.run([sys.executable, "-m", "jaxps.ps.manager", "leave", "--manager", manager, "--name",
                            "ps-0", "--token-env", "JAXPS_PS_TOKEN"], env=env, check=True, timeout=60,
                           capture_output=True)

        batches = make_batches(8, seed=34)
        t = _trainer(ps, tmp_path / "elastic")
        t.fit(_killing(batches, 3, change))
        ref = _trainer(embedded([table_spec(tb) for tb in _model().tables()]), tmp_path / "ref")
        ref.fit(batches)
        final = source.fetch()
        assert final["servers"] == ["ps-1", "ps-2", "ps-3"] and final["version"] == 2
        keys = np.arange(ROWS, dtype=np.uint64)
        np.testing.assert_array_equal(ps.pull("weights", keys), ref.steps.host.ps.pull("weights", keys))
        np.testing.assert_array_equal(np.asarray(t.state["dense"]["bias"]), np.asarray(ref.state["dense"]["bias"]))
        # the leaver refuses writes routed by an old ring
        with pytest.raises(Exception, match="ring version|belongs to"):
            GrpcTransport(addresses["ps-0"], token=token).push("weights", keys[:4], np.ones((4, 1), np.float32),
                                                               (1, 1), 1, -1, 0)
    finally:
        stop_processes(procs, grace=10)


def test_restoring_a_snapshot_drops_rows_stored_since(tmp_path):
    """Servers that kept running: a restore leaves exactly the snapshot's rows (with their
    optimizer slots), also over three servers with backups."""
    from jaxps.host_tables import HostTables

    tables = [t for t in _model().tables()]
    group = embedded([], servers=3, replicas=1)
    host = HostTables(tables, PSClient(group.ring, group.transports, [], replicas=1))
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, ROWS, 500)).astype(np.uint64)
    host.ps.push("weights", keys, rng.normal(size=(keys.size, 1)).astype(np.float32), 1)
    snap = host.snapshot()
    more = np.unique(rng.integers(0, ROWS, 500)).astype(np.uint64)
    host.ps.push("weights", more, rng.normal(size=(more.size, 1)).astype(np.float32), 2)
    host.load(snap)
    again = host.snapshot()
    order_a, order_b = np.argsort(snap["weights"]["keys"]), np.argsort(again["weights"]["keys"])
    for field in snap["weights"]:
        np.testing.assert_array_equal(snap["weights"][field][order_a], again["weights"][field][order_b])


def test_held_pushes_copied_to_a_replica_that_already_settled_their_step_are_applied_at_once():
    """The race behind a failover under BSP: a group's clock message reached the new
    replica T (so T settled step 1) but the source S refused it (frozen) and still holds
    step 1's pushes. Copied to T, they must be applied on arrival: a pull of step 2 may
    read T right away."""
    from jaxps.ps.clock import Sync
    from jaxps.ps.ring import Ring
    from jaxps.ps.server import PSServer, TableSpec

    spec = TableSpec("t", 1, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=64)
    ring = Ring(8, 8, ["s", "t"])
    source, target = PSServer("s", ring, [spec], replicas=1), PSServer("t", ring, [spec], replicas=1)
    keys = np.arange(64, dtype=np.uint64)
    for server in (source, target):
        server.clock(0, 0, 1, Sync(0))
    source.push("t", keys, np.ones((64, 1), np.float32), (7, 0), 1, 0)  # held at S
    target.clock(0, 1, 1, Sync(0))                                        # T settled step 1
    parts = list(range(8))
    target.load_partitions(source.export_partitions(parts))
    got = np.concatenate([target._store("t", p)[0].export()["values"] for p in parts])
    np.testing.assert_array_equal(got, -np.ones((64, 1), np.float32))


def test_a_membership_change_failing_half_way_drops_no_partition():
    """A server joins; one member's set_ring fails (it hangs, say). Publication is two-phase,
    so no server dropped a partition it replicated under the old ring, the manager's view is
    the new ring, and failing the bad server over afterwards ends with every row intact."""
    from jaxps.ps.server import TableSpec
    spec = TableSpec("t", 2, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=256)
    group = embedded([spec], servers=3, replicas=1)
    spare = embedded([spec], servers=4, replicas=1)
    keys = np.arange(256, dtype=np.uint64)
    ps = PSClient(group.ring, group.transports, [spec], replicas=1)
    ps.push("t", keys, np.ones((256, 2), np.float32), 1)
    want = ps.pull("t", keys)
    manager = ServerManager(group.ring, group.transports, replicas=1, heartbeat=60)
    joiner = spare.transports["ps-3"]
    joiner.server.set_ring(group.ring)
    bad = group.transports["ps-2"]
    set_ring = bad.set_ring

    def failing(ring, drop=True):
        if not drop:
            raise ConnectionError("ps-2 hangs")
        set_ring(ring, drop)
    bad.set_ring = failing
    held = {name: set(t.server._stores) for name, t in group.transports.items()}
    with pytest.raises(ConnectionError):
        manager.join("ps-3", joiner)
    for name, t in group.transports.items():  # nothing dropped anywhere
        assert held[name] <= set(t.server._stores), name
    assert manager.ring.version == group.ring.version + 1 and "ps-3" in manager.ring.servers
    bad.kill()
    manager.remove(["ps-2"], kind="failover")
    view = PSClient(manager.ring, {s: manager.transports[s] for s in manager.ring.servers}, [spec], replicas=1)
    np.testing.assert_array_equal(view.pull("t", keys), want)


def test_a_server_declared_dead_but_alive_is_fenced():
    """Failed over while it was only slow, a server refuses later requests (a client on the
    old ring gets Frozen and refreshes) instead of taking writes where nobody reads them or
    serving rows nobody updates; an unfreeze does not lift a fence."""
    import time

    from jaxps.ps.server import Frozen, TableSpec
    spec = TableSpec("t", 2, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=64)
    group = embedded([spec], servers=3, replicas=1)
    manager = ServerManager(group.ring, group.transports, replicas=1, heartbeat=60)
    zombie = group.transports["ps-1"].server
    manager.remove(["ps-1"], kind="failover")
    deadline = time.monotonic() + 10
    while not zombie._fenced and time.monotonic() < deadline:
        time.sleep(0.01)
    zombie.unfreeze()
    keys = np.arange(64, dtype=np.uint64)
    mine = keys[group.ring.owners()[partition_of(keys, group.ring.num_partitions)] == 1]
    with pytest.raises(Frozen):
        zombie.push("t", mine, np.ones((mine.size, 2), np.float32), (7, 1), 1)
    with pytest.raises(Frozen, match="fenced"):
        zombie.pull("t", mine)
