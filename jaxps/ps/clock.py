"""Worker-group clocks and the consistency models of a parameter server (Ho et al., NIPS
2013 "More Effective Distributed ML via a Stale Synchronous Parallel Parameter Server").

Each worker group (one SPMD program) counts the steps it completed: its clock. A pull for
a group's next step, made at clock c, may proceed once the slowest group reached c - s:

    bsp      s = 0   every group sees every other group's previous step (lockstep); the
                     server also sums all groups' pushes of a step and applies them as one
                     update, so G groups train exactly as one group on the combined batch
    ssp:s    s >= 1  the fastest group runs at most s steps ahead of the slowest
    asp      s = inf  nobody waits

A group that finished leaves the barrier (its clock becomes `DONE`), so groups with
different amounts of data do not block each other at the end.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

DONE = 1 << 62   # the clock of a group that finished: it no longer holds anyone back
# Seconds a pull (or a resumed process) waits at the clock gate for slower worker groups
# before it fails: long enough for a peer group's restart (compile, snapshot load), short
# enough that a dead group stops the others with an error, not forever.
GATE_TIMEOUT = 600.0
# Clocks a server keeps at most (groups x processes per group): a bound on what one clock
# message may make it allocate (the first message's count is kept for the job's life).
MAX_CLOCKS = 1 << 16


@dataclass(frozen=True)
class Sync:
    """A consistency model: `staleness` steps (None: asynchronous, no bound)."""

    staleness: int | None = 0

    def __post_init__(self):
        if isinstance(self.staleness, bool) or (self.staleness is not None and not isinstance(self.staleness, int)):
            raise ValueError(f"sync staleness must be an int or None, got {self.staleness!r}")
        if self.staleness is not None and self.staleness < 0:
            raise ValueError(f"sync staleness must be >= 0, got {self.staleness}")

    @property
    def bsp(self) -> bool:
        return self.staleness == 0

    @classmethod
    def parse(cls, text: str, where: str = "sync") -> "Sync":
        """'bsp', 'asp', 'ssp:N' (also 'ssp(N)')."""
        t = str(text).strip().lower().replace("(", ":").rstrip(")")
        if t == "bsp":
            return cls(0)
        if t == "asp":
            return cls(None)
        if t.startswith("ssp:"):
            try:
                s = int(t[4:])
            except ValueError:
                s = -1
            if s >= 0:
                return cls(s)
        raise ValueError(f"{where}: expected 'bsp', 'asp' or 'ssp:N' (N >= 0), got {text!r}")

    def __str__(self) -> str:
        return "bsp" if self.bsp else "asp" if self.staleness is None else f"ssp:{self.staleness}"


class SyncTimeout(TimeoutError):
    """A pull waited longer than its limit for a slow (or dead) worker group."""


class GroupClocks:
    """The clocks of every worker group, as one server sees them.

    `advance` records a group's clock and returns the steps every group has now completed
    (so the server can apply the aggregated pushes of each); the server then calls
    `publish` once they are applied, which is what waiting pulls wait for. Waiting time is
    counted for the metrics."""

    def __init__(self):
        self._cond = threading.Condition()
        self.groups: int | None = None
        self.sync: Sync | None = None
        self._clocks: list[int] = []
        self._settled = 0          # steps every group completed whose pushes are applied
        self.waits = 0             # pulls that had to wait
        self.wait_seconds = 0.0
        self.group_wait_seconds: list[float] = []  # per group: where the waiting happens
        self.max_gap = 0           # largest (clock of a pulling group - slowest clock) seen
        self._down: BaseException | None = None  # set by `fail`: waiting pulls raise it

    def configure(self, groups: int, sync: Sync) -> None:
        """Set the number of groups and the model; idempotent, a different one is refused."""
        if isinstance(groups, bool) or not 1 <= groups <= MAX_CLOCKS:
            raise ValueError(f"the number of worker-group clocks must be in [1, {MAX_CLOCKS}], got {groups}")
        with self._cond:
            if self.groups is None:
                self.groups, self.sync, self._clocks = groups, sync, [0] * groups
                self.group_wait_seconds = [0.0] * groups
            elif (self.groups, self.sync) != (groups, sync):
                raise ValueError(f"this server runs {self.groups} worker groups under {self.sync}; "
                                 f"a client asked for {groups} under {sync} (a group of several processes "
                                 f"counts one clock per process: every group needs as many processes)")

    def _check(self, group: int) -> None:
        if self.groups is None:
            raise ValueError("no worker groups configured: send a clock message first")
        if not 0 <= group < self.groups:
            raise ValueError(f"worker group {group} out of range [0, {self.groups})")

    def clocks(self) -> list[int]:
        with self._cond:
            return list(self._clocks)

    @property
    def settled(self) -> int:
        return self._settled

    def advance(self, group: int, clock: int) -> int:
        """Record that `group` completed `clock` steps (clocks only move forward). Returns
        the steps every group has now completed (`DONE` when every group finished); the
        server applies the held pushes up to there, then calls `publish` with it."""
        with self._cond:
            self._check(group)
            if clock > self._clocks[group]:
                self._clocks[group] = clock
            return min(self._clocks)

    def publish(self, settled: int) -> None:
        """Every group's pushes of steps <= settled are applied: release waiting pulls."""
        with self._cond:
            if settled > self._settled:
                self._settled = settled
                self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The server is gone: every waiting (and later) pull raises `error`, as a killed
        process's calls fail, so its clients retry elsewhere instead of waiting for clock
        messages that can no longer arrive."""
        with self._cond:
            self._down = error
            self._cond.notify_all()

    def wait(self, group: int, clock: int, timeout: float | None) -> float:
        """Block a pull of `group` at `clock` until the slowest group reached
        clock - staleness (and, under BSP, its pushes are applied). Returns seconds waited."""
        with self._cond:
            self._check(group)
            s = self.sync.staleness
            slowest = min(self._clocks)
            if slowest < DONE and clock < DONE:
                self.max_gap = max(self.max_gap, clock - slowest)
            if s is None:
                return 0.0
            need = clock - s
            if self._ready(need):
                return 0.0
            t0 = time.perf_counter()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._ready(need):
                if self._down is not None:
                    raise self._down
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SyncTimeout(f"worker group {group} at clock {clock} waited {timeout:.0f} s for the "
                                      f"slowest group to reach {need} ({self.sync}); clocks {self._clocks}")
                self._cond.wait(left)
            waited = time.perf_counter() - t0
            self.waits += 1
            self.wait_seconds += waited
            self.group_wait_seconds[group] += waited
            return waited

    def _ready(self, need: int) -> bool:
        if self.sync.bsp:  # the aggregated update of every earlier step must be applied
            return self._settled >= need or min(self._clocks) >= DONE
        return min(self._clocks) >= need

    def stats(self) -> dict:
        with self._cond:
            return {"groups": self.groups, "sync": str(self.sync) if self.sync else None,
                    "clocks": [c if c < DONE else "done" for c in self._clocks],
                    "waits": self.waits, "wait_seconds": self.wait_seconds,
                    "group_wait_seconds": list(self.group_wait_seconds), "max_gap": self.max_gap}
