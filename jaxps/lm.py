"""`jaxps lm`: train the decoder-only Transformer LM with data x pipeline x tensor
parallelism on the mesh (DP on `data`, the blocks pipelined over `stage` by a schedule
table, heads and MLP units split over `model`)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.parallel.pipeline import from_microbatches, pipeline_value_and_grad, to_microbatches
from jaxps.parallel.schedule import DEFAULT, build
from jaxps.parallel.tensor import spec_for


@dataclass
class LMConfig:
    mesh: MeshConfig = field(default_factory=lambda: MeshConfig(data=2, stage=2, model=2))
    schedule: str = DEFAULT
    microbatches: int = 4
    batch: int = 32               # global sequences per step
    steps: int = 60
    learning_rate: float = 3e-3
    d_model: int = 64
    heads: int = 4
    mlp: int = 128
    vocab: int = 64
    seq: int = 32
    seed: int = 0
    out: str = "runs/lm"


def train(cfg: LMConfig, log=print) -> dict:
    from jaxps.models.transformer_lm import (BLOCK_AXES, TransformerConfig, block, embed, head_loss, init,
                                             synthetic_tokens)
    mesh = make_mesh(cfg.mesh)
    S = mesh.shape["stage"]
    tcfg = TransformerConfig(cfg.vocab, cfg.seq, cfg.d_model, cfg.heads, cfg.mlp, S)
    sched = build(cfg.schedule, S, cfg.microbatches)
    params = init(tcfg, cfg.seed)
    repl = NamedSharding(mesh, P())
    shard = {"embed": jax.tree.map(lambda _: repl, params["embed"]),
             "head": jax.tree.map(lambda _: repl, params["head"]),
             "blocks": {k: NamedSharding(mesh, P("stage", *spec_for(BLOCK_AXES[k])))
                        for k in params["blocks"]}}
    params = jax.device_put(params, shard)
    tx = optax.adam(cfg.learning_rate)
    opt = jax.jit(tx.init)(params)
    f = block(tcfg)
    M, B, T = cfg.microbatches, cfg.batch, cfg.seq

    @jax.jit
    def step(params, opt, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x, embed_vjp = jax.vjp(lambda e: embed(e, inputs), params["embed"])
        xs, ys = to_microbatches(x, M), to_microbatches(targets, M)  # strided: rows stay on their shard
        r = pipeline_value_and_grad(f, head_loss, params["blocks"], xs, ys, sched, mesh,
                                    input_grads=True, head=params["head"])
        (g_embed,) = embed_vjp(from_microbatches(r.inputs))
        grads = {"embed": g_embed, "blocks": r.params, "head": r.head}
        grads = jax.tree.map(lambda g: g / (B * T), grads)          # mean token loss
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, r.loss / (B * T)

    data = NamedSharding(mesh, P("data"))
    losses, t0 = [], time.perf_counter()
    for i in range(cfg.steps):
        tokens = jax.device_put(synthetic_tokens(tcfg, B, cfg.seed * 100_003 + i), data)
        params, opt, loss = step(params, opt, tokens)
        losses.append(float(loss))
        if i % 10 == 0 or i == cfg.steps - 1:
            log(f"step {i:4d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - t0
    result = {"config": asdict(cfg), "mesh": dict(mesh.shape), "losses": losses, "first_loss": losses[0],
              "final_loss": float(np.mean(losses[-5:])), "seconds": seconds,
              "tokens_per_sec": cfg.steps * B * T / seconds, "bubble_theory": sched.theory_bubble()}
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "metrics.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result
