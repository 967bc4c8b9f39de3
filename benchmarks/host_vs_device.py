"""Wide&Deep step time with the embedding table in the host PS vs on the mesh.

Same model, same batches; only the embedding table's placement differs: `RowSharded` on
the mesh, or `HostTable` in an embedded (in-process) PS group, with pulls prefetched on
the input thread and pushes queued behind the device steps — strict (exact, repairs rows
shared with in-flight pushes) and non-strict (bounded staleness). Reported: seconds per
step of each (the fastest of --rounds passes over the same batches, the configurations
taking turns in every round, each round on batches of its own) and `ratio` = strict
HostTable / RowSharded (target <= 1.15); `ratio_first_round` the same from the first,
coldest round (rows initialised at their first pull).

Peers on the same batches: PyTorch (EmbeddingBag(sparse) + Adagrad, in-process) and TorchRec
(peers_torchrec.py under torchrun: EmbeddingBagCollection, fused row-wise Adagrad,
DistributedModelParallel table-wise over gloo). `ratio_vs_torchrec` = jaxps on-mesh samples/s
over TorchRec's; null with `torchrec_note` saying why when TorchRec is missing or fails.

Usage: python benchmarks/host_vs_device.py [--quick] [--batch 4096] [--dim 16] [--devices 1] [--rounds N] [--hidden 256 128]
       [--torchrec-procs 2] [--ps-threads 1] [--also-ps-threads 2 4] [--also-local-apply]
       [--switch-interval-ms 5]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from _torchrun import missing, torchrun  # noqa: E402
from jaxps.data import PlantedModel, SyntheticConfig  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.models import WideDeep, WideDeepConfig  # noqa: E402
from jaxps.placement import HostTable, RowSharded  # noqa: E402
from jaxps.trainer import TrainConfig, Trainer  # noqa: E402


def warm_trainer(placement, batches, args, strict=True, ps_threads=None, local_apply=False) -> Trainer:
    """A trainer of the benchmark's Wide&Deep with the embedding table at `placement`,
    compiled and its tables warmed on `batches` (a few, not timed)."""
    model = WideDeep(WideDeepConfig(num_slots=39, embed_rows=args.rows, embed_dim=args.dim,
                                    wide_rows=args.rows, hidden=tuple(args.hidden), embed_placement=placement))
    mesh = make_mesh(MeshConfig(data=args.devices), jax.devices()[:args.devices])
    t = Trainer(model, mesh, TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                         log_every=10_000, dense_optimizer="adam", dense_learning_rate=1e-3,
                                         compilation_cache="", ps_strict=strict,
                                         ps_threads=ps_threads or args.ps_threads, ps_local_apply=local_apply))
    t.fit(batches)
    return t


def timed_fit(t: Trainer, batches) -> tuple[float, dict]:
    """Seconds per step of one pass over `batches` (its pushes landed), and the host path's
    time split in ms per step (threads overlap: the parts need not sum to the step)."""
    host = t.steps.host
    before = dict(host.seconds) if host is not None else {}
    repaired_before = host.repaired_rows if host is not None else 0
    t0 = time.perf_counter()
    t.fit(batches)
    dt = (time.perf_counter() - t0) / len(batches)
    if host is None:
        return dt, {}
    split = {f"{k}_ms": 1e3 * (v - before[k]) / len(batches) for k, v in host.seconds.items()}
    return dt, {"repaired_rows": host.repaired_rows - repaired_before, "host_ms_per_step": split}


def interleaved_rounds(trainers: dict[str, Trainer], rounds: list[list]) -> tuple[dict[str, tuple[float, dict]],
                                                                                  dict[str, float]]:
    """Per trainer, its fastest pass in rounds that each time every trainer in turn on that
    round's batches (and that pass's split), and its first pass's seconds per step: a busy
    spell of the machine slows one round of every configuration, so the ratios are not one
    configuration's bad luck. Each round has batches of its own, so a later round is not a
    replay of rows the caches just held. The first round is the coldest: a hashed host
    table initialises a row at its first pull (the mesh's table did all of them when it
    was made), and the rows' pages fault in then."""
    best: dict[str, tuple[float, dict]] = {}
    first: dict[str, float] = {}
    for batches in rounds:
        for name, t in trainers.items():
            dt, extra = timed_fit(t, batches)
            first.setdefault(name, dt)
            if name not in best or dt < best[name][0]:
                best[name] = (dt, extra)
    return best, first


def torch_seconds_per_step(batches, args) -> float | None:
    """The same Wide&Deep step in PyTorch (CPU): per-slot nn.Embedding(sparse=True) and a
    wide EmbeddingBag(sparse=True) with Adagrad (sparse gradients), the tower with Adam.
    None when torch is not installed (it is a benchmark-only peer: pip install torch==2.13.0)."""
    try:
        import torch
    except ImportError:
        return None
    from jaxps.tables.table import Table
    torch.manual_seed(0)
    rows_of = Table("x", rows=args.rows).rows_for
    embed = torch.nn.Embedding(args.rows, args.dim, sparse=True)
    wide = torch.nn.EmbeddingBag(args.rows, 1, mode="sum", sparse=True)
    torch.nn.init.normal_(embed.weight, std=0.05)
    torch.nn.init.zeros_(wide.weight)
    widths = [39 * args.dim, *args.hidden]
    layers: list = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    tower = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], 1))
    sparse_opt = torch.optim.Adagrad(list(embed.parameters()) + list(wide.parameters()), lr=0.05)
    dense_opt = torch.optim.Adam(tower.parameters(), lr=1e-3)
    data = [(torch.from_numpy(rows_of(b.ids).astype(np.int64)), torch.from_numpy(b.vals),
             torch.from_numpy(b.labels)) for b in batches]

    def step(rows, vals, labels):
        e = embed(rows) * vals[..., None]                        # [B, slots, dim]
        offsets = torch.arange(0, rows.numel(), rows.shape[1])
        w = wide(rows.reshape(-1), offsets, per_sample_weights=vals.reshape(-1))[:, 0]
        logit = tower(e.reshape(e.shape[0], -1))[:, 0] + w
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels, reduction="sum")
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()

    for d in data[:3]:
        step(*d)
    t0 = time.perf_counter()
    for d in data:
        step(*d)
    return (time.perf_counter() - t0) / len(data)


def torchrec_run(batches, args) -> tuple[dict | None, str | None]:
    """TorchRec's samples/s on the same batches (hashed to the same rows), or why not."""
    why = missing("torch", "torchrec", "fbgemm_gpu")
    if why:
        return None, why
    from jaxps.tables.table import Table
    rows_of = Table("x", rows=args.rows).rows_for
    with tempfile.TemporaryDirectory(prefix="torchrec_") as tmp:
        path = Path(tmp) / "batches.npz"
        np.savez(path, rows=np.concatenate([rows_of(b.ids) for b in batches]).astype(np.int64),
                 vals=np.concatenate([b.vals for b in batches]),
                 labels=np.concatenate([b.labels for b in batches]))
        return torchrun("peers_torchrec.py", args.torchrec_procs,
                        ["--data", path, "--batch", args.batch, "--rows", args.rows, "--dim", args.dim,
                         "--hidden", *args.hidden],
                        timeout=900, retries=1)


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--rows", type=int, default=1 << 22, help="hashed rows of both tables")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds over every configuration, fastest kept (3 quick, 5 full)")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 128],
                   help="deep tower widths; a narrow tower (e.g. --hidden 16) makes the device step "
                        "short, as an accelerator's is, so the host path's own cost shows on a CPU")
    p.add_argument("--torchrec-procs", type=int, default=2, help="torchrun processes of the TorchRec peer")
    p.add_argument("--ps-threads", type=int, default=1,
                   help="threads per request of the embedded PS server (PSServer threads; for many-core hosts)")
    p.add_argument("--also-ps-threads", type=int, nargs="*", default=[],
                   help="more thread counts to time the HostTable steps with (by_ps_threads), e.g. 2 4 8 on a "
                        "many-core accelerator host: the A/B that decides the default there, in the same run")
    p.add_argument("--also-local-apply", action="store_true",
                   help="also time strict steps with TrainConfig.ps_local_apply (ratio_local_apply): the A/B "
                        "that decides its default on a many-core accelerator host")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="sys.setswitchinterval for the whole run (default: Python's 5 ms): a thread that "
                        "returns from a nogil call may wait this long for a busy training thread's GIL")
    args = p.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    steps = 12 if args.quick else 40
    rounds = args.rounds or (3 if args.quick else 5)
    planted = PlantedModel(SyntheticConfig(num_fields=39, vocab_size=10_000, seed=0))
    data, _ = planted.sample(args.batch * (3 + steps * rounds), seed=1)
    batches = [data.slice(i, i + args.batch) for i in range(0, data.size, args.batch)]
    warm, batches = batches[:3], batches[3:]  # compile and warm on batches no round replays
    per_round = [batches[r * steps:(r + 1) * steps] for r in range(rounds)]
    trainers = {"device": warm_trainer(RowSharded("data"), warm, args),
                "strict": warm_trainer(HostTable("hashed"), warm, args, strict=True),
                "nonstrict": warm_trainer(HostTable("hashed"), warm, args, strict=False)}
    if args.also_local_apply:
        trainers["strict_local"] = warm_trainer(HostTable("hashed"), warm, args, True, local_apply=True)
    for n in args.also_ps_threads:
        trainers[f"strict_{n}"] = warm_trainer(HostTable("hashed"), warm, args, True, n)
        trainers[f"nonstrict_{n}"] = warm_trainer(HostTable("hashed"), warm, args, False, n)
    timed, first = interleaved_rounds(trainers, per_round)
    for t in trainers.values():  # their PS threads and tables go before the peers run
        t.close()
    device_s = timed["device"][0]
    (host_s, host_extra), (loose_s, loose_extra) = timed["strict"], timed["nonstrict"]
    by_threads = {n: {"ratio": timed[f"strict_{n}"][0] / device_s,
                      "ratio_nonstrict": timed[f"nonstrict_{n}"][0] / device_s} for n in args.also_ps_threads}
    torch_s = torch_seconds_per_step(per_round[-1], args)  # one round's batches, as each jaxps pass
    trec, trec_why = torchrec_run(per_round[-1], args)
    trec_sps = trec["samples_per_sec"] if trec else None
    emit("host_vs_device", {
        "batch_size": args.batch, "embed_dim": args.dim, "rows": args.rows, "steps": steps, "rounds": rounds,
        "devices": args.devices, "hidden": args.hidden, "ps_threads": args.ps_threads, "switch_interval_ms": 1e3 * sys.getswitchinterval(),
        "seconds_per_step_device": device_s,
        "seconds_per_step_host_strict": host_s, "seconds_per_step_host_nonstrict": loose_s,
        "ratio": host_s / device_s, "ratio_nonstrict": loose_s / device_s, "by_ps_threads": by_threads,
        "ratio_first_round": first["strict"] / first["device"],
        "ratio_local_apply": timed["strict_local"][0] / device_s if args.also_local_apply else None,
        "host_ms_per_step_local_apply": timed["strict_local"][1].get("host_ms_per_step") if args.also_local_apply
        else None,
        "ratio_nonstrict_first_round": first["nonstrict"] / first["device"],
        "repaired_rows_strict": host_extra.get("repaired_rows"),
        "host_ms_per_step_strict": host_extra.get("host_ms_per_step"),
        "host_ms_per_step_nonstrict": loose_extra.get("host_ms_per_step"),
        "seconds_per_step_torch": torch_s,
        "ratio_device_vs_torch": None if torch_s is None else device_s / torch_s,
        "ratio_host_strict_vs_torch": None if torch_s is None else host_s / torch_s,
        "samples_per_sec_device": args.batch / device_s, "samples_per_sec_host_strict": args.batch / host_s,
        "samples_per_sec_torchrec": trec_sps,
        "ratio_vs_torchrec": None if trec_sps is None else args.batch / device_s / trec_sps,
        "ratio_host_strict_vs_torchrec": None if trec_sps is None else args.batch / host_s / trec_sps,
        "torchrec": trec, "torchrec_note": trec_why,
        "machine": machine_info(),
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
