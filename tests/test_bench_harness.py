"""benchmarks/run_all.py and _common.py on dummy scripts (no peers, no VW)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402
import run_all  # noqa: E402

GOOD = """
import sys
sys.path.insert(0, {bench!r})
from _common import emit, parser
args = parser("dummy").parse_args()
print("some log line")
emit("dummy", {{"quick": args.quick, "rows_per_sec": 1234.5, "ratio_vs_vw": 1.5,
               "nested": {{"ratio_vs_sklearn": 2.25, "note": "x"}}}}, args.out)
"""
BAD = """
import sys
print("starting", flush=True)
print("something broke: CANARY", file=sys.stderr)
sys.exit(3)
"""


@pytest.fixture()
def scripts(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "good.py").write_text(textwrap.dedent(GOOD.format(bench=str(BENCH))))
    (d / "bad.py").write_text(BAD)
    (d / "_helper.py").write_text("raise SystemExit('helpers must not run')\n")
    (d / "peers.py").write_text("raise SystemExit('peers must not run')\n")
    (d / "peers_torch_x.py").write_text("raise SystemExit('peer runners must not run')\n")
    return d


def test_report_chart_and_failure(scripts: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    rc = run_all.main(["--out", str(out), "--timeout", "60"], scripts_dir=scripts)
    assert rc != 0
    report = (out / "report.md").read_text()
    assert "## good" in report and "**ratio_vs_vw**" in report and "**1.5**" in report
    assert "nested.ratio_vs_sklearn" in report and "rows_per_sec" in report
    assert "| quick | True |" in report  # --quick passed by default
    assert "### bad: exit status 3" in report and "CANARY" in report
    assert "_helper" not in report and "peers" not in report
    png = out / "good_ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(good_ratios.png)" in report
    assert json.loads((out / "dummy.json").read_text())["ratio_vs_vw"] == 1.5


def test_only_and_full(scripts: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert run_all.main(["--out", str(out), "--only", "good", "--full"], scripts_dir=scripts) == 0
    report = (out / "report.md").read_text()
    assert "| quick | False |" in report and "bad" not in report
    assert run_all.main(["--out", str(out), "--only", "nope"], scripts_dir=scripts) == 1


def test_timeout_and_non_json(tmp_path: Path) -> None:
    d = tmp_path / "b"
    d.mkdir()
    (d / "slow.py").write_text("import time\ntime.sleep(30)\n")
    (d / "nojson.py").write_text("print('not json')\n")
    out = tmp_path / "r"
    assert run_all.main(["--out", str(out), "--timeout", "2"], scripts_dir=d) == 1
    report = (out / "report.md").read_text()
    assert "timeout after 2s" in report and "not JSON" in report


def test_emit_last_line_and_timer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    print("noise")
    path = _common.emit("x", {"a": np.float32(1.5), "b": np.arange(2), "c": float("nan")},
                        tmp_path)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["a"] == 1.5 and json.loads(last)["b"] == [0, 1]
    assert json.loads(path.read_text())["a"] == 1.5
    with _common.timer() as t:
        pass
    assert 0 <= t.seconds < 1
    info = _common.machine_info()
    assert info["cpu_count"] and info["numpy"]
    args = _common.parser("d").parse_args([])
    assert args.out == "bench_results" and not args.quick


def test_peers_parser_and_vw_conversion(tmp_path: Path) -> None:
    """sklearn's CSR batches (from jaxps's reader) and the VW converter (VW is not run)."""
    import numpy as np

    import peers

    src = tmp_path / "a.svm"
    src.write_text("1 3:1 5:0.5e1 # c 7:1\n\n-1 2:-1.25\n1 4:2\n0")
    for bs in (1, 2, 3, 10):
        batches = [(x.toarray(), y) for x, y in peers.iter_csr_batches(src, bs, 3, 4)]
        assert [b[1].size for b in batches] == [bs] * (4 // bs) + [4 % bs] * (4 % bs > 0)
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        assert y.tolist() == [1, 0, 1, 0]
        assert x[0, 3] == 1 and x[0, 5] == 5 and x[0].sum() == 6  # comment dropped
        assert x[1, 2] == -1.25 and x[1].sum() == -1.25
        assert x[2, 4] == 2 and x[3].sum() == 0
    big = tmp_path / "big.svm"
    (tmp_path / "big.svm").write_text("1 9:1 17:2\n" * 5 + "0 3:1\n")
    (x, y), = list(peers.iter_csr_batches(big, 100, 3, 2))  # 9 % 8, 17 % 8 == 1
    assert x.shape == (6, 8) and x[0, 1] == 3 and y.tolist() == [1] * 5 + [0]
    dst = tmp_path / "a.vw"
    assert peers.libsvm_to_vw(src, dst) == 5
    assert dst.read_text().splitlines()[0] == "1 |f 3:1 5:0.5e1 # c 7:1"
    assert [ln.split()[0] for ln in dst.read_text().splitlines() if ln.strip()] == \
        ["1", "-1", "1", "-1"]
    simple = tmp_path / "s.svm"
    simple.write_text("0 1:1\n1 2:1\n")  # the bytes.replace fast path
    peers.libsvm_to_vw(simple, dst)
    assert dst.read_text() == "-1 |f 1:1\n1 |f 2:1\n"


def test_run_sklearn_small(tmp_path: Path) -> None:
    import peers

    from jaxps.data import SyntheticConfig, generate_dataset

    generate_dataset(tmp_path, 3000, 1000, SyntheticConfig(num_fields=5, vocab_size=20))
    train, test = tmp_path / "train.svm", tmp_path / "test.svm"
    r = peers.run_sklearn(train, test, bits=12, batch_size=1000, eta0=0.05, max_nnz=5)
    assert r["train_examples"] == 3000 and r["test_examples"] == 1000
    assert r["examples_per_sec"] > 0 and 0.5 < r["auc"] <= 1 and r["logloss"] < 0.7


def test_pipeline_bubble_layout_and_env() -> None:
    """One device per core (NPROC=1), at least 2 stages; other XLA flags survive."""
    import pipeline

    assert pipeline.bubble_layout(4, 2) == {"stages": 2, "devices": 2, "threads": 1}
    assert pipeline.bubble_layout(4, 16) == {"stages": 4, "devices": 4, "threads": 1}
    assert pipeline.bubble_layout(4, 1) is None
    env = pipeline.bubble_env({"stages": 2, "devices": 2, "threads": 1},
                              {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d",
                               "HOME": "/h"})
    flags = env["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=2" in flags and "--xla_dump_to=/tmp/d" in flags
    assert not any(f.endswith("=8") for f in flags)
    assert set(pipeline.BUBBLE_XLA_FLAGS) <= set(flags) and env["NPROC"] == "1" and env["HOME"] == "/h"
    assert env["GLIBC_TUNABLES"] == pipeline.MALLOC_KEEP  # set unless the caller's env has its own
    assert pipeline.bubble_env({"stages": 2, "devices": 2, "threads": 1}, env) == env  # idempotent


def test_pipeline_bubble_estimates_closed_form() -> None:
    """Synthetic step times T(M) = span + c * ticks, with a span the lockstep model gives at
    the op costs: both estimates of u recover the busy time, so GPipe's measured bubble is
    its theory, a split kind's is its lockstep bubble at those costs plus what c adds, and
    the overhead per tick comes back as c."""
    import pipeline
    from jaxps.parallel.schedule import build

    S, c = 2, 2e-4
    ops = {"F": 1e-3, "BW": 2e-3, "B": 1.2e-3, "W": 0.8e-3}
    u = pipeline.busy_direct("gpipe", ops)
    assert u == pytest.approx(3e-3) and pipeline.busy_direct("zb-h1", ops) == pytest.approx(3e-3)

    def step(kind: str, M: int, V: int = 1) -> float:
        sched = build(kind, S, M, V)
        cost = {"F": ops["F"], "B": ops["B"] if sched.split else ops["BW"], "W": ops["W"]}
        return sched.lockstep_span(cost) + c * sched.ticks

    gpipe = {M: step("gpipe", M) for M in (2, 4, 6, 8)}
    fit = pipeline.busy_per_microbatch(S, gpipe)  # T = (M + 1) u + 2 (M + 1) c: slope u + 2c
    assert fit["busy_s_per_microbatch"] == pytest.approx(u + 2 * c)
    g = pipeline.bubble("gpipe", S, 1, gpipe, {"direct": u, "slope": fit["busy_s_per_microbatch"]}, ops)
    T8 = gpipe[8]
    assert g["bubble_estimator"] == "direct" and g["bubble_measured"] == g["bubble_measured_direct"]
    assert g["bubble_measured_direct"] == pytest.approx(1 - 8 * u / T8)
    assert g["bubble_measured_slope"] == pytest.approx(1 - 8 * (u + 2 * c) / T8)
    assert g["bubble_lockstep_measured_ops"] == pytest.approx(g["bubble_theory"]) == pytest.approx(1 / 9)
    assert g["overhead_s_per_tick"] == pytest.approx(c)
    zb = pipeline.bubble("zb-h1", S, 1, {8: step("zb-h1", 8)}, {"direct": u}, ops)
    span = step("zb-h1", 8) - c * build("zb-h1", S, 8).ticks
    assert zb["bubble_lockstep_measured_ops"] == pytest.approx(1 - 8 * u / span)
    assert zb["bubble_lockstep_measured_ops"] > zb["bubble_lockstep_model"]  # B costs more than W here
    assert zb["overhead_s_per_tick"] == pytest.approx(c) and zb["bubble_ratio"] == zb["bubble_ratio_direct"]
    only_slope = pipeline.bubble("gpipe", S, 1, gpipe, {"slope": u})
    assert only_slope["bubble_estimator"] == "slope" and "overhead_s_per_tick" not in only_slope


def test_pipeline_family_pick_is_the_tables_not_the_measurements() -> None:
    """Each family's headline schedule is its table with the lowest unit-cost lockstep
    bubble (zb-h1 for 1F1B: the default), whatever was measured: a noisy measurement
    cannot pick a family's figure."""
    import pipeline
    from jaxps.parallel.schedule import DEFAULT

    kinds = {k: {"family": pipeline.family(k), "virtual": V,
                 "measured_vs_theory": 9.0 if k in ("gpipe-split", "zb-h1", "interleaved-zb") else 0.5}
             for k, V in pipeline.SCHEDULES}
    best = pipeline.best_per_family(kinds, 2, 8)
    assert best == pipeline.best_per_family(kinds, 4, 16)
    assert {f: b["kind"] for f, b in best.items()} == {"gpipe": "gpipe-split", "1f1b": DEFAULT,
                                                       "interleaved": "interleaved-zb"}
    assert all(b["measured_vs_theory"] == 9.0 for b in best.values())


def test_trace_idle_fractions_closed_form() -> None:
    """A step runs from one host launch to the next; its pipelined part from the end of its
    first rendezvous of all devices (the start barrier) to the last event on a device
    thread (one that holds rendezvous). Idle = waits inside that part over devices x its
    length: waits before the barrier (a late launch) and on other threads' spans do not
    count. A step with fewer rendezvous than devices is skipped; no launches, no steps."""
    import _trace_idle as ti

    def ev(name, ts, dur, tid=1):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid}
    launch = ti.LAUNCH + "jit_step)"
    events = [ev(launch, 0, 1, tid=9), ev("[0] " + launch, 0, 1, tid=9),
              ev(ti.RENDEZVOUS, 1, 9, tid=1), ev(ti.WAIT + "1/2", 1, 9, tid=1),   # device 1 waits for the launch
              ev(ti.RENDEZVOUS, 8, 2, tid=2),                                     # barrier done at 10
              ev(ti.RENDEZVOUS, 30, 25, tid=2), ev(ti.WAIT + "1/2", 30, 20, tid=2),
              ev(ti.RENDEZVOUS, 52, 3, tid=1),
              ev("dot", 55, 45, tid=1),                                           # ends at 100
              ev("python work", 0, 500, tid=9),                                   # not a device thread
              ev(launch, 200, 1, tid=9),                                          # step 2: one rendezvous only
              ev(ti.RENDEZVOUS, 210, 5, tid=1)]
    assert ti.step_idle_fractions(events, 2) == pytest.approx([20 / (2 * 90)])
    assert ti.step_idle_fractions([ev(ti.WAIT + "1/2", 0, 5)], 2) == []


def test_pipeline_bubble_headline_is_the_traced_idle() -> None:
    """With a traced idle fraction the headline is it (over the theory); the direct and
    slope estimates stay beside it."""
    import pipeline

    ops = {"F": 1e-3, "BW": 2e-3, "B": 1.2e-3, "W": 0.8e-3}
    times = {8: 0.03}
    out = pipeline.bubble("gpipe", 2, 1, times, {"direct": 3e-3}, ops, {"median": 0.125, "steps": [0.12, 0.125, 0.2]})
    assert out["bubble_estimator"] == "trace" and out["bubble_measured"] == 0.125
    assert out["bubble_ratio"] == pytest.approx(0.125 * 9) and out["bubble_trace_steps"] == [0.12, 0.125, 0.2]
    assert out["bubble_measured_direct"] == pytest.approx(1 - 8 * 3e-3 / 0.03)


def test_pipeline_bubble_subprocess_runs_on_its_layout() -> None:
    """The bubble subprocess gets its own device count from bubble_env and returns every
    (schedule, M) step time and op time (tiny sizes: the values are not checked)."""
    import pipeline

    layout = {"stages": 2, "devices": 2, "threads": 1}
    cfg = {"stages": 2, "width": 128, "batch": 32, "layout": layout, "counts": [2, 4],
           "schedules": [["gpipe", 1], ["zb-h1", 1]], "rounds": 1, "reps": 1, "trace_steps": 3}
    out, why = pipeline.bubble_in_subprocess(cfg, timeout=300)
    assert why is None, why
    assert out["layout"] == layout and out["process_devices"] == 2
    assert set(out["step_seconds"]["gpipe"]) == {2, 4} and set(out["step_seconds"]["zb-h1"]) == {4}
    assert set(out["op_seconds"]) == {"F", "BW", "B", "W"} and min(out["op_seconds"].values()) > 0
    for kind in ("gpipe", "zb-h1"):  # the profiler's trace of trace_steps steps at the largest M
        idle = out["idle"][kind]
        assert idle is not None and len(idle["steps"]) == 3 and all(0 <= f < 1 for f in idle["steps"]), idle
