"""Two real jax.distributed worker processes (4 CPU devices each, started by
`jaxps launch local`) train the same model as one 8-device process fed the same global
batches: equal tables, equal eval metrics; also with the table in a PS server process
(each worker pulls and pushes the rows it owns)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxps.data import ReaderConfig
from jaxps.data.batch import concat
from jaxps.data.readers import batches
from jaxps.job import ModelConfig, build_model
from jaxps.mesh import MeshConfig
from jaxps.trainer import TrainConfig, Trainer
from reference import planted_parts

ROWS, GLOBAL_BATCH, LINES = 4096, 512, 3000


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    files = planted_parts(tmp_path, LINES, model_seed=7, sample_seed=10)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxps.cli", "launch", "local", "--workers", "2", "--cpu-devices", "4",
           "--timeout", "240", "--", sys.executable, "-m", "jaxps.cli", "train",
           f"data.train={files[0]},{files[1]}", f"data.eval={files[0]}", f"data.batch_size={GLOBAL_BATCH}",
           "data.max_nnz=6", f"model.rows={ROWS}", "train.out_dir=mp", "train.progress=false",
           "train.tensorboard=false"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    # one mesh of 8 devices over the 2 processes (the plan process 0 prints), not 2 meshes of 4
    assert "[worker 1]" in out.stdout and "on 8 cpu device(s)" in out.stdout
    mp_metrics = json.loads((tmp_path / "mp" / "metrics.json").read_text())

    # The same global batches in one process: process 0 reads part0, process 1 part1, and
    # process 0's rows come first in the global batch.
    reader = ReaderConfig(max_nnz=6)
    half = GLOBAL_BATCH // 2
    parts = [list(batches(f, reader, half)) for f in files]
    assert len(parts[0]) == len(parts[1])
    global_batches = [concat([a, b]) for a, b in zip(*parts)]
    cfg = TrainConfig(progress=False, tensorboard=False, checkpoint=False, out_dir=str(tmp_path / "sp"))
    single = Trainer(build_model(ModelConfig(rows=ROWS)), MeshConfig(), cfg)
    single.fit(global_batches)
    restored = Trainer(build_model(ModelConfig(rows=ROWS)), MeshConfig(),
                       TrainConfig(out_dir=str(tmp_path / "mp")))
    assert restored.restore() == single.step == mp_metrics["train"]["steps"]
    for key in ("params", "slots"):
        np.testing.assert_allclose(
            jax_tree_leaves(restored.state["tables"]["weights"][key]),
            jax_tree_leaves(single.state["tables"]["weights"][key]), rtol=1e-5, atol=1e-7)
    ev = single.evaluate(list(batches(files[0], reader, GLOBAL_BATCH)))
    assert mp_metrics["eval"]["examples"] == ev["examples"] == LINES
    assert mp_metrics["eval"]["logloss"] == pytest.approx(ev["logloss"], rel=1e-5)
    assert mp_metrics["eval"]["auc"] == pytest.approx(ev["auc"], abs=1e-6)


def _global_batches(files):
    """The batches two processes read (process 0 part0, process 1 part1), as one process's:
    process 0's rows first in each global batch."""
    reader = ReaderConfig(max_nnz=6)
    parts = [list(batches(f, reader, GLOBAL_BATCH // 2)) for f in files]
    assert len(parts[0]) == len(parts[1])
    return [concat([a, b]) for a, b in zip(*parts)]


def _write_parts(tmp_path, seed):
    return planted_parts(tmp_path, LINES, model_seed=seed, sample_seed=seed + 3)


@pytest.mark.slow
def test_two_processes_with_host_tables_equal_one_process(tmp_path):
    """Sparse LR with its table in a HostTable on one gRPC server process, trained by two
    jax.distributed workers (each dedups the whole batch and pulls, and pushes the summed
    gradient of, only the rows it owns) and by one 8-device process with an embedded server
    on the same global batches: equal rows, optimizer slots and dense parameters (through
    the two-process run's final checkpoint, PS snapshot included), equal eval metrics."""
    files = _write_parts(tmp_path, 17)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxps.cli", "launch", "local", "--workers", "2", "--servers", "1",
           "--cpu-devices", "4", "--timeout", "240", "--", sys.executable, "-m", "jaxps.cli", "train",
           f"data.train={files[0]},{files[1]}", f"data.eval={files[0]}", f"data.batch_size={GLOBAL_BATCH}",
           "data.max_nnz=6", f"model.rows={ROWS}", "model.placement=host:hashed", "train.out_dir=mp",
           "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=3",
           "train.compilation_cache="]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "[worker 1]" in out.stdout and "on 8 cpu device(s)" in out.stdout
    mp_metrics = json.loads((tmp_path / "mp" / "metrics.json").read_text())

    model = ModelConfig(rows=ROWS, placement="host:hashed")
    cfg = TrainConfig(progress=False, tensorboard=False, checkpoint=False, compilation_cache="",
                      out_dir=str(tmp_path / "sp"))
    single = Trainer(build_model(model), MeshConfig(), cfg)
    single.fit(_global_batches(files))
    restored = Trainer(build_model(model), MeshConfig(), TrainConfig(out_dir=str(tmp_path / "mp")))
    assert restored.restore() == single.step == mp_metrics["train"]["steps"] > 3
    want, got = single.steps.host.ps.export("weights"), restored.steps.host.ps.export("weights")
    np.testing.assert_array_equal(np.sort(got["keys"]), np.sort(want["keys"]))
    for field in want:
        np.testing.assert_allclose(got[field][np.argsort(got["keys"])], want[field][np.argsort(want["keys"])],
                                   rtol=1e-5, atol=1e-7, err_msg=field)
    np.testing.assert_allclose(jax_tree_leaves(restored.state["dense"]), jax_tree_leaves(single.state["dense"]),
                               rtol=1e-5, atol=1e-7)
    ev = single.evaluate(list(batches(files[0], ReaderConfig(max_nnz=6), GLOBAL_BATCH)))
    assert mp_metrics["eval"]["examples"] == ev["examples"] == LINES
    assert mp_metrics["eval"]["logloss"] == pytest.approx(ev["logloss"], rel=1e-5)
    assert mp_metrics["eval"]["auc"] == pytest.approx(ev["auc"], abs=1e-6)


def jax_tree_leaves(tree):
    import jax
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
