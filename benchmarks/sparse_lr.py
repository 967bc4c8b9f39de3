"""Sparse LR end to end: jaxps (FTRL, Adagrad) vs Vowpal Wabbit and scikit-learn.

All tools train one pass over the same generated libsvm file (Criteo-like: 39 fields,
Zipf ids, a planted model) with 2^bits hashed weights, and are scored on the same test
file. Throughput is end to end as a user runs it, parsing included; VW reads its own
text format, converted in a separately reported pass. jaxps's step-only rate (device
step over prepared batches) and a breakdown of its host pipeline say where time goes.

Usage: python benchmarks/sparse_lr.py [--quick] [--devices auto|1|8] [--batch 8192]
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.data import FileDataset, ReaderConfig, SyntheticConfig, generate_dataset  # noqa: E402
from jaxps.data.readers import batches as read_batches  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.models import SparseLR, SparseLRConfig  # noqa: E402
from jaxps.optim import FTRL, Adagrad  # noqa: E402
from jaxps.trainer import TrainConfig, Trainer  # noqa: E402


def make_trainer(opt, bits: int, ndev: int, out_dir: str) -> Trainer:
    mesh = make_mesh(MeshConfig(data=ndev), jax.devices()[:ndev])
    model = SparseLR(SparseLRConfig(rows=1 << bits, optimizer=opt))
    return Trainer(model, mesh, TrainConfig(progress=False, tensorboard=False, checkpoint=False,
                                            log_every=1000, out_dir=out_dir))


def run_jaxps(name, opt, train, test, reader, batch, bits, ndev, out_dir) -> dict:
    """End-to-end fit over the file (parse, plan, device steps) and its test metrics."""
    t = make_trainer(opt, bits, ndev, out_dir)
    t0 = time.perf_counter()
    res = t.fit(FileDataset(train, reader, batch))
    seconds = time.perf_counter() - t0
    ev = t.evaluate(FileDataset(test, reader, batch))
    n = res["train"]["examples"]
    return {"tool": name, "examples": n, "train_seconds": seconds, "examples_per_sec": n / seconds,
            "first_step_seconds": res["train"]["first_step_seconds"],
            "logloss": ev["logloss"], "auc": ev["auc"], "devices": ndev,
            "capacity": res["tables"]["weights"]["capacity"],
            "overflows": res["tables"]["weights"]["overflows"]}


def profile_pipeline(opt, train, reader, batch, bits, ndev, out_dir, max_batches=60) -> dict:
    """Rates of each stage alone on the same batches: parse, plan, device step."""
    t0 = time.perf_counter()
    host = []
    for b in read_batches(train, reader, batch):
        host.append(b)
        if len(host) == max_batches:
            break
    parse_s = time.perf_counter() - t0
    t = make_trainer(opt, bits, ndev, out_dir)
    steps = t.steps
    t0 = time.perf_counter()
    plans = [steps.plan_batch(b) for b in host]
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dev = [steps.to_device(b, p) for b, p in zip(host, plans)]
    jax.block_until_ready(dev)
    put_s = time.perf_counter() - t0
    state = t.state
    state, m = steps.train_step(state, dev[0])  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    inflight = []
    for d in dev[1:]:
        state, m = steps.train_step(state, d)
        inflight.append(m["loss"])
        if len(inflight) > 2:  # as the trainer does: few steps queued on XLA:CPU
            jax.block_until_ready(inflight.pop(0))
    jax.block_until_ready(state)
    step_s = time.perf_counter() - t0
    n = batch * len(host)
    return {"parse_examples_per_sec": n / parse_s, "plan_examples_per_sec": n / plan_s,
            "device_put_examples_per_sec": n / put_s,
            "step_only_examples_per_sec": batch * (len(dev) - 1) / step_s}


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--devices", default="auto", help="auto (fastest step of 1 and 8), or a count")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--bits", type=int, default=24)
    p.add_argument("--ftrl-lr", type=float, default=0.2)
    p.add_argument("--ftrl-beta", type=float, default=1.0)
    p.add_argument("--adagrad-lr", type=float, default=0.1)
    p.add_argument("--no-peers", action="store_true", help="jaxps only")
    args = p.parse_args(argv)
    n_train, n_test = (200_000, 50_000) if args.quick else (1_000_000, 100_000)
    data_dir = os.path.join(args.out, "data", f"sparse_lr_{n_train}")
    t0 = time.perf_counter()
    info = generate_dataset(data_dir, n_train, n_test, SyntheticConfig(num_fields=39, vocab_size=10_000))
    gen_s = time.perf_counter() - t0
    train, test = (os.path.join(data_dir, info["files"][k]) for k in ("train", "test"))
    reader = ReaderConfig(format="libsvm", max_nnz=39)
    work = os.path.join(args.out, "work")
    ftrl, adagrad = FTRL(args.ftrl_lr, beta=args.ftrl_beta), Adagrad(args.adagrad_lr)

    profiles = {}
    candidates = [1, 8] if args.devices == "auto" else [int(args.devices)]
    for ndev in candidates:
        profiles[ndev] = profile_pipeline(ftrl, train, reader, args.batch, args.bits, ndev, work)
    ndev = max(profiles, key=lambda d: profiles[d]["step_only_examples_per_sec"])

    runs = {"jaxps_ftrl": run_jaxps("jaxps_ftrl", ftrl, train, test, reader, args.batch, args.bits, ndev, work),
            "jaxps_adagrad": run_jaxps("jaxps_adagrad", adagrad, train, test, reader, args.batch,
                                       args.bits, ndev, work)}
    result = {"n_train": n_train, "n_test": n_test, "fields": 39, "bits": args.bits,
              "batch_size": args.batch, "devices": ndev, "generate_seconds": gen_s,
              "bayes_logloss": info["bayes_logloss_test"], "profile": profiles[ndev],
              "profile_by_devices": profiles, "machine": machine_info()}
    best = runs["jaxps_ftrl"]
    result.update(logloss_jaxps=best["logloss"], auc_jaxps=best["auc"],
                  examples_per_sec_jaxps=best["examples_per_sec"],
                  step_only_examples_per_sec_jaxps=profiles[ndev]["step_only_examples_per_sec"],
                  logloss_jaxps_adagrad=runs["jaxps_adagrad"]["logloss"],
                  examples_per_sec_jaxps_adagrad=runs["jaxps_adagrad"]["examples_per_sec"])
    if not args.no_peers:
        import peers
        prep = peers.prepare_vw(train, test, work)
        runs["vw"] = peers.run_vw(prep["train_vw"], prep["test_vw"], bits=args.bits)
        runs["sklearn"] = peers.run_sklearn(train, test, bits=args.bits)
        result["vw_prepare_seconds"] = prep["prepare_seconds"]
        for tool in ("vw", "sklearn"):
            result[f"logloss_{tool}"] = runs[tool]["logloss"]
            result[f"auc_{tool}"] = runs[tool]["auc"]
            result[f"examples_per_sec_{tool}"] = runs[tool]["examples_per_sec"]
            result[f"ratio_vs_{tool}"] = best["examples_per_sec"] / runs[tool]["examples_per_sec"]
        result["logloss_rel_vs_vw"] = best["logloss"] / runs["vw"]["logloss"] - 1
    result["runs"] = runs
    emit("sparse_lr", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
