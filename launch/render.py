"""`jaxps launch slurm|k8s|tpu`: render a cluster template that runs `jaxps launch node`.

The templates (launch/templates/, installed as package data) only say how to start one
`jaxps launch node` per task/pod/host with the layout flags; the node works out the rest,
so what runs on a cluster is what `jaxps launch local` and the tests run. Placeholders are
`{{name}}`; a placeholder without a value is an error, never an empty string.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

from jaxps.launch.layout import Layout, Role
from jaxps.launch.node import check_job_name, k8s_set

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
K8S_TOKEN_FILE = "/var/run/jaxps/token"


@dataclass(frozen=True)
class ClusterOptions:
    """Scheduler details that are not part of the layout every node sees."""
    job: str = "jaxps"
    devices_per_worker: int = 0          # GPUs per worker (SLURM --gpus-per-task, K8s nvidia.com/gpu)
    time: str | None = None              # SLURM --time
    partition: str | None = None         # SLURM --partition
    image: str = "jaxps:latest"          # Kubernetes container image (jaxps installed)
    tpu: str = "jaxps-tpu"               # TPU VM name
    zone: str = "us-central2-b"
    project: str | None = None
    out_name: str = "FILE"               # the rendered file's name, for the usage comments


def template(name: str) -> str:
    return resources.files("jaxps.launch").joinpath("templates", name).read_text()


def fill(text: str, values: dict[str, object]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return str(values[m.group(1)])
    return _PLACEHOLDER.sub(sub, text)


def node_argv(layout: Layout) -> list[str]:
    """`jaxps launch node` with the layout's flags (the same on every node)."""
    d = Layout()
    argv = ["jaxps", "launch", "node", "--servers", str(layout.servers), "--groups", str(layout.groups),
            "--workers-per-group", str(layout.workers_per_group)]
    for flag, value, default in (("--server-port", layout.server_port, d.server_port),
                                 ("--coordinator-port", layout.coordinator_port, d.coordinator_port),
                                 ("--partitions", layout.partitions, d.partitions),
                                 ("--sync", layout.sync, d.sync), ("--bind", layout.bind, d.bind)):
        if value != default:
            argv += [flag, str(value)]
    if layout.manager:
        argv += ["--manager", "--manager-port", str(layout.manager_port)]
    if layout.cpu_devices:
        argv += ["--cpu-devices", str(layout.cpu_devices)]
    return argv


def _common(layout: Layout, program: Sequence[str], opts: ClusterOptions) -> dict[str, object]:
    if not program:
        raise ValueError("no program to launch (put it after '--', e.g. -- jaxps train)")
    check_job_name(opts.job)
    return {"job": opts.job, "servers": layout.servers, "groups": layout.groups,
            "workers_per_group": layout.workers_per_group, "workers": layout.workers,
            "manager": int(layout.manager), "manager_note": " and a server manager" if layout.manager else "",
            "server_port": layout.server_port, "coordinator_port": layout.coordinator_port,
            "out_name": opts.out_name, "program": shlex.join(program)}


def slurm(layout: Layout, program: Sequence[str], opts: ClusterOptions) -> str:
    lines = [f"#SBATCH --time={opts.time}"] if opts.time else []
    lines += [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    # the allocation is per node: server nodes get GPUs too (a heterogeneous job avoids that)
    lines += [f"#SBATCH --gpus-per-node={opts.devices_per_worker}"] if opts.devices_per_worker else []
    worker_srun = f"--gpus-per-task={opts.devices_per_worker} " if opts.devices_per_worker else ""
    return fill(template("slurm.sbatch"), dict(_common(layout, program, opts), nodes=layout.ranks,
                                               sbatch_lines="\n".join(lines), worker_srun=worker_srun,
                                               node=shlex.join(node_argv(layout) + ["--scheduler", "slurm"])))


def k8s(layout: Layout, program: Sequence[str], opts: ClusterOptions) -> str:
    values = _common(layout, program, opts)
    node = node_argv(layout) + ["--scheduler", "k8s", "--job", opts.job, "--token-file", K8S_TOKEN_FILE]
    sets = []

    def stateful(name: str, role: str, replicas: int, argv: list[str], port: int, resources_: dict) -> None:
        sets.append(fill(template("k8s-statefulset.yaml"), dict(
            job=opts.job, name=name, role=role, replicas=replicas, image=json.dumps(opts.image),
            argv=json.dumps(argv), port=port, resources=json.dumps(resources_))))

    if layout.servers:
        stateful(k8s_set(opts.job, Role("server")), "server", layout.servers, node,
                 layout.server_port, {})
    gpus = {"limits": {"nvidia.com/gpu": opts.devices_per_worker}} if opts.devices_per_worker else {}
    for g in range(layout.groups):
        stateful(k8s_set(opts.job, Role("worker", 0, g)), "worker", layout.workers_per_group,
                 node + ["--", *program], layout.coordinator_port + g, gpus)
    if layout.manager:
        stateful(k8s_set(opts.job, Role("manager")), "manager", 1, node, layout.manager_port, {})
    return fill(template("k8s.yaml"), dict(values, statefulsets="".join(sets).rstrip("\n")))


def tpu(layout: Layout, program: Sequence[str], opts: ClusterOptions) -> str:
    if layout.groups != 1:
        raise ValueError("the TPU template runs one slice (one worker group); for multislice run it per slice "
                         "with MEGASCALE_* set, or use --groups 1")
    for what, value in (("TPU name", opts.tpu), ("zone", opts.zone), ("project", opts.project or "x")):
        if not re.fullmatch(r"[a-z][-a-z0-9:.]{0,62}", value):
            raise ValueError(f"{what} {value!r}: lower-case letters, digits, '-'")
    project = f" --project={opts.project}" if opts.project else ""
    return fill(template("tpu.sh"), dict(_common(layout, program, opts), tpu=opts.tpu, zone=opts.zone,
                                         project_flag=project, node=shlex.join(node_argv(layout))))


RENDERERS = {"slurm": slurm, "k8s": k8s, "tpu": tpu}


def render(kind: str, layout: Layout, program: Sequence[str], opts: ClusterOptions) -> str:
    if kind not in RENDERERS:
        raise ValueError(f"unknown cluster kind {kind!r}: {sorted(RENDERERS)}")
    return RENDERERS[kind](layout, program, opts)
