"""torch.distributed.pipelining peer of benchmarks/pipeline.py: one process per stage.

An MLP of L x (Linear(D) + ReLU), float32, split into S stages (one per torchrun process,
gloo, CPU), trained with a full step: forward + backward through the schedule, then SGD.
Interleaved1F1B holds V chunks per process; chunk c of rank r is global stage c*S + r, the
same mapping as jaxps's interleaved schedule. Rank 0 prints one JSON line: samples/s per
schedule. Run by benchmarks/pipeline.py through ``_torchrun.torchrun``; by hand:

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        benchmarks/peers_torch_pipeline.py --layers 8 --width 1024 --batch 512 --microbatches 8
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B)

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def mlp(layers: int, width: int, seed: int) -> list[torch.nn.Module]:
    """The whole model as a list of layers, identical on every rank (same seed)."""
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(layers)]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 * sum of squares: the loss jaxps's side uses."""
    return 0.5 * ((out - y) ** 2).sum()


def build(kind: str, rank: int, S: int, V: int, args: argparse.Namespace
          ) -> tuple[Callable[..., object], torch.optim.Optimizer]:
    """This rank's stage(s), its schedule and an SGD optimizer over its parameters."""
    v = V if kind == "interleaved" else 1
    layers = mlp(args.layers, args.width, args.seed)
    per = args.layers // (S * v)
    stages, params = [], []
    for c in range(v):
        g = c * S + rank
        mod = torch.nn.Sequential(*layers[g * per:(g + 1) * per])
        params += list(mod.parameters())
        stages.append(PipelineStage(mod, g, S * v, torch.device("cpu")))
    if kind == "gpipe":
        sched = ScheduleGPipe(stages[0], args.microbatches, loss_fn=mse)
    elif kind == "1f1b":
        sched = Schedule1F1B(stages[0], args.microbatches, loss_fn=mse)
    else:
        sched = ScheduleInterleaved1F1B(stages, args.microbatches, loss_fn=mse)
    return sched.step, torch.optim.SGD(params, lr=args.lr)


def measure(kind: str, rank: int, S: int, args: argparse.Namespace) -> float:
    """Samples/s of ``args.reps`` full training steps after ``args.warmup`` untimed ones."""
    step, opt = build(kind, rank, S, args.chunks, args)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.width)
    y = torch.randn(args.batch, args.width)
    first, last = rank == 0, rank == S - 1

    def train_step() -> None:
        opt.zero_grad(set_to_none=False)
        kwargs = {"target": y, "losses": []} if last else {}
        step(x, **kwargs) if first else step(**kwargs)
        opt.step()

    for _ in range(args.warmup):
        train_step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        train_step()
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return args.reps * args.batch / float(elapsed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=2,  # not --virtual: torchrun's parser takes it
                    help="stages per process in Interleaved1F1B")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed rounds (standalone smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.reps = 1, 2
    dist.init_process_group("gloo")
    rank, S = dist.get_rank(), dist.get_world_size()
    out: dict[str, object] = {"peer": "torch.distributed.pipelining", "torch": torch.__version__,
                              "processes": S, "torch_threads": torch.get_num_threads(),
                              "samples_per_sec": {}, "skipped": {}}
    for kind in args.schedules.split(","):
        v = args.chunks if kind == "interleaved" else 1
        if args.layers % (S * v) or args.batch % args.microbatches or \
                (kind == "interleaved" and (v < 2 or args.microbatches % S)):
            out["skipped"][kind] = f"needs layers % {S * v} == 0, batch % microbatches == 0" + \
                (f", virtual >= 2, microbatches % {S} == 0" if kind == "interleaved" else "")
            continue
        out["samples_per_sec"][kind] = measure(kind, rank, S, args)
    if rank == 0:
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
