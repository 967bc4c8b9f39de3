"""SSP vs BSP vs ASP with a straggling worker group (Ho et al., NIPS 2013; the four-realms
article §3.2).

Four worker groups (each a Trainer on its own 2 of 8 simulated devices, in threads) train
one sparse LR model through an embedded PS group, each on its own planted-model data.
On a cluster each group has its own accelerators; here the four share two CPU cores, so
each step's device time is simulated: the group's input waits `--device-ms` per step
(the slow group 3x that), which dominates the real (shared) CPU work. One group at a
time is slowed 3x:

    rotating    the slow group changes every few steps, at random (a noisy cluster: the
                straggler is whichever machine is busy now). BSP pays the straggler's time
                on every step; SSP(s) lets the others run up to s steps ahead and the slow
                one catch up later, so its rate approaches the groups' average rate.
    persistent  the same group is slow all run long. SSP cannot beat this: the fastest
                group may lead by s steps at most, so in the long run everyone moves at the
                straggler's pace (only ASP escapes, by not waiting at all).
    none        no straggler: where, as Mu Li observed, SSP's gain should vanish.

Per scenario and s in {0 (BSP), 1, 3, inf (ASP)}: test logloss of the PS model over time
(a monitor thread pulls the weights and scores a held-out set in numpy), and the
wall-clock until it reaches `target`: 90% of the way from the initial logloss to BSP's
final one in that scenario. The clock starts once every group finished its first
(compiling) step. Reported: `ssp3_vs_bsp` (rotating straggler; target <= 0.6),
`ssp3_vs_bsp_persistent`, `ssp3_vs_bsp_no_straggler`, the curves (and a PNG with --plot).

Usage: python benchmarks/ssp_straggler.py [--quick] [--steps 60] [--plot]
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


def _model() -> SparseLR:
    return SparseLR(SparseLRConfig(rows=ROWS, placement=HostTable("hashed"),
                                   optimizer=rowwise.make("adagrad", learning_rate=0.05)))


def _config(out: str) -> TrainConfig:
    return TrainConfig(progress=False, tensorboard=False, checkpoint=False, log_every=10_000,
                       dense_optimizer="sgd", dense_learning_rate=1e-4, compilation_cache="", out_dir=out)


class Slowdown:
    """Which group is slow at each step: `rotating` (a random group every `burst` steps),
    `persistent` (the last group), or `none`."""

    def __init__(self, kind: str, steps: int, burst: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        if kind == "rotating":
            slow = np.repeat(rng.integers(0, GROUPS, -(-steps // burst)), burst)[:steps]
        elif kind == "persistent":
            slow = np.full(steps, GROUPS - 1)
        else:
            slow = np.full(steps, -1)
        self.slow = slow

    def delayed(self, batches, group: int, device_seconds: float):
        """The group's batches, each after its simulated device time (SLOWDOWN x when the
        group is the slow one at that step)."""
        for k, b in enumerate(batches):
            time.sleep(device_seconds * (SLOWDOWN if self.slow[k] == group else 1.0))
            yield b


def _logloss(weights: np.ndarray, bias: float, rows: np.ndarray, labels: np.ndarray) -> float:
    logits = bias + weights[rows].sum(axis=1)
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def run(sync: str, slowdown: Slowdown, data, test, device_seconds: float, tmp: str,
        interval: float) -> dict:
    """One training run of the four groups; returns its logloss curve."""
    ps = embedded([], servers=2)
    trainers = [Trainer(_model(), make_mesh(MeshConfig(), jax.devices()[2 * g:2 * g + 2]),
                        _config(os.path.join(tmp, sync)), ps=PSClient(ps.ring, ps.transports, []),
                        group=WorkerGroup(g, GROUPS, sync)) for g in range(GROUPS)]
    reader = trainers[0].steps.host.ps
    server0 = ps.transports["ps-0"].server
    rows_test, labels = test
    errors, curve = [], []
    done = threading.Event()

    def train(g):
        try:
            trainers[g].fit(slowdown.delayed(data[g], g, device_seconds))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def monitor():
        t0 = None
        while not done.is_set():
            clocks = server0.clocks.clocks() if server0.clocks.groups else [0]
            if t0 is None and min(clocks) >= 1:
                t0 = time.perf_counter()
            if t0 is not None:
                w = reader.pull("weights", np.arange(ROWS, dtype=np.uint64))[:, 0]
                bias = float(reader.pull(DENSE_TABLE, np.zeros(1, np.uint64))[0, 0])
                curve.append((time.perf_counter() - t0, _logloss(w, bias, rows_test, labels),
                              int(np.mean([min(c, 1 << 30) for c in clocks]))))
            done.wait(interval)

    threads = [threading.Thread(target=train, args=(g,)) for g in range(GROUPS)]
    mon = threading.Thread(target=monitor)
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
    return {"curve": curve, "final_logloss": final, "seconds": end,
            "wait_seconds": sync_stats.get("wait_seconds"), "max_gap": sync_stats.get("max_gap")}


def time_to(curve, target: float) -> float | None:
    for t, loss, _ in curve:
        if loss <= target:
            return t
    return None


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per group (default 60, quick 30)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--burst", type=int, default=4, help="rotating straggler: steps before it moves")
    p.add_argument("--device-ms", type=float, default=80.0, help="simulated device time per step")
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
    # one group's step time alone (compiled first), which the straggler's pause scales
    solo = Trainer(_model(), make_mesh(MeshConfig(), jax.devices()[:2]), _config(os.path.join(tmp, "solo")))
    solo.fit(data[0][:3])
    t0 = time.perf_counter()
    solo.fit(data[0][3:13])
    step_seconds = (time.perf_counter() - t0) / 10
    device_seconds = args.device_ms / 1000.0
    interval = device_seconds / 2

    result = {"benchmark": "ssp_straggler", "groups": GROUPS, "slowdown": SLOWDOWN, "steps_per_group": steps,
              "batch": args.batch, "step_seconds_alone": step_seconds, "device_seconds": device_seconds, "initial_logloss": initial,
              "quick": args.quick, "machine": machine_info(), "scenarios": {}}
    for scenario in ("rotating", "persistent", "none"):
        slowdown = Slowdown(scenario, steps, args.burst)
        runs = {name: run(sync, slowdown, data, test, device_seconds, tmp, interval)
                for name, sync in STALENESS.items()}
        target = initial - 0.9 * (initial - runs["bsp"]["final_logloss"])
        times = {name: time_to(r["curve"], target) for name, r in runs.items()}
        result["scenarios"][scenario] = {
            "target_logloss": target,
            "seconds_to_target": times,
            "final_logloss": {n: r["final_logloss"] for n, r in runs.items()},
            "run_seconds": {n: r["seconds"] for n, r in runs.items()},
            "wait_seconds": {n: r["wait_seconds"] for n, r in runs.items()},
            "max_clock_gap": {n: r["max_gap"] for n, r in runs.items()},
            "curves": {n: [[round(t, 4), round(l, 6)] for t, l, _ in r["curve"]] for n, r in runs.items()},
        }
        print(f"{scenario:10s} target {target:.4f}  " + "  ".join(
            f"{n} {times[n] if times[n] is None else round(times[n], 2)}s" for n in STALENESS), flush=True)

    def ratio(scenario):
        t = result["scenarios"][scenario]["seconds_to_target"]
        return t["ssp3"] / t["bsp"] if t["ssp3"] is not None and t["bsp"] else None

    result["ssp3_vs_bsp"] = ratio("rotating")
    result["ssp3_vs_bsp_persistent"] = ratio("persistent")
    result["ssp3_vs_bsp_no_straggler"] = ratio("none")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
        for ax, (scenario, sc) in zip(axes, result["scenarios"].items()):
            for name, curve in sc["curves"].items():
                if curve:
                    ax.plot(*zip(*curve), label=name)
            ax.axhline(sc["target_logloss"], color="grey", linestyle=":")
            ax.set_title(f"straggler: {scenario}")
            ax.set_xlabel("seconds")
        axes[0].set_ylabel("test logloss")
        axes[0].legend()
        os.makedirs(args.out, exist_ok=True)
        fig.savefig(os.path.join(args.out, "ssp_straggler.png"), dpi=100, bbox_inches="tight")
        result["plot"] = os.path.join(args.out, "ssp_straggler.png")
    emit("ssp_straggler", result, args.out)


if __name__ == "__main__":
    main()
