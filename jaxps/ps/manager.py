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
            self.transports[name] = transport if transport is not None else self.connect(name)
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
            old_sets, new_sets = old.replicas(self.replicas), new.replicas(self.replicas)
            copies: dict[tuple[str, str], list[int]] = {}   # (source, target) -> partitions
            for p in range(old.num_partitions):
                have = [old.servers[i] for i in old_sets[p] if old.servers[i] not in dead]
                want = [new.servers[i] for i in new_sets[p]]
                if not have:
                    change.lost.append(p)
                    continue
                for target in want:
                    if target not in have:
                        copies.setdefault((have[0], target), []).append(p)
            for (source, target), parts in sorted(copies.items()):
                data = self.transports[source].export_partitions(parts)
                self.transports[target].load_partitions(data)
                change.copied += len(parts)
            for s in servers:
                self.transports[s].set_ring(new)
            self.ring = new
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
        if change.lost:
            log.error("partitions %s lost every replica (more than %d servers failed at once)",
                      change.lost[:10], self.replicas)
        log.warning("ring v%d: %s %s, %d partition copies in %.3fs", new.version, kind, who, change.copied,
                    change.seconds)
        self.changes.append(change)
        return change

    def moved_fraction(self, change: Change) -> float:
        """Copied (partition, replica) pairs over all of them: ~1/n for one of n servers."""
        return change.copied / float(self.ring.num_partitions * min(self.replicas + 1, len(self.ring.servers)))
