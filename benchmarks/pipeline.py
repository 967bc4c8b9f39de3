"""Pipeline schedules executed as one SPMD program: bubble vs theory, 1F1B vs GPipe memory.

Bubble, measured by the step-time slope: for M in a few microbatch counts, time a
pipelined value-and-grad step of an MLP stack (S stages of Linear+tanh, residual); fit
T(M) = a + b*M; the bubble at M is a / T(M) (time not proportional to the work), compared
with (S-1)/(V*M+S-1). Memory: compiled temporaries of 1F1B over GPipe at M = 4S.
8 simulated devices share 2 cores here: stages do not run concurrently, so an idle cell
costs only the tick's overhead (its switch, its ppermutes) and the measured "bubble" is
per-step and per-tick overhead, not the schedule's idle time; on a loaded box it varies
by +-0.5x of theory between identical runs (use several runs, or real devices).

Peer: torch.distributed.pipelining (peers_torch_pipeline.py under torchrun, one gloo
process per stage) trains L x (Linear(D) + ReLU) on the same sizes as jaxps on S devices,
rounds interleaved (_pipeline_vs_torch.py); `ratio_vs_torch_pipelining` = best jaxps
schedule's samples/s over best torch schedule's, null with `torch_note` saying why when
torch (optional: pip install torch==2.13.0) is missing or fails.

Usage: python benchmarks/pipeline.py [--quick] [--stages 4] [--width 256] [--batch 64]
       [--torch-stages 2] [--torch-layers 8] [--torch-width 1024] [--torch-batch 512]
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from _pipeline_vs_torch import MLPSpec, compare  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.parallel.pipeline import pipeline_value_and_grad  # noqa: E402
from jaxps.parallel.schedule import build  # noqa: E402


def block(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]) + x


def loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def params_for(S, V, D):
    shape = (S, V) if V > 1 else (S,)
    return {"w": jnp.full(shape + (D, D), 0.01, jnp.float32), "b": jnp.zeros(shape + (D,), jnp.float32)}


def step_fn(kind, S, M, V, mesh):
    sched = build(kind, S, M, V)
    return sched, jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh))


def time_step(fn, args, reps) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="examples per microbatch (over data=2)")
    p.add_argument("--torch-stages", type=int, default=2, help="torchrun processes = jaxps stages")
    p.add_argument("--torch-layers", type=int, default=8)
    p.add_argument("--torch-width", type=int, default=1024)
    p.add_argument("--torch-batch", type=int, default=512)
    p.add_argument("--torch-microbatches", type=int, default=8)
    p.add_argument("--torch-rounds", type=int, default=None, help="interleaved rounds (3 quick, 5 full)")
    args = p.parse_args(argv)
    S, D, B = args.stages, args.width, args.batch
    reps = 3 if args.quick else 10
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=8 // (2 * S)))
    counts = (S, 2 * S, 4 * S)
    result = {"stages": S, "width": D, "microbatch_size": B, "microbatch_counts": counts, "schedules": {}}
    for kind, V in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        params = params_for(S, V, D)
        times = {}
        for M in counts:
            xs = ys = jnp.ones((M, B, D), jnp.float32)
            _, fn = step_fn(kind, S, M, V, mesh)
            times[M] = time_step(fn, (params, xs, ys), reps)
        b, a = np.polyfit(np.array(counts, float), np.array([times[m] for m in counts]), 1)
        M = counts[-1]
        measured = a / times[M]
        theory = build(kind, S, M, V).theory_bubble()
        result["schedules"][kind] = {"virtual": V, "step_seconds": times, "bubble_measured": measured,
                                     "bubble_theory": theory, "bubble_ratio": measured / theory,
                                     "samples_per_sec": M * B / times[M]}
    M = 4 * S
    xs = ys = jnp.ones((M, B, D), jnp.float32)
    temp = {}
    for kind in ("gpipe", "1f1b"):
        _, fn = step_fn(kind, S, M, 1, mesh)
        temp[kind] = fn.lower(params_for(S, 1, D), xs, ys).compile().memory_analysis().temp_size_in_bytes
    result.update(
        bubble_ratio_vs_theory=max(r["bubble_ratio"] for r in result["schedules"].values()),
        memory_1f1b_vs_gpipe=temp["1f1b"] / temp["gpipe"], temp_bytes=temp,
        # (stage-input slots, gradient slots) per stage: the part of the temporaries the
        # schedule decides; the rest (a stage's parameter-gradient accumulator, one tick's
        # working set of a few microbatch activations) is the same under both
        buffer_slots={kind: build(kind, S, M).buffer_slots() for kind in ("gpipe", "1f1b")})
    spec = MLPSpec(stages=args.torch_stages, layers=args.torch_layers, width=args.torch_width,
                   batch=args.torch_batch, microbatches=args.torch_microbatches)
    rounds = args.torch_rounds or (3 if args.quick else 5)
    result.update(compare(spec, rounds=rounds, reps=3 if args.quick else 8), machine=machine_info())
    emit("pipeline", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
