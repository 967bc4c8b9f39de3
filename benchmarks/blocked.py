"""Realm 3: blocked sparse LR step time vs the number of feature blocks, at a fixed
example width (few examples, each with tens of thousands of nonzeros).

The 1-block run is the unsharded step on one device; `ratio_<k>_blocks` is its time over
the k-block step's (above 1: splitting the example pays). Host splitting (by owner
block, dedup per block) is timed separately. On the 2-core CPU box the simulated devices
share two cores, so the ratios here show overhead more than speed-up.

Usage: python benchmarks/blocked.py [--quick] [--width 20000] [--batch 64]
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
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.optim.rowwise import FTRL  # noqa: E402
from jaxps.parallel.blocked import blocked_lr_step, split_by_block  # noqa: E402
from jaxps.tables.routing import Router  # noqa: E402


def run(blocks: int, batches, rows: int, steps: int) -> tuple[float, float]:
    mesh = make_mesh(MeshConfig(data=1, model=blocks), jax.devices()[:blocks])
    sh = NamedSharding(mesh, P("model"))
    opt = FTRL()
    table = jax.device_put(jnp.zeros((rows, 1)), sh)
    slots = {n: jax.device_put(jnp.full((rows, 1), opt.slot_init(n)), sh) for n in opt.slots}
    bias = jnp.zeros(())
    rpb = rows // blocks
    router = Router(rpb, blocks)
    t0 = time.perf_counter()
    split = [split_by_block(r, v, m, rpb, blocks, router) for r, v, m, _ in batches]
    split_s = (time.perf_counter() - t0) / len(batches)
    width = max(b.width for b in split)
    split = [split_by_block(r, v, m, rpb, blocks, router, width) for r, v, m, _ in batches]  # one shape
    step = jax.jit(lambda t, s, b, r, i, v, y, w, k: blocked_lr_step(opt, t, s, b, r, i, v, y, w, k, 0.01,
                                                                     mesh, "model"), donate_argnums=(0, 1))
    dev = [tuple(jax.device_put(a, sh) for a in (b.rows, b.inverse, b.vals)) + (jnp.asarray(y),)
           for b, (_, _, _, y) in zip(split, batches)]
    ones = jnp.ones(batches[0][0].shape[0])
    table, slots, bias, loss = step(table, slots, bias, *dev[0], ones, 1)  # compile
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for i in range(steps):
        table, slots, bias, loss = step(table, slots, bias, *dev[i % len(dev)], ones, i + 2)
        jax.block_until_ready(loss)
    return (time.perf_counter() - t0) / steps, split_s


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=20_000, help="nonzeros per example")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rows", type=int, default=1 << 22)
    args = p.parse_args(argv)
    steps = 5 if args.quick else 20
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        r = rng.integers(0, args.rows, (args.batch, args.width))
        batches.append((r, np.ones(r.shape, np.float32), np.ones(r.shape, bool),
                        (rng.random(args.batch) < 0.3).astype(np.float32)))
    result = {"width": args.width, "batch_size": args.batch, "rows": args.rows, "by_blocks": {}}
    for blocks in (1, 2, 4, 8):
        step_s, split_s = run(blocks, batches, args.rows, steps)
        result["by_blocks"][blocks] = {"step_seconds": step_s, "split_seconds": split_s}
    base = result["by_blocks"][1]["step_seconds"]
    for blocks, r in result["by_blocks"].items():
        result[f"ratio_{blocks}_blocks"] = base / r["step_seconds"]
    result["machine"] = machine_info()
    emit("blocked", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
