"""`jaxps launch local`: run N worker processes of one job on this machine, on loopback.

Each worker gets the environment a cluster scheduler would give it (coordinator address,
process count, process id; see jaxps.runtime) and calls `jax.distributed.initialize`
itself. Output lines are prefixed with the worker's id. If one worker fails, or on
Ctrl-C, or past the timeout, every worker is stopped (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from jaxps.runtime import (ENV_COORDINATOR, ENV_COORDINATOR_BIND, ENV_CPU_DEVICES, ENV_NUM_PROCESSES,
                           ENV_PROCESS_ID)


@dataclass
class LocalJob:
    workers: int = 2
    cpu_devices: int | None = None  # simulated CPU devices per worker (JAXPS_CPU_DEVICES)
    timeout: float | None = None    # seconds; None = no limit
    grace: float = 5.0              # seconds between SIGTERM and SIGKILL when stopping


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", "replace"))
        out.flush()


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run(command: list[str], job: LocalJob) -> int:
    """Run `command` as `job.workers` processes; returns the first non-zero exit code."""
    if job.workers < 1:
        raise ValueError(f"workers must be >= 1, got {job.workers}")
    if not command:
        raise ValueError("no command to launch (put it after '--')")
    # loopback only; a port taken between free_port() and the coordinator's bind makes
    # worker 0 fail at start, which stops the job with its error
    coordinator = f"127.0.0.1:{free_port()}"
    procs, pumps = [], []
    try:
        for i in range(job.workers):
            env = dict(os.environ, **{ENV_COORDINATOR: coordinator, ENV_COORDINATOR_BIND: coordinator,
                                      ENV_NUM_PROCESSES: str(job.workers), ENV_PROCESS_ID: str(i)})
            if job.cpu_devices:
                env[ENV_CPU_DEVICES] = str(job.cpu_devices)
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[worker {i}] ", sys.stdout), daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if job.timeout is None else time.monotonic() + job.timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs, job.grace)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                _stop(procs, job.grace)
                sys.stderr.write(f"jaxps launch: timeout after {job.timeout}s, workers stopped\n")
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs, job.grace)
        return 130
    finally:
        _stop(procs, job.grace)
        for t in pumps:
            t.join(timeout=1.0)
