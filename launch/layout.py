"""The shape of a cluster job and the environment each of its processes gets.

Pure functions, no I/O: a scheduler adapter (`jaxps.launch.node`) finds out *who* a
process is (a rank, or a Kubernetes pod name) and *where* its peers are (host names);
everything else — its role, its ports, its JAXPS_* variables, the PS server's argv —
follows from the `Layout` here, so SLURM, Kubernetes and TPU pods agree by construction
and the logic is unit-testable without a cluster.

Rank layout (SLURM, one rank per task): the first `servers` ranks are PS servers, then
`groups × workers_per_group` workers, group-major (group g's worker j is rank
servers + g·workers_per_group + j), then the manager (when the layout has one).
Ports are offset by index (server i listens on server_port + i, group g's coordinator on
coordinator_port + g), so several ranks may share a host without colliding.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal, Sequence

from jaxps.ps.client import ENV_PARTITIONS, ENV_SERVERS, ENV_TOKEN
from jaxps.runtime import (ENV_COORDINATOR, ENV_COORDINATOR_BIND, ENV_CPU_DEVICES, ENV_NUM_PROCESSES,
                           ENV_PROCESS_ID)

# Worker groups: each group is its own jax.distributed job; the PS clocks relate them
# (JAXPS_GROUP, JAXPS_NUM_GROUPS, JAXPS_SYNC: see jaxps.groups).
from jaxps.groups import ENV_GROUP, ENV_NUM_GROUPS, ENV_SYNC  # noqa: E402
from jaxps.ps.client import ENV_MANAGER, ENV_REPLICAS  # noqa: E402  (manager address, backups per partition)

_SYNC = re.compile(r"^(bsp|asp|ssp:\d+)$")
RoleKind = Literal["server", "worker", "manager"]


@dataclass(frozen=True)
class Layout:
    """What a cluster job runs: the same on every node, given on every node's command line."""
    servers: int = 0                 # PS server processes (M)
    groups: int = 1                  # worker groups (G), each its own jax.distributed job
    workers_per_group: int = 1       # worker processes per group (N)
    manager: bool = False            # one PS server-manager process (needs jaxps.ps.manager)
    server_port: int = 7000          # server i listens on server_port + i
    coordinator_port: int = 12345    # group g's jax.distributed coordinator on coordinator_port + g
    manager_port: int = 7999
    partitions: int = 256            # PS key-space partitions (servers and clients must agree)
    sync: str = "bsp"
    bind: str = "0.0.0.0"            # address servers and coordinators listen on (tests: 127.0.0.1)
    cpu_devices: int | None = None   # simulated CPU devices per worker (CPU-only clusters, tests)
    replicas: int = 0                # backups per PS partition (hot standby; failover needs the manager)

    def __post_init__(self) -> None:
        if self.servers < 0 or self.groups < 1 or self.workers_per_group < 1:
            raise ValueError(f"need servers >= 0, groups >= 1, workers per group >= 1; got {self.servers}, "
                             f"{self.groups}, {self.workers_per_group}")
        if not _SYNC.match(self.sync):
            raise ValueError(f"sync={self.sync!r}: expected 'bsp', 'asp' or 'ssp:N'")
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")

    @property
    def workers(self) -> int:
        return self.groups * self.workers_per_group

    @property
    def ranks(self) -> int:
        """Processes in the rank layout (servers, workers, manager)."""
        return self.servers + self.workers + int(self.manager)

    @property
    def server_names(self) -> list[str]:
        return [f"ps-{i}" for i in range(self.servers)]


@dataclass(frozen=True)
class Role:
    kind: RoleKind
    index: int = 0   # server index, or the worker's process id within its group
    group: int = 0   # workers only


def role_of(layout: Layout, rank: int) -> Role:
    """The role of global `rank` in the rank layout (see the module docstring)."""
    if not 0 <= rank < layout.ranks:
        raise ValueError(f"rank {rank} is outside the layout's {layout.ranks} ranks ({layout.servers} servers, "
                         f"{layout.groups}x{layout.workers_per_group} workers, manager={layout.manager})")
    if rank < layout.servers:
        return Role("server", rank)
    w = rank - layout.servers
    if w < layout.workers:
        return Role("worker", w % layout.workers_per_group, w // layout.workers_per_group)
    return Role("manager")


def rank_of(layout: Layout, role: Role) -> int:
    """Inverse of `role_of`."""
    if role.kind == "server":
        return role.index
    if role.kind == "worker":
        return layout.servers + role.group * layout.workers_per_group + role.index
    return layout.servers + layout.workers


@dataclass(frozen=True)
class Peers:
    """Where the processes a node talks to run (host names or addresses, no ports)."""
    server_hosts: tuple[str, ...] = ()    # host of server i
    coordinator_host: str = ""            # host of this worker group's process 0
    manager_host: str | None = None


def peers_from_rank_hosts(layout: Layout, role: Role, hosts: Sequence[str]) -> Peers:
    """Peers when the host of every rank is known (SLURM: hosts[r] runs rank r)."""
    if len(hosts) != layout.ranks:
        raise ValueError(f"{len(hosts)} rank hosts for a layout of {layout.ranks} ranks")
    coordinator = hosts[rank_of(layout, Role("worker", 0, role.group))] if role.kind == "worker" else ""
    return Peers(tuple(hosts[:layout.servers]), coordinator,
                 hosts[rank_of(layout, Role("manager"))] if layout.manager else None)


def server_addresses(layout: Layout, peers: Peers) -> str:
    """JAXPS_PS_SERVERS: "ps-0=host:port,ps-1=host:port"."""
    if len(peers.server_hosts) != layout.servers:
        raise ValueError(f"{len(peers.server_hosts)} server hosts for {layout.servers} servers")
    return ",".join(f"{name}={host}:{layout.server_port + i}"
                    for i, (name, host) in enumerate(zip(layout.server_names, peers.server_hosts)))


def environment(layout: Layout, role: Role, peers: Peers, token: str | None) -> dict[str, str]:
    """The JAXPS_* variables a process of `role` runs with (added to the inherited ones).

    Every role gets the token; workers get the jax.distributed contract of their own group
    (jaxps.runtime), the worker-group variables and the PS client's."""
    env: dict[str, str] = {}
    if token:
        env[ENV_TOKEN] = token
    if layout.manager and peers.manager_host:
        env[ENV_MANAGER] = f"{peers.manager_host}:{layout.manager_port}"
    if role.kind == "server":
        return env
    if layout.servers:
        env[ENV_SERVERS] = server_addresses(layout, peers)
        env[ENV_PARTITIONS] = str(layout.partitions)
        env[ENV_REPLICAS] = str(layout.replicas)
    if role.kind == "manager":
        return env
    port = layout.coordinator_port + role.group
    env.update({ENV_COORDINATOR: f"{peers.coordinator_host}:{port}",
                ENV_COORDINATOR_BIND: f"{layout.bind}:{port}",
                ENV_NUM_PROCESSES: str(layout.workers_per_group), ENV_PROCESS_ID: str(role.index),
                ENV_GROUP: str(role.group), ENV_NUM_GROUPS: str(layout.groups), ENV_SYNC: layout.sync})
    if layout.cpu_devices:
        env[ENV_CPU_DEVICES] = str(layout.cpu_devices)
    return env


def server_argv(layout: Layout, index: int) -> list[str]:
    """`jaxps ps-server` for server `index` (run as `python -m jaxps.ps.serve`: no JAX import,
    fast start). The token travels in JAXPS_PS_TOKEN, never on the command line."""
    return [sys.executable, "-m", "jaxps.ps.serve", "--name", f"ps-{index}",
            "--servers", ",".join(layout.server_names), "--partitions", str(layout.partitions),
            "--host", layout.bind, "--port", str(layout.server_port + index), "--token-env", ENV_TOKEN,
            "--replicas", str(layout.replicas)]


def manager_argv(layout: Layout) -> list[str]:
    """The server manager (jaxps.ps.manager: heartbeats, failover, the ring for clients);
    it finds the servers in JAXPS_PS_SERVERS."""
    return [sys.executable, "-m", "jaxps.ps.manager", "--host", layout.bind, "--port", str(layout.manager_port),
            "--partitions", str(layout.partitions), "--replicas", str(layout.replicas), "--token-env", ENV_TOKEN]
