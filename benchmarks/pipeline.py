"""Pipeline schedules executed as one SPMD program: bubble vs theory, 1F1B (and zero bubble) vs GPipe memory.

Bubble. A schedule's bubble at M microbatches is the fraction of its step the stages sit
idle. Three estimates, all reported per kind:
- trace (the headline, `bubble_measured`, `bubble_ratio`; `_trace_idle.py`): --trace-steps run
  under the JAX profiler; a stage that reaches a tick's ppermute before its neighbours
  blocks in XLA's rendezvous, which the trace records, so idle = the stages' rendezvous
  waits over their execution spans (median step). This is per-stage busy time as the issue
  defines it: busy is everything a stage runs, its ops and the executor's own per-tick work.
- direct (`bubble_measured_direct`): 1 - V*M*u / T(M), u a stage's busy seconds per
  microbatch and block from a block's ops timed apart (`op_fns`: F, the whole backward from
  the stashed residuals, and its B and W halves, every stage running its own at once), u =
  F + backward, or F + B + W in the split kinds. It also charges the executor's per-tick
  work to the bubble (`overhead_s_per_tick`, below).
- slope (`bubble_measured_slope`): the slope of GPipe's T(M) over M = S..4S, whose ticks
  are all-forward or all-backward, so T(M) = (M + S - 1) u + fixed. On a loaded machine
  T(M) is not linear (negative fixed costs measured), so it is least trusted.
Per kind also `bubble_lockstep_measured_ops`, the table's lockstep bubble at the measured
op costs (`Schedule.lockstep_span`; it differs from the unit-cost model where B and W
cost unlike amounts), and `overhead_s_per_tick`, step time beyond that span per tick.
Timings are minima over rounds that interleave every (schedule, M) and op, so a busy
neighbour only makes a round slower, never the figure. The layout's loss is a linear
probe (`probe_loss`): the theory assumes equal stages, and an MSE's elementwise passes
made the last stage the slowest at every forward tick.

The layout (`bubble_layout`). Stages must run concurrently for an idle tick to cost time,
and on a CPU backend the simulated devices are threads of one process: with 8 devices on
fewer cores the stages take turns. So on CPU the bubble is timed in a subprocess
(_pipeline_bubble.py, its own XLA_FLAGS, `bubble_env`) on min(--stages, cores) >= 2
stages, one device per core, data = model = 1, NPROC=1, Eigen single-threaded, and the
step compiled while the process is on one core (`one_core`: XLA splits a fusion into as
many tasks as cores at compile time). The devices still share the process's intra-op
pool, one thread per core (measured: one device alone uses both cores, 1.25 ms per
[256,1024]x[1024,1024] dot vs 2.4 ms with both devices busy), but inside a step every
device holds a pool thread, running or blocked in a rendezvous, so an idle stage lends
no core: a forward beside a waiting neighbour takes the 2.4-2.9 ms of the timed ops
(traced). XLA's YNN dot kernels stay on: with Eigen's, the backward's transposed-weight
product cost 2.6x the forward's (g @ w.T 3.2 ms vs x @ w 1.2 ms), so B was 1.8x F;
with YNN's B, W and F cost about alike, as on a GPU. The JSON's `bubble_layout` says
{stages, devices, threads}; `bubble_measurable` is false (with `bubble_note`) only with
fewer than 2 cores or if that subprocess fails. Other backends time it in this process
on --stages devices. The width and microbatch size there are --bubble-width/--bubble-batch
(1024, 256).

`bubble_lockstep_model` is what the table predicts for this executor at unit costs: its
ticks are synchronous (a ppermute ends each), so a tick lasts as long as its slowest op on
any stage, and where 1F1B and interleaved run a forward beside a backward the forward's
stage waits (`Schedule.lockstep_bubble`, backward = 2 forwards, the pullback's matmuls).
GPipe's equals theory; 1F1B's and interleaved's exceed it. Their paired forms
("1f1b-paired", "interleaved-paired": a tick carries a forward and a backward on each
stage in the steady state) predict theory again; paired 1F1B pays with 2S-1 stash
entries instead of S (`memory_1f1b_paired_vs_gpipe`). "zb-h1" splits the backward into B
(input gradient) and W (weight gradient, deferred): one op per cell, each costing about
a forward, so its lockstep model (B = W = 1 forward) is its table bubble,
(S-1)/(3M+S-1), a third of the theory, with 1F1B's stash bound S; it keeps the output
gradients until the W's (`memory_zb_h1_vs_gpipe`). `zb_h1_lockstep` lists its lockstep
bubble over the theory for a few (S, M), from the tables alone. The split forms of every
family ("gpipe-split", "1f1b-split", "interleaved-split": each backward as B then W, unit
ops) predict 2(S-1)/(3VM+2(S-1)), 2/3-0.79x the theory, with the base kind's memory;
"interleaved-zb" (W deferred as in zb-h1) (S-1)/(3VM+S-1).

Per kind (`per_kind`): family, lockstep model over theory at the benchmark's (S, 4S),
the measured ratio (at the bubble layout's S and 4S), compiled temporaries at M = 4S
over GPipe's (V = 1; the interleaved kinds run a model of V blocks per stage, so over
interleaved's), and samples/s on the full mesh (data 2 x stage S). `best_per_family`:
the kind of each family (gpipe, 1f1b, interleaved) with the lowest lockstep model at unit
costs (gpipe-split, zb-h1, interleaved-zb), and its figures.
`bubble_ratio_vs_theory`, the headline, is the worst family's best: the schedule of each
family jaxps runs (for 1F1B that is zb-h1, `schedule.DEFAULT`; `default_schedule`).
`bubble_ratio_vs_theory_every_table` is the worst over every table, the textbook 1F1B
and interleaved ones included: in synchronous ticks they run a forward beside a two-matmul
backward, and their measured idle is their lockstep model's (2.6x and 4x the theory here),
which no executor of such ticks can beat; `measured_vs_lockstep_model_worst`, the largest
measured idle over its table's lockstep model at the measured op costs, says how far the
executor is from running its tables as designed. All null where not measurable
(`bubble_ratio_vs_theory_slope`, `_direct`: the worst by those estimates).

Memory: compiled temporaries (`memory_analysis().temp_size_in_bytes`, per device) of the
same step under 1F1B and GPipe at M = 4S (the headline) and 8S, with the default stash
(the stage's input-dependent vjp residuals) and with remat (stage inputs, recomputed).

Peer: torch.distributed.pipelining (peers_torch_pipeline.py under torchrun, one gloo
process per stage) trains L x (Linear(D) + ReLU) on the same sizes as jaxps on S devices,
rounds interleaved (_pipeline_vs_torch.py); `ratio_vs_torch_pipelining` = best jaxps
schedule's samples/s over best torch schedule's, null with `torch_note` saying why when
torch (optional: pip install torch==2.13.0) is missing or fails.

Usage: python benchmarks/pipeline.py [--quick] [--stages 4] [--width 512] [--batch 128]
       [--rounds N] [--bubble-width 1024] [--bubble-batch 256] [--bubble-rounds N] [--trace-steps N]
       [--torch-stages 2] [--torch-layers 8] [--torch-width 1024] [--torch-batch 512]
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from _pipeline_vs_torch import MLPSpec, compare  # noqa: E402
from _trace_idle import idle_fraction  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.parallel.pipeline import _residual_roles, pipeline_value_and_grad  # noqa: E402
from jaxps.parallel.schedule import DEFAULT, PAIRED, SPLIT, build  # noqa: E402

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


def probe_loss(h, y):
    """The bubble layout's loss, a linear probe: its gradient is y itself, so the last stage
    runs little work the others don't (one elementwise pass and a sum). The theory assumes
    equal stages; `loss`'s elementwise passes cost ~12% of a forward at D = 1024 on one
    core, and the other stages waited on the last one at every forward tick for them
    (gpipe's idle 0.128 vs 0.123, traced)."""
    return jnp.sum(h * y)


def params_for(S, V, D):
    shape = (S, V) if V > 1 else (S,)
    return {"w": jnp.full(shape + (D, D), 0.01, jnp.float32), "b": jnp.zeros(shape + (D,), jnp.float32)}


def start_barrier(mesh, p) -> jax.Array:
    """0.0, from an all-reduce over `stage` of the parameters times 0 (not folded: floats):
    a step that adds it to its input starts pipelining only once every stage is running.
    The host launches the devices' executions one after another (0.5-16 ms apart on 2
    cores), and which stage starts first would otherwise decide whether the fill's idle
    shows in the trace (a stage launched after its input was ready never waits for it)."""
    leaf = jax.tree.leaves(p)[0]
    return jax.shard_map(lambda a: jax.lax.psum(a.reshape(-1)[:1] * 0.0, "stage"), mesh=mesh,
                         in_specs=P("stage"), out_specs=P(), check_vma=False)(leaf)[0]


def step_fn(kind, S, M, V, mesh, remat=False, loss_fn=loss, synced=False):
    """(schedule, jitted step); `synced`: the step first waits for every stage (`start_barrier`)."""
    sched = build(kind, S, M, V)

    def step(p, x, y):
        if synced:
            x = x + start_barrier(mesh, p)
        return pipeline_value_and_grad(block, loss_fn, p, x, y, sched, mesh, remat=remat)
    return sched, jax.jit(step)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


BUBBLE_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "--xla_cpu_use_xnnpack=false")
MALLOC_KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=34359738368:glibc.malloc.top_pad=268435456"


def bubble_layout(stages: int, cores: int) -> dict[str, int] | None:
    """The CPU mesh the bubble is timed on: one device per core, stages = min(stages,
    cores), at least 2 (None with fewer cores: no two stages could run at once), data =
    model = 1, one thread per device."""
    S = min(stages, cores)
    if S < 2:
        return None
    return {"stages": S, "devices": S, "threads": 1}


def bubble_env(layout: dict[str, int], env: dict[str, str]) -> dict[str, str]:
    """env for the bubble subprocess: `layout["devices"]` host devices (XLA reads XLA_FLAGS
    when jax is imported, hence a process of its own), NPROC=1, Eigen single-threaded and
    XNNPACK off. The devices still share one intra-op pool (measured with 2 devices: 2
    threads, and a device alone spreads a dot over both), but within a step each device
    holds a pool thread, running or blocked in a rendezvous, so an idle stage lends its
    neighbour no core (see the module docstring). Other XLA_FLAGS in env are kept.

    GLIBC_TUNABLES (unless env sets it): the CPU client mallocs a step's temporaries per
    execution, glibc returns the large ones to the OS on free, and the next step faults
    them in again, ~1.25 ms per 4 MB touched first, on different ticks on different stages
    (traced: a stage's first backward, its gradient accumulator), each a wait for its
    neighbour. With mmap off and no trimming the memory stays with the process, as an
    accelerator's allocator keeps its pool (gpipe idle 0.118-0.123 vs 0.123-0.144)."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(
        ("--xla_force_host_platform_device_count",) + tuple(f.split("=")[0] for f in BUBBLE_XLA_FLAGS))]
    flags += [f"--xla_force_host_platform_device_count={layout['devices']}", *BUBBLE_XLA_FLAGS]
    return {"GLIBC_TUNABLES": MALLOC_KEEP, **env, "XLA_FLAGS": " ".join(flags), "NPROC": str(layout["threads"])}


def busy_direct(kind: str, ops: dict[str, float]) -> float:
    """A stage's busy seconds per microbatch and block from one device's op times: forward
    plus whole backward, or, in a split kind, forward plus B plus W (each with its own
    launch, as the executor's conditionals run them)."""
    split = kind in SPLIT
    return ops["F"] + (ops["B"] + ops["W"] if split else ops["BW"])


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


def bubble(kind: str, S: int, V: int, times: dict[int, float], busy: dict[str, float],
           ops: dict[str, float] | None = None, idle: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measured bubble at the largest M: the traced idle fraction (`idle`, from
    `_trace_idle.idle_fraction`: time the stages blocked waiting for each other) and, from
    each estimate of a stage's busy seconds per microbatch and block (`busy`: "direct", from
    `busy_direct`, and/or "slope", GPipe's), step time not spent busy over step time. The
    headline (`bubble_measured`, `bubble_ratio`) is the traced one where there is one, else
    the direct one: the direct estimate also charges the executor's per-tick work to the
    bubble, which `overhead_s_per_tick` reports apart. With the op times (`op_fns`'s
    F, BW, B, W), also the lockstep model at those costs (`bubble_lockstep_measured_ops`:
    what the table's synchronous ticks cost with real, unequal ops) and the step time
    beyond its span per tick (`overhead_s_per_tick`: the executor's and the
    synchronisation's)."""
    M = max(times)
    sched = build(kind, S, M, V)
    theory = sched.theory_bubble()
    out: dict[str, Any] = {"bubble_theory": theory, "bubble_lockstep_model": sched.lockstep_bubble(2.0)}
    for name, u in busy.items():
        out[f"bubble_measured_{name}"] = 1.0 - V * M * u / times[M]
        out[f"bubble_ratio_{name}"] = out[f"bubble_measured_{name}"] / theory
    if idle is not None:
        out.update(bubble_measured_trace=idle["median"], bubble_ratio_trace=idle["median"] / theory,
                   bubble_trace_steps=idle["steps"])
    head = "trace" if idle is not None else "direct" if "direct" in busy else "slope"
    out.update(bubble_measured=out[f"bubble_measured_{head}"], bubble_ratio=out[f"bubble_ratio_{head}"],
               bubble_estimator=head)
    if ops is not None:
        span = sched.lockstep_span({"F": ops["F"], "B": ops["B"] if sched.split else ops["BW"], "W": ops["W"]})
        out.update(bubble_lockstep_measured_ops=1.0 - V * M * busy_direct(kind, ops) / span,
                   overhead_s_per_tick=(times[M] - span) / sched.ticks)
    return out


def op_fns(mesh, D: int, B: int, M: int) -> dict[str, tuple[Callable, tuple]]:
    """A block's ops for M microbatches, one after another, run by every stage of `mesh` at
    once (each on its own microbatches, no communication): "F" the forwards (h and the
    stash entry: the pullback's input-dependent leaves, `_residual_roles`), "BW" the
    backwards from the stash (d x out, d params summed: as the executor's backward
    conditional does), "B" and "W" their input- and weight-gradient halves. Per op,
    divide by M. Every core is busy, as in the pipeline's busy ticks (an op timed beside
    idle cores would borrow them, or on a loaded machine a larger share of one), and one
    call lasts about as long as a stage's busy time in a step, so load that comes and
    goes hits the ops as it hits the steps they are compared with."""
    S = mesh.shape["stage"]
    spec = P("stage")
    sharding = jax.sharding.NamedSharding(mesh, spec)
    p = jax.device_put(params_for(S, 1, D), sharding)
    xs = jax.device_put(jnp.full((S, M, B, D), 0.5, jnp.float32), sharding)
    gs = jax.device_put(jnp.full((S, M, B, D), 0.01, jnp.float32), sharding)
    p0 = jax.tree.map(lambda a: a[0], p)
    roles = _residual_roles(block, p0, xs[0, 0])

    def local(f):  # f on each stage's block, microbatches and output gradients
        return jax.jit(jax.shard_map(lambda *a: jax.tree.map(lambda v: v[None], f(*(jax.tree.map(
            lambda v: v[0], b) for b in a))), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))

    def fwd(p, xs):
        def one(x):
            h, pullback = jax.vjp(block, p, x)
            return h, tuple(v for v, r in zip(jax.tree.leaves(pullback), roles) if r == "stash")
        return jax.lax.map(one, xs)

    def pullback(p, x, saved):  # as the executor's: recomputed leaves, stashed ones swapped in
        leaves, treedef = jax.tree.flatten(jax.vjp(block, p, x)[1])
        it = iter(saved)
        return jax.tree.unflatten(treedef, [next(it) if r == "stash" else v for v, r in zip(leaves, roles)])

    def bwd(half):
        def run(p, xs, stash, gs):
            def one(acc, m):
                x, saved, g = m
                dp, dx = pullback(p, x, saved)(g)
                return (jax.tree.map(jnp.add, acc, dp) if half != 1 else acc), (dx if half != 0 else ())
            return jax.lax.scan(one, jax.tree.map(jnp.zeros_like, p), (xs, stash, gs))
        return local(run)

    stash = local(fwd)(p, xs)[1]
    return {"F": (local(fwd), (p, xs)), "BW": (bwd(None), (p, xs, stash, gs)),
            "B": (bwd(1), (p, xs, stash, gs)), "W": (bwd(0), (p, xs, stash, gs))}


@contextlib.contextmanager
def one_core():
    """Every thread of this process on one core while XLA compiles, then back on its own
    cores. XLA:CPU splits a large elementwise fusion into as many parallel tasks as the
    cores it may schedule on when it compiles, and runs them on the client's thread pool,
    which all simulated devices share: then one stage's op runs partly on its neighbour's
    thread, waits behind that thread's matmul where their ticks mix ops (a forward beside a
    backward), and borrows an idle neighbour's core where they don't. Compiled under one
    core, every op of a device runs on that device's thread."""
    masks = {}
    for t in map(int, os.listdir("/proc/self/task")):
        with contextlib.suppress(ProcessLookupError):  # a thread that exited meanwhile
            masks[t] = os.sched_getaffinity(t)
    everything = os.sched_getaffinity(0)
    core = min(everything)
    for t in masks:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(t, {core})
    try:
        yield
    finally:
        for t in map(int, os.listdir("/proc/self/task")):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(t, masks.get(t, everything))


def measure_bubble(cfg: dict[str, Any], devices: list | None = None) -> dict[str, Any]:
    """Step times on a (data 1 x stage S x model 1) mesh (GPipe at every count of
    cfg["counts"], the other schedules at the largest) and the per-op times of `op_fns`,
    rounds interleaving all of them. Runs where the bubble layout's devices are: in
    _pipeline_bubble.py's process on CPU."""
    S, D, B, counts = cfg["stages"], cfg["width"], cfg["batch"], cfg["counts"]
    mesh = make_mesh(MeshConfig(data=1, stage=S, model=1), (devices or jax.devices())[:S])
    fns = {}
    for kind, V in cfg["schedules"]:
        for M in (counts if kind == "gpipe" else counts[-1:]):
            xs = ys = jnp.ones((M, B, D), jnp.float32)
            fns[kind, M] = (step_fn(kind, S, M, V, mesh, loss_fn=probe_loss, synced=True)[1],
                            (params_for(S, V, D), xs, ys))
    for name, fn in op_fns(mesh, D, B, counts[-1]).items():
        fns["op", name] = fn
    if cfg["layout"]["threads"] == 1:  # compiled for one thread each (see one_core)
        with one_core():
            fns = {k: (fn.lower(*args).compile(), args) for k, (fn, args) in fns.items()}
    t0 = time.perf_counter()
    t = time_rounds(fns, cfg["rounds"], cfg["reps"])
    t1 = time.perf_counter()
    idle = {kind: idle_fraction(lambda fn=fns[kind, counts[-1]]: jax.block_until_ready(fn[0](*fn[1])), S,
                                steps=cfg["trace_steps"])
            for kind, _ in cfg["schedules"]}
    return {"timing_seconds": t1 - t0, "trace_seconds": time.perf_counter() - t1,
            "process_devices": jax.device_count(), "idle": idle,
            "op_seconds": {name: t["op", name] / counts[-1] for name in ("F", "BW", "B", "W")},
            "step_seconds": {kind: {M: t[kind, M] for M in counts if (kind, M) in t} for kind, _ in cfg["schedules"]}}


def bubble_in_subprocess(cfg: dict[str, Any], timeout: float = 900) -> tuple[dict[str, Any] | None, str | None]:
    """measure_bubble(cfg) in _pipeline_bubble.py under `bubble_env(cfg["layout"])`: (its
    JSON with integer microbatch counts, None) or (None, why it failed)."""
    env = bubble_env(cfg["layout"], dict(os.environ))
    try:
        r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pipeline_bubble.py"),
                            json.dumps(cfg)], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"bubble subprocess timed out after {timeout:.0f}s"
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines:
        return None, f"bubble subprocess exited {r.returncode}: {r.stderr.strip()[-600:]}"
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None, f"bubble subprocess printed no JSON last: {lines[-1][:300]!r}"
    out["step_seconds"] = {k: {int(m): t for m, t in v.items()} for k, v in out["step_seconds"].items()}
    return out, None


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
               "measured_vs_theory": entry.get("bubble_ratio"),
               "measured_direct_vs_theory": entry.get("bubble_ratio_direct"),
               "measured_lockstep_at_op_costs": entry.get("bubble_lockstep_measured_ops"),
               "measured_overhead_s_per_tick": entry.get("overhead_s_per_tick"), "max_stash": max(sched.max_stash()),
               "samples_per_sec": entry["samples_per_sec"]}
        if kind in plain:
            row["memory_vs_gpipe"] = plain[kind] / plain["gpipe"]
        if kind in inter:
            row["memory_vs_interleaved"] = inter[kind] / inter["interleaved"]
        out[kind] = row
    return out


def best_per_family(kinds: dict[str, dict[str, Any]], S: int, M: int) -> dict[str, dict[str, Any]]:
    """Per family, the kind a user would pick: the lowest lockstep bubble at unit costs
    (backward = 2 forwards, B = W = 1; ties: the first listed) at (S, M), the layout the
    bubble was measured on: a property of the table alone. Not the measured bubble: picking
    the lowest of noisy measurements would flatter. Not the model at this machine's measured
    op costs either: it is a CPU's (W 1.2x F here), and it overstates the interleaved split
    kinds' idle (measured 0.73-0.90x of it)."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for kind, row in kinds.items():
        f, model = row["family"], build(kind, S, M, row["virtual"]).lockstep_bubble(2.0)
        if f not in best or model < best[f][0] - 1e-12:
            best[f] = (model, {"kind": kind, **row})
    return {f: row for f, (_, row) in best.items()}


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


def bubble_run(args, S: int) -> tuple[dict[str, Any] | None, str | None]:
    """(measure_bubble's result with its layout, None) or (None, why there is none). On CPU
    the layout has one device per core and runs in a subprocess (its own
    XLA_FLAGS); elsewhere in this process on the first S devices."""
    cores = usable_cores()
    cpu = jax.default_backend() == "cpu"
    layout = bubble_layout(S, cores) if cpu else {"stages": S, "devices": S, "threads": None}
    if layout is None:
        return None, f"{cores} core(s): the bubble needs 2 stages running at once, one per core"
    Sb = layout["stages"]
    cfg = {"stages": Sb, "width": args.bubble_width, "batch": args.bubble_batch, "layout": layout,
           "counts": [Sb * k for k in (1, 2, 3, 4)], "schedules": SCHEDULES,
           "rounds": args.bubble_rounds or (5 if args.quick else 10), "reps": 3,
           "trace_steps": args.trace_steps or (15 if args.quick else 25)}
    if not cpu:
        return {"layout": layout, **measure_bubble(cfg)}, None
    return bubble_in_subprocess(cfg)


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="examples per microbatch (over data=2)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (8 quick, 15 full)")
    p.add_argument("--bubble-width", type=int, default=1024, help="block width D of the bubble layout's MLP")
    p.add_argument("--bubble-batch", type=int, default=256, help="microbatch size of the bubble layout")
    p.add_argument("--bubble-rounds", type=int, default=None, help="bubble timing rounds (5 quick, 10 full)")
    # A step's traced idle varies by +-25% on a shared 2-core box (0.097-0.164 for GPipe at a
    # theory of 0.111, 7 steps): the median of 7 moved 0.95-1.10x the theory between runs.
    p.add_argument("--trace-steps", type=int, default=None,
                   help="profiled steps per schedule, idle = their median (15 quick, 25 full)")
    p.add_argument("--torch-stages", type=int, default=2, help="torchrun processes = jaxps stages")
    p.add_argument("--torch-layers", type=int, default=8)
    p.add_argument("--torch-width", type=int, default=1024)
    p.add_argument("--torch-batch", type=int, default=512)
    p.add_argument("--torch-microbatches", type=int, default=8)
    p.add_argument("--torch-rounds", type=int, default=None, help="interleaved rounds (3 quick, 5 full)")
    args = p.parse_args(argv)
    S, D, B = args.stages, args.width, args.batch
    rounds = args.rounds or (8 if args.quick else 15)
    reps = 3 if args.quick else 4
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=8 // (2 * S)))
    devices = mesh.devices.size
    M = 4 * S  # throughput on the full mesh at M = 4S; the bubble on its own layout (below)
    fns = {}
    for kind, V in SCHEDULES:
        xs = ys = jnp.ones((M, B, D), jnp.float32)
        fns[kind] = (step_fn(kind, S, M, V, mesh)[1], (params_for(S, V, D), xs, ys))
    t0 = time.perf_counter()
    times = time_rounds(fns, rounds, reps)
    result: dict[str, Any] = {
        "stages": S, "width": D, "microbatch_size": B, "microbatches": M, "devices": devices,
        "backend": jax.default_backend(), "cores": usable_cores(), "timing_rounds": rounds,
        "timing_seconds": time.perf_counter() - t0, "schedules": {}}
    bub, why_not = bubble_run(args, S)
    Sb = bub["layout"]["stages"] if bub else S  # the bubble layout's stages (CPU: one per core)
    result.update(bubble_measurable=bub is not None, bubble_note=why_not,
                  bubble_layout=bub["layout"] if bub else None, bubble_width=args.bubble_width,
                  bubble_microbatch_size=args.bubble_batch)
    if bub:
        gpipe = bub["step_seconds"]["gpipe"]
        fit = busy_per_microbatch(Sb, gpipe)
        result.update(fit, bubble_microbatch_counts=sorted(gpipe), bubble_op_seconds=bub["op_seconds"],
                      bubble_timing_seconds=bub["timing_seconds"])
    # one estimator for every kind: the traced idle only where each kind has it
    traced = bub["idle"] if bub and all(v is not None for v in bub["idle"].values()) else {}
    result["bubble_estimator"] = ("trace" if traced else "direct") if bub else None
    if bub and not traced:
        result["bubble_estimator_note"] = ("no traced idle for " + ", ".join(k for k, v in bub["idle"].items() if v is None)
                                           + ": the direct estimate for all")
    for kind, V in SCHEDULES:
        entry: dict[str, Any] = {"virtual": V, "step_seconds": {M: times[kind]},
                                 "ticks": {M: build(kind, S, M, V).ticks}, "samples_per_sec": M * B / times[kind]}
        if bub:
            steps = bub["step_seconds"][kind]
            u = busy_direct(kind, bub["op_seconds"])
            entry.update(bubble_step_seconds=steps, busy_s_per_microbatch_direct=u,
                         **bubble(kind, Sb, V, steps, {"direct": u, "slope": fit["busy_s_per_microbatch"]},
                                  bub["op_seconds"], traced.get(kind)))
        result["schedules"][kind] = entry
    mem = memory(S, D, B, mesh)
    kinds = per_kind(S, M, result["schedules"], mem)
    best = best_per_family(kinds, Sb, 4 * Sb)  # ranked where the bubble was measured
    result.update(
        bubble_ratio_vs_theory=(max(r["measured_vs_theory"] for r in best.values()) if bub else None),
        bubble_ratio_vs_theory_every_table=(max(r["bubble_ratio"] for r in result["schedules"].values())
                                            if bub else None),
        measured_vs_lockstep_model_worst=max((r["bubble_measured"] / r["bubble_lockstep_measured_ops"]
                                              for r in result["schedules"].values()
                                              if r.get("bubble_lockstep_measured_ops", 0) > 0), default=None),
        default_schedule=DEFAULT,
        bubble_ratio_vs_theory_slope=(max(r["bubble_ratio_slope"] for r in result["schedules"].values())
                                      if bub else None),
        bubble_ratio_vs_theory_direct=(max(r["bubble_ratio_direct"] for r in result["schedules"].values())
                                       if bub else None),
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
