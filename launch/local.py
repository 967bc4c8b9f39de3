"""`jaxps launch local`: run the processes of one job on this machine, on loopback: M
parameter-server processes (`--servers`) and N worker processes (`--workers`), or G
worker groups of N processes each (`--groups`, `--sync`: see jaxps.groups; every group
is its own jax.distributed job with its own coordinator, as on a cluster).

Each worker gets the environment a cluster scheduler would give it (coordinator address,
process count, process id; see jaxps.runtime) and calls `jax.distributed.initialize`
itself. Output lines are prefixed with the worker's id. If one worker fails, or on
Ctrl-C, or past the timeout, every worker is stopped (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from jaxps.groups import ENV_GROUP, ENV_NUM_GROUPS, ENV_SYNC
from jaxps.ps.client import ENV_MANAGER, ENV_PARTITIONS, ENV_REPLICAS, ENV_SERVERS, ENV_TOKEN
from jaxps.runtime import (ENV_COORDINATOR, ENV_COORDINATOR_BIND, ENV_CPU_DEVICES, ENV_NUM_PROCESSES,
                           ENV_PROCESS_ID)


@dataclass
class LocalJob:
    workers: int = 1
    servers: int = 0                # PS server processes (0: none; host tables stay in-process)
    replicas: int = 0               # backups per PS partition; > 0 also starts a server manager (failover)
    groups: int = 1                 # worker groups (each its own jax.distributed job); > 1 needs servers
    sync: str = "bsp"               # how worker groups relate through the PS clocks
    partitions: int = 256           # PS key-space partitions
    server_start_timeout: float = 60.0
    cpu_devices: int | None = None  # simulated CPU devices per worker (JAXPS_CPU_DEVICES)
    timeout: float | None = None    # seconds; None = no limit
    grace: float = 5.0              # seconds between SIGTERM and SIGKILL when stopping


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out, lines: "queue.Queue | None" = None) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", "replace")
        out.write(prefix + text)
        out.flush()
        if lines is not None:
            lines.put(text)
    if lines is not None:
        lines.put(None)  # the stream ended: the process is gone


def stop_processes(procs: Iterable[subprocess.Popen], grace: float, group: bool = False) -> None:
    """SIGTERM every running process (with `group`: its whole process group, for ones started
    in their own session), then SIGKILL what still runs `grace` seconds later."""
    procs = list(procs)
    send = (lambda p, sig: os.killpg(p.pid, sig)) if group else (lambda p, sig: p.send_signal(sig))
    for p in procs:
        if p.poll() is None:
            send(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            send(p, signal.SIGKILL)
            p.wait()


def _spawn(cmd: list[str], env: dict, name: str, procs: list, pumps: list) -> queue.Queue:
    """Start a PS-side process (its own session, output prefixed); returns its line queue."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(p)
    q: queue.Queue = queue.Queue()
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{name}] ", sys.stdout, q), daemon=True)
    t.start()
    pumps.append(t)
    return q


def _address(q: queue.Queue, what: str, deadline: float, timeout: float) -> str:
    """The host:port a started process prints as `... listening on HOST:PORT`."""
    while True:
        try:
            line = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"{what} did not start within {timeout}s") from None
        if line is None:
            raise RuntimeError(f"{what} exited at start")
        if " listening on " in line:
            return line.rsplit(" listening on ", 1)[1].strip()


def _start_servers(job: LocalJob, procs: list, pumps: list) -> dict[str, str]:
    """Start the PS server processes (loopback, a fresh shared token) and, with replicas,
    their manager, and wait until each says where it listens. Returns the environment
    workers need to reach them."""
    token = secrets.token_hex(16)
    names = [f"ps-{i}" for i in range(job.servers)]
    env = dict(os.environ, **{ENV_TOKEN: token})
    lines = [_spawn([sys.executable, "-m", "jaxps.ps.serve", "--name", name, "--servers", ",".join(names),
                     "--partitions", str(job.partitions), "--token-env", ENV_TOKEN, "--replicas", str(job.replicas)],
                    env, name, procs, pumps) for name in names]
    deadline = time.monotonic() + job.server_start_timeout
    addresses = {name: _address(q, f"PS server {name}", deadline, job.server_start_timeout)
                 for name, q in zip(names, lines)}
    out = {ENV_SERVERS: ",".join(f"{n}={a}" for n, a in addresses.items()),
           ENV_PARTITIONS: str(job.partitions), ENV_TOKEN: token, ENV_REPLICAS: str(job.replicas)}
    if job.replicas:  # hot standby: a manager watches the servers and fails over
        q = _spawn([sys.executable, "-m", "jaxps.ps.manager", "--token-env", ENV_TOKEN], dict(env, **out),
                   "manager", procs, pumps)
        out[ENV_MANAGER] = _address(q, "the PS manager", deadline, job.server_start_timeout)
    return out


def run(command: list[str], job: LocalJob) -> int:
    """Run `command` as `job.workers` processes (with `job.servers` PS servers beside them);
    returns the first non-zero exit code of a worker."""
    if job.workers < 1 or job.groups < 1:
        raise ValueError(f"workers and groups must be >= 1, got {job.workers}, {job.groups}")
    if job.groups > 1 and not job.servers:
        raise ValueError("worker groups share the model through PS servers: give --servers")
    if not command:
        raise ValueError("no command to launch (put it after '--')")
    procs, pumps, servers = [], [], []
    try:
        ps_env = _start_servers(job, servers, pumps) if job.servers else {}
        for g in range(job.groups):
            # loopback only; a port taken between free_port() and the coordinator's bind
            # makes the group's worker 0 fail at start, which stops the job with its error
            coordinator = f"127.0.0.1:{free_port()}"
            group_env = ({ENV_GROUP: str(g), ENV_NUM_GROUPS: str(job.groups), ENV_SYNC: job.sync}
                         if job.groups > 1 else {})
            for i in range(job.workers):
                env = dict(os.environ, **ps_env, **group_env,
                           **{ENV_COORDINATOR: coordinator, ENV_COORDINATOR_BIND: coordinator,
                              ENV_NUM_PROCESSES: str(job.workers), ENV_PROCESS_ID: str(i)})
                if job.cpu_devices:
                    env[ENV_CPU_DEVICES] = str(job.cpu_devices)
                p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                procs.append(p)
                name = f"group {g} worker {i}" if job.groups > 1 else f"worker {i}"
                t = threading.Thread(target=_pump, args=(p.stdout, f"[{name}] ", sys.stdout), daemon=True)
                t.start()
                pumps.append(t)
        deadline = None if job.timeout is None else time.monotonic() + job.timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            # with backups the manager fails a dead server over; without, or when the
            # manager itself died, the job cannot go on
            watched = servers if not job.replicas else servers[-1:]
            dead = [p.returncode for p in watched if p.poll() is not None]
            if failed or dead:
                sys.stderr.write("jaxps launch: a PS server exited; stopping the job\n" if dead and not failed else "")
                return failed[0] if failed else 1
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                sys.stderr.write(f"jaxps launch: timeout after {job.timeout}s, workers stopped\n")
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:  # a server that did not come up
        sys.stderr.write(f"jaxps launch: {e}\n")
        return 1
    finally:
        stop_processes(procs + servers, job.grace, group=True)
        for t in pumps:
            t.join(timeout=1.0)
