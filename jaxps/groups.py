"""Worker groups: several independent SPMD programs training one model through one PS
server group (the four-realms article §3.2; DESIGN.md "Consistency").

A worker group is one SPMD program with its own mesh: one trainer process, or several
processes of its own jax.distributed job (a multi-host slice, a multi-node GPU group).
Every namespace of a multi-group job lives in the PS (tables as HostTables, dense parameters as one dense
table), each group reads its own share of the data, and the PS clocks
(`jaxps.ps.clock`) govern how far groups may drift apart: `bsp`, `ssp:N` or `asp`.

On the servers every process of every group keeps its own clock (`clock_id` of
`clocks`): a group's step counts as completed once all its processes reported it, so
BSP's one aggregated update, SSP's gate, checkpoint cuts and `DONE` need no barrier
inside the group. Each process pulls and pushes its own share of the keys
(jaxps.host_tables.ProcessShare), the dense table's rows included.

Environment contract (set by `jaxps launch`, read by `from_env`):
    JAXPS_GROUP        this process's group, 0-based
    JAXPS_NUM_GROUPS   number of worker groups
    JAXPS_SYNC         "bsp" | "ssp:N" | "asp"   (default "bsp")
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from jaxps.ps.clock import Sync

ENV_GROUP = "JAXPS_GROUP"
ENV_NUM_GROUPS = "JAXPS_NUM_GROUPS"
ENV_SYNC = "JAXPS_SYNC"


@dataclass(frozen=True)
class WorkerGroup:
    index: int = 0
    count: int = 1
    sync: str = "bsp"
    processes: int = 1   # processes of this group's jax.distributed job (the same in every group)
    process: int = 0     # this process's index in it

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"worker group {self.index} of {self.count}: need 0 <= group < groups")
        if self.processes < 1 or not 0 <= self.process < self.processes:
            raise ValueError(f"process {self.process} of {self.processes} in worker group {self.index}: "
                             f"need 0 <= process < processes")
        Sync.parse(self.sync, "sync")

    @property
    def clock_id(self) -> int:
        """This process's clock on the servers (group-major: group g's process p)."""
        return self.index * self.processes + self.process

    @property
    def clocks(self) -> int:
        """Clocks the servers keep: one per process of every group."""
        return self.count * self.processes

    @property
    def policy(self) -> Sync:
        return Sync.parse(self.sync, "sync")


def from_env() -> WorkerGroup | None:
    """The worker group this process belongs to (None when JAXPS_NUM_GROUPS is unset or 1:
    a job of one group is an ordinary job)."""
    count = os.environ.get(ENV_NUM_GROUPS, "").strip()
    if not count or count == "1":
        return None
    try:
        return WorkerGroup(int(os.environ.get(ENV_GROUP, "0")), int(count), os.environ.get(ENV_SYNC, "bsp"))
    except ValueError as e:
        raise ValueError(f"{ENV_GROUP}/{ENV_NUM_GROUPS}/{ENV_SYNC}: {e}") from None
