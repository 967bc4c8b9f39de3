"""The server manager: membership, heartbeats, failover and elastic join/leave of a PS
server group (Li et al., OSDI 2014 §4.3; DESIGN.md "Server manager").

A membership change (a server found dead, or one joining or leaving) is one procedure:

  1. freeze every live server: they refuse pushes and clocks (clients retry them) and
     finish those in progress, so partitions can be copied consistently;
  2. compute the next ring; for every partition, each server that joins its replica set
     (primary + k backups, `Ring.replicas`) receives the partition — rows, optimizer
     slots, exactly-once marks and held BSP pushes — from a live member of its old set.
     Consistent hashing keeps this to the partitions whose replica set changed, and a
     dead primary's first backup simply becomes primary: it already holds the rows;
  3. publish the ring to the servers (each drops what it no longer replicates), then to
     clients (`view`), and unfreeze.

With k backups, any k servers may die at once and no acknowledged push is lost: a push is
acknowledged only after every replica applied (or, under BSP, held) it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from jaxps.ps.ring import Ring

log = logging.getLogger("jaxps.ps.manager")


@dataclass
class Change:
    """One membership change, for metrics and the failover benchmark."""

    kind: str                 # "failover" | "join" | "leave"
    servers: list[str]        # the servers that died, joined or left
    version: int              # the ring version it published
    copied: int = 0           # (partition, new replica) pairs copied
    lost: list[int] = field(default_factory=list)  # partitions without a live replica (data lost)
    detected_at: float = 0.0  # time.monotonic() when the change began
    seconds: float = 0.0      # until the new ring was published and the servers unfrozen


class ServerManager:
    """Tracks a server group through its transports (in-process or gRPC; each needs
    ping, freeze, unfreeze, set_ring, export_partitions, load_partitions)."""

    def __init__(self, ring: Ring, transports: Mapping[str, object], replicas: int = 2,
                 heartbeat: float = 0.2, misses: int = 3,
                 connect: Callable[[str], object] | None = None):
        """heartbeat: seconds between pings; misses: failed pings in a row before a server
        is declared dead. connect: makes a transport for a server named by `join`."""
        self.ring, self.replicas = ring, replicas
        self.transports = dict(transports)
        self.heartbeat, self.misses, self.connect = heartbeat, misses, connect
        self.changes: list[Change] = []
        self._missed = {s: 0 for s in ring.servers}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ clients
    def view(self) -> tuple[Ring, dict[str, object]]:
        """The current ring and transports (a `PSClient`'s ring_source)."""
        with self._lock:
            return self.ring, dict(self.transports)

    # ------------------------------------------------------------------ heartbeats
    def start(self) -> "ServerManager":
        self._thread = threading.Thread(target=self._watch, daemon=True, name="jaxps-ps-manager")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.heartbeat):
            dead = []
            for name in list(self.ring.servers):
                try:
                    self.transports[name].ping()
                    self._missed[name] = 0
                except Exception:  # noqa: BLE001 - any failure to answer counts as a miss
                    self._missed[name] = self._missed.get(name, 0) + 1
                    if self._missed[name] >= self.misses:
                        dead.append(name)
            if dead:
                try:
                    self.remove(dead, kind="failover")
                except Exception:  # noqa: BLE001 - keep watching; the next beat retries
                    log.exception("failover of %s failed", dead)

    # ------------------------------------------------------------------ membership
    def remove(self, names: list[str], kind: str = "leave") -> Change:
        """Take servers out of the group (dead ones: failover; live ones: they hand their
        partitions over first, then stop being asked)."""
        with self._lock:
            servers = [s for s in self.ring.servers if s not in names]
            if not servers:
                raise ValueError(f"removing {names} would leave no server")
            dead = set(names) if kind == "failover" else set()
            return self._reconfigure(servers, kind, list(names), dead)

    def join(self, name: str, transport: object | None = None) -> Change:
        """Add a server (started, empty, serving the same tables) while training runs."""
        with self._lock:
            if name in self.ring.servers:
                raise ValueError(f"server {name} is already in the group")
            transport = transport if transport is not None else self.connect(name)
            for spec in self.transports[self.ring.servers[0]].table_specs():  # it starts empty
                transport.create_table(spec)
            self.transports[name] = transport
            self._missed[name] = 0
            return self._reconfigure(self.ring.servers + [name], "join", [name], set())

    def _reconfigure(self, servers: list[str], kind: str, who: list[str], dead: set[str]) -> Change:
        t0 = time.monotonic()
        old, new = self.ring, self.ring.with_servers(servers)
        live = [s for s in dict.fromkeys(old.servers + servers) if s not in dead]
        change = Change(kind, who, new.version, detected_at=t0)
        frozen = []
        try:
            for s in live:
                self.transports[s].freeze()
                frozen.append(s)
            old_sets = old.replicas(self.replicas)
            copies: dict[tuple[str, str], list[int]] = {}   # (source, target) -> partitions
            for p, targets in old.gains(new, self.replicas).items():
                have = [old.servers[i] for i in old_sets[p] if old.servers[i] not in dead]
                if not have:  # (a dead holder is never in the new set: every new holder gains p)
                    change.lost.append(p)
                    continue
                for target in targets:
                    copies.setdefault((have[0], target), []).append(p)
            for (source, target), parts in sorted(copies.items()):
                data = self.transports[source].export_partitions(parts)
                self.transports[target].load_partitions(data)
                change.copied += len(parts)
            # Two phases: every server adopts the new ring keeping all it holds, and only then
            # drops what it no longer replicates. If adopting fails half-way, nothing was
            # dropped anywhere: the manager's view moves to the new ring (servers that took it
            # refuse older clients), the failing server misses its heartbeats, and the next
            # change (its failover) publishes a newer ring and drops the leftovers.
            adopted = []
            try:
                for s in live:  # members, and leavers too: they must refuse stale clients' writes
                    self.transports[s].set_ring(new, drop=False)
                    adopted.append(s)
            finally:
                if adopted:
                    self.ring = new
            for s in live:
                try:
                    self.transports[s].set_ring(new)
                except Exception:  # noqa: BLE001 - its leftover partitions only cost memory
                    log.warning("server %s kept partitions it no longer replicates", s)
            for s in who:
                if s not in servers:
                    self._missed.pop(s, None)
        finally:
            for s in frozen:
                if s not in dead:
                    try:
                        self.transports[s].unfreeze()
                    except Exception:  # noqa: BLE001 - a server that died meanwhile
                        log.warning("could not unfreeze %s", s)
        change.seconds = time.monotonic() - t0
        if dead:
            self._fence(sorted(dead))
        if change.lost:
            log.error("partitions %s lost every replica (more than %d servers failed at once)",
                      change.lost[:10], self.replicas)
        log.warning("ring v%d: %s %s, %d partition copies in %.3fs", new.version, kind, who, change.copied,
                    change.seconds)
        self.changes.append(change)
        return change

    def _fence(self, dead: list[str]) -> None:
        """Best effort, in the background: fence the servers declared dead, so one that was
        only slow (a zombie) refuses the requests of clients still on the old ring (writes
        into partitions nobody reads any more, reads of rows nobody updates). A really dead
        one just fails the call; a hung one is not waited for (the change is published)."""
        def fence():
            for s in dead:
                try:
                    self.transports[s].fence()
                except Exception:  # noqa: BLE001 - dead indeed
                    pass
        threading.Thread(target=fence, name="jaxps-ps-fence", daemon=True).start()

    def moved_fraction(self, change: Change) -> float:
        """Copied (partition, replica) pairs over all of them: ~1/n for one of n servers."""
        return change.copied / float(self.ring.num_partitions * min(self.replicas + 1, len(self.ring.servers)))


# ---------------------------------------------------------------------------------- process
MANAGER_SERVICE = "jaxps.ps.Manager"
RING_METHOD = f"/{MANAGER_SERVICE}/Ring"
CHANGE_METHOD = f"/{MANAGER_SERVICE}/Change"   # {"op": "join" | "leave", "name": ..., "address": ...}


def _ring_json(manager: ServerManager, addresses: Mapping[str, str]) -> dict:
    ring, _ = manager.view()
    return {"servers": list(ring.servers), "addresses": {s: addresses[s] for s in ring.servers},
            "version": ring.version, "partitions": ring.num_partitions, "vnodes": ring.vnodes,
            "replicas": manager.replicas}


def serve_manager(manager: ServerManager, addresses: Mapping[str, str], host: str = "127.0.0.1", port: int = 0,
                  token: str | None = None):
    """Serve the manager's ring to clients over gRPC (`/jaxps.ps.Manager/Ring`: JSON of the
    servers, their addresses and the ring version). Returns (grpc server, port)."""
    import hmac

    import grpc

    from jaxps.ps import wire

    want = token.encode("utf-8") if token else None
    addresses = dict(addresses)

    def receive(request: bytes, context):
        try:
            msg = wire.decode(request, wire.ADMIN)
        except wire.WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {e}")
        if want is not None and not hmac.compare_digest(msg.token, want):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        return msg

    def ring(request: bytes, context):
        receive(request, context)
        return wire.encode(wire.Message(wire.ADMIN_REPLY, meta=wire.json_meta(_ring_json(manager, addresses))))

    def change(request: bytes, context):
        """A server joins (name, address: started, empty) or leaves (name) while training runs."""
        from jaxps.ps.grpc_transport import GrpcTransport
        msg = receive(request, context)
        try:
            req = msg.json()
            op, name = req["op"], req["name"]
            if op == "join":
                addresses[name] = req["address"]
                done = manager.join(name, GrpcTransport(req["address"], token=token, timeout=10))
            elif op == "leave":
                done = manager.remove([name])
            else:
                raise ValueError(f"unknown op {op!r} (join, leave)")
        except (KeyError, ValueError, TypeError, wire.WireError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad change request: {e}")
        except Exception as e:  # noqa: BLE001 - the change failed; the group keeps its ring
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return wire.encode(wire.Message(wire.ADMIN_REPLY, meta=wire.json_meta(
            {"version": done.version, "copied": done.copied, "seconds": done.seconds})))

    from jaxps.ps.grpc_transport import start_grpc_server
    handler = grpc.method_handlers_generic_handler(
        MANAGER_SERVICE, {"Ring": grpc.unary_unary_rpc_method_handler(ring),
                          "Change": grpc.unary_unary_rpc_method_handler(change)})
    return start_grpc_server(handler, host, port, "PS manager", "jaxps-manager", max_workers=4)


class RemoteRing:
    """A `PSClient` ring source that asks a manager process (JAXPS_PS_MANAGER) for the
    current ring, and connects to servers it has not seen yet."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 10.0):
        import grpc
        self.address, self.token, self.timeout = address, token, timeout
        self.channel = grpc.insecure_channel(address)
        self._call = self.channel.unary_unary(RING_METHOD)
        self._transports: dict[str, object] = {}
        self._replaced: list[object] = []  # a server's transport before it moved (closed in `close`:
        # a client may still be finishing a call on it)

    def close(self) -> None:
        """Close the channel to the manager and every transport this made."""
        for t in list(self._transports.values()) + self._replaced:
            t.close()
        self._transports, self._replaced = {}, []
        self.channel.close()

    def fetch(self) -> dict:
        from jaxps.ps import wire
        data = wire.encode(wire.Message(wire.ADMIN, token=(self.token or "").encode("utf-8")))
        return wire.decode(self._call(data, timeout=self.timeout), wire.ADMIN_REPLY).json()

    def __call__(self) -> tuple[Ring, dict[str, object]]:
        from jaxps.ps.grpc_transport import GrpcTransport
        info = self.fetch()
        for name, address in info["addresses"].items():
            t = self._transports.get(name)
            if t is None or t.address != address:
                if t is not None:
                    self._replaced.append(t)
                self._transports[name] = GrpcTransport(address, token=self.token)
        ring = Ring(info["partitions"], info["vnodes"], info["servers"], info["version"])
        return ring, {s: self._transports[s] for s in ring.servers}


def request_change(manager: str, op: str, name: str, address: str | None = None, token: str | None = None,
                   timeout: float = 120.0) -> dict:
    """Ask a manager process to let server `name` join (at `address`) or leave."""
    import grpc

    from jaxps.ps import wire
    with grpc.insecure_channel(manager) as channel:
        data = wire.encode(wire.Message(wire.ADMIN, token=(token or "").encode("utf-8"), meta=wire.json_meta(
            {"op": op, "name": name, **({"address": address} if address else {})})))
        reply = channel.unary_unary(CHANGE_METHOD)(data, timeout=timeout)
    return wire.decode(reply, wire.ADMIN_REPLY).json()


def main(argv=None) -> int:
    """`jaxps ps-manager`: watch a server group, fail over, serve the ring to clients.
    `jaxps ps-manager join|leave --manager HOST:PORT --name NAME [--address HOST:PORT]`
    asks a running manager to add or retire a server while training runs."""
    import argparse
    import os
    import sys

    from jaxps.ps.grpc_transport import GrpcTransport
    from jaxps.ps.serve import serve_until_signalled

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["join"], ["leave"]):
        c = argparse.ArgumentParser(prog=f"jaxps ps-manager {argv[0]}")
        c.add_argument("--manager", required=True, help="host:port of the running manager")
        c.add_argument("--name", required=True)
        c.add_argument("--address", default=None, help="host:port of the joining server")
        c.add_argument("--token-env", default=None)
        a = c.parse_args(argv[1:])
        if argv[0] == "join" and not a.address:
            c.error("join needs --address")
        token = os.environ.get(a.token_env) if a.token_env else None
        print(json.dumps(request_change(a.manager, argv[0], a.name, a.address, token)))
        return 0

    p = argparse.ArgumentParser(prog="jaxps ps-manager", description=main.__doc__)
    p.add_argument("--servers", default=os.environ.get("JAXPS_PS_SERVERS"),
                   help="name=host:port,... of every server of the group (default: $JAXPS_PS_SERVERS)")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("JAXPS_PS_REPLICAS", "2")))
    p.add_argument("--partitions", type=int, default=int(os.environ.get("JAXPS_PS_PARTITIONS", "1024")))
    p.add_argument("--vnodes", type=int, default=64)
    p.add_argument("--heartbeat", type=float, default=0.5, help="seconds between pings")
    p.add_argument("--misses", type=int, default=3, help="missed pings before a server is declared dead")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token-env", default=None, help="environment variable holding the group's token")
    args = p.parse_args(argv)
    if not args.servers:
        p.error("--servers (or JAXPS_PS_SERVERS) is required")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env) if args.token_env else None
    addresses = dict(item.split("=", 1) for item in args.servers.split(",") if item)
    ring = Ring(args.partitions, args.vnodes, list(addresses))
    manager = ServerManager(ring, {n: GrpcTransport(a, token=token, timeout=10) for n, a in addresses.items()},
                            args.replicas, args.heartbeat, args.misses).start()
    try:
        srv, port = serve_manager(manager, addresses, args.host, args.port, token)
    except OSError as e:
        print(f"jaxps ps-manager: {e}", file=sys.stderr)
        return 2
    serve_until_signalled(f"jaxps ps-manager listening on {args.host}:{port}")
    manager.stop()
    srv.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
