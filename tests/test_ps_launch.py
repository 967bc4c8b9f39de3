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
