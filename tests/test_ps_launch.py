"""A full training run against PS server processes over gRPC (started by
`jaxps launch local --servers 2`) equals the same run with the embedded in-process PS."""
import json
import os
import subprocess
import sys

import pytest

ARGS = ["train", "model.placement=host:hashed", "model.rows=65536", "data.synthetic.n_train=20000",
        "data.synthetic.n_test=5000", "train.progress=false", "train.checkpoint=false",
        "train.tensorboard=false"]


@pytest.mark.slow
def test_grpc_server_processes_train_like_the_embedded_ps(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    jaxps = [sys.executable, "-m", "jaxps.cli"]
    local = subprocess.run(jaxps + ARGS + ["train.out_dir=local"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = subprocess.run(jaxps + ["launch", "local", "--servers", "2", "--timeout", "240", "--"] + jaxps
                            + ARGS + ["train.out_dir=remote"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-2000:]
    assert "[ps-0] jaxps ps-server ps-0 listening on 127.0.0.1:" in remote.stdout
    assert "[ps-1] jaxps ps-server ps-1 stopped" in remote.stdout  # stopped at the end
    a = json.loads((tmp_path / "local/metrics.json").read_text())
    b = json.loads((tmp_path / "remote/metrics.json").read_text())
    assert a["train"]["steps"] == b["train"]["steps"]
    assert b["eval"]["logloss"] == pytest.approx(a["eval"]["logloss"], rel=1e-5)
    assert b["eval"]["auc"] == pytest.approx(a["eval"]["auc"], abs=1e-4)


@pytest.mark.slow
def test_worker_groups_in_processes_over_grpc_equal_in_process_groups(tmp_path):
    """`jaxps launch local --servers 2 --groups 2 --sync bsp`: two trainer processes, each
    one worker group reading its half of the data, share two gRPC servers. Both groups end
    with the same model, and it equals two in-process groups (threads, embedded PS) on the
    same shards."""
    from jaxps.cli import _load
    from reference import run_concurrently
    from jaxps.groups import WorkerGroup
    from jaxps.job import build_data, build_model, dense_features
    from jaxps.ps.client import PSClient, embedded
    from jaxps.trainer import Trainer
    import jax
    from jaxps.mesh import MeshConfig, make_mesh

    args = ARGS + ["data.synthetic.n_train=8000", "data.synthetic.n_test=2000", "data.batch_size=1024",
                   f"data.synthetic.dir={tmp_path / 'data'}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXPS_CPU_DEVICES"] = "2"
    jaxps = [sys.executable, "-m", "jaxps.cli"]
    remote = subprocess.run(jaxps + ["launch", "local", "--servers", "2", "--groups", "2", "--sync", "bsp",
                                     "--timeout", "240", "--"] + jaxps + args + ["train.out_dir=remote"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stdout[-4000:] + remote.stderr[-2000:]
    runs = [json.loads((tmp_path / f"remote/group-{g}/metrics.json").read_text()) for g in range(2)]
    assert runs[0]["ps"]["__sync__"]["sync"] == "bsp"
    assert runs[0]["ps"]["__sync__"]["clocks"] == ["done", "done"]
    assert runs[0]["eval"]["logloss"] == pytest.approx(runs[1]["eval"]["logloss"], rel=1e-6)

    cfg = _load(args[1:])
    ps = embedded([], servers=2)
    trainers, data = [], []
    for g in range(2):
        group = WorkerGroup(g, 2, "bsp")
        train_ds, eval_ds, _ = build_data(cfg.data, group)
        model = build_model(cfg.model, dense_features(cfg.data), cfg.data.max_nnz)
        devices = jax.devices()[2 * g:2 * g + 2]
        trainers.append(Trainer(model, make_mesh(MeshConfig(), devices),
                                dataclasses_replace(cfg.train, out_dir=str(tmp_path / "local")),
                                ps=PSClient(ps.ring, ps.transports, []), group=group))
        data.append((train_ds, eval_ds))
    results, errors = run_concurrently([lambda g=g: trainers[g].fit(*data[g]) for g in range(2)], 240)
    assert not errors, errors
    assert results[0]["train"]["steps"] == runs[0]["train"]["steps"]
    assert runs[0]["eval"]["logloss"] == pytest.approx(results[0]["eval"]["logloss"], rel=1e-5)


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


@pytest.mark.slow
def test_replicated_servers_with_a_manager_train_like_the_embedded_ps(tmp_path):
    """`jaxps launch local --servers 3 --replicas 1`: every partition on two servers, a
    manager process watching them; the client learns the ring from the manager. Same model
    as the embedded PS (backups change no number)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    jaxps = [sys.executable, "-m", "jaxps.cli"]
    args = ARGS + ["data.synthetic.n_train=6000", "data.synthetic.n_test=2000", f"data.synthetic.dir={tmp_path / 'd'}"]
    local = subprocess.run(jaxps + args + ["train.out_dir=local"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    remote = subprocess.run(jaxps + ["launch", "local", "--servers", "3", "--replicas", "1", "--timeout", "240",
                                     "--"] + jaxps + args + ["train.out_dir=remote"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-2000:]
    assert "[manager] jaxps ps-manager listening on 127.0.0.1:" in remote.stdout
    a = json.loads((tmp_path / "local/metrics.json").read_text())
    b = json.loads((tmp_path / "remote/metrics.json").read_text())
    assert b["eval"]["logloss"] == pytest.approx(a["eval"]["logloss"], rel=1e-5)
    # each pushed key landed on two servers: stored keys add up to twice the embedded run's
    assert b["ps"]["weights"]["keys"] == 2 * a["ps"]["weights"]["keys"]
