"""Host PS scaling: pull latency per key and memory per key at 1M, 10M, 100M collisionless keys.

One collisionless table (dim 8, SGD: no optimizer slots, so the raw data is keys + values)
in an embedded server group (1 server, 256 partitions), filled by pushing every key in
batches of 1M. Pull latency: batches of 100k keys, 90% stored keys (random) and 10% never
seen (they read as initial rows), through the client (routing, server, partition stores).
Memory: bytes the stores actually hold (row arrays at their capacity, key array and hash
buckets: `PartitionStore.nbytes`, the arrays' nbytes) over raw bytes (keys * 8 + values
+ optimizer state); process RSS growth is reported too.

latency_growth = ns/key at the largest size / ns/key at 1M (target <= 1.5);
memory_ratio = store bytes / raw bytes at the largest size (target <= 1.5; the worst
size is reported as memory_ratio_max).

Usage: python benchmarks/ps_scaling.py [--quick] [--sizes 1000000,10000000,100000000]
"""
from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.hashing import mix64  # noqa: E402
from jaxps.optim.rowwise import SGD  # noqa: E402
from jaxps.ps.client import embedded  # noqa: E402
from jaxps.ps.server import TableSpec  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def keys_range(lo: int, hi: int) -> np.ndarray:
    """Distinct random-looking keys: a bijective hash of the counter."""
    return mix64(np.arange(lo, hi, dtype=np.uint64) + np.uint64(1))


def measure(n_keys: int, dim: int, batch: int, n_batches: int, partitions: int, fill_batch: int) -> dict:
    gc.collect()
    rss0 = rss_bytes()
    client = embedded([TableSpec("t", dim, SGD(0.1))], servers=1, num_partitions=partitions)
    zeros = np.zeros((fill_batch, dim), np.float32)
    t0 = time.perf_counter()
    for lo in range(0, n_keys, fill_batch):
        k = keys_range(lo, min(n_keys, lo + fill_batch))
        client.push("t", k, zeros[:k.shape[0]], 1)
    fill_s = time.perf_counter() - t0
    server = next(iter(client.transports.values())).server
    stores = list(server._stores.values())
    assert sum(s.size for s in stores) == n_keys
    arrays = {"values": sum(s.values.nbytes for s in stores),
              "optimizer_slots": sum(a.nbytes for s in stores for a in s.slots.values()),
              "index": sum(s.index.nbytes for s in stores)}
    store_bytes = sum(arrays.values())
    assert store_bytes == next(iter(client.stats().values()))["t"]["bytes"]
    raw = n_keys * (8 + 4 * dim)  # SGD: no optimizer state
    rss_growth = rss_bytes() - rss0

    rng = np.random.default_rng(0)
    n_hit = int(round(0.9 * batch))
    batches = []
    for b in range(n_batches + 1):
        hit = mix64(rng.choice(n_keys, n_hit, replace=False).astype(np.uint64) + np.uint64(1))
        miss = keys_range(n_keys + 1 + b * batch, n_keys + 1 + b * batch + batch - n_hit)
        k = np.concatenate([hit, miss])
        rng.shuffle(k)
        batches.append(k)
    client.pull("t", batches[0])  # warm
    t0 = time.perf_counter()
    for k in batches[1:]:
        client.pull("t", k)
    pull_s = time.perf_counter() - t0
    ns_per_key = 1e9 * pull_s / (n_batches * batch)
    assert sum(s.size for s in server._stores.values()) == n_keys  # pulls store nothing
    client.close()
    del client, server, stores
    gc.collect()
    return {"keys": n_keys, "pull_ns_per_key": ns_per_key, "fill_seconds": fill_s,
            "fill_keys_per_sec": n_keys / fill_s, "store_bytes": store_bytes, "store_bytes_by_array": arrays,
            "raw_bytes": raw, "memory_ratio": store_bytes / raw, "bytes_per_key": store_bytes / n_keys,
            "rss_growth_bytes": rss_growth, "rss_growth_per_key": rss_growth / n_keys}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated key counts (default 1M,10M,100M; quick 1M,10M)")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=None, help="timed pull batches per size (default 30, quick 10)")
    p.add_argument("--partitions", type=int, default=256)
    p.add_argument("--fill-batch", type=int, default=1_000_000)
    args = p.parse_args(argv)
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    else:
        sizes = [1_000_000, 10_000_000] if args.quick else [1_000_000, 10_000_000, 100_000_000]
    nb = args.batches or (10 if args.quick else 30)
    runs = [measure(n, args.dim, args.batch, nb, args.partitions, args.fill_batch) for n in sizes]
    base = runs[0]
    result = {
        "quick": bool(args.quick),
        "note": ("quick mode: stops at 10M keys (full run: 1M, 10M, 100M)" if args.quick and not args.sizes
                 else None),
        "sizes": sizes, "dim": args.dim,
        "optimizer": "sgd (no optimizer slots: raw bytes = keys * 8 + keys * dim * 4)",
        "batch_keys": args.batch, "existing_key_fraction": 0.9, "timed_batches": nb,
        "partitions": args.partitions, "servers": 1,
        "latency_growth": runs[-1]["pull_ns_per_key"] / base["pull_ns_per_key"],
        "latency_growth_vs_size": f"{sizes[-1]} / {sizes[0]} keys",
        "memory_ratio": runs[-1]["memory_ratio"],
        "memory_ratio_max": max(r["memory_ratio"] for r in runs),
        "pull_ns_per_key": {str(r["keys"]): r["pull_ns_per_key"] for r in runs},
        "bytes_per_key": {str(r["keys"]): r["bytes_per_key"] for r in runs},
        "rss_growth_per_key": {str(r["keys"]): r["rss_growth_per_key"] for r in runs},
        "runs": runs,
        "machine": machine_info(),
    }
    emit("ps_scaling", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
