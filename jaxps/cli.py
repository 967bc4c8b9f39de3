"""`jaxps` command line: train, evaluate, predict, plan, gen-data, launch, ps-server, ps-manager, schedule.

Every command takes an optional config file (TOML or JSON) and `key=value` overrides
with dotted keys, e.g. `jaxps train model.optimizer.name=adagrad data.batch_size=8192`.
JAX is imported only after the CPU device count is set, so a plain CPU machine gets 8
simulated devices (real accelerators, when present, are used instead).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from jaxps.parallel.schedule import DEFAULT as DEFAULT_SCHEDULE, KINDS as SCHEDULE_KINDS  # plain Python: no JAX

EPILOG = """\
config keys (defaults in jaxps.job.JobConfig; `jaxps train --print-config` shows them all):
  mesh.data/stage/model        axis sizes, -1 = the remaining devices
  data.train, data.eval        comma-separated libsvm/Criteo files (empty: generated data)
  data.format                  libsvm | criteo;   data.skip_bad_lines=true counts bad lines
  data.batch_size, data.max_nnz
  model.name                   sparse_lr | mlp | wide_deep;   model.rows
  model.placement              replicated | row_sharded[:axis] | blocked[:axis] | host | auto
  model.optimizer.name         ftrl | adagrad | adam | sgd  (+ learning_rate, l1, l2, ...)
  train.epochs, train.out_dir, train.checkpoint, train.log_every
examples:
  jaxps train                                   # generated Criteo-like data, 8 CPU devices
  jaxps train data.train=day0.svm data.eval=day1.svm model.optimizer.l1=1.0
  jaxps train model.placement=blocked mesh.model=4   # realm 3: examples split over `model`
  jaxps train model.name=wide_deep model.deep_blocks=4 model.deep_placement=staged:4:1f1b mesh.stage=4
  jaxps train job.toml data.format=criteo data.train=train.txt data.eval=test.txt
  jaxps train --resume train.checkpoint_every=1000   # after a crash: continue where it stopped
  jaxps evaluate job.toml                       # restore train.out_dir's checkpoint
  jaxps predict data.eval=new.svm --out p.txt   # probabilities, one per example, in order
"""


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    path, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif path is None:
            path = it
        else:
            raise SystemExit(f"jaxps: unexpected argument {it!r} (one config file, then key=value)")
    return path, overrides


def _load(items: list[str]):
    from jaxps.config import ConfigError, build
    from jaxps.job import JobConfig
    path, overrides = _split_args(items)
    try:
        return build(JobConfig, path, overrides)
    except (ConfigError, ValueError, OSError) as e:
        raise SystemExit(f"jaxps: config error: {e}")


def cmd_train(args) -> int:
    import dataclasses
    cfg = _load(args.config)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    from jaxps import groups
    from jaxps.ps.client import from_env
    group = groups.from_env()  # one of several worker groups (`jaxps launch --groups`), if set
    ps = from_env()            # servers started by `jaxps launch --servers`, if any
    if group is not None and group.count > 1 and ps is None:
        raise SystemExit(f"jaxps train: {groups.ENV_NUM_GROUPS}={group.count} needs PS servers "
                         f"(JAXPS_PS_SERVERS unset); use jaxps launch local --servers M --groups G")
    try:
        return _train(cfg, args, group, ps)
    finally:
        if ps is not None:  # its gRPC channels (the trainer stops only its own threads)
            ps.close()


def _train(cfg, args, group, ps) -> int:
    """`jaxps train` once the servers (if any) are known: train, evaluate, report; the
    trainer is closed at the end (checkpoints written, pushes landed)."""
    import dataclasses

    import jax

    from jaxps.job import build_data, build_model, dense_features
    from jaxps.trainer import Trainer
    train_ds, eval_ds, info = build_data(cfg.data, group)
    with Trainer(build_model(cfg.model, dense_features(cfg.data), cfg.data.max_nnz), cfg.mesh, cfg.train,
                 ps=ps, group=group) as trainer:
        if jax.process_index() == 0:
            print(trainer.plan(), flush=True)
        if args.resume:  # the latest complete checkpoint of train.out_dir, data position included
            step = trainer.resume()
            if jax.process_index() == 0:
                print(f"resumed from {trainer.checkpointer.directory}/{step}" if step is not None else
                      f"no complete checkpoint in {trainer.checkpointer.directory}: starting fresh", flush=True)
            if trainer.ps_restored:  # the one process that read the PS snapshot
                r = trainer.ps_restored
                print(f"loaded the PS snapshot of step {r['step']} ({sum(r['rows'].values())} rows of "
                      f"{len(r['rows'])} tables) onto {r['servers']} server(s)", flush=True)
        report = {"data": {"train": train_ds.stats, "eval": eval_ds.stats if eval_ds else None},
                  "config": dataclasses.asdict(cfg)}
        if info:
            report["synthetic"] = {k: info[k] for k in info if k.startswith(("bayes", "n_"))}
        result = trainer.fit(train_ds, eval_ds, total_examples=info.get("n_train"), report=report)
        path = os.path.join(trainer.config.out_dir, "metrics.json")
        if jax.process_index() != 0:  # one report per job
            return 0
        t = result["train"]
        print(f"trained {t['examples']} examples in {t['seconds']:.1f}s "
              f"({t['examples_per_sec']:,.0f} examples/s), {t['steps']} steps")
        for name, ds in (("train", train_ds), ("eval", eval_ds)):
            if ds is not None and ds.stats.skipped:
                print(f"{name} data: {ds.stats.summary()}")
        if "eval" in result:
            e = result["eval"]
            line = f"eval logloss {e['logloss']:.5f}  AUC {e['auc']:.5f}  ({e['examples']:.0f} examples)"
            if info.get("bayes_logloss_test"):
                line += f"  [Bayes-optimal logloss {info['bayes_logloss_test']:.5f}]"
            print(line)
        print(f"metrics: {path}")
        if cfg.train.tensorboard:
            print(f"tensorboard: {os.path.join(trainer.config.out_dir, 'tensorboard')}")
        if "checkpoint" in result:
            print(f"checkpoint: {result['checkpoint']}")
        return 0


def _restored(cfg, command: str):
    """The eval dataset and a trainer holding the latest checkpoint of train.out_dir."""
    from jaxps.job import build_eval_data, build_model, dense_features
    from jaxps.trainer import Trainer
    eval_ds = build_eval_data(cfg.data)
    if eval_ds is None:
        raise SystemExit(f"jaxps {command}: no input (set data.eval=FILES)")
    trainer = Trainer(build_model(cfg.model, dense_features(cfg.data), cfg.data.max_nnz), cfg.mesh, cfg.train)
    return eval_ds, trainer, trainer.restore()


def cmd_evaluate(args) -> int:
    eval_ds, trainer, step = _restored(_load(args.config), "evaluate")
    result = trainer.evaluate(eval_ds)
    print(json.dumps({"step": step, **result}, indent=2))
    return 0


def cmd_predict(args) -> int:
    import jax
    import numpy as np
    eval_ds, trainer, step = _restored(_load(args.config), "predict")
    probs = trainer.predict(eval_ds)
    # each process predicts its own share of the input: one file per process then
    out = args.out if jax.process_count() == 1 else f"{args.out}.part{jax.process_index()}"
    np.savetxt(out, probs, fmt="%.6f")
    print(f"wrote {probs.size} predictions of the step-{step} model to {out}")
    return 0


def cmd_plan(args) -> int:
    cfg = _load(args.config)
    from jaxps.job import build_model, dense_features
    from jaxps.mesh import make_mesh
    from jaxps.plan import format_plan, plan_model
    from jaxps.step import dense_optimizer
    model = build_model(cfg.model, dense_features(cfg.data), cfg.data.max_nnz)
    mesh = make_mesh(cfg.mesh)
    plans = plan_model(model, mesh, dense_optimizer(cfg.train.dense_optimizer, cfg.train.dense_learning_rate))
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
    else:
        print(format_plan(plans, mesh))
    return 0


def cmd_gen_data(args) -> int:
    from jaxps.data.synthetic import SyntheticConfig, generate_dataset
    info = generate_dataset(args.out, args.train, args.test, SyntheticConfig(
        num_fields=args.fields, vocab_size=args.vocab, seed=args.seed))
    print(json.dumps(info, indent=2))
    return 0


def cmd_lm(args) -> int:
    from jaxps.config import ConfigError, build
    from jaxps.lm import LMConfig, train
    try:
        cfg = build(LMConfig, *_split_args(args.config))
    except (ConfigError, ValueError, OSError) as e:
        raise SystemExit(f"jaxps: config error: {e}")
    r = train(cfg)
    print(f"trained on mesh {r['mesh']} ({cfg.schedule}, {cfg.microbatches} microbatches): loss "
          f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}, {r['tokens_per_sec']:,.0f} tokens/s; "
          f"metrics: {os.path.join(cfg.out, 'metrics.json')}")
    return 0


def cmd_schedule(args) -> int:
    from jaxps.parallel.schedule import build, draw
    sched = build(args.kind, args.stages, args.microbatches, args.virtual)
    print(sched.render())
    cost, lockstep = sched.lockstep_summary()
    print(f"{sched.kind}: {sched.ticks} ticks, bubble fraction {sched.bubble_fraction():.4f}, "
          f"lockstep with {cost} {lockstep:.4f} "
          f"(theory (S-1)/(V*M+S-1) = {sched.theory_bubble():.4f}), "
          f"max activations stashed per stage {max(sched.max_stash())}")
    if args.png:
        draw(sched, args.png)
        print(f"timeline: {args.png}")
    return 0


def cmd_ps_server(args) -> int:
    from jaxps.ps.serve import main as serve_main  # imports no JAX: starts fast, holds no accelerator
    return serve_main(args.cmd)


def cmd_ps_manager(args) -> int:
    from jaxps.ps.manager import main as manager_main  # heartbeats, failover, the ring for clients
    return manager_main(args.cmd)


def cmd_launch(args) -> int:
    return args.launch(args, args.cmd)  # jaxps.launch.commands: local, node, slurm, k8s, tpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxps", description="JAX sharded trainer",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("train", cmd_train, "train a model (default: sparse LR on generated data)"),
                               ("evaluate", cmd_evaluate, "evaluate the latest checkpoint on data.eval"),
                               ("predict", cmd_predict, "write the latest checkpoint's predictions on data.eval"),
                               ("plan", cmd_plan, "print namespaces, bytes, placements and realms")):
        p = sub.add_parser(name, help=helptext, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", nargs="*", help="[config.toml|json] [key=value ...]")
        p.set_defaults(fn=fn)
        if name == "train":
            p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
            p.add_argument("--resume", action="store_true",
                           help="continue from the latest complete checkpoint of train.out_dir (if any)")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "predict":
            p.add_argument("--out", default="predictions.txt", help="one probability per line, input order")
    g = sub.add_parser("gen-data", help="write generated Criteo-like libsvm data with a planted model")
    g.add_argument("--out", default="runs/data")
    g.add_argument("--train", type=int, default=1_000_000)
    g.add_argument("--test", type=int, default=100_000)
    g.add_argument("--fields", type=int, default=39)
    g.add_argument("--vocab", type=int, default=10_000)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_gen_data)
    from jaxps.launch.commands import USAGE, add_parsers
    la = sub.add_parser("launch", help="start the processes of a job, or render a cluster template",
                        description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parsers(la)
    la.set_defaults(fn=cmd_launch)
    lm = sub.add_parser("lm", help="train the Transformer LM with DP x PP x TP (mesh.data/stage/model)")
    lm.add_argument("config", nargs="*", help="[config.toml|json] [key=value ...] (jaxps.lm.LMConfig)")
    lm.set_defaults(fn=cmd_lm)
    sc = sub.add_parser("schedule", help="print (and draw) a pipeline schedule table")
    sc.add_argument("--kind", default=DEFAULT_SCHEDULE, choices=SCHEDULE_KINDS, help="default: what Staged runs")
    sc.add_argument("--stages", type=int, default=4)
    sc.add_argument("--microbatches", type=int, default=8)
    sc.add_argument("--virtual", type=int, default=1, help="virtual chunks per stage (interleaved)")
    sc.add_argument("--png", default=None, help="write the timeline picture here")
    sc.set_defaults(fn=cmd_schedule)
    ps = sub.add_parser("ps-server", add_help=False,
                        help="run one parameter-server process (jaxps ps-server --help)")
    ps.set_defaults(fn=cmd_ps_server)
    pm = sub.add_parser("ps-manager", add_help=False,
                        help="run the PS server manager: failover, join/leave (jaxps ps-manager --help)")
    pm.set_defaults(fn=cmd_ps_manager)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ps-server"]:  # its own flags: see jaxps.ps.serve
        return cmd_ps_server(argparse.Namespace(cmd=argv[1:]))
    if argv[:1] == ["ps-manager"]:  # its own flags: see jaxps.ps.manager
        return cmd_ps_manager(argparse.Namespace(cmd=argv[1:]))
    command: list[str] = []
    if "--" in argv:  # everything after '--' is the workers' command, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.cmd = command
    if args.command not in ("launch", "schedule"):
        from jaxps.runtime import initialize_distributed, set_cpu_devices
        set_cpu_devices()
        initialize_distributed()
    try:
        return args.fn(args)
    except (ValueError, OSError, NotImplementedError) as e:  # bad input or settings: the message says what
        print(f"jaxps {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
