"""Failover of a PS server: time from SIGKILL to the first acknowledged push on the
promoted backup, and updates lost (none may be).

Four real server processes (gRPC on loopback, token, `--replicas 2`: every partition has
a primary and two backups) hold a table of `--rows` rows; a client pushes without pause
(SGD, learning rate 1, every gradient 1, so each applied push lowers its rows by exactly
1 — the table itself counts the pushes applied). The benchmark SIGKILLs the server that
is primary of the most partitions. The manager (heartbeat `--heartbeat` s, `--misses`
missed beats) notices, freezes the survivors, copies the partitions whose replica sets
changed, publishes the next ring; the client, whose pushes to the dead server failed,
refreshes its ring and retries with the same request ids.

Reported: `failover_seconds` (kill -> first push acknowledged on the new ring), its parts
(detection, reconfiguration), `ratio_vs_detection_floor` (failover / heartbeat x misses,
the time no heartbeat-based detector can beat), and `lost_updates` = acknowledged pushes
missing from the table (plus `duplicate_updates`, applied twice), both read back from
every row of the table.

Usage: python benchmarks/failover.py [--quick] [--rows 1000000] [--heartbeat 0.1]
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from _common import emit, machine_info, parser, server_address  # noqa: E402
from jaxps.launch.local import stop_processes  # noqa: E402
from jaxps.optim import rowwise  # noqa: E402
from jaxps.ps.client import PSClient  # noqa: E402
from jaxps.ps.grpc_transport import GrpcTransport  # noqa: E402
from jaxps.ps.manager import ServerManager  # noqa: E402
from jaxps.ps.ring import Ring  # noqa: E402
from jaxps.ps.server import TableSpec  # noqa: E402

SERVERS = [f"ps-{i}" for i in range(4)]
TOKEN = "failover-bench"
DIM = 8


def start_servers(partitions: int) -> tuple[dict, dict]:
    procs, transports = {}, {}
    env = dict(os.environ, JAXPS_PS_TOKEN=TOKEN)
    for name in SERVERS:
        p = subprocess.Popen([sys.executable, "-m", "jaxps.ps.serve", "--name", name, "--servers", ",".join(SERVERS),
                              "--partitions", str(partitions), "--replicas", "2", "--token-env", "JAXPS_PS_TOKEN",
                              "--grace", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs[name] = p
        transports[name] = GrpcTransport(server_address(p, name), token=TOKEN, timeout=10)
    return procs, transports


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="table rows (default 1M, quick 100k)")
    p.add_argument("--batch", type=int, default=4096, help="keys per push")
    p.add_argument("--heartbeat", type=float, default=0.1)
    p.add_argument("--misses", type=int, default=3)
    p.add_argument("--partitions", type=int, default=256)
    args = p.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    spec = TableSpec("t", DIM, rowwise.SGD(learning_rate=1.0), kind="hashed", rows=rows)
    procs, transports = start_servers(args.partitions)
    ring = Ring(args.partitions, 64, SERVERS)
    manager = ServerManager(ring, transports, replicas=2, heartbeat=args.heartbeat, misses=args.misses).start()
    ps = PSClient(ring, transports, [], replicas=2, ring_source=manager.view)
    acked = np.zeros(rows, np.int64)     # acknowledged pushes per row
    log: list[tuple[float, int]] = []    # (ack time, ring version the push ended on)
    try:
        ps.create_tables([spec])
        all_keys = np.arange(rows, dtype=np.uint64)
        ps.load("t", {"keys": all_keys, "values": np.zeros((rows, DIM), np.float32)})  # every row stored
        rng = np.random.default_rng(0)
        stop = threading.Event()
        errors = []

        def pusher():
            try:
                while not stop.is_set():
                    keys = np.unique(rng.integers(0, rows, args.batch)).astype(np.uint64)
                    ps.push("t", keys, np.ones((keys.shape[0], DIM), np.float32), step=1)
                    acked[keys.astype(np.int64)] += 1
                    log.append((time.monotonic(), ps.ring.version))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        worker = threading.Thread(target=pusher)
        worker.start()
        time.sleep(1.0 if args.quick else 2.0)
        victim = SERVERS[int(np.bincount(ring.owners(), minlength=4).argmax())]
        pushes_before = len(log)
        t_kill = time.monotonic()
        procs[victim].send_signal(signal.SIGKILL)
        deadline = t_kill + 60
        while not manager.changes and time.monotonic() < deadline:
            time.sleep(0.01)
        while time.monotonic() < deadline and not any(t > t_kill and v > ring.version for t, v in log):
            time.sleep(0.01)
        time.sleep(1.0 if args.quick else 2.0)  # keep pushing on the new ring
        stop.set()
        worker.join(60)
        if errors:
            raise errors[0]
        first = min(t for t, v in log if t > t_kill and v > ring.version)
        change = manager.changes[0]
        values = ps.pull("t", all_keys)
        applied = np.rint(-values[:, 0]).astype(np.int64)
        consistent = bool(np.all(values == values[:, :1]))  # every column saw the same pushes
        result = {
            "benchmark": "failover", "quick": args.quick, "rows": rows, "keys_per_push": args.batch,
            "servers": len(SERVERS), "replicas": 2, "victim": victim,
            "failover_seconds": first - t_kill,
            "detection_seconds": change.detected_at - t_kill,
            "reconfigure_seconds": change.seconds,
            "partition_copies": change.copied,
            "heartbeat": args.heartbeat, "misses": args.misses,
            "ratio_vs_detection_floor": (first - t_kill) / (args.heartbeat * args.misses),
            "pushes_acknowledged": len(log), "pushes_before_kill": pushes_before,
            "client_retries": ps.retries,
            "lost_updates": int(np.maximum(acked - applied, 0).sum()),
            "duplicate_updates": int(np.maximum(applied - acked, 0).sum()),
            "rows_consistent": consistent,
            "machine": machine_info(),
        }
        print(f"failover {result['failover_seconds']:.3f}s (detect {result['detection_seconds']:.3f}s, "
              f"reconfigure {result['reconfigure_seconds']:.3f}s, {change.copied} partition copies), "
              f"lost {result['lost_updates']}, duplicated {result['duplicate_updates']}", flush=True)
    finally:
        manager.stop()
        stop_processes(procs.values(), grace=10)
    emit("failover", result, args.out)


if __name__ == "__main__":
    main()
