"""What an SSP/ASP consistent cut costs a fast worker group's pushes.

One in-process server, two ASP worker groups, one Adagrad table (`--rows` hashed rows of
`--dim`). Group 0 pushes `--steps` batches of `--keys` unique keys (half from a hot set, so
pushes overlap as real embedding traffic does) while group 1 lags `--lag` steps behind
(it pushes its step once group 0 is that far ahead). Two runs, interleaved `--rounds`
times on the same batches:

    plain   no periodic checkpoints (cut_every = 0): every push is the batched fused kernel
    cuts    cuts every `--every` steps: group 0's pushes past a pending cut are applied at
            once after the cut's copy kept the rows they change (jaxps.ps.cow.CutCopy),
            group 1's late pushes update the copies too, and each cut is copied out once
            group 1 completes it

Reported: seconds per group-0 push of each (median over rounds) and `ratio` = cuts / plain
(the floor is `plain`: the same pushes with nothing kept), the copies' peak bytes over the
table's bytes, the time of a clock that takes a cut, and the check that each cut holds
exactly the pushes of steps <= its step (SGD counts are exact; asserted).

Measured on 2 cores: ratio 1.12-1.60 (--quick: 16k keys over 500k rows), 1.95-2.43 (full:
64k keys over 2M rows, where most keys of a push are written past the cut for the first
time: the copy then reads as many rows as the push updates). A copy is per table and cut,
kept for a whole request span in a few vectorized calls (one `pull_runs` reads the live
rows); per partition it was 3.0-3.5x (~60 us of Python per partition and pending cut).
The former design held pushes past a cut instead (0.69x plain for the fast group's push,
but that group then read rows without its own writes, and the slow group's clock applied
them). Pushes pay only while a cut is pending: under SSP(s), at most s steps of each
checkpoint interval.

Usage: python benchmarks/ps_cuts.py [--quick] [--rows 2000000] [--keys 65536] [--steps 24]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.optim import rowwise  # noqa: E402
from jaxps.ps.clock import DONE, Sync  # noqa: E402
from jaxps.ps.ring import Ring  # noqa: E402
from jaxps.ps.server import PSServer, TableSpec  # noqa: E402

ASP = Sync(None)


def _batches(rows: int, keys: int, steps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    hot = rng.choice(rows, rows // 50, replace=False)
    out = []
    for _ in range(steps):
        k = np.unique(np.concatenate([rng.choice(hot, keys // 2), rng.integers(0, rows, keys // 2)]))
        out.append(k.astype(np.uint64))
    return out


def _run(spec: TableSpec, batches: list[np.ndarray], dim: int, every: int, lag: int, partitions: int
         ) -> dict[str, float]:
    """Group 0 pushes every batch (timed), group 1 the same batches `lag` steps behind."""
    server = PSServer("ps-0", Ring(partitions, 64, ["ps-0"]), [spec], wait_timeout=60)
    for g in (0, 1):
        server.clock(g, 0, 2, ASP, cut_every=every)
    grads = [np.full((k.shape[0], dim), 0.01, np.float32) for k in batches]
    spent, peak, cut_s = 0.0, 0, 0.0
    for step in range(1, len(batches) + 1):
        t0 = time.perf_counter()
        server.push("t", batches[step - 1], grads[step - 1], (1, step), step, 0)
        spent += time.perf_counter() - t0
        server.clock(0, step, 2, ASP, cut_every=every)
        if step > lag:  # the slow group's step, late: after group 0's pushes past its cut
            s = step - lag
            server.push("t", batches[s - 1], grads[s - 1], (2, s), s, 1)
            t0 = time.perf_counter()
            server.clock(1, s, 2, ASP, cut_every=every)  # takes a cut at multiples of `every`
            cut_s += time.perf_counter() - t0
        peak = max(peak, server.stats()["t"]["cut_copy_bytes"])
    table_bytes = server.stats()["t"]["bytes"]
    server.clock(0, DONE, 2, ASP, cut_every=every)
    for s in range(len(batches) - lag + 1, len(batches) + 1):
        server.push("t", batches[s - 1], grads[s - 1], (2, s), s, 1)
        server.clock(1, s, 2, ASP, cut_every=every)
    server.clock(1, DONE, 2, ASP, cut_every=every)
    if every:  # the last cut taken holds exactly each group's pushes of steps <= it
        at = len(batches) // every * every
        cut = server.export_cut("t", at)
        want = np.zeros(spec.rows, np.float32)
        for b in batches[:at]:
            want[b.astype(np.int64)] -= 2 * 0.01
        np.testing.assert_allclose(cut["values"][:, 0], want[cut["keys"].astype(np.int64)], rtol=1e-5, atol=1e-6)
    return {"push_s": spent / len(batches), "peak_copy_bytes": peak, "table_bytes": table_bytes,
            "cut_ms": 1e3 * cut_s / max(1, len(batches) // max(every, 1))}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--keys", type=int, default=65536, help="keys per push (before dedup)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=4, help="cut every this many steps")
    p.add_argument("--lag", type=int, default=6, help="steps the slow group lags behind")
    p.add_argument("--partitions", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.keys, a.steps, a.rounds = 500_000, 16384, 16, 3
    # SGD with lr 1 keeps the cut's check exact; the cut path's cost is the copy, not the math
    spec = TableSpec("t", a.dim, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=a.rows)
    batches = _batches(a.rows, a.keys, a.steps, seed=0)
    runs: dict[str, list[dict]] = {"plain": [], "cuts": []}
    for _ in range(a.rounds):
        for kind in ("plain", "cuts"):
            runs[kind].append(_run(spec, batches, a.dim, a.every if kind == "cuts" else 0, a.lag, a.partitions))
    med = {k: statistics.median(r["push_s"] for r in v) for k, v in runs.items()}
    cuts = runs["cuts"][-1]
    result = {
        "benchmark": "ps_cuts", "quick": a.quick,
        "rows": a.rows, "dim": a.dim, "keys_per_push": int(np.mean([b.shape[0] for b in batches])),
        "steps": a.steps, "cut_every": a.every, "lag": a.lag, "rounds": a.rounds,
        "plain_ms_per_push": 1e3 * med["plain"], "cuts_ms_per_push": 1e3 * med["cuts"],
        "ratio": med["cuts"] / med["plain"],
        "peak_copy_vs_table_bytes": cuts["peak_copy_bytes"] / max(cuts["table_bytes"], 1),
        "ms_per_cut_taken": statistics.median(r["cut_ms"] for r in runs["cuts"]),
        "machine": machine_info(),
    }
    print(f"push: plain {result['plain_ms_per_push']:.2f} ms, with pending cuts {result['cuts_ms_per_push']:.2f} ms "
          f"(ratio {result['ratio']:.2f}); copies peak {result['peak_copy_vs_table_bytes']:.2f}x the table's bytes; "
          f"a cut taken {result['ms_per_cut_taken']:.1f} ms")
    emit("ps_cuts", result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
