"""SSP vs BSP vs ASP with a straggling worker group (Ho et al., NIPS 2013; the four-realms
article §3.2).

Four worker groups (each a Trainer on its own 2 of 8 simulated devices, in threads) train
one sparse LR model through an embedded PS group, each on its own planted-model data.
On a cluster each group has its own accelerators; here the four share two CPU cores, so
each step's device time is simulated: once the step's pull returned (the parameters are
there), the training thread waits `--device-ms` (80 ms; 3x while the group is slow), then
dispatches the step, whose push follows. Stragglers (`Straggler`):

    rotating        in each window of `--burst` nominal steps of wall time one random group
                    is slow (a noisy cluster: the straggler is whichever machine is busy
                    now). BSP pays the straggler's time on every step; SSP(s) lets the
                    others run up to s steps ahead and the slow one catch up later.
    rotating_steps  the older definition: the group drawn for a run of `--burst` step
                    numbers is slow on those steps whenever it reaches them, which ties the
                    slowness to progress (a burst of 4 slow steps puts the straggler 8 fast
                    steps behind: more than SSP(3) can absorb).
    persistent      the same group is slow all run long. SSP cannot beat this: the fastest
                    group may lead by s steps at most, so in the long run everyone moves at
                    the straggler's pace (only ASP escapes, by not waiting at all).
    none            no straggler: where, as Mu Li observed, SSP's gain should vanish (here
                    BSP still pays its barrier each step: push, clock and pull in series).

Per scenario and s in {0 (BSP), 1, 3, inf (ASP)}: test logloss of the PS model over time
(a monitor thread pulls the weights and scores a held-out set in numpy), and the wall-clock
until it reaches `target`: 90% of the way from the initial logloss to BSP's final one in
that scenario (interpolated between evaluations), with the data it took (steps per group).
The clock starts once every group finished its first (compiling) step. Per group: step
time, simulated device time, clock-gate waits, pull (waits included) and push latency.
Reported: `ssp3_vs_bsp` (rotating straggler; target <= 0.6), `ssp3_vs_bsp_rotating_steps`,
`ssp3_vs_bsp_persistent`, `ssp3_vs_bsp_no_straggler`, the curves (and a PNG with --plot).
`--no-strict` turns off read-my-writes (train.ps_strict=false), `--lr-scale` scales
SSP/ASP's learning rates: the experiments behind the README's SSP section.

Usage: python benchmarks/ssp_straggler.py [--quick] [--steps 60] [--scenarios rotating,none] [--plot]
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.data import PlantedModel, SyntheticConfig  # noqa: E402
from jaxps.dense_table import DENSE_TABLE  # noqa: E402
from jaxps.groups import WorkerGroup  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig  # noqa: E402
from jaxps.optim import rowwise  # noqa: E402
from jaxps.placement import HostTable  # noqa: E402
from jaxps.ps.client import PSClient, embedded  # noqa: E402
from jaxps.trainer import TrainConfig, Trainer  # noqa: E402

GROUPS = 4
SLOWDOWN = 3.0
ROWS = 1 << 18
STALENESS = {"bsp": "bsp", "ssp1": "ssp:1", "ssp3": "ssp:3", "asp": "asp"}


LEARNING_RATE, DENSE_LEARNING_RATE = 0.05, 1e-4


def _model(lr_scale: float = 1.0) -> SparseLR:
    return SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                   optimizer=rowwise.make("adagrad", learning_rate=LEARNING_RATE * lr_scale)))


def _config(out: str, lr_scale: float = 1.0, strict: bool = True) -> TrainConfig:
    return TrainConfig(progress=False, tensorboard=False, checkpoint=False, log_every=10_000,
                       dense_optimizer="sgd", dense_learning_rate=DENSE_LEARNING_RATE * lr_scale,
                       compilation_cache="", out_dir=out, ps_strict=strict)


class Straggler:
    """When each group is slow (SLOWDOWN x its device time).

    rotating        wall time is cut into windows of `burst` nominal steps; in each, one
                    group drawn at random is slow (a noisy cluster: the straggler is
                    whichever machine is busy now). A step that overlaps a slow window runs
                    at 1/SLOWDOWN speed for the overlap.
    rotating_steps  the group drawn for each run of `burst` step numbers is slow on those
                    steps, whenever it reaches them (the pre-2026-11 definition; it ties the
                    slowness to progress: a group that fell behind stays slow on the steps
                    the others already passed).
    persistent      the last group, all run long.
    none            nobody."""

    def __init__(self, kind: str, steps: int, burst: int, device_seconds: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kind, self.device_seconds = kind, device_seconds
        self.window = burst * device_seconds
        self.who = rng.integers(0, GROUPS, 1 << 16)       # rotating: the slow group of each window
        self.slow = np.repeat(rng.integers(0, GROUPS, -(-steps // burst)), burst)[:steps]  # rotating_steps
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self, group: int, step: int, now: float) -> float:
        """Device time of `group`'s `step` when it starts at `now` (perf_counter)."""
        d = self.device_seconds
        if self.kind == "none":
            return d
        if self.kind == "persistent":
            return d * (SLOWDOWN if group == GROUPS - 1 else 1.0)
        if self.kind == "rotating_steps":
            return d * (SLOWDOWN if self.slow[min(step, len(self.slow) - 1)] == group else 1.0)
        work, t = d, max(0.0, now - self.t0)   # rotating: integrate speed over the windows
        while True:
            w = int(t / self.window + 1e-9)
            speed = 1.0 / SLOWDOWN if self.who[w % self.who.size] == group else 1.0
            room = ((w + 1) * self.window - t) * speed
            if room >= work:
                return t + work / speed - max(0.0, now - self.t0)
            work -= room
            t = (w + 1) * self.window


def _logloss(weights: np.ndarray, bias: float, rows: np.ndarray, labels: np.ndarray) -> float:
    logits = bias + weights[rows].sum(axis=1)
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


class _Timed:
    """Seconds spent in a callable (wraps a bound method of one group's objects)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def run(sync: str, straggler: Straggler, data, test, tmp: str, interval: float,
        lr_scale: float = 1.0, strict: bool = True, bsp_lr_scale: float = 1.0) -> dict:
    """One training run of the four groups; returns its logloss curve and where the time went.

    Device time is simulated after the step's pull returned (on the training thread, just
    before the step is dispatched), as on an accelerator: read the parameters, compute,
    push. lr_scale multiplies SSP/ASP's learning rates, bsp_lr_scale BSP's (a baseline
    tuned on its own: BSP applies one summed update per step where SSP/ASP apply G)."""
    scale = bsp_lr_scale if sync == "bsp" else lr_scale
    ps = embedded([], servers=2)
    trainers = [Trainer(_model(scale), make_mesh(MeshConfig(), jax.devices()[2 * g:2 * g + 2]),
                        _config(os.path.join(tmp, sync), scale, strict), ps=PSClient(ps.ring, ps.transports, []),
                        group=WorkerGroup(g, GROUPS, sync)) for g in range(GROUPS)]
    reader = trainers[0].steps.host.ps
    server0 = ps.transports["ps-0"].server
    rows_test, labels = test
    errors, curve, evals = [], [], []
    done = threading.Event()
    steps_log = [[] for _ in range(GROUPS)]   # per group: (start, simulated device seconds)
    pushes = []
    for g, tr in enumerate(trainers):
        step_fn = tr.steps.train_step

        def device_step(state, dev, g=g, step_fn=step_fn):
            now = time.perf_counter()
            d = straggler.seconds(g, len(steps_log[g]), now)
            steps_log[g].append((now, d))
            time.sleep(d)
            return step_fn(state, dev)
        tr.steps.train_step = device_step
        client = tr.steps.host.ps
        client.push = _Timed(client.push)
        pushes.append(client.push)

    def train(g):
        try:
            trainers[g].fit(data[g])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def monitor():
        t0 = None
        while not done.is_set():
            clocks = server0.clocks.clocks() if server0.clocks.groups else [0]
            if t0 is None and min(clocks) >= 1:
                t0 = time.perf_counter()
            if t0 is not None:
                e0 = time.perf_counter()
                w = reader.pull("weights", np.arange(ROWS, dtype=np.uint64))[:, 0]
                bias = float(reader.pull(DENSE_TABLE, np.zeros(1, np.uint64))[0, 0])
                loss = _logloss(w, bias, rows_test, labels)
                evals.append(time.perf_counter() - e0)
                # (seconds, logloss, steps trained per group on average: the data seen)
                curve.append((e0 - t0, loss, float(np.mean([min(c, len(data[0])) for c in clocks]))))
            done.wait(interval)

    threads = [threading.Thread(target=train, args=(g,)) for g in range(GROUPS)]
    mon = threading.Thread(target=monitor)
    straggler.start()
    for t in threads:
        t.start()
    mon.start()
    for t in threads:
        t.join(600)
    done.set()
    mon.join()
    if errors:
        raise errors[0]
    w = reader.pull("weights", np.arange(ROWS, dtype=np.uint64))[:, 0]
    bias = float(reader.pull(DENSE_TABLE, np.zeros(1, np.uint64))[0, 0])
    final = _logloss(w, bias, rows_test, labels)
    sync_stats = trainers[0].steps.host.stats().get("__sync__", {})
    end = curve[-1][0] if curve else 0.0
    per_group = []
    for g, tr in enumerate(trainers):
        log = steps_log[g][1:]            # the first (compiling) step is not timed
        starts = np.array([t for t, _ in log])
        n = len(steps_log[g])
        per_group.append({
            "step_seconds": float(np.mean(np.diff(starts))) if len(starts) > 1 else None,
            "device_seconds": float(np.mean([d for _, d in log])) if log else None,
            "gate_wait_seconds": server0.clocks.group_wait_seconds[g],
            "pull_seconds": tr.steps.host.pull_seconds / n,   # per step, gate waits included
            "push_seconds": pushes[g].seconds / max(pushes[g].calls, 1),
        })
    return {"curve": curve, "final_logloss": final, "seconds": end,
            "wait_seconds": sync_stats.get("wait_seconds"), "max_gap": sync_stats.get("max_gap"),
            "groups": per_group, "eval_seconds": float(np.median(evals)) if evals else None,
            "eval_spacing": float(np.median(np.diff([c[0] for c in curve]))) if len(curve) > 1 else None}


def to_target(curve, target: float) -> tuple[float | None, float | None]:
    """(seconds, steps per group) when the curve first reached `target`; the time between
    two evaluations is interpolated linearly (the eval interval no longer quantises it)."""
    for i, (t, loss, steps) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return t, steps
            t0, l0, s0 = curve[i - 1]
            f = (l0 - target) / (l0 - loss) if l0 > loss else 1.0
            return t0 + f * (t - t0), s0 + f * (steps - s0)
    return None, None


def _ratio(by_sync: dict) -> float | None:
    return by_sync["ssp3"] / by_sync["bsp"] if by_sync.get("ssp3") is not None and by_sync.get("bsp") else None


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per group (default 60, quick 24)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--burst", type=int, default=4, help="rotating straggler: nominal steps before it moves")
    p.add_argument("--device-ms", type=float, default=80.0, help="simulated device time per step")
    p.add_argument("--scenarios", default="rotating,rotating_steps,persistent,none",
                   help="comma list of rotating, rotating_steps, persistent, none")
    p.add_argument("--lr-scale", type=float, default=1.0, help="SSP/ASP learning rates x this (BSP keeps its)")
    p.add_argument("--bsp-lr-scale", type=float, default=1.0, help="BSP's learning rates x this (tune the baseline)")
    p.add_argument("--no-strict", action="store_true",
                   help="train.ps_strict=false: SSP/ASP groups do not read their own writes")
    p.add_argument("--plot", action="store_true", help="write ssp_straggler.png (matplotlib)")
    args = p.parse_args()
    steps = args.steps or (24 if args.quick else 60)
    planted = PlantedModel(SyntheticConfig(num_fields=24, vocab_size=20_000))
    table = _model().tables()[0]
    data = []
    for g in range(GROUPS):
        batches = [planted.sample(args.batch, 1000 * g + k)[0] for k in range(steps)]
        data.append(batches)
    test_batch, _ = planted.sample(20_000, 999_999)
    test = (table.rows_for(test_batch.ids), test_batch.labels.astype(np.float64))
    initial = _logloss(np.zeros(ROWS), 0.0, *test)

    tmp = tempfile.mkdtemp(prefix="jaxps-ssp-")
    # one group's step time alone (compiled first): the real work next to the simulated device time
    solo = Trainer(_model(), make_mesh(MeshConfig(), jax.devices()[:2]), _config(os.path.join(tmp, "solo")))
    solo.fit(data[0][:3])
    t0 = time.perf_counter()
    solo.fit(data[0][3:13])
    step_seconds = (time.perf_counter() - t0) / 10
    device_seconds = args.device_ms / 1000.0
    interval = device_seconds / 2

    result = {"benchmark": "ssp_straggler", "groups": GROUPS, "slowdown": SLOWDOWN, "steps_per_group": steps,
              "batch": args.batch, "burst": args.burst, "step_seconds_alone": step_seconds,
              "device_seconds": device_seconds, "initial_logloss": initial, "lr_scale": args.lr_scale,
              "bsp_lr_scale": args.bsp_lr_scale,
              "strict": not args.no_strict, "quick": args.quick, "machine": machine_info(), "scenarios": {}}
    for scenario in args.scenarios.split(","):
        runs = {name: run(sync, Straggler(scenario, steps, args.burst, device_seconds), data, test, tmp,
                          interval, args.lr_scale, not args.no_strict, args.bsp_lr_scale)
                for name, sync in STALENESS.items()}
        target = initial - 0.9 * (initial - runs["bsp"]["final_logloss"])
        reached = {name: to_target(r["curve"], target) for name, r in runs.items()}
        times = {n: t for n, (t, _) in reached.items()}
        result["scenarios"][scenario] = {
            "target_logloss": target,
            "seconds_to_target": times,
            "steps_to_target": {n: s for n, (_, s) in reached.items()},   # per group: the data it took
            "final_logloss": {n: r["final_logloss"] for n, r in runs.items()},
            "run_seconds": {n: r["seconds"] for n, r in runs.items()},
            "wait_seconds": {n: r["wait_seconds"] for n, r in runs.items()},
            "max_clock_gap": {n: r["max_gap"] for n, r in runs.items()},
            "groups": {n: r["groups"] for n, r in runs.items()},
            "eval_seconds": {n: r["eval_seconds"] for n, r in runs.items()},
            "eval_spacing": {n: r["eval_spacing"] for n, r in runs.items()},
            "curves": {n: [[round(t, 4), round(l, 6), round(c, 2)] for t, l, c in r["curve"]]
                       for n, r in runs.items()},
        }
        print(f"{scenario:14s} target {target:.4f}  " + "  ".join(
            f"{n} {'-' if t is None else f'{t:.2f}s/{s:.1f}st'}" for n, (t, s) in reached.items())
            + "  end " + " ".join(f"{n} {r['seconds']:.1f}s {r['final_logloss']:.4f}" for n, r in runs.items()),
            flush=True)

    def ratio(scenario):
        return _ratio(result["scenarios"][scenario]["seconds_to_target"]) if scenario in result["scenarios"] else None

    # time to target = data to target x time per step: each part SSP(3) / BSP, per scenario
    # (the data part carries the optimizer's difference: G pushes vs one summed update)
    result["ssp3_vs_bsp_parts"] = {
        sc: {"time_to_target": ratio(sc),
             "steps_to_target": _ratio(r["steps_to_target"]),
             "run_seconds": _ratio(r["run_seconds"])} for sc, r in result["scenarios"].items()}
    result["ssp3_vs_bsp"] = ratio("rotating")
    result["ssp3_vs_bsp_rotating_steps"] = ratio("rotating_steps")
    result["ssp3_vs_bsp_persistent"] = ratio("persistent")
    result["ssp3_vs_bsp_no_straggler"] = ratio("none")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(result["scenarios"]), figsize=(5 * len(result["scenarios"]), 4),
                                 sharey=True, squeeze=False)
        for ax, (scenario, sc) in zip(axes[0], result["scenarios"].items()):
            for name, curve in sc["curves"].items():
                if curve:
                    ax.plot([c[0] for c in curve], [c[1] for c in curve], label=name)
            ax.axhline(sc["target_logloss"], color="grey", linestyle=":")
            ax.set_title(f"straggler: {scenario}")
            ax.set_xlabel("seconds")
        axes[0][0].set_ylabel("test logloss")
        axes[0][0].legend()
        os.makedirs(args.out, exist_ok=True)
        fig.savefig(os.path.join(args.out, "ssp_straggler.png"), dpi=100, bbox_inches="tight")
        result["plot"] = os.path.join(args.out, "ssp_straggler.png")
    emit("ssp_straggler", result, args.out)


if __name__ == "__main__":
    main()
