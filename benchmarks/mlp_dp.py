"""Realm 1 (data parallel): jaxps MLP classifier vs the same model as a plain JAX/optax loop.

The plain loop is what a Flax user writes for a model that fits one device: embedding
lookup with `jnp.take`, dense gradients of every parameter (the embedding table too),
`optax.adagrad` over all of them, one jitted step with the batch sharded over `data`.
jaxps runs the same model with the embedding as a replicated `Table` (row-wise Adagrad on
the touched rows only). Both see the same pre-built batches (no file parsing), so the
ratio is the step machinery alone. Reported: examples/s of each and `ratio_vs_plain_jax`.

Usage: python benchmarks/mlp_dp.py [--quick] [--rows 262144] [--batch 4096]
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from _common import emit, machine_info, parser  # noqa: E402
from jaxps.data import PlantedModel, SyntheticConfig  # noqa: E402
from jaxps.mesh import MeshConfig, make_mesh  # noqa: E402
from jaxps.models import MLPClassifier, MLPConfig  # noqa: E402
from jaxps.optim import Adagrad  # noqa: E402
from jaxps.trainer import TrainConfig, Trainer  # noqa: E402

LR = 0.05


class PlainMLP(nnx.Module):
    def __init__(self, rows, dim, hidden, rngs):
        self.embed = nnx.Param(0.05 * jax.random.normal(rngs.params(), (rows, dim)))
        dims = (dim,) + tuple(hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.out = nnx.Linear(dims[-1], 1, rngs=rngs)

    def __call__(self, rows, vals):
        x = jnp.sum(jnp.take(self.embed[...], rows, axis=0) * vals[..., None], axis=1)
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.out(x)[..., 0]


def run_plain(batches, rows_of, cfg, mesh, steps) -> float:
    model = PlainMLP(cfg.rows, cfg.embed_dim, cfg.hidden, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, repl)
    tx = optax.adagrad(LR)
    opt = jax.jit(tx.init, out_shardings=repl)(params)

    @jax.jit
    def step(params, opt, rows, vals, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(rows, vals)
            return jnp.sum(jax.nn.softplus(logits) - logits * labels)
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    dev = [(jax.device_put(rows_of(b.ids) * b.mask, data), jax.device_put(b.vals, data),
            jax.device_put(b.labels, data)) for b in batches]
    params, opt, loss = step(params, opt, *dev[0])  # compile
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt, loss = step(params, opt, *dev[i % len(dev)])
        if i % 2:
            jax.block_until_ready(loss)
    jax.block_until_ready(params)
    return steps * batches[0].size / (time.perf_counter() - t0)


def run_jaxps(batches, cfg, mesh, steps) -> float:
    trainer = Trainer(MLPClassifier(cfg), mesh, TrainConfig(dense_optimizer="adagrad", dense_learning_rate=LR,
                                                          progress=False, tensorboard=False,
                                                          checkpoint=False, compilation_cache=""))
    sb = trainer.steps
    dev = [sb.to_device(b, sb.plan_batch(b)) for b in batches]
    state, m = sb.train_step(trainer.state, dev[0])  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = sb.train_step(state, dev[i % len(dev)])
        if i % 2:
            jax.block_until_ready(m)
    jax.block_until_ready(state)
    return steps * batches[0].size / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1 << 18, help="embedding rows (fits one device)")
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args(argv)
    steps = 30 if args.quick else 150
    planted = PlantedModel(SyntheticConfig(num_fields=26, vocab_size=10_000, seed=0))
    data, _ = planted.sample(args.batch * 8, seed=1)
    batches = [data.slice(i, i + args.batch) for i in range(0, data.size, args.batch)]
    cfg = MLPConfig(rows=args.rows, embed_dim=16, hidden=(128, 64), optimizer=Adagrad(LR))
    rows_of = MLPClassifier(cfg).tables()[0].rows_for
    result = {"rows": args.rows, "batch_size": args.batch, "steps": steps, "by_devices": {}}
    for ndev in (1, 8):
        mesh = make_mesh(MeshConfig(data=ndev), jax.devices()[:ndev])
        plain = run_plain(batches, rows_of, cfg, mesh, steps)
        ours = run_jaxps(batches, cfg, mesh, steps)
        result["by_devices"][ndev] = {"examples_per_sec_jaxps": ours, "examples_per_sec_plain_jax": plain,
                                      "ratio": ours / plain}
    best = max(result["by_devices"].values(), key=lambda r: r["examples_per_sec_jaxps"])
    result.update(examples_per_sec_jaxps=best["examples_per_sec_jaxps"],
                  examples_per_sec_plain_jax=max(r["examples_per_sec_plain_jax"]
                                                 for r in result["by_devices"].values()),
                  ratio_vs_plain_jax_8dev=result["by_devices"][8]["ratio"],
                  ratio_vs_plain_jax_1dev=result["by_devices"][1]["ratio"],
                  machine=machine_info())
    result["ratio_vs_plain_jax"] = result["examples_per_sec_jaxps"] / result["examples_per_sec_plain_jax"]
    emit("mlp_dp", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
