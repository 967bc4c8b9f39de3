"""Torch peer plumbing of the benchmarks: JSON parsing and the null-with-a-reason path.

CI has no torch: everything here runs without it (the launcher is faked); the one test that
launches a real torch peer skips, saying so, when torch is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _torchrun  # noqa: E402


def test_last_json() -> None:
    assert _torchrun.last_json('log\n{"a": 1}\n\n') == {"a": 1}
    assert _torchrun.last_json('{"a": 1}\nnot json') is None
    assert _torchrun.last_json("[1, 2]") is None and _torchrun.last_json("  \n") is None


def test_missing_module_is_a_reason() -> None:
    assert _torchrun.missing("json") is None
    why = _torchrun.missing("json", "no_such_module_zz9")
    assert why and "no_such_module_zz9 is not installed" in why
    assert "cannot be located" in (_torchrun.missing("no_such_pkg_zz9.sub") or "")


def _fake_run(stdout: str, rc: int = 0, stderr: str = ""):
    def run(cmd, **kw):  # noqa: ANN001, ANN003 - subprocess.run's shape
        assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
        assert kw["env"]["OMP_NUM_THREADS"] and "XLA_FLAGS" not in kw["env"]
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)
    return run


def test_torchrun_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_torchrun, "missing", lambda *m: "torch is not installed")
    assert _torchrun.torchrun("peer.py", 2, [], 5) == (None, "torch is not installed")
    monkeypatch.setattr(_torchrun, "missing", lambda *m: None)
    monkeypatch.setattr(subprocess, "run", _fake_run('warn\n{"samples_per_sec": {"gpipe": 5.0}}\n'))
    res, why = _torchrun.torchrun("peer.py", 2, ["--x", 1], 5, threads_per_proc=3)
    assert why is None and res == {"samples_per_sec": {"gpipe": 5.0}, "omp_num_threads": 3}
    monkeypatch.setattr(subprocess, "run", _fake_run("", rc=1, stderr="Traceback: CANARY"))
    res, why = _torchrun.torchrun("peer.py", 2, [], 5)
    assert res is None and "exit status 1" in why and "CANARY" in why
    monkeypatch.setattr(subprocess, "run", _fake_run("no json here"))
    assert "not a JSON object" in _torchrun.torchrun("peer.py", 2, [], 5)[1]

    def timeout(cmd, **kw):  # noqa: ANN001, ANN003
        raise subprocess.TimeoutExpired(cmd, 5)
    monkeypatch.setattr(subprocess, "run", timeout)
    assert _torchrun.torchrun("peer.py", 2, [], 5) == (None, "peer.py: timeout after 5s")
    runs = iter([_fake_run("", rc=1, stderr="[rank1]: RuntimeError: flaky"), _fake_run('{"x": 1}')])
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: next(runs)(cmd, **kw))
    res, why = _torchrun.torchrun("peer.py", 2, [], 5, retries=1)
    assert why is None and res["x"] == 1 and "RuntimeError: flaky" in res["failed_before"][0]


def test_failure_keeps_the_childrens_errors() -> None:
    log = ("noise\n[rank1]: RuntimeError: gloo broke\n  File \"x/torch/distributed/elastic/api.py\"\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
           "  exitcode  : -6 (pid: 1)  (SIGABRT)\n[rank1]: RuntimeError: gloo broke\n")
    assert _torchrun.failure(log) == "[rank1]: RuntimeError: gloo broke\nexitcode  : -6 (pid: 1)  (SIGABRT)"
    assert _torchrun.failure("just this") == "just this"


TINY = dict(stages=2, layers=4, width=8, batch=8, microbatches=4)


def test_pipeline_compare_without_and_with_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    import _pipeline_vs_torch as pvt

    spec = pvt.MLPSpec(**TINY)
    monkeypatch.setattr(pvt, "torchrun", lambda *a, **k: (None, "torch is not installed"))
    r = pvt.compare(spec, rounds=2, reps=1)
    assert r["ratio_vs_torch_pipelining"] is None and r["torch_note"] == "torch is not installed"
    assert set(r["jaxps_samples_per_sec"]) == {"gpipe", "1f1b", "interleaved"}
    assert all(len(v) == 2 for v in r["jaxps_samples_per_sec_rounds"].values())
    fake = {"peer": "torch.distributed.pipelining", "samples_per_sec": {"gpipe": 1.0, "1f1b": 2.0}}
    seen: list[list[str]] = []
    monkeypatch.setattr(pvt, "torchrun", lambda script, n, args, t: (seen.append(args), (fake, None))[1])
    r = pvt.compare(spec, rounds=3, reps=1)
    assert len(seen) == 3 and seen[0][seen[0].index("--width") + 1] == "8"
    assert r["torch_samples_per_sec"] == {"gpipe": 1.0, "1f1b": 2.0} and r["torch_note"] is None
    assert r["ratio_vs_torch_pipelining"] == pytest.approx(max(r["jaxps_samples_per_sec"].values()) / 2.0)


def test_real_torch_pipeline_peer() -> None:
    """The peer script itself under torchrun (tiny sizes); only where torch is installed."""
    why = _torchrun.missing("torch")
    if why:
        pytest.skip(f"torch peer not run: {why}")
    import _pipeline_vs_torch as pvt

    res, why = _torchrun.torchrun("peers_torch_pipeline.py", 2, pvt.MLPSpec(**TINY).peer_args(1, 1), 120)
    assert why is None, why
    assert set(res["samples_per_sec"]) == {"gpipe", "1f1b", "interleaved"} and res["processes"] == 2


def _wide_deep_batches(n: int, batch: int):
    from jaxps.data import PlantedModel, SyntheticConfig

    data, _ = PlantedModel(SyntheticConfig(num_fields=39, vocab_size=100, seed=0)).sample(n * batch, seed=1)
    return [data.slice(i, i + batch) for i in range(0, data.size, batch)]


def test_torchrec_run_without_and_with_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import numpy as np

    import host_vs_device as hvd

    args = argparse.Namespace(rows=1000, batch=32, dim=4, hidden=[8, 4], torchrec_procs=2)
    batches = _wide_deep_batches(3, 32)
    monkeypatch.setattr(hvd, "missing", lambda *m: "torchrec is not installed")
    assert hvd.torchrec_run(batches, args) == (None, "torchrec is not installed")
    monkeypatch.setattr(hvd, "missing", lambda *m: None)

    def fake(script: str, n: int, argv: list, timeout: float, **kw: object):
        data = np.load(argv[argv.index("--data") + 1])
        assert script == "peers_torchrec.py" and n == 2
        assert data["rows"].shape == (96, 39) and data["rows"].max() < 1000 and data["labels"].shape == (96,)
        assert argv[argv.index("--hidden") + 1:][:2] == [8, 4]  # the tower jaxps runs
        return {"samples_per_sec": 10.0}, None
    monkeypatch.setattr(hvd, "torchrun", fake)
    assert hvd.torchrec_run(batches, args) == ({"samples_per_sec": 10.0}, None)


def test_real_torchrec_peer() -> None:
    """The TorchRec peer itself under torchrun (tiny tables); only where TorchRec loads."""
    why = _torchrun.missing("torch", "torchrec", "fbgemm_gpu")
    if why:
        pytest.skip(f"TorchRec peer not run: {why}")
    import argparse

    import host_vs_device as hvd

    args = argparse.Namespace(rows=1000, batch=64, dim=4, hidden=[8], torchrec_procs=2)
    res, why = hvd.torchrec_run(_wide_deep_batches(4, 64), args)
    assert why is None, why
    assert res["samples_per_sec"] > 0 and res["steps"] == 4 and res["sharding"] == "table_wise"
