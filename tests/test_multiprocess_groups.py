"""Worker groups of several processes each: `jaxps launch local --groups 2 --workers-per-group 2`
starts 2 groups of 2 real jax.distributed processes (2 CPU devices each, every group its
own coordinator) sharing one gRPC PS server. Under BSP they train exactly as 2 groups of
one 4-device process each (in threads here) and as one group on the summed batch; under
SSP every process's share is pushed once per step and the clocks stay within the bound."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxps.checkpoint import Checkpointer
from jaxps.data import ReaderConfig
from jaxps.data.batch import concat
from jaxps.data.dataset import FileDataset
from jaxps.data.readers import batches
from jaxps.dense_table import DENSE_TABLE
from jaxps.groups import WorkerGroup
from jaxps.host_tables import table_spec
from jaxps.job import ModelConfig, build_model
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.ps.client import PSClient, embedded
from jaxps.trainer import TrainConfig, Trainer
from reference import assert_same_rows, planted_parts, run_concurrently, sorted_rows

ROWS, GLOBAL_BATCH, LINES = 4096, 256, 1200   # GLOBAL_BATCH: one group's batch per step
GROUPS, PROCS = 2, 2
MODEL = ModelConfig(rows=ROWS, placement="host:hashed")
TRAIN = ["train.progress=false", "train.tensorboard=false", "train.compilation_cache=",
         "train.dense_optimizer=sgd", "train.dense_learning_rate=0.01"]


def _files(tmp_path):
    return planted_parts(tmp_path, LINES, model_seed=17, sample_seed=20)


def _launch(tmp_path, files, sync, *extra, resume=False, servers=1, output=None):
    """Run the 2 x 2 job; returns each group's metrics (`output`: a list to get stdout)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxps.cli", "launch", "local", "--servers", str(servers), "--groups", str(GROUPS),
           "--workers-per-group", str(PROCS), "--sync", sync, "--cpu-devices", "2", "--timeout", "240", "--",
           sys.executable, "-m", "jaxps.cli", "train", *(["--resume"] if resume else []),
           f"data.train={files[0]},{files[1]}",
           f"data.eval={files[0]}", f"data.batch_size={GLOBAL_BATCH}", "data.max_nnz=6", f"model.rows={ROWS}",
           "model.placement=host:hashed", "train.out_dir=mp", *TRAIN, *extra]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert not resume or "resumed from" in out.stdout
    # each group is one 4-device mesh over its 2 processes
    assert "[group 1 worker 1]" in out.stdout and "on 4 cpu device(s)" in out.stdout
    if output is not None:
        output.append(out.stdout)
    return [json.loads((tmp_path / "mp" / f"group-{g}" / "metrics.json").read_text()) for g in range(GROUPS)]


def _group_batches(files):
    """Each group's global batches as its two processes read them (process p of group g is
    reader g * PROCS + p of GROUPS * PROCS; process 0's rows first in the group's batch)."""
    reader = ReaderConfig(max_nnz=6)
    share = [list(FileDataset(files, reader, GLOBAL_BATCH // PROCS, process_index=i,
                              process_count=GROUPS * PROCS, prefetch=0)) for i in range(GROUPS * PROCS)]
    assert len({len(s) for s in share}) == 1
    return [[concat(list(parts)) for parts in zip(*share[g * PROCS:(g + 1) * PROCS])] for g in range(GROUPS)]


def _config(out_dir):
    return TrainConfig(progress=False, tensorboard=False, checkpoint=False, dense_optimizer="sgd",
                       dense_learning_rate=0.01, compilation_cache="", out_dir=str(out_dir))


@pytest.mark.slow
def test_bsp_groups_of_two_processes_equal_one_process_groups_and_one_group(tmp_path):
    files = _files(tmp_path)
    metrics = _launch(tmp_path, files, "bsp", "train.checkpoint_every=2")
    steps = metrics[0]["train"]["steps"]
    assert steps == metrics[1]["train"]["steps"] > 2
    sync = metrics[0]["ps"]["__sync__"]  # one server clock per process, all finished
    assert sync["sync"] == "bsp" and sync["clocks"] == ["done"] * (GROUPS * PROCS)
    # every process pushed its share of each table once per step (the dense table's too)
    assert metrics[0]["ps"]["weights"]["pushes"] == metrics[0]["ps"][DENSE_TABLE]["pushes"] == 4 * steps
    ckpt = Checkpointer(str(tmp_path / "mp" / "group-0" / "checkpoints"), read_only=True)
    assert steps in ckpt.steps() and 2 in ckpt.steps()  # periodic and final, PS snapshot with each
    snap = ckpt.ps_snapshot(steps)

    shards = _group_batches(files)
    # 2 groups of one 4-device process each, in threads, on the same group batches
    ps = embedded([], servers=1)
    groups = [Trainer(build_model(MODEL), make_mesh(MeshConfig(), jax.devices()[4 * g:4 * g + 4]),
                      _config(tmp_path / "threads"), ps=PSClient(ps.ring, ps.transports, []),
                      group=WorkerGroup(g, GROUPS, "bsp")) for g in range(GROUPS)]
    _, errors = run_concurrently([lambda g=g: groups[g].fit(shards[g]) for g in range(GROUPS)])
    assert not errors, errors
    # one group on the summed batch (group 0's rows, then group 1's)
    model = build_model(MODEL)
    one = Trainer(model, make_mesh(MeshConfig(), jax.devices()[:4]), _config(tmp_path / "one"),
                  ps=embedded([table_spec(t) for t in model.tables()]))
    one.fit([concat([a, b]) for a, b in zip(*shards)])
    assert groups[0].step == one.step == steps

    got = sorted_rows(snap["weights"])
    for want in (groups[0].steps.host.ps.export("weights"), one.steps.host.ps.export("weights")):
        want = sorted_rows(want)
        np.testing.assert_array_equal(got["keys"], want["keys"])
        for field in want:
            np.testing.assert_allclose(got[field], want[field], rtol=2e-5, atol=1e-7, err_msg=field)
    assert np.abs(got["values"]).max() > 1e-2
    # the dense parameters (the bias) the 2x2 job trained in the PS
    dense = sorted_rows(snap[DENSE_TABLE])["values"].reshape(-1)[0]
    np.testing.assert_allclose(dense, np.asarray(groups[0].state["dense"]["bias"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dense, np.asarray(one.state["dense"]["bias"]), rtol=1e-5, atol=1e-7)
    assert abs(float(dense)) > 1e-3
    # every group evaluated the final model: the one-group reference's metrics
    ev = one.evaluate(list(batches(files[0], ReaderConfig(max_nnz=6), GLOBAL_BATCH)))
    for m in metrics:
        assert m["eval"]["examples"] == ev["examples"] == LINES
        assert m["eval"]["logloss"] == pytest.approx(ev["logloss"], rel=1e-5)
        assert m["eval"]["auc"] == pytest.approx(ev["auc"], abs=1e-6)


@pytest.mark.slow
def test_ssp_groups_of_two_processes_stay_within_the_bound(tmp_path):
    """Under ssp:1 with periodic checkpoints (the servers cut at every second step once all
    4 processes completed it): every share pushed once per step, the gap in bound."""
    files = _files(tmp_path)
    metrics = _launch(tmp_path, files, "ssp:1", "train.checkpoint_every=2")
    steps = metrics[0]["train"]["steps"]
    ckpt = Checkpointer(str(tmp_path / "mp" / "group-0" / "checkpoints"), read_only=True)
    assert 2 in ckpt.steps() and ckpt.has_ps(2)  # read from the servers' cut at step 2
    for m in metrics:
        sync = m["ps"]["__sync__"]
        assert sync["sync"] == "ssp:1" and sync["clocks"] == ["done"] * (GROUPS * PROCS)
        # a pull's gap is measured before it waits: at most s + 1 (jaxps.ps.clock)
        assert sync["max_gap"] <= 2
        assert np.isfinite(m["eval"]["logloss"]) and m["eval"]["examples"] == LINES
    assert metrics[0]["ps"]["weights"]["pushes"] == 4 * steps  # no share lost or applied twice


@pytest.mark.slow
def test_groups_of_two_processes_resume_like_an_uninterrupted_run(tmp_path):
    """One epoch of a 2 x 2 BSP job, then `jaxps train --resume` of a second epoch on fresh
    servers (group 0's process 0 loads the PS snapshot, every process restores its group's
    device state): the same rows and dense parameters as 2 one-process groups training
    both epochs without a stop."""
    files = _files(tmp_path)
    _launch(tmp_path, files, "bsp", "train.epochs=1")
    metrics = _launch(tmp_path, files, "bsp", "train.epochs=2", resume=True)
    steps = metrics[0]["train"]["steps"]
    ckpt = Checkpointer(str(tmp_path / "mp" / "group-0" / "checkpoints"), read_only=True)
    snap = ckpt.ps_snapshot(steps)

    shards = _group_batches(files)
    ps = embedded([], servers=1)
    config = dataclasses.replace(_config(tmp_path / "threads"), epochs=2)
    groups = [Trainer(build_model(MODEL), make_mesh(MeshConfig(), jax.devices()[4 * g:4 * g + 4]), config,
                      ps=PSClient(ps.ring, ps.transports, []), group=WorkerGroup(g, GROUPS, "bsp"))
              for g in range(GROUPS)]
    _, errors = run_concurrently([lambda g=g: groups[g].fit(shards[g]) for g in range(GROUPS)])
    assert not errors, errors
    assert steps == groups[0].step == 2 * len(shards[0])
    got, want = sorted_rows(snap["weights"]), sorted_rows(groups[0].steps.host.ps.export("weights"))
    np.testing.assert_array_equal(got["keys"], want["keys"])
    for field in want:
        np.testing.assert_allclose(got[field], want[field], rtol=2e-5, atol=1e-7, err_msg=field)
    np.testing.assert_allclose(sorted_rows(snap[DENSE_TABLE])["values"].reshape(-1)[0],
                               np.asarray(groups[0].state["dense"]["bias"]), rtol=1e-5, atol=1e-7)


def _snapshot(tmp_path, step):
    return Checkpointer(str(tmp_path / "mp" / "group-0" / "checkpoints"), read_only=True).ps_snapshot(step)


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["ssp:1", "asp"])
def test_ssp_and_asp_groups_of_two_processes_resume_from_a_hot_checkpoint(tmp_path, sync):
    """2 groups x 2 processes under SSP/ASP, one epoch (5 steps) on one server, cuts every
    5 steps. What a resume makes exact there, whatever the timing of the groups:
    * restored rows: resumed onto 2 servers with nothing left to train, the servers hold
      the snapshot exactly (rows, optimizer slots, the dense table): the checkpoint the
      resumed job writes again at step 5 (the servers' cut of what they hold) equals it;
      one process read it (group 0's process 0, "loaded ... onto 2 server(s)");
    * clocks: a second epoch resumed onto one server starts every process's clock at 5:
      each group trains steps 6-10 only (the data position), every process pushes its share
      once per step (20 pushes of each table, none of steps 1-5), every clock ends done
      (asp: each group's own; the others' are between 5 and 10 or done);
    * the bound: ssp:1 pulls never ran more than s + 1 ahead (the gap is measured before
      the wait); asp never waited at a gate (its resume waits for group 0's load apart)."""
    files = _files(tmp_path)
    extra = ("train.checkpoint_every=5",)
    steps = _launch(tmp_path, files, sync, *extra)[0]["train"]["steps"]
    assert steps == 5
    before = _snapshot(tmp_path, steps)

    out: list[str] = []
    metrics = _launch(tmp_path, files, sync, *extra, resume=True, servers=2, output=out)
    assert [m["train"]["steps"] for m in metrics] == [steps, steps]
    loaded = [line for line in out[0].splitlines() if "loaded the PS snapshot" in line]
    assert len(loaded) == 1 and loaded[0].startswith("[group 0 worker 0]") and "onto 2 server(s)" in loaded[0]
    assert out[0].count("resumed from") == GROUPS  # each group's process 0 reports
    after = _snapshot(tmp_path, steps)
    assert set(after) == set(before) == {"weights", DENSE_TABLE}
    for table in before:
        assert_same_rows(after[table], before[table], table)

    metrics = _launch(tmp_path, files, sync, *extra, "train.epochs=2", resume=True)
    for g, m in enumerate(metrics):
        assert m["train"]["steps"] == 2 * steps
        s = m["ps"]["__sync__"]
        assert s["sync"] == sync
        if sync == "asp":  # its final pull waits for nobody: another group may still be at work
            mine = s["clocks"][g * PROCS:(g + 1) * PROCS]
            assert mine == ["done"] * PROCS and all(c == "done" or steps <= c <= 2 * steps for c in s["clocks"])
            assert s["waits"] == 0
        else:
            assert s["clocks"] == ["done"] * (GROUPS * PROCS) and s["max_gap"] <= 2
        assert np.isfinite(m["eval"]["logloss"]) and m["eval"]["examples"] == LINES
    for table in ("weights", DENSE_TABLE):  # the group that finished last saw every push
        pushes = [m["ps"][table]["pushes"] for m in metrics]
        assert max(pushes) == GROUPS * PROCS * steps, table
    final = _snapshot(tmp_path, 2 * steps)
    assert not np.array_equal(sorted_rows(final["weights"])["values"], sorted_rows(before["weights"])["values"])
