"""A PS server process: one `PSServer` of a group, served over gRPC.

    python -m jaxps.ps.serve --name ps-0 --port 50051 --servers ps-0,ps-1 --partitions 256 \\
        --tables tables.json [--token-env JAXPS_PS_TOKEN] [--host 127.0.0.1]

tables.json is a list of TableSpec fields, the optimizer as {"name": ..., **hyper-parameters}
(`jaxps.optim.rowwise.make`), e.g.
    [{"name": "ids", "dim": 16, "init_scale": 0.01, "seed": 1,
      "optimizer": {"name": "adagrad", "learning_rate": 0.05}}]
Every server of a group and its clients must agree on --servers, --partitions and --vnodes.

The process prints `jaxps ps-server NAME listening on HOST:PORT` once it serves, and stops
gracefully on SIGTERM or SIGINT. The token is read from an environment variable, never
from the command line (other users can read a process's arguments). Nothing here imports JAX.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Sequence

import grpc

from jaxps.ps.grpc_transport import DEFAULT_MAX_REQUEST_BYTES, make_server
from jaxps.ps.ring import Ring
from jaxps.ps.server import PSServer, TableSpec

_FIELDS = {"name", "dim", "kind", "rows", "init_scale", "seed", "optimizer"}


def serve_until_signalled(ready_line: str) -> None:
    """Print `ready_line` (launchers read the address from it) and block until SIGTERM or
    SIGINT: the main loop of a PS-side process (server, manager)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(ready_line, flush=True)
    while not stop.wait(1.0):
        pass


def serve(name: str, ring: Ring, tables: Sequence[TableSpec], host: str = "127.0.0.1", port: int = 0,
          token: str | bytes | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          max_workers: int = 16, replicas: int = 0) -> tuple[grpc.Server, int]:
    """Start serving server `name` of `ring` on host:port (0: a free port); returns the
    started gRPC server and the port it bound. Stop it with `server.stop(grace)`."""
    if name not in ring.servers:
        raise ValueError(f"server {name!r} is not on the ring {ring.servers}")
    return make_server(PSServer(name, ring, tables, replicas), host, port, token, max_request_bytes, max_workers)


def table_specs(entries) -> list[TableSpec]:
    """TableSpecs from parsed tables.json: a list (or {"tables": [...]}) of field dicts."""
    if isinstance(entries, dict) and "tables" in entries:
        entries = entries["tables"]
    if not isinstance(entries, list):
        raise ValueError("tables: expected a list of table objects")
    return [TableSpec.from_json(e, f"tables[{i}]") for i, e in enumerate(entries)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxps ps-server", description="Run one host PS server.")
    p.add_argument("--name", required=True, help="this server's name on the ring")
    p.add_argument("--servers", required=True, help="comma-separated names of every server of the group")
    p.add_argument("--tables", default=None,
                   help="JSON file listing the tables (default: none; clients create their tables)")
    p.add_argument("--partitions", type=int, default=1024)
    p.add_argument("--replicas", type=int, default=0,
                   help="backups per partition (hot standby; the group's clients and manager must agree)")
    p.add_argument("--vnodes", type=int, default=64)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    p.add_argument("--token-env", default=None,
                   help="environment variable holding the shared token clients must send")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--workers", type=int, default=16, help="gRPC handler threads")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on shutdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"jaxps ps-server: --token-env {args.token_env}: the variable is unset or empty",
                  file=sys.stderr)
            return 2
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"jaxps ps-server: warning: serving {args.host} without a token", file=sys.stderr)
    try:
        tables = []
        if args.tables:
            with open(args.tables) as f:
                tables = table_specs(json.load(f))
        ring = Ring(args.partitions, args.vnodes, servers)
        srv, port = serve(args.name, ring, tables, args.host, args.port, token, args.max_request_bytes,
                          args.workers, args.replicas)
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"jaxps ps-server: {e}", file=sys.stderr)
        return 2

    serve_until_signalled(f"jaxps ps-server {args.name} listening on {args.host}:{port}")
    srv.stop(args.grace).wait()
    print(f"jaxps ps-server {args.name} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
