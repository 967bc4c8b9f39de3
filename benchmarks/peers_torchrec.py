"""TorchRec peer of benchmarks/host_vs_device.py: the same Wide&Deep step, TorchRec's way.

One EmbeddingBagCollection holds both tables, as jaxps's WideDeep does: ``embed`` (rows x
dim, one pooled feature per slot, 39 slots sharing it) and ``wide`` (one feature pooling all
39 ids; FBGEMM refuses a width not divisible by 4, so it is rows x 4 and column 0 is the wide
weight: 4x jaxps's wide bytes, the peer's cost of the library), per-id weights = the example's values (``is_weighted``). Tables train
with fused row-wise Adagrad (the optimizer runs inside the backward, TorchRec's usual
setting), the 256-128 tower with Adam. DistributedModelParallel over gloo on CPU shards the
tables table-wise (the planner refuses row-wise on CPU) and wraps the tower in DDP. Each
global batch is split over the torchrun processes; rank 0 prints one JSON line with
samples/s of global batches. The data (hashed rows, values, labels) comes as an .npz from
host_vs_device.py so both sides train on the same batches. By hand:

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        benchmarks/peers_torchrec.py --data batches.npz --batch 4096 --rows 4194304
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter


WIDE_DIM = 4  # FBGEMM's smallest table width (local_cols % 4 == 0)


class WideDeep(torch.nn.Module):
    """Embeddings from the EBC, deep tower on the slots' vectors, plus the wide sum."""

    def __init__(self, rows: int, dim: int, slots: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.deep_width = slots * dim
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="embed", embedding_dim=dim, num_embeddings=rows,
                               feature_names=[f"s{j}" for j in range(slots)]),
            EmbeddingBagConfig(name="wide", embedding_dim=WIDE_DIM, num_embeddings=rows,
                               feature_names=["wide"]),
        ], is_weighted=True, device=torch.device("meta"))
        layers: list[torch.nn.Module] = []
        width = self.deep_width
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.tower = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        v = self.ebc(kjt).values()  # [B, slots*dim + WIDE_DIM]: table order, s0..s38 then wide
        return self.tower(v[:, :self.deep_width])[:, 0] + v[:, self.deep_width]


def to_kjt(rows: np.ndarray, vals: np.ndarray) -> KeyedJaggedTensor:
    """One id per sample for each slot feature (key-major), all 39 for ``wide``."""
    b, slots = rows.shape
    r, v = torch.from_numpy(rows), torch.from_numpy(vals)
    return KeyedJaggedTensor(
        keys=[f"s{j}" for j in range(slots)] + ["wide"],
        values=torch.cat([r.t().reshape(-1), r.reshape(-1)]),
        weights=torch.cat([v.t().reshape(-1), v.reshape(-1)]),
        lengths=torch.cat([torch.ones(b * slots, dtype=torch.int32), torch.full((b,), slots, dtype=torch.int32)]))


def build(args: argparse.Namespace, slots: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """DistributedModelParallel with table-wise sharding and the fused/dense optimizers."""
    model = WideDeep(args.rows, args.dim, slots, tuple(args.hidden))
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": args.lr})
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={t: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
                     for t in ("embed", "wide")})
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.Adam(ps, lr=args.dense_lr))
    placement = {name: {t: str(p.ranks) for t, p in mod.items()} for name, mod in plan.plan.items()}
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), placement


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help=".npz with rows [N, slots] int64, vals, labels")
    ap.add_argument("--batch", type=int, default=4096, help="global batch (split over processes)")
    ap.add_argument("--rows", type=int, default=1 << 22)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 128], help="deep tower widths")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dense-lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="1 warm-up step and at most 8 timed (standalone smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.warmup = 1
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"batch {args.batch} does not split over {world} processes")
    data = np.load(args.data)
    rows, vals, labels = data["rows"].astype(np.int64), data["vals"].astype(np.float32), data["labels"]
    slots, local = rows.shape[1], args.batch // world
    batches = []
    for s in range(0, rows.shape[0] - args.batch + 1, args.batch):
        lo, hi = s + rank * local, s + (rank + 1) * local
        batches.append((to_kjt(rows[lo:hi], vals[lo:hi]), torch.from_numpy(labels[lo:hi].astype(np.float32))))
    if args.quick:
        batches = batches[:8]
    dmp, opt, placement = build(args, slots)

    def step(kjt: KeyedJaggedTensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        logit = dmp(kjt)
        torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="sum").backward()
        opt.step()

    for b in batches[:args.warmup]:
        step(*b)
    dist.barrier()
    t0 = time.perf_counter()
    for b in batches:
        step(*b)
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"peer": "torchrec", "torch": torch.__version__, "processes": world,
                          "torch_threads": torch.get_num_threads(), "steps": len(batches),
                          "batch_size": args.batch, "sharding": "table_wise", "plan": placement, "wide_dim": WIDE_DIM,
                          "embedding_optimizer": "fused row-wise Adagrad", "dense_optimizer": "Adam",
                          "seconds_per_step": float(elapsed) / len(batches),
                          "samples_per_sec": len(batches) * args.batch / float(elapsed)}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
