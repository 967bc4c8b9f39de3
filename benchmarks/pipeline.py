"""Pipeline schedules executed as one SPMD program: bubble vs theory, 1F1B (and zero bubble) vs GPipe memory.

Bubble, from per-stage busy time: for M in a few counts, time a pipelined value-and-grad
step of an MLP stack (S stages of Linear+tanh, residual). A stage's busy time per
microbatch u (one block's forward and backward, with the executor's per-op costs) is the
slope of GPipe's step time in M: GPipe's ticks are all-forward or all-backward, so
T(M) = (M + S - 1) * u + fixed, exactly linear. Every schedule runs the same ops, so its
bubble at M is 1 - V*M*u / T(M) (V virtual chunks, each one block here), compared with
(S-1)/(M+S-1) (GPipe, 1F1B) and the circular form (S-1)/(V*M+S-1) (interleaved). (A
slope fit of each schedule's own T(M) would hide idle time that grows with M in the
slope.) Timings are the minimum over rounds that interleave every (schedule, M), so a
busy neighbour only makes a round slower, never the figure.

`bubble_lockstep_model` is what the table predicts for this executor: its ticks are
synchronous (a ppermute ends each), so a tick lasts as long as its slowest op on any
stage, and where 1F1B and interleaved run a forward beside a backward the forward's
stage waits (`Schedule.lockstep_bubble`, backward = 2 forwards, the pullback's matmuls).
GPipe's equals theory; 1F1B's and interleaved's exceed it, and the measurement shows it.
Their paired forms ("1f1b-paired", "interleaved-paired": a tick carries a forward and a
backward on each stage in the steady state) predict theory again; paired 1F1B pays with
2S-1 stash entries instead of S (`memory_1f1b_paired_vs_gpipe`). "zb-h1" splits the
backward into B (input gradient) and W (weight gradient, deferred): one op per cell, each
costing about a forward, so its lockstep model (B = W = 1 forward) is its table bubble,
(S-1)/(3M+S-1), a third of the theory, with 1F1B's stash bound S; it keeps the output
gradients until the W's (`memory_zb_h1_vs_gpipe`). `zb_h1_lockstep` lists its lockstep
bubble over the theory for a few (S, M), from the tables alone. The split forms of every
family ("gpipe-split", "1f1b-split", "interleaved-split": each backward as B then W, unit
ops) predict 2(S-1)/(3VM+2(S-1)), 0.68-0.79x the theory, with the base kind's memory;
"interleaved-zb" (W deferred as in zb-h1) (S-1)/(3VM+S-1).

Per kind (`per_kind`): family, lockstep model over theory at the benchmark's (S, 4S),
the measured ratio where measurable, compiled temporaries at M = 4S over GPipe's (V = 1;
the interleaved kinds run a model of V blocks per stage, so over interleaved's), and
samples/s. `best_per_family`: the kind of each family (gpipe, 1f1b, interleaved) with the
lowest lockstep model, and its figures; `bubble_ratio_vs_theory` stays the worst measured
schedule's, `bubble_ratio_vs_theory_best_per_family` the worst family's best (the issue's
target: each family's schedule within 1.1x), both null where not measurable. With
--quick only GPipe is timed at every M (its slope is the busy time), the others at the
largest M, the only one their figures use.

This is only a measurement when the stages run concurrently. On a CPU backend, the
simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) are threads of
one process: with fewer cores than devices, stages take turns, an idle cell costs only
its tick's overhead, and the step times measure overhead, not the schedule. There the
JSON says `bubble_measurable: false` with the reason and reports no bubble figures (the
step times are still there). Run it on a machine with at least as many cores as devices.

Memory: compiled temporaries (`memory_analysis().temp_size_in_bytes`, per device) of the
same step under 1F1B and GPipe at M = 4S (the headline) and 8S, with the default stash
(the stage's input-dependent vjp residuals) and with remat (stage inputs, recomputed).

Peer: torch.distributed.pipelining (peers_torch_pipeline.py under torchrun, one gloo
process per stage) trains L x (Linear(D) + ReLU) on the same sizes as jaxps on S devices,
rounds interleaved (_pipeline_vs_torch.py); `ratio_vs_torch_pipelining` = best jaxps
schedule's samples/s over best torch schedule's, null with `torch_note` saying why when
torch (optional: pip install torch==2.13.0) is missing or fails.

Usage: python benchmarks/pipeline.py [--quick] [--stages 4] [--width 512] [--batch 128]
       [--rounds N] [--torch-stages 2] [--torch-layers 8] [--torch-width 1024] [--torch-batch 512]
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from _pipeline_vs_torch import MLPSpec, compare  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.parallel.pipeline import pipeline_value_and_grad  # noqa: E402
from jaxps.parallel.schedule import PAIRED, SPLIT, build  # noqa: E402

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("1f1b-paired", 1), ("interleaved-paired", 2),
             ("zb-h1", 1), ("gpipe-split", 1), ("1f1b-split", 1), ("interleaved-split", 2), ("interleaved-zb", 2))
MEMORY_KINDS = ("gpipe", "1f1b", "1f1b-paired", "zb-h1", "gpipe-split", "1f1b-split")
INTERLEAVED_MEMORY_KINDS = ("interleaved", "interleaved-paired", "interleaved-split", "interleaved-zb")  # V = 2


def family(kind: str) -> str:
    """gpipe, 1f1b or interleaved: the base order a kind pairs, splits or defers."""
    return PAIRED.get(kind) or SPLIT.get(kind, (kind,))[0]


def block(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]) + x


def loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def params_for(S, V, D):
    shape = (S, V) if V > 1 else (S,)
    return {"w": jnp.full(shape + (D, D), 0.01, jnp.float32), "b": jnp.zeros(shape + (D,), jnp.float32)}


def step_fn(kind, S, M, V, mesh, remat=False):
    sched = build(kind, S, M, V)
    return sched, jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh, remat=remat))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bubble_measurability(devices: int) -> tuple[bool, str | None]:
    """(measurable, why not): stages must run concurrently for idle ticks to cost time."""
    cores = usable_cores()
    if jax.default_backend() == "cpu" and cores < devices:
        return False, (f"{devices} simulated CPU devices share {cores} cores: stages cannot run "
                       "concurrently, so an idle tick costs only its overhead and the step-time "
                       f"slope measures overhead, not the schedule's bubble (needs >= {devices} cores)")
    return True, None


def time_rounds(fns: dict[Any, tuple[Callable, tuple]], rounds: int, reps: int) -> dict[Any, float]:
    """Seconds per call of each fn: the minimum over rounds, each round visiting every fn
    in turn (reps calls each), so that load drift hits all alike."""
    for fn, args in fns.values():  # compile and warm
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, (fn, args) in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                out = fn(*args)
            jax.block_until_ready(out)
            best[k] = min(best[k], (time.perf_counter() - t0) / reps)
    return best


def busy_per_microbatch(S: int, gpipe_times: dict[int, float]) -> dict[str, float]:
    """A stage's busy time per microbatch u: the slope of GPipe's T(M) = (M + S - 1) u + c."""
    counts = sorted(gpipe_times)
    u, a = np.polyfit(np.array(counts, float), np.array([gpipe_times[m] for m in counts]), 1)
    return {"busy_s_per_microbatch": float(u), "fixed_s": float(a - (S - 1) * u)}


def bubble(kind: str, S: int, V: int, times: dict[int, float], u: float) -> dict[str, float]:
    """Measured bubble at the largest M: step time not spent busy, over step time."""
    M = max(times)
    sched = build(kind, S, M, V)
    measured = 1.0 - V * M * u / times[M]
    return {"bubble_measured": measured, "bubble_theory": sched.theory_bubble(),
            "bubble_ratio": measured / sched.theory_bubble(),
            "bubble_lockstep_model": sched.lockstep_bubble(2.0)}


def memory(S: int, D: int, B: int, mesh) -> dict[str, Any]:
    """Compiled temporaries per device of each of MEMORY_KINDS at M = 4S and 8S, both stash policies."""
    out: dict[str, Any] = {}
    for M in (4 * S, 8 * S):
        xs = ys = jnp.ones((M, B, D), jnp.float32)
        for remat in (False, True):
            temp = {}
            for kind in MEMORY_KINDS:
                _, fn = step_fn(kind, S, M, 1, mesh, remat)
                temp[kind] = fn.lower(params_for(S, 1, D), xs, ys).compile().memory_analysis().temp_size_in_bytes
            out[f"M={M}" + (" remat" if remat else "")] = {
                "temp_bytes": temp, "ratio_1f1b_vs_gpipe": temp["1f1b"] / temp["gpipe"],
                "ratio_1f1b_paired_vs_gpipe": temp["1f1b-paired"] / temp["gpipe"],
                "ratio_zb_h1_vs_gpipe": temp["zb-h1"] / temp["gpipe"],
                # the table's ring spans per stage (inputs kept until the backward, gradients,
                # stash, last stage's loss gradients: with V = 1 the executor holds these in
                # its gradient ring)
                "buffer_slots": {k: build(k, S, M).buffer_slots(not remat, True)._asdict() for k in temp}}
    # the interleaved kinds (V = 2 blocks per stage: a deeper model than the above) against
    # interleaved, at M = 4S with the default stash
    M = 4 * S
    xs = ys = jnp.ones((M, B, D), jnp.float32)
    temp = {kind: step_fn(kind, S, M, 2, mesh)[1].lower(params_for(S, 2, D), xs, ys).compile()
            .memory_analysis().temp_size_in_bytes for kind in INTERLEAVED_MEMORY_KINDS}
    out[f"M={M} V=2"] = {"temp_bytes": temp,
                         "ratio_vs_interleaved": {k: v / temp["interleaved"] for k, v in temp.items()}}
    return out


def per_kind(S: int, M: int, schedules: dict[str, Any], mem: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each kind's lockstep model (backward = 2 forwards; split: B = W = 1) over its theory
    at (S, M) (the timed M), measured ratio (or None), memory ratio at 4S and samples/s."""
    plain, inter = mem[f"M={4 * S}"]["temp_bytes"], mem[f"M={4 * S} V=2"]["temp_bytes"]
    out = {}
    for kind, entry in schedules.items():
        sched = build(kind, S, M, entry["virtual"])
        row = {"family": family(kind), "virtual": sched.virtual, "lockstep_model": sched.lockstep_bubble(2.0),
               "theory": sched.theory_bubble(),
               "lockstep_model_vs_theory": sched.lockstep_bubble(2.0) / sched.theory_bubble(),
               "measured_vs_theory": entry.get("bubble_ratio"), "max_stash": max(sched.max_stash()),
               "samples_per_sec": entry["samples_per_sec"]}
        if kind in plain:
            row["memory_vs_gpipe"] = plain[kind] / plain["gpipe"]
        if kind in inter:
            row["memory_vs_interleaved"] = inter[kind] / inter["interleaved"]
        out[kind] = row
    return out


def best_per_family(kinds: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per family, the kind with the lowest lockstep model (ties: the first listed)."""
    best: dict[str, dict[str, Any]] = {}
    for kind, row in kinds.items():
        f = row["family"]
        if f not in best or row["lockstep_model"] < best[f]["lockstep_model"] - 1e-12:
            best[f] = {"kind": kind, **row}
    return best


def zb_lockstep(pairs=((2, 8), (4, 8), (4, 16), (8, 32), (8, 64))) -> dict[str, dict[str, float]]:
    """zb-h1's lockstep bubble (B = W = 1 forward) over the theory (S-1)/(M+S-1), beside
    1F1B's lockstep one (backward = 2 forwards), from the tables."""
    out = {}
    for S, M in pairs:
        zb, f1b1 = build("zb-h1", S, M), build("1f1b", S, M)
        out[f"S={S} M={M}"] = {"lockstep": zb.lockstep_bubble(2.0), "theory": zb.theory_bubble(),
                               "ratio_vs_theory": zb.lockstep_bubble(2.0) / zb.theory_bubble(),
                               "lockstep_1f1b": f1b1.lockstep_bubble(2.0), "max_stash": max(zb.max_stash())}
    return out


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="examples per microbatch (over data=2)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (12 quick, 15 full)")
    p.add_argument("--torch-stages", type=int, default=2, help="torchrun processes = jaxps stages")
    p.add_argument("--torch-layers", type=int, default=8)
    p.add_argument("--torch-width", type=int, default=1024)
    p.add_argument("--torch-batch", type=int, default=512)
    p.add_argument("--torch-microbatches", type=int, default=8)
    p.add_argument("--torch-rounds", type=int, default=None, help="interleaved rounds (3 quick, 5 full)")
    args = p.parse_args(argv)
    S, D, B = args.stages, args.width, args.batch
    rounds = args.rounds or (12 if args.quick else 15)
    reps = 3 if args.quick else 4
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=8 // (2 * S)))
    devices = mesh.devices.size
    measurable, why_not = bubble_measurability(devices)
    counts = (S, 2 * S, 3 * S, 4 * S) if args.quick else (S, 2 * S, 3 * S, 4 * S, 6 * S)
    fns = {}
    for kind, V in SCHEDULES:
        for M in (counts if kind == "gpipe" or not args.quick else counts[-1:]):
            xs = ys = jnp.ones((M, B, D), jnp.float32)
            fns[kind, M] = (step_fn(kind, S, M, V, mesh)[1], (params_for(S, V, D), xs, ys))
    t0 = time.perf_counter()
    times = time_rounds(fns, rounds, reps)
    result: dict[str, Any] = {
        "stages": S, "width": D, "microbatch_size": B, "microbatch_counts": counts, "devices": devices,
        "backend": jax.default_backend(), "cores": usable_cores(), "timing_rounds": rounds,
        "timing_seconds": time.perf_counter() - t0,
        "bubble_measurable": measurable, "bubble_note": why_not, "schedules": {}}
    if measurable:
        fit = busy_per_microbatch(S, {M: times["gpipe", M] for M in counts})
        result.update(fit)
    for kind, V in SCHEDULES:
        steps = {M: times[kind, M] for M in counts if (kind, M) in times}
        entry: dict[str, Any] = {"virtual": V, "step_seconds": steps,
                                 "ticks": {M: build(kind, S, M, V).ticks for M in steps},
                                 "samples_per_sec": counts[-1] * B / steps[counts[-1]]}
        if measurable:
            entry.update(bubble(kind, S, V, steps, fit["busy_s_per_microbatch"]))
        result["schedules"][kind] = entry
    mem = memory(S, D, B, mesh)
    kinds = per_kind(S, counts[-1], result["schedules"], mem)
    best = best_per_family(kinds)
    result.update(
        bubble_ratio_vs_theory=(max(r["bubble_ratio"] for r in result["schedules"].values())
                                if measurable else None),
        bubble_ratio_vs_theory_best_per_family=(max(r["measured_vs_theory"] for r in best.values())
                                                if measurable else None),
        lockstep_model_vs_theory_best_per_family=max(r["lockstep_model_vs_theory"] for r in best.values()),
        per_kind=kinds, best_per_family=best,
        memory_1f1b_split_vs_gpipe=mem[f"M={4 * S}"]["temp_bytes"]["1f1b-split"] / mem[f"M={4 * S}"]["temp_bytes"]["gpipe"],
        memory_1f1b_vs_gpipe=mem[f"M={4 * S}"]["ratio_1f1b_vs_gpipe"],
        memory_1f1b_vs_gpipe_8s=mem[f"M={8 * S}"]["ratio_1f1b_vs_gpipe"],
        memory_1f1b_paired_vs_gpipe=mem[f"M={4 * S}"]["ratio_1f1b_paired_vs_gpipe"],
        memory_zb_h1_vs_gpipe=mem[f"M={4 * S}"]["ratio_zb_h1_vs_gpipe"],
        memory_zb_h1_vs_gpipe_8s=mem[f"M={8 * S}"]["ratio_zb_h1_vs_gpipe"],
        zb_h1_lockstep=zb_lockstep(),
        temp_bytes=mem[f"M={4 * S}"]["temp_bytes"], memory=mem)
    spec = MLPSpec(stages=args.torch_stages, layers=args.torch_layers, width=args.torch_width,
                   batch=args.torch_batch, microbatches=args.torch_microbatches)
    torch_rounds = args.torch_rounds or (3 if args.quick else 5)
    result.update(compare(spec, rounds=torch_rounds, reps=3 if args.quick else 8), machine=machine_info())
    emit("pipeline", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
