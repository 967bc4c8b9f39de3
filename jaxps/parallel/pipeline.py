"""Pipelined stages in one SPMD program, driven by a schedule table (GPipe or 1F1B).

Every device of the `stage` axis runs the same program: a `lax.scan` over the table's
ticks. At tick t, stage s looks up its op in the table and runs it through `lax.switch`
(idle / forward / backward; a conditional each device evaluates on its own), then two
`ppermute`s move the tick's activations one stage down and its input-gradients one stage
up (collectives stay outside the branches). A forward keeps only its stage input; a
backward recomputes the stage from that input under `jax.vjp` and accumulates the
parameter gradients, so a stage holds at most `max_stash` inputs: S for 1F1B, M for
GPipe, which is 1F1B's memory advantage. Microbatch inputs live in a ring buffer of that
size, indexed by microbatch modulo the bound (1F1B's live microbatches form a contiguous
range, so the slots never collide).

Data parallel composes on `data` (each data shard pipelines its slice of every
microbatch; gradients are summed over `data`). Gradients come out directly: the
pipeline is not differentiated by JAX, it is the differentiation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxps.parallel.schedule import Schedule

IDLE, FWD, BWD = 0, 1, 2


def _table_arrays(sched: Schedule) -> tuple[np.ndarray, np.ndarray]:
    if sched.virtual != 1:
        raise NotImplementedError("executing interleaved (virtual) schedules comes next; "
                                  "their tables are available (jaxps.parallel.schedule)")
    kind = np.zeros((sched.ticks, sched.stages), np.int32)
    mb = np.zeros((sched.ticks, sched.stages), np.int32)
    for t, row in enumerate(sched.table):
        for s, op in enumerate(row):
            if op is not None:
                kind[t, s] = FWD if op.kind == "F" else BWD
                mb[t, s] = op.microbatch
    return kind, mb


def pipeline_value_and_grad(block: Callable[[Any, jax.Array], jax.Array],
                            loss: Callable[[jax.Array, jax.Array], jax.Array],
                            params: Any, xs: jax.Array, ys: jax.Array, sched: Schedule,
                            mesh: Mesh) -> tuple[jax.Array, Any]:
    """Sum over microbatches of loss(block_{S-1}(...block_0(x))), and its gradient w.r.t.
    the stage-stacked `params` (every leaf [S, ...], sharded over `stage`).

    block(p, x) -> h keeps x's shape (a stage's layers); loss(h, y) -> scalar.
    xs: [M, batch, ...] and ys: [M, batch, ...], the batch split over `data`.
    """
    S, M = sched.stages, sched.microbatches
    if mesh.shape["stage"] != S:
        raise ValueError(f"the schedule has {S} stages, the mesh's stage axis {mesh.shape['stage']}")
    if xs.shape[0] != M or ys.shape[0] != M:
        raise ValueError(f"expected {M} microbatches, got xs {xs.shape[0]} and ys {ys.shape[0]}")
    kind_np, mb_np = _table_arrays(sched)
    K = max(sched.max_stash())  # input/gradient buffer slots per stage
    up = [(s, s + 1) for s in range(S - 1)]     # activations: stage s -> s+1
    down = [(s + 1, s) for s in range(S - 1)]   # input-gradients: stage s+1 -> s

    def run(p, xs, ys):
        p = jax.tree.map(lambda a: a[0], p)  # this stage's parameters
        s = jax.lax.axis_index("stage")
        last = s == S - 1
        kinds, mbs = jnp.asarray(kind_np), jnp.asarray(mb_np)
        x0 = xs[0]

        def tick(carry, t):
            acts, grads_in, gsum, lsum = carry
            k, m = kinds[t, s], mbs[t, s]
            x_in = jnp.where(s == 0, xs[m], acts[m % K])

            def idle(_):
                return jnp.zeros_like(x0), jnp.zeros_like(x0), jax.tree.map(jnp.zeros_like, p), 0.0

            def fwd(_):
                h = block(p, x_in)
                l_m = jnp.where(last, loss(h, ys[m]), 0.0)
                return h, jnp.zeros_like(x0), jax.tree.map(jnp.zeros_like, p), l_m

            def bwd(_):
                h, pullback = jax.vjp(block, p, x_in)
                g_loss = jax.grad(loss)(h, ys[m])
                g_h = jnp.where(last, g_loss, grads_in[m % K])
                dp, dx = pullback(g_h)
                return jnp.zeros_like(x0), dx, dp, 0.0

            h, dx, dp, l_m = jax.lax.switch(k, (idle, fwd, bwd), None)
            # what arrives here this tick, and for which microbatch (known from the table)
            h_in = jax.lax.ppermute(h, "stage", up)
            dx_in = jax.lax.ppermute(dx, "stage", down)
            prev = jnp.maximum(s - 1, 0)
            nxt = jnp.minimum(s + 1, S - 1)
            got_act = (s > 0) & (kinds[t, prev] == FWD)
            got_grad = (s < S - 1) & (kinds[t, nxt] == BWD)
            acts = jnp.where(got_act, acts.at[mbs[t, prev] % K].set(h_in), acts)
            grads_in = jnp.where(got_grad, grads_in.at[mbs[t, nxt] % K].set(dx_in), grads_in)
            gsum = jax.tree.map(jnp.add, gsum, dp)
            return (acts, grads_in, gsum, lsum + l_m), None

        buf = jnp.zeros((K,) + x0.shape, x0.dtype)
        init = (buf, buf, jax.tree.map(jnp.zeros_like, p), jnp.zeros((), jnp.float32))
        (_, _, gsum, lsum), _ = jax.lax.scan(tick, init, jnp.arange(kind_np.shape[0]))
        lsum = jax.lax.psum(lsum, ("stage", "data"))          # only the last stage holds loss
        gsum = jax.tree.map(lambda g: jax.lax.psum(g, "data")[None], gsum)
        return lsum, gsum

    stage_spec = jax.tree.map(lambda _: P("stage"), params)
    data_spec = P(None, "data")
    return jax.shard_map(run, mesh=mesh, in_specs=(stage_spec, data_spec, data_spec),
                         out_specs=(P(), stage_spec), axis_names={"stage", "data"},
                         check_vma=False)(params, xs, ys)
