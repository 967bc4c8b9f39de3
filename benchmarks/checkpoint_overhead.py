"""Step time of Wide&Deep with a HostTable, with hot checkpoints every N steps vs none.

One trainer (one model, one embedded PS) runs interleaved rounds of `--every` steps: a
round with a checkpoint in its middle (the servers mark the PS rows on the push thread
right after that step's pushes and a copy thread copies them while pushes go on; Orbax
writes the device state and the PS snapshot in the background), then a round without,
and so on. Each round's time includes waiting for its
checkpoint to finish at the round's end, so a writer slower than half a round shows up.
Reported: median seconds per step of each kind and `ratio` = with / without (target <= 1.05),
the same for the process's CPU time (`cpu_ratio`, `cpu_ms_per_checkpoint`: steadier on a
shared machine),
the time a checkpoint holds the training thread (`blocking_ms_per_checkpoint`: hand Orbax
the state, which copies it off the device) and the checkpoint's size.

The interval: `--interval-seconds` of training between checkpoints (default 10; N is set
from the step time measured after warm-up), or `--every N` steps. A checkpoint costs a
fixed amount of background CPU (`cpu_ms_per_checkpoint`: Orbax's per-save threads, event
loop and per-array tensorstore work, ~50 ms for this 26-array state with training
stopped, plus the row copy and the write), so on a small CPU machine, where those threads
share the cores (and the GIL) with the step, the ratio is that cost over the interval:
every ~1.7 s of training (50 steps here) gave 1.05-1.11 on 2 cores, every ~5 s 0.99-1.05.
Ten seconds is still far more often than production jobs checkpoint (minutes); the
reported per-checkpoint costs give the overhead at any other interval:
`interval_seconds_for_5_percent` = background CPU per checkpoint / 0.05 (an upper bound:
it assumes the step uses every core all the time).

Usage: python benchmarks/checkpoint_overhead.py [--quick] [--batch 4096] [--interval-seconds 10 | --every N] [--rounds 5]
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.data import PlantedModel, SyntheticConfig  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.models import WideDeep, WideDeepConfig  # noqa: E402
from jaxps.placement import HostTable  # noqa: E402
from jaxps.trainer import TrainConfig, Trainer  # noqa: E402


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--rows", type=int, default=1 << 20, help="hashed rows of the embedding and wide tables")
    p.add_argument("--interval-seconds", type=float, default=10.0,
                   help="seconds of training between checkpoints (sets N from the measured step time)")
    p.add_argument("--every", type=int, default=0, help="steps between checkpoints (= steps per round); "
                   "overrides --interval-seconds")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each kind")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--distinct-batches", type=int, default=40, help="batches generated (rounds cycle through them)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.interval_seconds = 1024, 3, 4.0
    if args.every % 2:
        raise SystemExit("--every must be even: the checkpoint falls in the middle of a round")
    planted = PlantedModel(SyntheticConfig(num_fields=39, vocab_size=10_000, seed=0))
    data, _ = planted.sample(args.batch * args.distinct_batches, seed=1)
    pool = [data.slice(i, i + args.batch) for i in range(0, data.size, args.batch)]
    model = WideDeep(WideDeepConfig(num_slots=39, embed_rows=args.rows, embed_dim=args.dim, wide_rows=args.rows,
                                    hidden=(256, 128), embed_placement=HostTable("hashed")))
    mesh = make_mesh(MeshConfig(data=args.devices), jax.devices()[:args.devices])
    with tempfile.TemporaryDirectory(prefix="jaxps_ckpt_bench_") as out:
        base = TrainConfig(progress=False, tensorboard=False, checkpoint=False, log_every=10_000,
                           dense_optimizer="adam", dense_learning_rate=1e-3, compilation_cache="",
                           out_dir=out, keep_checkpoints=2)
        t = Trainer(model, mesh, base)
        blocking: list[float] = []
        save = t.save

        def timed_save(*a, **kw):  # the part of a checkpoint the training thread waits for
            t0 = time.perf_counter()
            save(*a, **kw)
            blocking.append(time.perf_counter() - t0)

        t.save = timed_save
        t.fit(pool)  # warm up: compile, fill the PS
        t0 = time.perf_counter()
        t.fit(pool)
        step_seconds = (time.perf_counter() - t0) / len(pool)
        every = args.every or max(2, 2 * round(args.interval_seconds / step_seconds / 2))
        batches = [pool[i % len(pool)] for i in range(every)]
        # shift the step count by half a round, so that every checkpoint falls in the
        # middle of its round
        shift = (every // 2 - t.step) % every
        if shift:
            t.fit(batches[:shift])
        times: dict[str, list[float]] = {"with": [], "without": []}
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.rounds):
            for kind in ("with", "without"):
                t.config = dataclasses.replace(base, checkpoint_every=every if kind == "with" else 0)
                t0, c0 = time.perf_counter(), time.process_time()
                t.fit(batches)  # waits for its checkpoint's writes at the end
                times[kind].append((time.perf_counter() - t0) / len(batches))
                cpu[kind].append((time.process_time() - c0) / len(batches))
        last = t.checkpointer.steps()[-1]
        step_dir = os.path.join(t.checkpointer.directory, str(last))
        ps_bytes, total_bytes = _dir_bytes(os.path.join(step_dir, "ps")), _dir_bytes(step_dir)
        ps_rows = sum(s["embed"]["keys"] for s in t.steps.host.ps.stats().values())
    with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
    cpu_ms = 1000 * every * (statistics.median(cpu["with"]) - statistics.median(cpu["without"]))
    emit("checkpoint_overhead", {
        "batch_size": args.batch, "embed_dim": args.dim, "rows": args.rows, "every": every,
        "rounds": args.rounds, "devices": args.devices,
        "seconds_per_step_with_checkpoints": with_s, "seconds_per_step_without": without_s,
        "ratio": with_s / without_s,
        # CPU seconds of this process per step (all threads): the work a checkpoint adds,
        # less sensitive than wall time to other jobs on a shared machine
        "cpu_ratio": statistics.median(cpu["with"]) / statistics.median(cpu["without"]),
        "cpu_ms_per_checkpoint": cpu_ms, "interval_seconds_for_5_percent": cpu_ms / 1000 / 0.05,
        "blocking_ms_per_checkpoint": 1000 * statistics.median(blocking), "checkpoints": len(blocking),
        "seconds_between_checkpoints": every * without_s, "target_interval_seconds": args.interval_seconds
        if not args.every else None,
        "rounds_with": times["with"], "rounds_without": times["without"],
        "checkpoint_bytes": total_bytes, "ps_snapshot_bytes": ps_bytes, "ps_rows": ps_rows,
        "machine": machine_info(),
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
