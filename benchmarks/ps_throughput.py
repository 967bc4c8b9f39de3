"""Host PS throughput: pull + push rows/s of the in-process parameter server vs the machine's floor.

One collisionless table (dim 16, Adagrad) in an embedded server group (1 server, 256
partitions), pre-populated by pushing every key, then timed on batches of 100k unique
random existing keys: one pull and one push (find, gather values + accumulator, row-wise
Adagrad, scatter both back) per batch. As in a training step, the push carries exactly the
keys the client pulled, so the server reuses the pull's routing and slots (`jaxps.ps.memo`;
verified against the pushed keys, no second index probe). The floor, measured in the same run on a flat table
of the same rows: numpy gather + scatter of the same number of random rows of every array
the update touches (values and accumulator), with the fastest idiom (np.take / np.put on
void row views, PS_NOTES.md), timed in rounds interleaved with the PS's (one floor batch,
then one PS batch of the same rows). ratio_vs_floor = PS rows/s / floor rows/s.

If a gRPC transport exists (jaxps/ps/grpc_transport.py), 2 server processes over gRPC are
measured the same way and compared with in-process (grpc_ratio_vs_inprocess).

Usage: python benchmarks/ps_throughput.py [--quick] [--rows N] [--batches N]
"""
from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from _common import emit, machine_info, parser, server_address  # noqa: E402
from jaxps.hashing import mix64  # noqa: E402
from jaxps.launch.local import stop_processes  # noqa: E402
from jaxps.optim.rowwise import Adagrad  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table_keys(lo: int, hi: int) -> np.ndarray:
    """Keys lo..hi-1 of the table: a bijective hash of the counter (unique, random-looking)."""
    return mix64(np.arange(lo, hi, dtype=np.uint64) + np.uint64(1))


def batches_of_rows(n_rows: int, batch: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n_rows, batch, replace=False) for _ in range(count)]


class Floor:
    """Gather + scatter of values and accumulator rows (np.take / np.put on void row views)
    on a flat table of n_rows, one batch per `round`: timed in rounds interleaved with the
    PS's, so both see the same machine (these VMs drift by 1.5x between minutes)."""

    def __init__(self, n_rows: int, dim: int, batch: int):
        self.values = np.empty((n_rows, dim), np.float32)
        self.acc = np.empty((n_rows, dim), np.float32)
        self.values.fill(0.5)  # touch every page: untouched zero pages would read unrealistically fast
        self.acc.fill(0.1)
        row = np.dtype((np.void, 4 * dim))
        self.vv, self.av = self.values.view(row).reshape(-1), self.acc.view(row).reshape(-1)
        self.vbuf, self.abuf = np.empty(batch, row), np.empty(batch, row)
        self.seconds, self.rows = 0.0, 0

    def round(self, rows: np.ndarray, timed: bool = True) -> None:
        t0 = time.perf_counter()
        np.take(self.vv, rows, out=self.vbuf)
        np.take(self.av, rows, out=self.abuf)
        np.put(self.vv, rows, self.vbuf)
        np.put(self.av, rows, self.abuf)
        if timed:
            self.seconds += time.perf_counter() - t0
            self.rows += rows.shape[0]

    def result(self) -> dict:
        return {"rows_per_sec": self.rows / self.seconds, "ns_per_row": 1e9 * self.seconds / self.rows,
                "seconds": self.seconds}


def run_ps(client, keys_all: np.ndarray, key_batches: list[np.ndarray], dim: int, prepop_batch: int,
           table: str = "t", between=None) -> dict:
    """Prepopulate, then time pull + push of each batch; `between(i)` (untimed here) runs
    before batch i: the floor's interleaved round."""
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    zeros = np.zeros((prepop_batch, dim), np.float32)
    for lo in range(0, keys_all.shape[0], prepop_batch):
        k = keys_all[lo:lo + prepop_batch]
        client.push(table, k, zeros[:k.shape[0]], 1)
    prepop_s = time.perf_counter() - t0
    grads = rng.normal(size=(key_batches[0].shape[0], dim)).astype(np.float32)
    client.pull(table, key_batches[0])  # warm (compiles nothing new, touches code paths)
    pull_s = push_s = 0.0
    for step, keys in enumerate(key_batches, start=2):
        if between is not None:
            between(step - 2)
        t0 = time.perf_counter()
        client.pull(table, keys)
        t1 = time.perf_counter()
        client.push(table, keys, grads, step)
        t2 = time.perf_counter()
        pull_s += t1 - t0
        push_s += t2 - t1
    n = sum(k.shape[0] for k in key_batches)
    return {"prepopulate_seconds": prepop_s, "prepopulate_rows_per_sec": keys_all.shape[0] / prepop_s,
            "rows_per_sec": n / (pull_s + push_s), "pull_rows_per_sec": n / pull_s,
            "push_rows_per_sec": n / push_s, "seconds": pull_s + push_s}


def grpc_available() -> bool:
    return importlib.util.find_spec("jaxps.ps.grpc_transport") is not None


def run_grpc(n_rows, dim, partitions, keys_all, key_batches, prepop_batch, out_dir) -> dict:
    """The same workload on 2 server processes (python -m jaxps.ps.serve) over gRPC on loopback."""
    import json
    import subprocess

    from jaxps.ps.client import PSClient
    from jaxps.ps.grpc_transport import GrpcTransport
    from jaxps.ps.ring import Ring
    from jaxps.ps.serve import table_specs

    names = ["ps-0", "ps-1"]
    tables = [{"name": "t", "dim": dim, "optimizer": {"name": "adagrad", "learning_rate": 0.05}}]
    os.makedirs(out_dir, exist_ok=True)
    tables_json = os.path.join(out_dir, "ps_throughput_tables.json")
    with open(tables_json, "w") as f:
        json.dump(tables, f)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    procs, addrs = [], {}
    try:
        for name in names:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jaxps.ps.serve", "--name", name, "--servers", ",".join(names),
                 "--partitions", str(partitions), "--tables", tables_json, "--workers", "8", "--grace", "2"],
                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(proc)
            addrs[name] = server_address(proc, name)
        ring = Ring(partitions, 64, names)
        transports = {n: GrpcTransport(a, timeout=120) for n, a in addrs.items()}
        client = PSClient(ring, transports, table_specs(tables))
        res = run_ps(client, keys_all, key_batches, dim, prepop_batch)
        stats = client.stats()
        res["keys"] = sum(s["t"]["keys"] for s in stats.values())
        res["store_bytes"] = sum(s["t"]["bytes"] for s in stats.values())
        client.close()
        for t in transports.values():
            t.close()
        return res
    finally:
        stop_processes(procs, grace=20)


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="table rows (default 50M, quick 5M)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 30, quick 10)")
    p.add_argument("--prepop-batch", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="in-process server threads per request (PSServer threads; the floor uses one)")
    p.add_argument("--no-grpc", action="store_true", help="skip the 2-process gRPC measurement")
    args = p.parse_args(argv)
    n_rows = args.rows or (5_000_000 if args.quick else 50_000_000)
    nb = args.batches or (10 if args.quick else 30)
    dim, batch = args.dim, args.batch
    opt = Adagrad(0.05)

    row_batches = batches_of_rows(n_rows, batch, nb, seed=0)
    rss0 = rss_bytes()
    floor = Floor(n_rows, dim, batch)
    floor.round(row_batches[0], timed=False)  # warm

    from jaxps.ps.client import embedded
    from jaxps.ps.server import TableSpec

    keys_all = table_keys(0, n_rows)
    key_batches = [keys_all[r] for r in row_batches]
    spec = TableSpec("t", dim, opt)
    client = embedded([spec], servers=1, num_partitions=args.partitions, threads=args.threads)
    rss1 = rss_bytes()
    ps = run_ps(client, keys_all, key_batches, dim, args.prepop_batch,
                between=lambda i: floor.round(row_batches[i]))
    stats = next(iter(client.stats().values()))["t"]
    ps["rss_growth_bytes"] = rss_bytes() - rss1
    ps["store_bytes"] = stats["bytes"]
    assert stats["keys"] == n_rows, stats
    client.close()
    del client
    floor_res = floor.result()
    del floor
    gc.collect()

    raw = n_rows * (8 + 2 * 4 * dim)
    result = {
        "quick": bool(args.quick),
        "note": ("quick mode: 5M-row table (full run: 50M)" if args.quick and not args.rows else None),
        "table_rows": n_rows, "dim": dim, "optimizer": "adagrad (values + accumulator)",
        "batch_keys": batch, "timed_batches": nb, "partitions": args.partitions, "servers": 1,
        "server_threads": args.threads,
        "table_bytes_values_and_accumulator": n_rows * 2 * 4 * dim,
        "raw_bytes_keys_values_accumulator": raw,
        "store_bytes": ps["store_bytes"], "store_bytes_per_raw": ps["store_bytes"] / raw,
        "ps_rows_per_sec": ps["rows_per_sec"], "floor_rows_per_sec": floor_res["rows_per_sec"],
        "ratio_vs_floor": ps["rows_per_sec"] / floor_res["rows_per_sec"],
        "ps_pull_rows_per_sec": ps["pull_rows_per_sec"], "ps_push_rows_per_sec": ps["push_rows_per_sec"],
        "floor_ns_per_row": floor_res["ns_per_row"], "ps_ns_per_row": 1e9 / ps["rows_per_sec"],
        "prepopulate_seconds": ps["prepopulate_seconds"],
        "prepopulate_rows_per_sec": ps["prepopulate_rows_per_sec"],
        "ps_rss_growth_bytes": ps["rss_growth_bytes"], "rss_before_bytes": rss0,
        "floor_definition": "np.take + np.put on void row views of values and accumulator, same row count",
        "floor_timing": "one floor batch before each PS batch (interleaved rounds, same rows)",
    }
    g = None
    if args.no_grpc:
        result["grpc_ratio_vs_inprocess"] = None
        result["grpc_note"] = "skipped (--no-grpc)"
    elif not grpc_available():
        result["grpc_ratio_vs_inprocess"] = None
        result["grpc_note"] = "no gRPC transport in jaxps/ps (jaxps/ps/grpc_transport.py absent) at run time"
    else:
        try:
            g = run_grpc(n_rows, dim, args.partitions, keys_all, key_batches, args.prepop_batch, args.out)
            assert g["keys"] == n_rows, g
        except Exception as e:  # noqa: BLE001 - the transport is young: report, keep the in-process result
            g = None
            result["grpc_ratio_vs_inprocess"] = None
            result["grpc_note"] = f"gRPC measurement failed: {type(e).__name__}: {e}"[:500]
    if g is not None:
        result["grpc_ratio_vs_inprocess"] = g["rows_per_sec"] / ps["rows_per_sec"]
        result["grpc"] = {"servers": 2, "transport": "jaxps.ps.grpc_transport over loopback, one process per server",
                          "rows_per_sec": g["rows_per_sec"], "pull_rows_per_sec": g["pull_rows_per_sec"],
                          "push_rows_per_sec": g["push_rows_per_sec"],
                          "prepopulate_seconds": g["prepopulate_seconds"], "store_bytes": g["store_bytes"]}
    result["machine"] = machine_info()
    emit("ps_throughput", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
