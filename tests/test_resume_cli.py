"""`jaxps train --resume` after the trainer process was SIGKILLed mid-run: the same loss
curve (the loss of every step, `train_loss.jsonl`), final loss and eval as an
uninterrupted run, also onto another mesh (8 -> 4 devices) and another number of PS server
processes (`jaxps launch local --servers 4`, then `--servers 3`)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from jaxps.trainer import LOSS_LOG

ARGS = ["model.placement=host:hashed", "model.rows=65536", "data.synthetic.n_train=12000",
        "data.synthetic.n_test=3000", "data.batch_size=512", "train.progress=false",
        "train.tensorboard=false", "train.log_every=6", "train.checkpoint_every=6",
        "train.keep_checkpoints=5", "train.dense_optimizer=adam", "train.compilation_cache="]
JAXPS = [sys.executable, "-m", "jaxps.cli"]
KILL_AT = 12  # steps; a pass is 24

# `jaxps train`, killed with SIGKILL right after the step-KILL_AT checkpoint was started
# (its write may or may not have finished: a resume takes the latest complete one)
KILLED = [sys.executable, "-c", f"""
import os, signal, sys
from jaxps.trainer import Trainer
save = Trainer.save
def save_then_die(self, *args):
    save(self, *args)
    if self.step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer.save = save_then_die
from jaxps.cli import main
sys.exit(main(sys.argv[1:]))
"""]


def _env(devices=8):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXPS_CPU_DEVICES"] = str(devices)
    return env


def _run(cmd, cwd, devices=8, expect=0):
    """Run to the end; `expect` None: any failure (a killed worker)."""
    out = subprocess.run(cmd, cwd=cwd, env=_env(devices), capture_output=True, text=True, timeout=300)
    ok = out.returncode != 0 if expect is None else out.returncode == expect
    assert ok, f"rc {out.returncode}\n" + out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _metrics(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (embedded PS, 8 devices), and the shared data folder."""
    root = tmp_path_factory.mktemp("resume")
    args = ARGS + [f"data.synthetic.dir={root / 'data'}"]
    _run(JAXPS + ["train"] + args + ["train.out_dir=ref"], root)
    return root, args, _metrics(root / "ref" / "metrics.json")


def _losses(out_dir) -> list[tuple[int, float]]:
    """(step, loss) of every step in a run's loss log, in order."""
    path = out_dir / LOSS_LOG
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def _resumed_curve(out_dir, killed, stdout, reference, rtol):
    """The killed run logged up to the kill; the resumed one dropped its lines past the
    checkpoint it resumed from and logged from there on, so the file is one curve, steps
    1..24, each loss the uninterrupted run's at that step."""
    step = int(stdout.split("resumed from ", 1)[1].split()[0].rsplit("/", 1)[1])
    assert 0 < step <= KILL_AT
    want = dict(reference)
    assert [s for s, _ in reference] == list(range(1, 25))
    assert [s for s, _ in killed] == list(range(1, KILL_AT + 1))
    curve = _losses(out_dir)
    assert [s for s, _ in curve] == list(range(1, 25))
    assert curve[:step] == killed[:step]  # kept as the killed run wrote them
    for s, loss in killed + curve:
        assert loss == pytest.approx(want[s], rel=rtol), s


def _same(got, want, rtol):
    assert got["train"]["steps"] == want["train"]["steps"] == 24
    assert got["train"]["final_loss"] == pytest.approx(want["train"]["final_loss"], rel=rtol)
    assert got["eval"]["logloss"] == pytest.approx(want["eval"]["logloss"], rel=rtol)
    assert got["eval"]["auc"] == pytest.approx(want["eval"]["auc"], abs=10 * rtol)


@pytest.mark.slow
def test_sigkilled_run_resumes_like_an_uninterrupted_one(reference):
    root, args, want = reference
    _run(KILLED + ["train"] + args + ["train.out_dir=killed"], root, expect=-signal.SIGKILL)
    assert not (root / "killed" / "metrics.json").exists()
    killed = _losses(root / "killed")
    out = _run(JAXPS + ["train", "--resume"] + args + ["train.out_dir=killed"], root)
    assert "resumed from" in out.stdout
    _resumed_curve(root / "killed", killed, out.stdout, _losses(root / "ref"), 1e-6)
    got = _metrics(root / "killed" / "metrics.json")
    _same(got, want, 1e-6)
    # the data position was restored: only the batches after the checkpoint were trained
    assert got["train"]["examples"] < want["train"]["examples"]


@pytest.mark.slow
def test_resume_onto_4_devices_and_3_server_processes(reference):
    """Killed on 8 devices with 4 gRPC servers; resumed on 4 devices with 3 servers: the
    rows go wherever the new ring puts them, the device state is resharded by Orbax."""
    root, args, want = reference
    launch = JAXPS + ["launch", "local", "--timeout", "240"]
    out = _run(launch + ["--servers", "4", "--"] + KILLED + ["train"] + args + ["train.out_dir=moved"],
               root, expect=None)
    assert "[ps-3] jaxps ps-server ps-3 listening" in out.stdout
    assert not (root / "moved" / "metrics.json").exists()
    killed = _losses(root / "moved")
    out = _run(launch + ["--servers", "3", "--"] + JAXPS + ["train", "--resume"] + args
               + ["train.out_dir=moved", "mesh.data=4"], root, devices=4)
    assert "resumed from" in out.stdout and "[ps-3]" not in out.stdout
    assert "onto 3 server(s)" in out.stdout  # the one reader loaded the snapshot onto the new ring
    _resumed_curve(root / "moved", killed, out.stdout, _losses(root / "ref"), 1e-5)
    _same(_metrics(root / "moved" / "metrics.json"), want, 1e-5)
