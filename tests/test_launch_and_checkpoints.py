"""The local launcher's failure and timeout paths; periodic checkpoints with retention;
resuming from a checkpoint continues exactly where training stopped."""
import os
import subprocess
import sys
import time

import numpy as np

from jaxps.data import PlantedModel, SyntheticConfig
from jaxps.launch.local import LocalJob, run
from jaxps.mesh import MeshConfig
from jaxps.models import SparseLR, SparseLRConfig
from jaxps.optim import Adam
from jaxps.trainer import TrainConfig, Trainer


def test_launcher_stops_everyone_when_a_worker_fails(capfd):
    code = ("import os, sys, time\n"
            "if os.environ['JAXPS_PROCESS_ID'] == '1': sys.exit(3)\n"
            "print('coordinator', os.environ['JAXPS_COORDINATOR'], flush=True)\n"
            "time.sleep(60)\n")
    t0 = time.monotonic()
    rc = run([sys.executable, "-c", code], LocalJob(workers=2, timeout=30, grace=2))
    assert rc == 3 and time.monotonic() - t0 < 20  # worker 0 was stopped, not waited for
    out = capfd.readouterr().out
    assert "[worker 0] coordinator 127.0.0.1:" in out


def test_launcher_timeout_and_cli():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jaxps.cli", "launch", "local", "--workers", "2",
                          "--timeout", "1", "--", sys.executable, "-c", "import time; time.sleep(60)"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 124 and "timeout" in out.stderr
    assert time.monotonic() - t0 < 30


def _batches(n, size=256, seed=1):
    data, _ = PlantedModel(SyntheticConfig(num_fields=5, vocab_size=30, seed=2)).sample(n * size, seed)
    return [data.slice(i, i + size) for i in range(0, n * size, size)]


def _trainer(out_dir, **kw):
    # Adam: its bias correction reads the global step, so a resume must restore it too
    cfg = TrainConfig(progress=False, tensorboard=False, out_dir=str(out_dir), **kw)
    return Trainer(SparseLR(SparseLRConfig(rows=512, optimizer=Adam(0.05))), MeshConfig(), cfg)


def test_periodic_checkpoints_keep_the_last_n(tmp_path):
    t = _trainer(tmp_path, checkpoint_every=2, keep_checkpoints=2)
    t.fit(_batches(7))
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps == [6, 7]  # saved at 2, 4, 6 and at the end (7); the last two kept


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    batches = _batches(6)
    whole = _trainer(tmp_path / "whole", checkpoint=False)
    whole.fit(batches)
    first = _trainer(tmp_path / "split")
    first.fit(batches[:3])
    second = _trainer(tmp_path / "split")
    assert second.restore() == 3
    second.fit(batches[3:])
    assert second.step == whole.step == 6
    for key in ("params",):
        np.testing.assert_allclose(np.asarray(second.state["tables"]["weights"][key]),
                                   np.asarray(whole.state["tables"]["weights"][key]), rtol=1e-6, atol=1e-8)
    for slot in ("m", "v"):
        np.testing.assert_allclose(np.asarray(second.state["tables"]["weights"]["slots"][slot]),
                                   np.asarray(whole.state["tables"]["weights"]["slots"][slot]),
                                   rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(second.state["dense"]["bias"]), float(whole.state["dense"]["bias"]),
                               rtol=1e-6)
