"""Per-stage idle time of a jitted step, read from a JAX profiler trace: the pipeline bubble
measured as idle time (the issue's "from per-stage busy time"), with no model of op costs.

On the CPU backend each simulated device runs its step as one thunk-executor call, which
the trace records as a "ThunkExecutor::Execute (wait for completion)" event per device and
execution, and a device that reaches a collective (the ticks' ppermutes, the final psums)
before its peers blocks in XLA's rendezvous, recorded as a "Wait: pending_threads=k/n"
event. A step's idle fraction is its devices' wait time over the sum of their execution
spans from the last device's launch, i.e. 1 - busy / (S x span) with busy everything a
device runs: its ops and the
executor's own per-tick work (which `pipeline.bubble`'s `overhead_s_per_tick` reports
apart). What the fraction misses: a device that idles without blocking in a rendezvous
(none on this executor: every tick ends in its ppermutes).

The event names are XLA:CPU's (jaxlib 0.10); where a trace has none of them the result is
None and the caller says so.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import statistics
import tempfile
from typing import Any, Callable

EXECUTE = "ThunkExecutor::Execute (wait for completion)"
WAIT = "Wait: pending_threads="


def trace_events(trace_dir: str) -> list[dict[str, Any]]:
    """The complete ("X") events of the newest trace under `trace_dir`."""
    files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))
    if not files:
        return []
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def step_idle_fractions(events: list[dict[str, Any]], devices: int) -> list[float]:
    """Idle fraction of each step in the trace: steps are the groups of `devices`
    overlapping executions (executions shorter than a fifth of the longest, other small
    jitted calls, are left out; a group of another size is skipped), counted from the
    last device's start: the host launches the devices' executions one after another
    (0.5-10 ms apart measured on 2 cores), and a device waiting at its first rendezvous
    for a neighbour not yet launched is the launch's delay, not the schedule's bubble."""
    execs = sorted((e for e in events if e["name"] == EXECUTE), key=lambda e: e["ts"])
    if not execs:
        return []
    longest = max(e["dur"] for e in execs)
    execs = [e for e in execs if e["dur"] >= 0.2 * longest]
    groups: list[list[dict[str, Any]]] = []
    end = float("-inf")
    for e in execs:
        if e["ts"] > end:
            groups.append([])
        groups[-1].append(e)
        end = max(end, e["ts"] + e["dur"])
    waits = [e for e in events if e["name"].startswith(WAIT)]
    out = []
    for g in groups:
        if len(g) != devices:
            continue
        lo, hi = max(e["ts"] for e in g), max(e["ts"] + e["dur"] for e in g)
        span = sum(e["ts"] + e["dur"] - lo for e in g)
        waited = sum(max(0.0, min(w["ts"] + w["dur"], hi) - max(w["ts"], lo)) for w in waits)
        out.append(waited / span)
    return out


def idle_fraction(fn: Callable[[], Any], devices: int, steps: int = 5) -> dict[str, Any] | None:
    """Run `fn` (one step, blocking until done) `steps` times under the profiler: {"median",
    "steps": each step's idle fraction}, or None when the trace holds no step of `devices`
    executions (a backend or version without these events)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(steps):
                fn()
        finally:
            jax.profiler.stop_trace()
        fractions = step_idle_fractions(trace_events(d), devices)
    if not fractions:
        return None
    return {"median": statistics.median(fractions), "steps": fractions}
