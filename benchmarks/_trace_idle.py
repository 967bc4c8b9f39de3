"""Per-stage idle time of a jitted step, read from a JAX profiler trace: the pipeline bubble
measured as idle time (the issue's "from per-stage busy time"), with no model of op costs.

On the CPU backend a device that reaches a collective (the ticks' ppermutes, the final
psums) before its peers blocks in XLA's rendezvous, which the trace records as a
"Rendezvous" event with a "Wait: pending_threads=k/n" event inside while it waits. The
step must begin with a rendezvous of all devices (`pipeline.start_barrier`): the host
launches the devices' executions one after another (0.5-16 ms apart measured on 2 cores),
and without it the order of launches would decide whether the fill's idle shows (a device
launched after its first input was ready never waits for it). A step runs from the host's
launch ("CommonPjRtLoadedExecutable::Execute (...)", one per step) to the next; its
pipelined part from the end of that first rendezvous (every device running) to the end of
the last event on a device thread. Its idle fraction is the waits inside that part over S
times its length, i.e. 1 - busy / (S x span) with busy everything a device runs: its ops
and the executor's own per-tick work (which `pipeline.bubble`'s `overhead_s_per_tick`
reports apart). Device threads are those that hold rendezvous events; the trace's
per-execution events do not bound an execution (at small sizes they last 0 us).

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

LAUNCH = "CommonPjRtLoadedExecutable::Execute ("
RENDEZVOUS = "Rendezvous"
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


def _end(e: dict[str, Any]) -> float:
    return e["ts"] + e["dur"]


def step_idle_fractions(events: list[dict[str, Any]], devices: int) -> list[float]:
    """Idle fraction of the pipelined part of each step in the trace (see the module
    docstring); a step with fewer than `devices` rendezvous, or none after its first, is
    skipped."""
    launches = sorted(e["ts"] for e in events if e["name"].startswith(LAUNCH))
    meets = sorted((e for e in events if e["name"] == RENDEZVOUS), key=lambda e: e["ts"])
    device_threads = {e["tid"] for e in meets}
    waits = [e for e in events if e["name"].startswith(WAIT)]
    on_devices = [e for e in events if e["tid"] in device_threads]
    out = []
    for k, start in enumerate(launches):
        stop = launches[k + 1] if k + 1 < len(launches) else float("inf")
        first = [e for e in meets if start <= e["ts"] < stop][:devices]
        if len(first) < devices:
            continue
        begin = max(map(_end, first))  # every device past the start barrier
        end = max((_end(e) for e in on_devices if start <= e["ts"] < stop), default=begin)
        if end <= begin:
            continue
        waited = sum(max(0.0, min(_end(w), end) - max(w["ts"], begin)) for w in waits if start <= w["ts"] < stop)
        out.append(waited / (devices * (end - begin)))
    return out


def idle_fraction(fn: Callable[[], Any], devices: int, steps: int = 5) -> dict[str, Any] | None:
    """Run `fn` (one step that begins with a rendezvous of all `devices`, blocking until
    done) `steps` times under the profiler: {"median", "steps": each step's idle fraction},
    or None when there is no profiler or the trace holds no such step (a backend or
    version without these events)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        try:
            jax.profiler.start_trace(d)
        except Exception:  # noqa: BLE001 - no profiler here (a backend without one): no figure
            return None
        try:
            for _ in range(steps):
                fn()
        finally:
            jax.profiler.stop_trace()
        fractions = step_idle_fractions(trace_events(d), devices)
    if not fractions:
        return None
    return {"median": statistics.median(fractions), "steps": fractions}
