"""The `jaxps launch` subcommands: local, node, slurm, k8s, tpu (argparse only; jaxps.cli
hands over the program after `--`). Kept here so the CLI module stays a thin table."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

USAGE = ("jaxps launch local --workers 2 -- jaxps train data.train=a.svm,b.svm\n"
         "jaxps launch local --servers 2 -- jaxps train model.placement=host\n"
         "jaxps launch local --servers 2 --groups 4 --sync ssp:3 -- jaxps train model.placement=host\n"
         "jaxps launch local --servers 1 --groups 2 --workers-per-group 2 -- jaxps train model.placement=host\n"
         "jaxps launch slurm --servers 2 --groups 1 --workers-per-group 4 --out job.sbatch -- jaxps train ...\n"
         "jaxps launch node ...   (what every task/pod/host of a cluster template runs)")


def add_parsers(la: argparse.ArgumentParser) -> None:
    from jaxps.launch.node import add_layout_args, add_node_args
    sub = la.add_subparsers(dest="where", required=True, metavar="{local,node,slurm,k8s,tpu}")
    lo = sub.add_parser("local", help="all processes on this machine, on loopback")
    lo.add_argument("--workers", "--workers-per-group", dest="workers", type=int, default=1,
                    help="worker processes (of each group: one jax.distributed job per group)")
    lo.add_argument("--servers", type=int, default=0, help="PS server processes for the model's host tables")
    lo.add_argument("--replicas", type=int, default=0,
                    help="backups per PS partition (hot standby); > 0 also runs a server manager for failover")
    lo.add_argument("--groups", type=int, default=1,
                    help="worker groups sharing the model through the PS servers (each --workers processes)")
    lo.add_argument("--sync", default="bsp", help="worker groups' consistency: bsp, ssp:N or asp")
    lo.add_argument("--partitions", type=int, default=256, help="PS key-space partitions")
    lo.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices per worker")
    lo.add_argument("--timeout", type=float, default=None, help="stop every worker after this many seconds")
    lo.set_defaults(launch=_local)
    no = sub.add_parser("node", help="one task/pod/host of a cluster job: become a server or a worker, exec it")
    add_node_args(no)
    no.set_defaults(launch=_node)
    for kind, what in (("slurm", "an sbatch script"), ("k8s", "a Kubernetes manifest (StatefulSets + headless "
                                                                "Service)"), ("tpu", "a TPU VM pod bash script")):
        p = sub.add_parser(kind, help=f"render {what} running `jaxps launch node`")
        add_layout_args(p)
        p.add_argument("--devices-per-worker", type=int, default=0, help="GPUs per worker (0: none requested)")
        p.add_argument("--job", default="jaxps", help="job name (Kubernetes object prefix)")
        p.add_argument("--out", default=None, help="write here (default: stdout)")
        if kind == "slurm":
            p.add_argument("--time", default=None, help="#SBATCH --time")
            p.add_argument("--partition", default=None, help="#SBATCH --partition")
        if kind == "k8s":
            p.add_argument("--image", default="jaxps:latest", help="container image with jaxps installed")
        if kind == "tpu":
            p.add_argument("--tpu", default="jaxps-tpu", help="TPU VM name")
            p.add_argument("--zone", default="us-central2-b")
            p.add_argument("--project", default=None)
        p.set_defaults(launch=_render)


def _local(args: argparse.Namespace, command: Sequence[str]) -> int:
    from jaxps.launch.local import LocalJob, run
    return run(list(command), LocalJob(workers=args.workers, servers=args.servers, replicas=args.replicas,
                                       groups=args.groups,
                                       sync=args.sync, partitions=args.partitions,
                                       cpu_devices=args.cpu_devices, timeout=args.timeout))


def _node(args: argparse.Namespace, command: Sequence[str]) -> int:
    from jaxps.launch.node import main
    return main(args, command)


def _render(args: argparse.Namespace, command: Sequence[str]) -> int:
    import os

    from jaxps.launch.node import layout_from_args
    from jaxps.launch.render import ClusterOptions, render
    opts = ClusterOptions(job=args.job, devices_per_worker=args.devices_per_worker,
                          time=getattr(args, "time", None), partition=getattr(args, "partition", None),
                          image=getattr(args, "image", ClusterOptions.image),
                          tpu=getattr(args, "tpu", ClusterOptions.tpu), zone=getattr(args, "zone", ClusterOptions.zone),
                          project=getattr(args, "project", None),
                          out_name=os.path.basename(args.out) if args.out else "FILE")
    text = render(args.where, layout_from_args(args), command, opts)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        if args.where != "k8s":
            os.chmod(args.out, 0o755)
        print(f"jaxps launch {args.where}: wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
