"""`jaxps launch node`: the one entry point every task/pod/host of a cluster job runs.

    jaxps launch node --servers M --groups G --workers-per-group N [...] --token-file F -- jaxps train ...

It reads who it is from the scheduler, becomes a PS server, a worker of a group, or the
server manager, sets the JAXPS_* environment and execs the program, so `jaxps launch
slurm|k8s|tpu` templates and `jaxps launch local` run the same commands:

- SLURM: rank = SLURM_PROCID + --rank-offset (a step runs SLURM_STEP_NUM_TASKS ranks);
  hosts from SLURM_JOB_NODELIST (expanded by `scontrol show hostnames`, else in Python),
  one rank per node, or all on one node, or block-distributed by SLURM_TASKS_PER_NODE.
  Ranks: servers, workers group-major, manager.
- Kubernetes: the pod's hostname `<job>-ps-<i>`, `<job>-g<g>-<j>` or `<job>-manager-0`
  (StatefulSet ordinals); peers by DNS through the headless Service `<job>`.
- TPU VMs: TPU_WORKER_ID, TPU_WORKER_HOSTNAMES (MEGASCALE_SLICE_ID / MEGASCALE_NUM_SLICES /
  MEGASCALE_COORDINATOR_ADDRESS for multislice): every host is a worker (slice = group, or
  one group over all slices); servers and the manager run beside the workers of slice 0's
  first hosts, because every TPU host has chips.

Variables it sets (README "Cluster templates" lists them all): for workers
JAXPS_COORDINATOR, JAXPS_COORDINATOR_BIND, JAXPS_NUM_PROCESSES, JAXPS_PROCESS_ID (of its
group's jax.distributed job), JAXPS_GROUP, JAXPS_NUM_GROUPS, JAXPS_SYNC,
JAXPS_CPU_DEVICES (with --cpu-devices); JAXPS_PS_SERVERS, JAXPS_PS_PARTITIONS (with
servers); JAXPS_PS_MANAGER (with --manager); JAXPS_PS_TOKEN for every role, read from
--token-file or the inherited JAXPS_PS_TOKEN — never from the command line, which other
users of a host can read. Workers wait until every server accepts connections before the
program starts (servers and workers start in any order).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from jaxps.launch.layout import (Layout, Peers, Role, environment, manager_argv, peers_from_rank_hosts,
                                 role_of, server_argv)
from jaxps.launch.nodelist import hostnames, tasks_per_node
from jaxps.ps.client import ENV_TOKEN

SCHEDULERS = ("auto", "slurm", "k8s", "tpu")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Assignment:
    """What this node runs: usually one role; on TPU hosts a worker and a server beside it."""
    roles: tuple[Role, ...]
    peers: Peers

    @property
    def worker(self) -> Role | None:
        return next((r for r in self.roles if r.kind == "worker"), None)


# ------------------------------------------------------------------------------ SLURM
def rank_hosts(ranks: int, nodes: Sequence[str], per_node: str | None = None) -> list[str]:
    """The host of each rank: one rank per node (the template's layout), all ranks on a
    single node, or SLURM's block distribution of SLURM_TASKS_PER_NODE."""
    if len(nodes) >= ranks:
        return list(nodes[:ranks])
    if len(nodes) == 1:
        return [nodes[0]] * ranks
    if per_node:
        counts = tasks_per_node(per_node)
        if len(counts) == len(nodes) and sum(counts) == ranks:
            return [n for n, c in zip(nodes, counts) for _ in range(c)]
    raise ValueError(f"{ranks} ranks on {len(nodes)} nodes: run one task per node (--ntasks-per-node=1)")


def slurm_assignment(layout: Layout, env: Mapping[str, str], rank_offset: int | None = None,
                     expand: Callable[[str], list[str]] = hostnames) -> Assignment:
    """rank_offset None: one srun step runs every rank; an int: this step runs ranks
    offset .. offset + SLURM_NTASKS - 1 (the template's separate server/worker steps)."""
    try:
        rank = int(env["SLURM_PROCID"]) + (rank_offset or 0)
        nodelist = env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
    except KeyError as e:
        raise ValueError(f"not in a SLURM task: {e.args[0]} is unset") from None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 0)  # this step's tasks
    if ntasks and (ntasks != layout.ranks if rank_offset is None else rank_offset + ntasks > layout.ranks):
        raise ValueError(f"SLURM_NTASKS={ntasks} (rank offset {rank_offset}) does not fit the layout's "
                         f"{layout.ranks} ranks")
    role = role_of(layout, rank)
    hosts = rank_hosts(layout.ranks, expand(nodelist), env.get("SLURM_TASKS_PER_NODE"))
    return Assignment((role,), peers_from_rank_hosts(layout, role, hosts))


# ------------------------------------------------------------------------------ Kubernetes
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_job_name(job: str) -> str:
    """Kubernetes object names must be DNS labels; pod names append '-g<g>-<j>'."""
    if not _K8S_NAME.match(job) or len(job) > 40:
        raise ValueError(f"job name {job!r}: lower-case letters, digits and '-', at most 40 characters")
    return job


def k8s_set(job: str, role: Role) -> str:
    """The StatefulSet a role's pod belongs to: <job>-ps, <job>-g<g>, <job>-manager."""
    return {"server": f"{job}-ps", "worker": f"{job}-g{role.group}", "manager": f"{job}-manager"}[role.kind]


def k8s_pod(job: str, role: Role) -> str:
    """The pod (and host) name of a role: its StatefulSet's name + '-' + ordinal."""
    return f"{k8s_set(job, role)}-{role.index if role.kind != 'manager' else 0}"


def k8s_assignment(layout: Layout, job: str, hostname: str) -> Assignment:
    """Role from the pod's hostname; peers are `<pod>.<job>` (the headless Service's DNS)."""
    check_job_name(job)
    rest = hostname.split(".", 1)[0].removeprefix(job + "-") if hostname.startswith(job + "-") else None
    m = re.fullmatch(r"ps-(\d+)|g(\d+)-(\d+)|manager-0", rest or "")
    if not m:
        raise ValueError(f"pod {hostname!r} is not a pod of job {job!r} ({job}-ps-<i>, {job}-g<g>-<j>, "
                         f"{job}-manager-0)")
    if m.group(1) is not None:
        role = Role("server", int(m.group(1)))
    elif m.group(2) is not None:
        role = Role("worker", int(m.group(3)), int(m.group(2)))
    else:
        role = Role("manager")
    if (role.kind == "server" and role.index >= layout.servers) or (role.kind == "manager" and not layout.manager) \
            or (role.kind == "worker" and (role.group >= layout.groups or role.index >= layout.workers_per_group)):
        raise ValueError(f"pod {hostname!r} is outside the layout {layout}")

    def dns(r: Role) -> str:
        return f"{k8s_pod(job, r)}.{job}"
    return Assignment((role,), Peers(tuple(dns(Role("server", i)) for i in range(layout.servers)),
                                     dns(Role("worker", 0, role.group)) if role.kind == "worker" else "",
                                     dns(Role("manager")) if layout.manager else None))


# ------------------------------------------------------------------------------ TPU VMs
def tpu_assignment(layout: Layout, env: Mapping[str, str]) -> Assignment:
    """Every TPU host is a worker; slice 0's first hosts also run the servers (and host 0
    the manager). Slices are the worker groups, or one group spans them all."""
    try:
        worker_id = int(env["TPU_WORKER_ID"])
        hosts = [h.strip() for h in env["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]
    except KeyError as e:
        raise ValueError(f"not on a TPU VM host: {e.args[0]} is unset") from None
    slice_id, slices = int(env.get("MEGASCALE_SLICE_ID", "0")), int(env.get("MEGASCALE_NUM_SLICES", "1"))
    first = env.get("MEGASCALE_COORDINATOR_ADDRESS", "").rsplit(":", 1)[0] if slices > 1 else hosts[0]
    if slices > 1 and not first:
        raise ValueError("multislice: MEGASCALE_COORDINATOR_ADDRESS is unset")
    if layout.groups == slices:
        worker, coordinator, per_group = Role("worker", worker_id, slice_id), hosts[0], len(hosts)
    elif layout.groups == 1:
        worker, coordinator, per_group = Role("worker", slice_id * len(hosts) + worker_id), first, slices * len(hosts)
    else:
        raise ValueError(f"{layout.groups} worker groups on {slices} TPU slices: use one group per slice, or one")
    if layout.workers_per_group != per_group:
        raise ValueError(f"--workers-per-group {layout.workers_per_group}, but the TPU job has {per_group} hosts "
                         f"per group")
    if layout.servers > (len(hosts) if slices == 1 else 1):
        raise ValueError(f"{layout.servers} servers: at most one per host of slice 0 ({len(hosts)}), and at most "
                         f"one in a multislice job (other slices only know slice 0's first host)")
    server_hosts = tuple(hosts[:layout.servers]) if slices == 1 else (first,) * layout.servers
    roles = [worker]
    if slice_id == 0:
        roles += [Role("server", worker_id)] if worker_id < layout.servers else []
        roles += [Role("manager")] if layout.manager and worker_id == 0 else []
    return Assignment(tuple(roles), Peers(server_hosts, coordinator, first if layout.manager else None))


# ------------------------------------------------------------------------------ running
def detect(env: Mapping[str, str]) -> str:
    if "SLURM_PROCID" in env:
        return "slurm"
    if "TPU_WORKER_ID" in env:
        return "tpu"
    if "KUBERNETES_SERVICE_HOST" in env:
        return "k8s"
    raise ValueError("cannot tell the scheduler (no SLURM_PROCID, TPU_WORKER_ID or KUBERNETES_SERVICE_HOST); "
                     "pass --scheduler")


def read_token(path: str | None, env: Mapping[str, str]) -> str | None:
    """The shared PS token: the file's first line, else the inherited JAXPS_PS_TOKEN."""
    if not path:
        return env.get(ENV_TOKEN) or None
    path = os.path.expanduser(path)
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"jaxps launch node: warning: {path} is readable by other users (chmod 600 it)", file=sys.stderr)
    with open(path) as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"--token-file {path} is empty")
    return token


def wait_reachable(addresses: Sequence[str], timeout: float) -> None:
    """Block until every host:port accepts a TCP connection (servers start when they start)."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        host, port = address.rsplit(":", 1)
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=2.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PS server {address} unreachable after {timeout}s") from None
                time.sleep(0.2)


def role_argv(layout: Layout, role: Role, command: Sequence[str]) -> list[str]:
    if role.kind == "server":
        return server_argv(layout, role.index)
    if role.kind == "manager":
        return manager_argv(layout)
    if not command:
        raise ValueError("a worker needs the program to run after '--'")
    return list(command)


def describe(role: Role, env: Mapping[str, str]) -> str:
    if role.kind == "worker":
        return (f"worker {role.index} of group {role.group} (coordinator {env.get('JAXPS_COORDINATOR')}, "
                f"servers {env.get('JAXPS_PS_SERVERS', 'none')})")
    return f"{role.kind} {role.index}" if role.kind == "server" else "manager"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(layout: Layout, assignment: Assignment, command: Sequence[str], token: str | None,
        server_wait: float = 600.0) -> int:
    """Exec the node's only role; with several (TPU), run the server/manager as children
    beside the worker and stop them when it exits."""
    if layout.servers and not token and layout.bind not in _LOOPBACK:
        raise ValueError(f"servers listening on {layout.bind} need a token: pass --token-file (or set {ENV_TOKEN})")
    base = dict(os.environ)
    plans = []
    for role in assignment.roles:
        env = dict(base, **environment(layout, role, assignment.peers, token))
        plans.append((role, role_argv(layout, role, command), env))
        print(f"jaxps launch node: {describe(role, env)}", file=sys.stderr, flush=True)
    worker = assignment.worker
    servers = [f"{h}:{layout.server_port + i}" for i, h in enumerate(assignment.peers.server_hosts)]
    if len(plans) == 1:
        role, argv, env = plans[0]
        if role.kind == "worker":
            wait_reachable(servers, server_wait)
        sys.stdout.flush()
        os.execvpe(argv[0], argv, env)  # does not return
    side = [subprocess.Popen(argv, env=env, start_new_session=True) for role, argv, env in plans if role is not worker]
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop the worker, then the children, in order
            signal.signal(sig, _interrupt)
        wait_reachable(servers, server_wait)
        _, argv, env = next(p for p in plans if p[0] is worker)
        child = subprocess.Popen(argv, env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.terminate()
            return child.wait()
    finally:
        from jaxps.launch.local import stop_processes
        stop_processes(side, grace=10.0, group=True)


# ------------------------------------------------------------------------------ command line
def add_layout_args(p: argparse.ArgumentParser) -> None:
    """The layout flags, shared by `jaxps launch node` and the template renderers."""
    d = Layout()
    p.add_argument("--servers", type=int, default=d.servers, help="PS server processes")
    p.add_argument("--groups", type=int, default=d.groups, help="worker groups (each its own jax.distributed job)")
    p.add_argument("--workers-per-group", type=int, default=d.workers_per_group,
                   help="worker processes (hosts) per group")
    p.add_argument("--manager", action="store_true", help="run a PS server manager (jaxps.ps.manager)")
    p.add_argument("--server-port", type=int, default=d.server_port, help="server i listens on this + i")
    p.add_argument("--coordinator-port", type=int, default=d.coordinator_port,
                   help="group g's jax.distributed coordinator listens on this + g")
    p.add_argument("--manager-port", type=int, default=d.manager_port)
    p.add_argument("--partitions", type=int, default=d.partitions, help="PS key-space partitions")
    p.add_argument("--sync", default=d.sync, help="bsp | ssp:N | asp (how worker groups relate)")
    p.add_argument("--replicas", type=int, default=d.replicas,
                   help="backups per PS partition (hot standby; pair it with --manager for failover)")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices per worker")


def layout_from_args(args: argparse.Namespace, bind: str = Layout.bind) -> Layout:
    return Layout(servers=args.servers, groups=args.groups, workers_per_group=args.workers_per_group,
                  manager=args.manager, server_port=args.server_port, coordinator_port=args.coordinator_port,
                  manager_port=args.manager_port, partitions=args.partitions, sync=args.sync, bind=bind,
                  cpu_devices=args.cpu_devices, replicas=args.replicas)


def add_node_args(p: argparse.ArgumentParser) -> None:
    add_layout_args(p)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="auto")
    p.add_argument("--bind", default=Layout.bind, help="address servers and coordinators listen on")
    p.add_argument("--token-file", default=None, help=f"file holding the PS token (else ${ENV_TOKEN})")
    p.add_argument("--rank-offset", type=int, default=None,
                   help="SLURM: added to SLURM_PROCID (servers and workers as separate steps)")
    p.add_argument("--job", default=None, help="Kubernetes: the job's name (StatefulSet/Service prefix)")
    p.add_argument("--server-wait", type=float, default=600.0, help="seconds a worker waits for the servers")


def assignment_for(args: argparse.Namespace, layout: Layout, env: Mapping[str, str]) -> Assignment:
    kind = detect(env) if args.scheduler == "auto" else args.scheduler
    if kind == "slurm":
        return slurm_assignment(layout, env, args.rank_offset)
    if kind == "k8s":
        if not args.job:
            raise ValueError("Kubernetes: pass --job NAME")
        return k8s_assignment(layout, args.job, env.get("HOSTNAME") or socket.gethostname())
    return tpu_assignment(layout, env)


def main(args: argparse.Namespace, command: Sequence[str]) -> int:
    layout = layout_from_args(args, bind=args.bind)
    assignment = assignment_for(args, layout, os.environ)
    try:
        return run(layout, assignment, command, read_token(args.token_file, os.environ), args.server_wait)
    except KeyboardInterrupt:  # SIGTERM/SIGINT before the worker started
        return 130


__all__ = ["Assignment", "add_layout_args", "add_node_args", "assignment_for", "k8s_assignment", "k8s_pod", "k8s_set",
           "layout_from_args", "main", "rank_hosts", "read_token", "run", "slurm_assignment", "tpu_assignment",
           "wait_reachable"]
