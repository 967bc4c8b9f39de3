"""HostTable namespaces: strict training through the parameter server equals the same
model with its table on the mesh, step for step."""
import jax
import numpy as np
import pytest

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import rowwise
from jaxps.placement import HostTable, RowSharded
from jaxps.ps.client import embedded
from jaxps.host_tables import table_spec
from jaxps.trainer import TrainConfig, Trainer
from test_sparse_lr_exact import OPTIMIZERS, ROWS, make_batches


def _train(placement, opt, batches, ps_servers=1, rows=ROWS, strict=True, hp=None):
    model = SparseLR(SparseLRConfig(rows=rows, placement=placement,
                                    optimizer=rowwise.make(opt, **(hp or OPTIMIZERS[opt]))))
    ps = embedded([table_spec(t) for t in model.tables()], servers=ps_servers) \
        if isinstance(placement, HostTable) else None
    t = Trainer(model, MeshConfig(), TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                                 dense_optimizer="sgd", dense_learning_rate=0.01,
                                                 compilation_cache="", ps_strict=strict), ps=ps)
    t.fit(batches)
    return t, model


@pytest.mark.parametrize("opt", ["ftrl", "adam"])
def test_strict_hashed_host_table_equals_row_sharded(opt):
    batches = make_batches(5, seed=11)
    dev, _ = _train(RowSharded("data"), opt, batches)
    host, model = _train(HostTable("hashed"), opt, batches, ps_servers=3)
    device_rows = np.asarray(dev.state["tables"]["weights"]["params"])[:ROWS]
    ps_rows = host.steps.host.ps.pull("weights", np.arange(ROWS, dtype=np.uint64))
    assert np.abs(device_rows).max() > 1e-3
    np.testing.assert_allclose(ps_rows, device_rows, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([h["loss"] for h in host.history], [h["loss"] for h in dev.history], rtol=1e-6)
    np.testing.assert_allclose(host.predict(batches), dev.predict(batches), rtol=1e-5, atol=1e-7)
    stats = host.steps.host.ps.stats()
    assert sum(s["weights"]["pushes"] for s in stats.values()) >= len(batches)
    t = model.tables()[0]
    touched = np.unique(np.concatenate([t.rows_for(b.ids[b.mask]) for b in batches]))
    assert sum(s["weights"]["keys"] for s in stats.values()) == len(touched)  # stored on push only


@pytest.mark.parametrize("opt", ["adagrad", "ftrl", "adam", "sgd"])
def test_strict_local_apply_equals_waiting_for_the_servers(opt):
    """With one in-process server a strict repair takes the previous push's outcome on the
    shared rows from the push thread's local apply instead of waiting for the servers:
    bit-identical tables and losses to the waiting repair, and equal to the mesh's table."""
    batches = make_batches(8, seed=15)
    runs = {}
    for local in (True, False):
        model = SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                        optimizer=rowwise.make(opt, **OPTIMIZERS[opt])))
        t = Trainer(model, MeshConfig(), TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                                     dense_optimizer="sgd", dense_learning_rate=0.01,
                                                     compilation_cache="", ps_local_apply=local))
        assert t.steps.host.local_apply_eligible  # the embedded default: one in-process server
        assert t.steps.host.local_apply == local
        t.fit(batches)
        runs[local] = t
    applied = runs[True].steps.host.local_rows_applied
    assert applied > 0 and runs[False].steps.host.local_rows_applied == 0
    assert runs[True].steps.host.repaired_rows < runs[False].steps.host.repaired_rows
    keys = np.arange(ROWS, dtype=np.uint64)
    local_rows, waited_rows = (runs[k].steps.host.ps.pull("weights", keys) for k in (True, False))
    assert np.abs(local_rows).max() > 1e-3
    np.testing.assert_array_equal(local_rows, waited_rows)
    assert [h["loss"] for h in runs[True].history] == [h["loss"] for h in runs[False].history]
    dev, _ = _train(RowSharded("data"), opt, batches)
    np.testing.assert_allclose(local_rows, np.asarray(dev.state["tables"]["weights"]["params"])[:ROWS],
                               rtol=1e-5, atol=1e-7)


def _gated_host_tables(local_rows):
    """HostTables of a hashed Adagrad table with local apply on, whose push thread reads a
    step's gradients through `local_rows` (a test holds the push there), and two batches
    sharing hot ids."""
    import threading

    from jaxps.host_tables import HostTables
    model = SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                    optimizer=rowwise.make("adagrad", **OPTIMIZERS["adagrad"])))
    (t,) = model.tables()
    ht = HostTables([t], embedded([table_spec(t)]))
    ht.local_apply = True
    gate = threading.Event()
    ht.local_rows = lambda g: local_rows(gate, g)
    b1, b2 = make_batches(2, seed=16)
    p1 = ht.plan(b1)
    r1, _ = ht.pull(p1)
    ht.push(p1, {t.name: np.random.default_rng(0).normal(size=r1[t.name].shape).astype(np.float32)}, step=1)
    p2 = ht.plan(b2)
    r2, mark = ht.pull(p2)  # before push 1 is applied: it waits at the gate
    assert mark == 0
    return ht, t.name, gate, p2, r2


def _repair_in_thread(ht, p2, r2):
    import threading
    errors = []

    def run():
        try:
            ht.repair(p2, r2, 0)
        except Exception as e:  # noqa: BLE001 - the test checks it
            errors.append(e)
    th = threading.Thread(target=run)
    th.start()
    return th, errors


def _wait_for(cond, seconds=10.0):
    import time
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_local_apply_serves_the_repair_before_the_push_lands():
    """The repair registers its claim while push 1 waits for the step's gradients; the push
    thread then computes the shared rows, and they equal the servers' after push 1."""
    ht, name, gate, p2, r2 = _gated_host_tables(lambda gate, g: (gate.wait(30), np.asarray(g))[1])
    th, errors = _repair_in_thread(ht, p2, r2)
    _wait_for(lambda: 0 in ht._claims)
    gate.set()
    th.join(30)
    assert not th.is_alive() and not errors
    assert ht.local_rows_applied > 0 and ht.repaired_rows == 0
    ht.flush()
    keys = p2[name].keys
    np.testing.assert_array_equal(r2[name][:keys.shape[0]], ht.ps.pull(name, keys))


def test_local_apply_refused_once_the_push_is_sent_falls_back_to_waiting():
    ht, name, gate, p2, r2 = _gated_host_tables(lambda gate, g: (gate.wait(30), np.asarray(g))[1])
    gate.set()
    ht.flush()  # push 1 sent and applied before the repair asks
    ht.repair(p2, r2, 0)
    assert ht.local_rows_applied == 0 and ht.repaired_rows > 0
    keys = p2[name].keys
    np.testing.assert_array_equal(r2[name][:keys.shape[0]], ht.ps.pull(name, keys))


def test_local_apply_of_a_failing_push_raises_its_error_in_the_repair():
    def fail(gate, g):
        gate.wait(30)
        raise ValueError("gradients could not be read")
    ht, _, gate, p2, r2 = _gated_host_tables(fail)
    th, errors = _repair_in_thread(ht, p2, r2)
    _wait_for(lambda: 0 in ht._claims)
    gate.set()
    th.join(30)
    assert not th.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ValueError), errors


def test_local_apply_only_where_this_client_is_the_one_writer():
    """Several servers, admission or eviction, non-strict: the repair waits for the servers
    (a local apply would not be exact there), whatever ps_local_apply says."""
    from jaxps.host_tables import HostTables
    from jaxps.tables.table import Table

    def local(placement, servers=1, strict=True):
        t = Table("weights", rows=64, dim=4, placement=placement, optimizer=rowwise.make("adagrad"))
        return HostTables([t], embedded([table_spec(t)], servers=servers), strict=strict).local_apply_eligible

    assert local(HostTable("hashed")) and local(HostTable("collisionless"))
    assert not local(HostTable("hashed"), servers=2)
    assert not local(HostTable("collisionless", min_count=2))
    assert not local(HostTable("collisionless", max_rows=32))
    assert not local(HostTable("hashed"), strict=False)


def test_train_config_ps_threads_split_requests_and_train_alike(monkeypatch):
    """TrainConfig.ps_threads: the embedded servers split each request's partitions over
    that many threads; training is bit-identical to one thread (partitions are disjoint)."""
    import jaxps.ps.server as server_mod
    monkeypatch.setattr(server_mod, "PARALLEL_KEYS", 16)  # the test's small requests split too
    batches = make_batches(4, seed=14)
    runs = {}
    for threads in (1, 3):
        model = SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                        optimizer=rowwise.make("adagrad", **OPTIMIZERS["adagrad"])))
        t = Trainer(model, MeshConfig(), TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                                     dense_optimizer="sgd", dense_learning_rate=0.01,
                                                     compilation_cache="", ps_threads=threads))
        t.fit(batches)
        (server,) = [tr.server for tr in t.steps.host.ps.transports.values()]
        assert server.threads == threads
        runs[threads] = t.steps.host.ps.pull("weights", np.arange(ROWS, dtype=np.uint64))
    assert np.abs(runs[1]).max() > 1e-3
    np.testing.assert_array_equal(runs[3], runs[1])
    with pytest.raises(ValueError, match="ps_threads"):
        TrainConfig(ps_threads=0)


def test_collisionless_host_table_keys_raw_ids():
    """No hashing: ids far apart in uint64 are distinct rows; where the hashed table has no
    collisions the two models agree."""
    batches = make_batches(4, seed=12)
    for b in batches:  # spread the ids over the whole uint64 range, keeping them distinct
        b.ids[:] = np.where(b.mask, (b.ids * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1), 0)
    hashed, model = _train(HostTable("hashed"), "ftrl", batches, rows=1 << 24)
    free, _ = _train(HostTable("collisionless"), "ftrl", batches, rows=1 << 24)
    t = model.tables()[0]
    ids = np.unique(np.concatenate([b.ids[b.mask] for b in batches]))
    assert len(np.unique(t.rows_for(ids))) == len(ids)  # no collisions in the hashed one
    np.testing.assert_allclose(free.steps.host.ps.pull("weights", ids),
                               hashed.steps.host.ps.pull("weights", t.rows_for(ids).astype(np.uint64)),
                               rtol=1e-6, atol=1e-8)
    stats = free.steps.host.ps.stats()
    assert sum(s["weights"]["keys"] for s in stats.values()) == len(ids)


def test_prefetch_is_repaired_in_strict_mode_and_stale_without():
    """Pulls run ahead on the input thread; strict mode pulls the keys shared with pushes
    issued since again (so it equals the sequential run, tested above); without it, rows
    are a few steps stale and training still converges alike."""
    batches = make_batches(12, seed=13)
    hp = dict(learning_rate=0.02)  # staleness of a few steps is harmless at a modest rate
    strict, _ = _train(HostTable("hashed"), "adagrad", batches, hp=hp)
    assert strict.steps.host.repaired_rows > 0  # Zipf batches share hot ids
    loose, _ = _train(HostTable("hashed"), "adagrad", batches, strict=False, hp=hp)
    assert loose.steps.host.repaired_rows == 0
    # the client's time split: strict waits for pushes and pulls again, non-strict never does
    split = {run: run.steps.host.stats()["__client__"] for run in (strict, loose)}
    assert split[strict]["repair_pull_seconds"] > 0 and split[strict]["pull_seconds"] > 0
    assert split[strict]["repair_probe_seconds"] > 0 and split[strict]["plan_seconds"] > 0
    assert split[loose]["repair_wait_seconds"] == split[loose]["repair_pull_seconds"] == 0
    assert split[loose]["repair_probe_seconds"] == 0
    assert split[loose]["push_seconds"] > 0 and split[loose]["grads_wait_seconds"] >= 0
    s_loss = np.mean([h["loss"] for h in strict.history[-4:]])
    l_loss = np.mean([h["loss"] for h in loose.history[-4:]])
    assert abs(l_loss - s_loss) < 0.05 * s_loss


def test_wide_deep_embeddings_move_between_mesh_and_ps_by_placement_only():
    """Wide&Deep with its embedding table row-sharded on the mesh or in the PS (hashed,
    strict): same initial rows, same losses, same rows after training."""
    from jaxps.models import WideDeep, WideDeepConfig
    batches = make_batches(4, seed=14)

    def train(placement):
        model = WideDeep(WideDeepConfig(num_slots=6, embed_rows=2048, embed_dim=4, wide_rows=2048,
                                        hidden=(16,), embed_placement=placement))
        t = Trainer(model, MeshConfig(), TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                                     dense_optimizer="adam", dense_learning_rate=0.01,
                                                     compilation_cache=""))
        t.fit(batches)
        return t

    dev, host = train(RowSharded("data")), train(HostTable("hashed"))
    np.testing.assert_allclose([h["loss"] for h in host.history], [h["loss"] for h in dev.history], rtol=1e-5)
    np.testing.assert_allclose(host.steps.host.ps.pull("embed", np.arange(2048, dtype=np.uint64)),
                               np.asarray(dev.state["tables"]["embed"]["params"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_wide_deep_tower_staged_over_the_pipeline_equals_replicated(schedule):
    """The deep tower's placement (Replicated vs Staged over 4 stages, run by the schedule
    table it names with the loss head on the last stage) changes where it runs, not the
    numbers; evaluation runs the forward-only GPipe loop."""
    from jaxps.models import WideDeep, WideDeepConfig
    from jaxps.placement import Replicated, Staged
    batches = make_batches(3, seed=15)

    def train(deep_placement, mesh):
        model = WideDeep(WideDeepConfig(num_slots=6, embed_rows=2048, embed_dim=4, wide_rows=2048,
                                        embed_placement=RowSharded("data"), deep_blocks=4, deep_width=16,
                                        deep_placement=deep_placement))
        t = Trainer(model, mesh, TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                             dense_optimizer="adam", dense_learning_rate=0.01,
                                             compilation_cache=""))
        t.fit(batches)
        return t

    staged = train(Staged(microbatches=4, schedule=schedule), make_mesh(MeshConfig(data=2, stage=4)))
    plain = train(Replicated(), make_mesh(MeshConfig(data=8)))
    assert staged.state["dense"]["blocks_w"].sharding.spec[0] == "stage"
    np.testing.assert_allclose([h["loss"] for h in staged.history], [h["loss"] for h in plain.history], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(staged.state["dense"]["blocks_w"]),
                               np.asarray(plain.state["dense"]["blocks_w"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(staged.predict(batches), plain.predict(batches), rtol=1e-5, atol=1e-7)


def test_checkpoint_restores_host_tables_onto_another_server_count_and_mesh(tmp_path):
    """fit() on 8 devices with 4 PS servers snapshots the PS rows with the device state at
    the same step; a trainer on 4 devices with 3 servers restores both: every row,
    optimizer slot and dense value equal, and it predicts like the original."""
    model = SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                    optimizer=rowwise.make("adagrad", **OPTIMIZERS["adagrad"])))
    cfg = TrainConfig(progress=False, tensorboard=False, out_dir=str(tmp_path), compilation_cache="")
    batches = make_batches(3, seed=16)
    spec = [table_spec(t) for t in model.tables()]
    first = Trainer(model, MeshConfig(), cfg, ps=embedded(spec, servers=4))
    first.fit(batches)
    assert (tmp_path / "checkpoints" / str(first.step) / "ps" / "weights" / "values.npy").exists()
    second = Trainer(model, make_mesh(MeshConfig(data=4), jax.devices()[:4]), cfg, ps=embedded(spec, servers=3))
    assert second.restore() == first.step
    keys = np.arange(ROWS, dtype=np.uint64)
    np.testing.assert_array_equal(second.steps.host.ps.pull("weights", keys),
                                  first.steps.host.ps.pull("weights", keys))
    want, got = first.steps.host.ps.export("weights"), second.steps.host.ps.export("weights")
    order_want, order_got = np.argsort(want["keys"]), np.argsort(got["keys"])
    for field in want:  # keys, values and the Adagrad accumulator, row for row
        np.testing.assert_array_equal(got[field][order_got], want[field][order_want], err_msg=field)
    for a, b in zip(jax.tree.leaves(second.state), jax.tree.leaves(first.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert second.state["dense"]["bias"].sharding.mesh.devices.size == 4
    np.testing.assert_allclose(second.predict(batches), first.predict(batches), rtol=1e-6)
    # the optimizer slots came back too: one more identical step keeps them equal
    first.fit(batches[:1])
    second.fit(batches[:1])
    np.testing.assert_allclose(second.steps.host.ps.pull("weights", keys),
                               first.steps.host.ps.pull("weights", keys), rtol=1e-6, atol=1e-8)


def test_ps_snapshots_follow_checkpoint_retention(tmp_path):
    model = SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed")))
    cfg = TrainConfig(progress=False, tensorboard=False, out_dir=str(tmp_path), compilation_cache="",
                      checkpoint_every=1, keep_checkpoints=2)
    Trainer(model, MeshConfig(), cfg).fit(make_batches(5, seed=17))
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    snaps = sorted(int(p.parents[2].name) for p in (tmp_path / "checkpoints").glob("*/ps/weights/values.npy"))
    assert snaps == ckpts == [4, 5]  # the PS rows are an item of each step: kept and dropped with it


def test_closing_a_trainer_lands_its_pushes_and_stops_its_threads():
    import threading
    batches = make_batches(3, seed=17)
    before = {t.name for t in threading.enumerate()}
    model = SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                    optimizer=rowwise.make("adagrad", **OPTIMIZERS["adagrad"])))
    with Trainer(model, MeshConfig(), TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                                  dense_optimizer="sgd", dense_learning_rate=0.01,
                                                  compilation_cache="")) as t:
        t.fit(batches)
        host = t.steps.host
    assert host._issued == host._applied == len(batches)
    left = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith(("jaxps-push", "jaxps-snapshot")) for name in left), left
