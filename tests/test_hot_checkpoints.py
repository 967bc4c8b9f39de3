"""Hot checkpoints: the PS snapshot is written off the training thread, as an item of the
same Orbax step; a crashed run resumed from its latest complete checkpoint (data position
included) trains exactly like an uninterrupted one, for one trainer and for two worker
groups under BSP (consistent cut; group 0 loads the snapshot before anyone pulls)."""
import threading
import time

import jax
import numpy as np
import pytest

from jaxps import snapshot
from jaxps.groups import WorkerGroup
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import rowwise
from jaxps.placement import HostTable
from jaxps.ps.client import PSClient, embedded
from jaxps.trainer import TrainConfig, Trainer
from reference import assert_same_rows, run_concurrently
from test_sparse_lr_exact import ROWS, make_batches

KEYS = np.arange(ROWS, dtype=np.uint64)


def _model(opt="adam"):  # Adam: its bias correction reads the step, which must come back too
    return SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                   optimizer=rowwise.make(opt, learning_rate=0.05)))


def _config(out_dir, **kw):
    base = dict(progress=False, tensorboard=False, dense_optimizer="adam", dense_learning_rate=0.01,
                compilation_cache="", out_dir=str(out_dir), log_every=1)
    return TrainConfig(**dict(base, **kw))


class Crashing:
    """A dataset that fails instead of producing batch `crash_at` (0-based) of pass
    `crash_pass` (1-based): the run dies there, as a killed one would."""

    def __init__(self, batches, crash_at, crash_pass=1):
        self.batches, self.crash_at, self.crash_pass, self.passes = batches, crash_at, crash_pass, 0

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.batches):
            if self.passes == self.crash_pass and i == self.crash_at:
                raise RuntimeError("crash")
            yield b


def test_a_crashed_run_resumes_from_its_latest_complete_checkpoint_like_an_uninterrupted_one(tmp_path):
    batches = make_batches(5, seed=31)
    whole = Trainer(_model(), MeshConfig(), _config(tmp_path / "whole", epochs=2, checkpoint=False))
    whole.fit(batches)
    # a run of 2 epochs x 5 batches that dies before step 9 (the second pass's 4th batch):
    # the last complete checkpoint is step 8, three batches into the second pass
    cfg = _config(tmp_path / "split", epochs=2, checkpoint_every=4)
    first = Trainer(_model(), MeshConfig(), cfg)
    with pytest.raises(RuntimeError, match="crash"):
        first.fit(Crashing(batches, crash_at=3, crash_pass=2))
    assert first.checkpointer.steps()[-1] == 8
    second = Trainer(_model(), MeshConfig(), cfg)  # a fresh embedded PS: rows come from the snapshot
    assert second.resume() == 8 and second._resume_at == (1, 3)
    second.fit(batches)
    assert second.step == whole.step == 10
    np.testing.assert_allclose([h["loss"] for h in second.history], [h["loss"] for h in whole.history[8:]],
                               rtol=1e-6)
    np.testing.assert_allclose(second.steps.host.ps.pull("weights", KEYS), whole.steps.host.ps.pull("weights", KEYS),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(second.state["dense"]["bias"]), np.asarray(whole.state["dense"]["bias"]),
                               rtol=1e-6)
    # resuming a finished run trains nothing and keeps its final checkpoint
    third = Trainer(_model(), MeshConfig(), cfg)
    assert third.resume() == 10 and third._resume_at == (2, 0)
    third.fit(batches)
    assert third.step == 10 and third.history == []


def test_the_ps_snapshot_is_written_off_the_training_thread(tmp_path, monkeypatch):
    """A writer that cannot finish until training has gone two steps past the checkpoint:
    if the snapshot were written on the training thread, it would never be released (the
    wait has a generous limit so that a regression fails instead of hanging)."""
    steps_done = threading.Semaphore(0)
    seen = {}
    write = snapshot.write_rows

    def slow_write(directory, rows):
        if "thread" not in seen:  # the step-2 snapshot (the step-4 one is written normally)
            seen["thread"] = threading.current_thread()
            seen["released"] = all(steps_done.acquire(timeout=60) for _ in range(2))
            seen["step_on_disk_while_writing"] = (tmp_path / "checkpoints" / "2").exists()
        write(directory, rows)

    monkeypatch.setattr(snapshot, "write_rows", slow_write)
    t = Trainer(_model(), MeshConfig(), _config(tmp_path, checkpoint_every=2, checkpoint=False))
    push = t.steps.host.push

    def counting_push(plans, grads, step):
        push(plans, grads, step)
        if step > 2:
            steps_done.release()

    t.steps.host.push = counting_push
    t.fit(make_batches(4, seed=32))
    assert seen["released"] and seen["thread"] is not threading.main_thread()
    assert not seen["step_on_disk_while_writing"]  # the step appears only once the PS rows are written
    assert t.checkpointer.steps() == [2, 4] and t.checkpointer.has_ps(2) and t.checkpointer.has_ps(4)


def test_the_snapshot_copied_off_thread_holds_exactly_the_rows_after_its_step(tmp_path):
    """The copy of the step-3 snapshot is held back until the pushes of steps 4 and 5 were
    applied (the training thread went on meanwhile); it still holds exactly the rows,
    optimizer slots included, of an independent run stopped after step 3."""
    batches = make_batches(6, seed=33)
    ref = Trainer(_model(), MeshConfig(), _config(tmp_path / "ref", checkpoint=False))
    ref.fit(batches[:3])
    want = ref.steps.host.ps.export("weights")

    t = Trainer(_model(), MeshConfig(), _config(tmp_path / "run", checkpoint_every=3, checkpoint=False))
    pushed_after = threading.Semaphore(0)
    held = {}
    push, export = t.steps.host.push, t.steps.host.ps.export_pieces

    def counting_push(plans, grads, step):
        push(plans, grads, step)
        if step > 3:
            t.steps.host._inflight[-1].add_done_callback(lambda _: pushed_after.release())

    def held_export(table, marks):
        if "released" not in held:  # the step-3 snapshot's copy
            held["thread"] = threading.current_thread()
            held["released"] = all(pushed_after.acquire(timeout=60) for _ in range(2))
        return export(table, marks)

    t.steps.host.push = counting_push
    t.steps.host.ps.export_pieces = held_export
    t.fit(batches)
    assert held["released"] and held["thread"] is not threading.main_thread()
    got = t.checkpointer.ps_snapshot(3)["weights"]
    order_got, order_want = np.argsort(got["keys"]), np.argsort(want["keys"])
    assert sorted(got) == sorted(want) == ["keys", "slot_m", "slot_v", "values"]
    for field in want:
        np.testing.assert_array_equal(got[field][order_got], want[field][order_want], err_msg=field)
    # the live rows did move on after step 3
    assert not np.array_equal(t.steps.host.ps.pull("weights", KEYS), ref.steps.host.ps.pull("weights", KEYS))


def _group_trainers(out_dir, ps, count=2, sync="bsp", **kw):
    return [Trainer(_model("adagrad"), make_mesh(MeshConfig(), jax.devices()[4 * g:4 * g + 4]),
                    _config(out_dir, dense_optimizer="sgd", **kw), ps=PSClient(ps.ring, ps.transports, []),
                    group=WorkerGroup(g, count, sync))
            for g in range(count)]


def _run(fns, timeout=120):
    return run_concurrently(fns, timeout)[1]


def test_worker_groups_resume_from_a_consistent_cut(tmp_path):
    """Two groups under BSP checkpoint every 2 steps and both die at step 5; a fresh pair
    of trainers on a fresh PS of another size resumes from step 4 and finishes. Group 1
    starts first and must wait for group 0 to load the snapshot. The final table and
    dense parameters equal an uninterrupted two-group run's."""
    shards = [make_batches(7, seed=41), make_batches(7, seed=42)]
    ref_ps = embedded([], servers=2)
    ref = _group_trainers(tmp_path / "ref", ref_ps, checkpoint=False)
    assert not _run([lambda g=g: ref[g].fit(shards[g]) for g in range(2)])

    ps = embedded([], servers=2)
    first = _group_trainers(tmp_path / "run", ps, checkpoint_every=2)
    errors = _run([lambda g=g: first[g].fit(Crashing(shards[g], crash_at=5)) for g in range(2)])
    assert len(errors) == 2 and all("crash" in str(e) for e in errors)
    for g in range(2):
        assert (tmp_path / "run" / f"group-{g}" / "checkpoints" / "4").is_dir()
    assert first[0].checkpointer.has_ps(4) and not first[1].checkpointer.has_ps(4)  # group 0 writes it

    fresh = embedded([], servers=3)
    second = _group_trainers(tmp_path / "run", fresh, checkpoint_every=2)
    server = fresh.transports["ps-0"].server

    def group1():
        assert second[1].resume() == 4
        second[1].fit(shards[1])

    def group0():
        deadline = time.monotonic() + 60  # start once group 1 joined the clocks at 4 (and waits)
        while server.clocks.groups is None or server.clocks.clocks()[1] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert server.clocks.clocks()[0] == 0  # group 1 is held at the gate
        assert second[0].resume() == 4
        second[0].fit(shards[0])

    assert not _run([group1, group0])
    # no pull was made while the fresh servers still counted group 0 at clock 0: the gaps
    # they record are the training's (BSP: at most s + 1 = 1), not the restart's 4
    assert second[0].steps.host.stats()["__sync__"]["max_gap"] <= 1
    want = ref[0].steps.host.ps.pull("weights", KEYS)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(second[0].steps.host.ps.pull("weights", KEYS), want, rtol=1e-6, atol=1e-8)
    for g in range(2):
        np.testing.assert_allclose(np.asarray(second[g].state["dense"]["bias"]),
                                   np.asarray(ref[g].state["dense"]["bias"]), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose([h["loss"] for h in second[g].history],
                                   [h["loss"] for h in ref[g].history[4:]], rtol=1e-6)


def test_asp_worker_groups_resume_once_group_0_loaded_the_snapshot(tmp_path):
    """ASP has no clock gate to hold a resumed group back, yet a group that pulled before
    group 0 loaded the snapshot would train on rows the load then drops. Two ASP groups
    (cuts every 2 steps) die at step 5; resumed from the cut at 4 onto 3 fresh servers
    (2 wrote it), group 1 starts first and pulls and pushes nothing until group 0 loaded
    the snapshot: at that moment the servers hold exactly the checkpoint's rows and
    optimizer slots, whatever their number. Both then finish without ever waiting at a
    gate (asp), every clock done, and cut a checkpoint at 6."""
    shards = [make_batches(7, seed=43), make_batches(7, seed=44)]
    first = _group_trainers(tmp_path, embedded([], servers=2), sync="asp", checkpoint_every=2)
    errors = _run([lambda g=g: first[g].fit(Crashing(shards[g], crash_at=5)) for g in range(2)])
    assert len(errors) == 2 and all("crash" in str(e) for e in errors)

    fresh = embedded([], servers=3)
    second = _group_trainers(tmp_path, fresh, sync="asp", checkpoint_every=2)
    servers = [t.server for t in fresh.transports.values()]
    seen = {}

    def group1():
        assert second[1].resume() == 4
        second[1].fit(shards[1])

    def group0():
        deadline = time.monotonic() + 60  # start once group 1 joined the clocks at 4 (and waits)
        while any(s.clocks.groups is None or s.clocks.clocks()[1] < 4 for s in servers):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # room for a pull group 1 must not make
        assert all(st.get("pulls", 0) == st.get("pushes", 0) == 0
                   for s in servers for name, st in s.stats().items() if name != "__sync__")
        assert second[0].resume() == 4
        seen["stats"] = [s.stats()["weights"] for s in servers]
        seen["rows"] = {name: second[0].steps.host.ps.export(name) for name in second[0].steps.host.names}
        second[0].fit(shards[0])

    assert not _run([group1, group0])
    assert all(st["pulls"] == st["pushes"] == 0 and st["keys"] > 0 for st in seen["stats"])
    snap = second[0].checkpointer.ps_snapshot(4)
    assert set(seen["rows"]) == set(snap) == {"weights", "__dense__"}
    for name, rows in snap.items():
        assert_same_rows(seen["rows"][name], rows, name)
    sync = second[0].steps.host.stats()["__sync__"]
    assert sync["sync"] == "asp" and sync["clocks"] == ["done", "done"] and sync["waits"] == 0
    assert [t.step for t in second] == [7, 7] and 6 in second[0].checkpointer.steps()
    assert second[0].checkpointer.has_ps(6)


def test_ssp_servers_cut_at_checkpoint_steps_while_groups_run_ahead(tmp_path):
    """SSP(3), cuts every 3 steps: a fast group may push steps past a cut before the slow
    one reaches it; those pushes are applied at once (the group reads its own writes: each
    of its pulls counts every push it made) while the cut's copy keeps the rows they
    changed. SGD with learning rate 1 and gradients of 1 makes every row count the pushes
    applied to it: the cut at step c holds exactly c pushes of each group, whatever the
    timing; nothing is lost after."""
    import threading
    import time

    from jaxps.optim import rowwise
    from jaxps.ps.clock import DONE, Sync
    from jaxps.ps.ring import Ring
    from jaxps.ps.server import PSServer, TableSpec

    sync = Sync(3)
    spec = TableSpec("t", 2, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=16)
    server = PSServer("ps-0", Ring(8, 8, ["ps-0"]), [spec], wait_timeout=20)
    keys = np.arange(16, dtype=np.uint64)
    for g in range(2):
        server.clock(g, 0, 2, sync, cut_every=3)
    copies_seen, own_missing = [], []

    def group(g, delay):
        for c in range(9):
            rows = server.pull("t", keys, g, c)
            own_missing.append(bool((rows > -c).any()))  # a row lacking one of this group's own c pushes
            time.sleep(delay)
            server.push("t", keys, np.ones((16, 2), np.float32), (g, c), c + 1, g)
            copies_seen.append(len(server._cut_copies))
            server.clock(g, c + 1, 2, sync, cut_every=3)
        server.clock(g, DONE, 2, sync, cut_every=3)

    threads = [threading.Thread(target=group, args=(g, d)) for g, d in ((0, 0.0), (1, 0.03))]
    for t in threads:
        t.start()
    cuts = {at: server.export_cut("t", at) for at in (3, 6)}
    for t in threads:
        t.join(30)
    assert max(copies_seen) > 0  # the fast group did run past a cut before the slow one got there
    assert not any(own_missing)
    for at, rows in cuts.items():
        np.testing.assert_array_equal(rows["values"], np.full((16, 2), -2.0 * at, np.float32))
    np.testing.assert_array_equal(server.pull("t", keys), np.full((16, 2), -18.0, np.float32))


def test_ssp_groups_write_periodic_checkpoints_from_the_servers_cuts(tmp_path):
    """Two SSP worker groups with train.checkpoint_every: group 0's PS snapshot at step k
    is the servers' cut at k (every group's pushes of steps <= k, none later)."""
    ps = embedded([], servers=2)
    trainers = [Trainer(_model(), make_mesh(MeshConfig(), jax.devices()[4 * g:4 * g + 4]),
                        _config(tmp_path, checkpoint_every=2), ps=PSClient(ps.ring, ps.transports, []),
                        group=WorkerGroup(g, 2, "ssp:2")) for g in range(2)]
    errors = _run([lambda g=g: trainers[g].fit(make_batches(6, seed=50 + g)) for g in range(2)])
    assert not errors, errors
    steps = trainers[0].checkpointer.steps()
    assert {2, 4}.issubset(set(steps))
    snap = trainers[0].checkpointer.ps_snapshot(4)
    assert set(snap) == {"weights", "__dense__"} and snap["weights"]["keys"].size > 0


class _Process1:
    """`jax` as process 1 of a multi-process job sees it, inside jaxps.trainer only."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def process_index():
        return 1


def test_one_process_reads_the_ps_snapshot_and_loads_it_onto_any_number_of_servers(tmp_path, monkeypatch):
    """A checkpoint written from one server: a process other than process 0 restores the
    device state without reading the PS snapshot at all (Orbax's read is a collective of
    every process; one reader is all the servers need); process 0 reads it once and loads
    it onto three servers, which then hold exactly the rows trained before."""
    import jaxps.trainer as trainer_module
    from jaxps.checkpoint import Checkpointer

    batches = make_batches(3, seed=34)
    first = Trainer(_model(), MeshConfig(), _config(tmp_path))
    first.fit(batches)
    reads = []
    read = Checkpointer.ps_snapshot
    monkeypatch.setattr(Checkpointer, "ps_snapshot", lambda self, step: reads.append(step) or read(self, step))

    servers = embedded([], servers=3)
    other = Trainer(_model(), MeshConfig(), _config(tmp_path), ps=PSClient(servers.ring, servers.transports, []))
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "jax", _Process1())
        assert other.restore() == 3
    assert reads == [] and other.ps_restored is None
    assert sum(s.server.stats()["weights"]["keys"] for s in servers.transports.values()) == 0
    np.testing.assert_array_equal(np.asarray(other.state["dense"]["bias"]), np.asarray(first.state["dense"]["bias"]))

    lead = Trainer(_model(), MeshConfig(), _config(tmp_path), ps=PSClient(servers.ring, servers.transports, []))
    assert lead.restore() == 3 and reads == [3]
    want = first.steps.host.ps.export("weights")
    assert lead.ps_restored == {"step": 3, "rows": {"weights": want["keys"].size}, "servers": 3}
    assert all(s.server.stats()["weights"]["keys"] > 0 for s in servers.transports.values())
    np.testing.assert_array_equal(lead.steps.host.ps.pull("weights", KEYS), first.steps.host.ps.pull("weights", KEYS))
