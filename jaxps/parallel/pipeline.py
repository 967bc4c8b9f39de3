"""Pipelined stages in one SPMD program, driven by a schedule table (GPipe, 1F1B,
interleaved; paired; split backward, zero bubble).

Every device of the `stage` axis runs the same program: a `lax.scan` over the table's
ticks. At tick t, stage s looks up its cell in the table (at most one forward and one
backward, each with its microbatch and chunk) and runs it through two conditionals (the
forward one, then the backward one; each device evaluates them on its own), then two
`ppermute`s move the tick's activations one stage down and its input-gradients one stage
up (collectives stay outside the per-stage branches; a direction nobody sends in at a
tick, known from the table, skips its ppermute on every device alike). A paired cell
(the "-paired" schedules) thus runs a forward and a backward in one tick, so every stage
does the same work per steady-state tick and nobody waits for a neighbour's costlier op;
the last stage's backward of the microbatch it just ran forward takes the loss gradient
straight from that forward.

A forward stashes what its backward needs: by default the stage's `jax.vjp` residuals
computed from its input (activations, not parameters; `_residual_roles`), so a backward
only runs the pullback; the input itself stays in its arrival slot until the backward.
With `remat` only the input is kept and the backward recomputes the stage. A stage holds
at most S stash entries under 1F1B and M under GPipe: 1F1B's memory advantage. The last
global stage evaluates the loss and its gradient at its forward and keeps that gradient
until its backward (as autodiff keeps a loss's residuals). Every buffer is a ring
indexed by microbatch modulo a bound read off the table (`Schedule.buffer_slots`: the
widest span of microbatches live at once, so slots never collide) and is updated one
slot per tick, in place; a slot a conditional reads is read before it, since XLA copies
a whole buffer that a conditional reads and the tick then updates. Measured at M = 4S
(benchmarks/pipeline.py), 1F1B's compiled temporaries are 0.34 of GPipe's; what is left
besides the stash is the parameter-gradient accumulator and one tick's working set (a
few activations), the same under both schedules. Paired 1F1B keeps 2S-1 stash entries
and 2S-3 inputs (its round trip in synchronous ticks, see schedule.py): 0.44 of GPipe's
at M = 4S, S = 4 (0.24 at 8S).

A split schedule (the "-split" kinds, "zb-h1", "interleaved-zb") has a third conditional:
its B takes only the input cotangent of the stage's pullback, its W only the parameter
cotangent, from the same stash entry and output gradient, and XLA removes the unused half
of each as dead code (the compiled cost of F + B + W per tick equals 1F1B's F + backward).
The stash entry, the stage input and the output gradient then live until the W: the
gradient ring (with V = 1 it also keeps the last stage's own loss gradients, until their
W's) grows in zb-h1 from 1 slot to S, and zb-h1 holds 4 activations more than 1F1B at S =
4 (tests/test_pipeline.py); "1f1b-split", whose W follows its B at once, holds exactly
1F1B's. Under `remat` both B and W recompute the stage's forward (2 forwards each, so the
ops no longer cost alike).

Interleaved schedules hold V chunks per stage ([s, c] is global stage c*S + s); the
activations of stage S-1's chunk c wrap to stage 0's chunk c+1 through a ring ppermute.
Data parallel composes on `data` (each data shard pipelines its slice of every
microbatch; gradients are summed over `data`). Gradients come out directly: the
pipeline is not differentiated by JAX, it is the differentiation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal
from jax.sharding import Mesh, PartitionSpec as P

from jaxps.parallel.schedule import Schedule

def to_microbatches(a: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...], example i in microbatch i % M: each `data` shard's rows
    stay on it (a contiguous split would move rows between shards: a reshard per step)."""
    if m < 1 or a.shape[0] % m:
        raise ValueError(f"a batch of {a.shape[0]} does not split into {m} microbatches")
    return jnp.swapaxes(a.reshape((a.shape[0] // m, m) + a.shape[1:]), 0, 1)


def from_microbatches(a: jax.Array) -> jax.Array:
    """The inverse of `to_microbatches`: [M, B/M, ...] -> [B, ...]."""
    return jnp.swapaxes(a, 0, 1).reshape((-1,) + a.shape[2:])


def _check_stacked(params: Any, stages: int, virtual: int = 1) -> None:
    """One entry per stage along every leaf's first axis and, with virtual chunks, one per
    chunk along its second (else a stage would silently run only the first of its several
    layers, or a chunk index out of range would read a clamped layer and drop its gradient)."""
    for leaf in jax.tree.leaves(params):
        if leaf.shape[0] != stages:
            raise ValueError(f"pipelined parameters are stacked per stage: leading axis {leaf.shape[0]} "
                             f"!= {stages} stages (one block per stage)")
        if virtual > 1 and (leaf.ndim < 2 or leaf.shape[1] != virtual):
            raise ValueError(f"an interleaved schedule's parameters are [stages, {virtual} chunks, ...]: "
                             f"got a leaf of shape {list(leaf.shape)}")


def _shift_if(pred: jax.Array, x: jax.Array, perm: list[tuple[int, int]]) -> jax.Array:
    """ppermute over `stage` on the ticks that send (pred: uniform across devices), zeros
    otherwise: GPipe's forward half sends no gradients and its backward half no activations."""
    return jax.lax.cond(pred, lambda v: jax.lax.ppermute(v, "stage", perm), jnp.zeros_like, x)


def _after_all(*trees: Any) -> jax.Array:
    """True, computed from one element of every tree: a send whose predicate includes it
    waits for all of them. A ppermute is a rendezvous of all stages, and XLA schedules a
    tick's activation send right after the forward conditional unless told otherwise (an
    optimization_barrier does not survive XLA:CPU's passes), so a stage that ran a
    backward beside a neighbour's forward waited at that send for the forward, then ran its
    backward while the neighbour waited at the gradient send: the tick lasted F + B, not
    max(F, B) (traced at S = 2, M = 8: zb-h1 idle 0.34 of the step). x * 0 is a zero or NaN,
    never infinite, and XLA does not fold it (floats), so the result is always True."""
    firsts = [leaf.reshape(-1)[0].astype(jnp.float32) for tree in trees for leaf in jax.tree.leaves(tree)
              if leaf.size]
    return ~jnp.isinf(sum(firsts, jnp.float32(0)) * 0.0)


def _put_if(buf: jax.Array, index: tuple, cond: jax.Array, value: jax.Array) -> jax.Array:
    """buf with buf[index] = value where cond: a one-slot update XLA does in place (a
    `where` over the whole buffer would copy it every tick; a `where` over the slot would
    read the slot's old value into a temporary). Where not cond the index is out of
    bounds and the scatter drops the update."""
    index = (jnp.where(cond, index[0], buf.shape[0]),) + tuple(index[1:])
    return buf.at[index].set(value, mode="drop")


class TableArrays(NamedTuple):
    """The schedule table as [tick, stage] arrays: whether the cell has a forward (backward,
    weight gradient), and that op's microbatch and virtual chunk (0 where it has none)."""
    f_on: np.ndarray
    f_mb: np.ndarray
    f_chunk: np.ndarray
    b_on: np.ndarray
    b_mb: np.ndarray
    b_chunk: np.ndarray
    w_on: np.ndarray
    w_mb: np.ndarray
    w_chunk: np.ndarray


def _table_arrays(sched: Schedule) -> TableArrays:
    shape = (sched.ticks, sched.stages)
    a = {k: np.zeros(shape, np.int32) for k in TableArrays._fields}
    for t, s, op in sched.ops():
        x = op.kind.lower()
        a[f"{x}_on"][t, s] = 1
        a[f"{x}_mb"][t, s] = op.microbatch
        a[f"{x}_chunk"][t, s] = op.chunk
    return TableArrays(**{k: v.astype(bool) if k.endswith("_on") else v for k, v in a.items()})


class PipelineGrads(NamedTuple):
    loss: jax.Array            # summed over microbatches (and the batch)
    params: Any                # gradient of the stage-stacked block parameters
    inputs: jax.Array | None   # gradient w.r.t. xs (with input_grads)
    head: Any                  # gradient of the loss head's parameters (with head)
    targets: Any = None        # gradient w.r.t. ys (with target_grads)


def _residual_roles(block: Callable[[Any, jax.Array], jax.Array], p: Any, x: jax.Array) -> list[str]:
    """Per leaf of block's `jax.vjp` pullback at (p, x): "input" (x itself: the stage keeps
    its input until the backward anyway), "stash" (computed from x: one stash entry per
    microbatch) or "recompute" (the parameters, slices and casts of them, constants such
    as a causal mask: the backward recomputes them from p). Dataflow over the traced
    program's top-level equations; an equation with any input that depends on x counts as
    depending on x in all its outputs (conservative: nested calls are not looked into, so
    in doubt a leaf is stashed)."""
    jaxpr = jax.make_jaxpr(lambda p, x: jax.tree.leaves(jax.vjp(block, p, x)[1]))(p, x).jaxpr
    x_var = jaxpr.invars[-1]
    dependent = {x_var}
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in dependent for v in eqn.invars):
            dependent.update(eqn.outvars)
    return ["input" if v is x_var else "stash" if not isinstance(v, Literal) and v in dependent
            else "recompute" for v in jaxpr.outvars]


def pipeline_value_and_grad(block: Callable[[Any, jax.Array], jax.Array], loss: Callable[..., jax.Array],
                            params: Any, xs: jax.Array, ys: jax.Array, sched: Schedule,
                            mesh: Mesh, input_grads: bool = False, head: Any = None,
                            target_grads: bool = False, remat: bool = False) -> PipelineGrads:
    """Sum over microbatches of loss(block_{G-1}(...block_0(x))), and its gradient w.r.t.
    the stacked `params`: every leaf [S, ...] (sharded over `stage`), or [S, V, ...] for an
    interleaved schedule, where [s, c] is global stage c*S + s.

    block(p, x) -> h keeps x's shape (a stage's layers); loss(h, y) -> scalar, or
    loss(head, h, y) when `head` (parameters of a loss head, e.g. an LM's output layer,
    replicated) is given. xs: [M, batch, ...]; ys: a pytree of [M, batch, ...] float arrays;
    the batch over `data`. With input_grads, whatever produced xs (embeddings, a layer before
    the pipeline) can be trained through it, at the cost of an xs-sized buffer on every
    stage; with target_grads, whatever produced ys too (e.g. a wide part's logits the head
    adds to the tower's), for a ys-sized buffer.

    What a forward keeps for its backward (one entry per microbatch in flight): by default
    the block's `jax.vjp` residuals computed from its input (its activations, not its
    parameters) and the input, so a backward runs only the pullback; with `remat`, only
    the stage input, and the backward recomputes the stage (one more forward per
    backward; an entry one activation wide instead of the block's residuals).
    """
    if head is None:
        def loss_fn(_, h, y):
            return loss(h, y)
    else:
        loss_fn = loss
    S, M, V = sched.stages, sched.microbatches, sched.virtual
    if mesh.shape["stage"] != S:
        raise ValueError(f"the schedule has {S} stages, the mesh's stage axis {mesh.shape['stage']}")
    if xs.shape[0] != M or any(y.shape[0] != M for y in jax.tree.leaves(ys)):
        raise ValueError(f"expected {M} microbatches, got xs {xs.shape[0]} and ys "
                         f"{[y.shape[0] for y in jax.tree.leaves(ys)]}")
    _check_stacked(params, S, V)
    tab_np = _table_arrays(sched)
    # Without remat the last global stage evaluates the loss and its gradient at its forward
    # (its residuals do not include its output h) and keeps that gradient until its backward,
    # in its gradient buffer; with remat it recomputes h at its backward.
    loss_at_forward = not remat
    own_loss_grads = loss_at_forward and V > 1  # the last stage's loss gradients: see run
    # ring neighbours: with virtual chunks, stage S-1's chunk c feeds stage 0's chunk c+1
    up = [(s, (s + 1) % S) for s in range(S if V > 1 else S - 1)]    # activations
    down = [((s + 1) % S, s) for s in range(S if V > 1 else S - 1)]  # input-gradients
    argnums = (0, 1, 2) if target_grads else (0, 1)

    def run(p, hp, xs, ys):
        p = jax.tree.map(lambda a: a[0], p)  # this stage's parameters ([V, ...] if virtual)
        s = jax.lax.axis_index("stage")
        tab = TableArrays(*map(jnp.asarray, tab_np))
        # ticks on which some stage runs a forward (backward): only then is there anything
        # to shift; the same on every device, so skipping the collective is safe
        sends_fwd, sends_bwd = jnp.asarray(tab_np.f_on.any(1)), jnp.asarray(tab_np.b_on.any(1))
        x0 = xs[0]
        prev, nxt = (s - 1) % S, (s + 1) % S

        def chunk_params(c):
            return jax.tree.map(lambda a: a[c], p) if V > 1 else p

        roles = None if remat else _residual_roles(block, chunk_params(0), x0)
        # the stage input stays in its arrival slot until the backward when the backward
        # needs it (remat, or a block whose residuals include its input)
        input_until_backward = remat or "input" in roles
        KA, KG, KS, KL = sched.buffer_slots(loss_at_forward, input_until_backward)  # m -> slot m % K
        # With V = 1 the last stage never receives a gradient: its own loss gradients can
        # use its gradient buffer (one buffer, one write per tick); with virtual chunks it
        # also receives gradients for its other chunks, so they get their own.
        if loss_at_forward and not own_loss_grads:
            KG, KL = max(KG, KL), 1

        def forward(pc, x):
            """(h, its stash entry: a tuple of arrays)."""
            if remat:
                return block(pc, x), ()
            h, pullback = jax.vjp(block, pc, x)
            return h, tuple(leaf for leaf, r in zip(jax.tree.leaves(pullback), roles) if r == "stash")

        def pullback_of(pc, x, saved):
            """(h, the stage's pullback) from the stage input and its stash entry."""
            if remat:
                return jax.vjp(block, pc, x)
            # the pullback traced anew has the input and the recomputed residuals right; the
            # stash replaces the others, whose computation (and h's) is then dead code
            # that XLA removes
            h, template = jax.vjp(block, pc, x)
            leaves, treedef = jax.tree.flatten(template)
            it = iter(saved)
            return h, jax.tree.unflatten(treedef, [next(it) if r == "stash" else leaf
                                                   for leaf, r in zip(leaves, roles)])

        saved_shapes = jax.eval_shape(forward, chunk_params(0), x0)[1]
        zeros = functools.partial(jax.tree.map, jnp.zeros_like)
        # A split schedule's backward conditional computes only the input gradient (B) and
        # a third conditional only the parameter gradient (W): each takes one output of the
        # same pullback and XLA removes the other half as dead code.
        split = sched.split

        def tick(carry, t):
            arrived, grads_in, loss_grads, stash, gsum, lsum, dxs, hsum, dys = carry
            # a cell holds up to one forward (microbatch mf, chunk cf) and one backward
            # (mb, cb), run in that order: a paired tick (see schedule.py); or, in a split
            # schedule, one F, B or W
            is_f, mf, cf = tab.f_on[t, s], tab.f_mb[t, s], tab.f_chunk[t, s]
            is_b, mb, cb = tab.b_on[t, s], tab.b_mb[t, s], tab.b_chunk[t, s]
            is_w, mw, cw = tab.w_on[t, s], tab.w_mb[t, s], tab.w_chunk[t, s]  # (split schedules)
            first_f, last_f = (s == 0) & (cf == 0), (s == S - 1) & (cf == V - 1)
            first_b, last_b = (s == 0) & (cb == 0), (s == S - 1) & (cb == V - 1)
            last_w = (s == S - 1) & (cw == V - 1)
            y_f = jax.tree.map(lambda a: a[mf], ys)
            y_b = jax.tree.map(lambda a: a[mb], ys)
            y_w = jax.tree.map(lambda a: a[mw], ys)
            no_y = zeros(y_f) if target_grads else ()
            no_saved = tuple(jnp.zeros(a.shape, a.dtype) for a in saved_shapes)

            # the stage inputs, read once outside the conditionals (XLA copies a whole buffer
            # that a conditional reads and the tick then updates)
            if input_until_backward and sched.paired and V == 1:
                x_f = jnp.where(first_f, xs[mf], arrived[cf, mf % KA])
                x_b = jnp.where(first_b, xs[mb], arrived[cb, mb % KA])
            elif input_until_backward and sched.paired:  # both inputs in one gather: two reads
                # made XLA copy the whole buffer under virtual chunks (+14 activations at
                # S=4, M=16), one gather costs one activation more than two reads at V = 1
                ms = jnp.stack([mf, mb])
                pair = jnp.where(jnp.stack([first_f, first_b]).reshape((2,) + (1,) * x0.ndim), xs[ms],
                                 arrived[jnp.stack([cf, cb]), ms % KA])
                x_f, x_b = pair[0], pair[1]
            else:  # one read: a cell's one op's input (or a pair's forward's: the pullback's
                # input then comes from the stash)
                m, c = jnp.where(is_f, mf, jnp.where(is_b, mb, mw)), jnp.where(is_f, cf, jnp.where(is_b, cb, cw))
                x_f = x_b = jnp.where((s == 0) & (c == 0), xs[m], arrived[c, m % KA])
            x_w = x_b  # a split schedule's cell holds one op

            def head_grads(h, y):
                """Loss and (d head, d h, d y) of the last global stage at a microbatch."""
                l_m, g = jax.value_and_grad(loss_fn, argnums=argnums)(hp, h, y)
                return l_m, g if target_grads else g + ((),)

            # Two conditionals, a forward one and a backward one (each skips unless this
            # tick's cell has an op of its kind), rather than one switch over both: a
            # conditional's outputs are all live while its taken branch runs, so one switch
            # would keep the forward's stash-entry outputs allocated during every backward.
            def no_fwd(_):
                return jnp.zeros_like(x0), no_saved, 0.0, zeros(hp), no_y

            def fwd(_):
                h, saved = forward(chunk_params(cf), x_f)
                return h, saved, 0.0, zeros(hp), no_y

            def fwd_loss(_):  # the last stage's forward; it sends nothing: h is d loss / d h
                h, saved = forward(chunk_params(cf), x_f)
                l_m, (g_head, g_h, g_y) = head_grads(h, y_f)
                return g_h, saved, l_m, g_head, g_y

            evaluates_loss_f = last_f & is_f & loss_at_forward
            evaluates_loss_b = last_b & is_b & (not loss_at_forward)
            fwd_branches = (no_fwd, fwd, fwd_loss) if loss_at_forward else (no_fwd, fwd)
            h, saved, l_f, dh_f, dy_f = jax.lax.switch(
                jnp.where(is_f, jnp.where(evaluates_loss_f, 2, 1), 0), fwd_branches, None)
            stash = tuple(_put_if(a, (cf, mf % KS), is_f, v) for a, v in zip(stash, saved))
            # the last stage's backward of the microbatch whose forward it ran just now (a
            # pair F(m)+B(m)) takes the loss gradient straight from that forward
            same_tick = evaluates_loss_f & is_b & last_b & (mb == mf)
            if own_loss_grads:  # written before the backward reads it, as a stash entry
                loss_grads = _put_if(loss_grads, (mf % KL,), evaluates_loss_f, h)
                keep_own = evaluates_loss_f
            else:  # kept in the gradient ring at the end of the tick, unless used now
                keep_own = evaluates_loss_f & ~same_tick

            def stashed(c, m):
                return tuple(a[c, m % KS] for a in stash)

            def output_grad(c, m, last):
                """d loss / d (this stage's output) for microbatch m of chunk c: received, or
                (the last global stage) its own loss gradient."""
                if own_loss_grads:
                    return jnp.where(last, loss_grads[m % KL], grads_in[c, m % KG])
                return grads_in[c, m % KG]

            def accumulate(g, dp, c):
                """g + dp into chunk c's gradient, inside the conditional that computes dp: the
                no-op branch returns g as is (XLA aliases it: no copy), so a tick without a
                parameter gradient neither makes a zero one nor adds it (a parameter-sized
                write and add per tick; the split kinds run 3VM + S - 1 ticks)."""
                if V > 1:
                    return jax.tree.map(lambda a, d: a.at[c].add(d), g, dp)
                return jax.tree.map(jnp.add, g, dp)

            # the backward conditional accumulates the parameter gradient, except under a
            # split (the W conditional does)
            acc = (lambda g, dp, c: g) if split else accumulate
            if split:  # a cell's one B or W reads its output gradient here, outside the
                # conditionals: it lives until the W (up to S slots), and a read inside would
                # copy the whole ring every tick
                g_out = output_grad(jnp.where(is_b, cb, cw), jnp.where(is_b, mb, mw),
                                    jnp.where(is_b, last_b, last_w))

            def no_bwd(g):
                return jnp.zeros_like(x0), g, 0.0, zeros(hp), no_y

            def bwd(g):
                _, pullback = pullback_of(chunk_params(cb), x_b, stashed(cb, mb))
                g_h = g_out if split else output_grad(cb, mb, last_b)
                if loss_at_forward and not own_loss_grads and sched.paired:  # (passing h in costs a copy)
                    g_h = jnp.where(same_tick, h, g_h)
                dp, dx = pullback(g_h)
                return dx, acc(g, dp, cb), 0.0, zeros(hp), no_y

            def bwd_loss(g):  # the last stage's backward under remat, recomputing h
                h, pullback = pullback_of(chunk_params(cb), x_b, stashed(cb, mb))
                l_m, (g_head, g_h, g_y) = head_grads(h, y_b)
                dp, dx = pullback(g_h)
                return dx, acc(g, dp, cb), l_m, g_head, g_y

            bwd_branches = (no_bwd, bwd) if loss_at_forward else (no_bwd, bwd, bwd_loss)
            dx, gsum, l_b, dh_b, dy_b = jax.lax.switch(
                jnp.where(is_b, jnp.where(evaluates_loss_b, 2, 1), 0), bwd_branches, gsum)
            if split:  # W: the parameter gradient from the same stash entry and output gradient
                def no_w(g):
                    return g

                def wgt(g):
                    _, pullback = pullback_of(chunk_params(cw), x_w, stashed(cw, mw))
                    return accumulate(g, pullback(g_out)[0], cw)

                def wgt_loss(g):  # under remat the last stage recomputes h and its loss gradient
                    h, pullback = pullback_of(chunk_params(cw), x_w, stashed(cw, mw))
                    return accumulate(g, pullback(head_grads(h, y_w)[1][1])[0], cw)

                w_branches = (no_w, wgt) if loss_at_forward else (no_w, wgt, wgt_loss)
                gsum = jax.lax.switch(jnp.where(is_w, jnp.where(last_w & (not loss_at_forward), 2, 1), 0),
                                      w_branches, gsum)
            l_m = l_f + l_b
            dh = jax.tree.map(jnp.add, dh_f, dh_b)
            hsum = jax.tree.map(jnp.add, hsum, dh)
            if target_grads:  # d loss / d ys[m], where the last global stage evaluates the loss
                if loss_at_forward:
                    dys = jax.tree.map(lambda d, g: _put_if(d, (mf,), evaluates_loss_f, g), dys, dy_f)
                else:
                    dys = jax.tree.map(lambda d, g: _put_if(d, (mb,), evaluates_loss_b, g), dys, dy_b)
            # what arrives here this tick, for which microbatch and chunk (from the table):
            # from stage s-1's forward of chunk c (or stage S-1's chunk c-1 when s == 0), and
            # back from stage s+1's backward of chunk c (or stage 0's chunk c+1 when s == S-1)
            after = _after_all(h, dx, gsum)
            h_in = _shift_if(sends_fwd[t] & after, h, up)
            dx_in = _shift_if(sends_bwd[t] & after, dx, down)
            c_up = tab.f_chunk[t, prev] + jnp.where(s == 0, 1, 0)
            c_down = tab.b_chunk[t, nxt] - jnp.where(s == S - 1, 1, 0)
            # (one stage with virtual chunks sends to itself: chunk c's output is chunk c+1's input)
            got_act = tab.f_on[t, prev] & ((s > 0) | (c_up < V))
            got_grad = tab.b_on[t, nxt] & ((s < S - 1) | (c_down >= 0))
            arrived = _put_if(arrived, (jnp.clip(c_up, 0, V - 1), tab.f_mb[t, prev] % KA), got_act, h_in)
            if loss_at_forward and not own_loss_grads:  # never both at once (see above)
                grads_in = _put_if(grads_in, (jnp.where(keep_own, cf, jnp.clip(c_down, 0, V - 1)),
                                              jnp.where(keep_own, mf, tab.b_mb[t, nxt]) % KG),
                                   keep_own | got_grad, jnp.where(keep_own, h, dx_in))
            else:
                grads_in = _put_if(grads_in, (jnp.clip(c_down, 0, V - 1), tab.b_mb[t, nxt] % KG), got_grad, dx_in)
            # the first global stage's input gradient is d loss / d xs[m]
            if input_grads:
                dxs = _put_if(dxs, (mb,), first_b & is_b, dx)
            return (arrived, grads_in, loss_grads, stash, gsum, lsum + l_m, dxs, hsum, dys), None

        init = (jnp.zeros((V, KA) + x0.shape, x0.dtype), jnp.zeros((V, KG) + x0.shape, x0.dtype),
                jnp.zeros((KL,) + x0.shape, x0.dtype),
                tuple(jnp.zeros((V, KS) + a.shape, a.dtype) for a in saved_shapes),
                jax.tree.map(jnp.zeros_like, p), jnp.zeros((), jnp.float32),
                jnp.zeros_like(xs) if input_grads else jnp.zeros((), xs.dtype),
                jax.tree.map(jnp.zeros_like, hp), jax.tree.map(jnp.zeros_like, ys) if target_grads else ())
        (*_, gsum, lsum, dxs, hsum, dys), _ = jax.lax.scan(tick, init, jnp.arange(sched.ticks))
        hsum = jax.tree.map(lambda g: jax.lax.psum(g, ("stage", "data")), hsum)  # last stage only
        lsum = jax.lax.psum(lsum, ("stage", "data"))          # only the last stage holds loss
        gsum = jax.tree.map(lambda g: jax.lax.psum(g, "data")[None], gsum)
        dxs = jax.lax.psum(dxs, "stage") if input_grads else dxs  # held by stage 0 only
        dys = jax.tree.map(lambda d: jax.lax.psum(d, "stage"), dys)  # held by the last stage only
        return lsum, gsum, dxs, hsum, dys

    stage_spec = jax.tree.map(lambda _: P("stage"), params)
    data_spec = P(None, "data")
    ys_spec = jax.tree.map(lambda _: data_spec, ys)
    head_tree = head if head is not None else jnp.zeros(())
    head_spec = jax.tree.map(lambda _: P(), head_tree)
    loss_sum, grads, dxs, head_grads, dys = jax.shard_map(
        run, mesh=mesh, in_specs=(stage_spec, head_spec, data_spec, ys_spec),
        out_specs=(P(), stage_spec, data_spec if input_grads else P(), head_spec,
                   ys_spec if target_grads else ()),
        axis_names={"stage", "data"}, check_vma=False)(params, head_tree, xs, ys)
    return PipelineGrads(loss_sum, grads, dxs if input_grads else None,
                         head_grads if head is not None else None, dys if target_grads else None)


def pipelined_loss(block: Callable[[Any, jax.Array], jax.Array], loss: Callable[[Any, jax.Array, Any], jax.Array],
                   sched: Schedule, mesh: Mesh | None = None,
                   remat: bool = False) -> Callable[[Any, Any, jax.Array, Any], jax.Array]:
    """f(params, head, xs, ys) = sum over microbatches m of loss(head, tower(xs[m]), ys[m]),
    a scalar JAX can differentiate w.r.t. all four arguments (ys: float leaves), so a
    pipelined tower sits inside an ordinary loss (embeddings before it, a wide part added in
    its head).

    Its gradient is not autodiff's: differentiating runs `sched` (any kind with one chunk per
    stage) as one SPMD program that computes the loss and every gradient at once
    (`pipeline_value_and_grad`), and the backward pass only scales those by the incoming
    cotangent. This works because f is the loss: the cotangent is a scalar. Evaluated
    without a gradient, f runs the forward-only GPipe loop (`pipeline_forward`, one chunk
    per stage). `mesh` defaults to the ambient one; `remat` as in `pipeline_value_and_grad`."""
    if sched.virtual > 1:
        raise ValueError(f"pipelined_loss runs one chunk per stage; {sched.kind} has {sched.virtual} "
                         "(call pipeline_value_and_grad for interleaved schedules)")

    def value_and_grads(params, head, xs, ys):
        m = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
        return pipeline_value_and_grad(block, loss, params, xs, ys, sched, m, input_grads=True,
                                       head=head, target_grads=True, remat=remat)

    @jax.custom_vjp
    def f(params, head, xs, ys):
        outs = pipeline_forward(block, params, xs, mesh)
        return jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(head, outs, ys))

    def f_fwd(params, head, xs, ys):
        r = value_and_grads(params, head, xs, ys)
        return r.loss, (r.params, r.head, r.inputs, r.targets)

    def f_bwd(grads, g):
        return jax.tree.map(lambda a: (g * a).astype(a.dtype), grads)

    f.defvjp(f_fwd, f_bwd)
    return f


def pipeline_forward(block: Callable[[Any, jax.Array], jax.Array], params: Any, xs: jax.Array,
                     mesh: Mesh | None = None) -> jax.Array:
    """GPipe's forward half as a differentiable function: [M, batch, ...] microbatches in,
    the last stage's outputs out. Stage 0 injects microbatch t at tick t; activations move
    one stage per tick; after M + S - 1 ticks the last stage has every output. Autodiff
    transposes the scan into GPipe's backward, so a model can place a `Staged` tower inside
    an ordinary loss (memory: all M microbatches' activations, as GPipe keeps). `mesh`
    defaults to the ambient one (`jax.sharding.use_abstract_mesh`; the trainer's step sets it)."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    S, M = mesh.shape["stage"], xs.shape[0]
    _check_stacked(params, S)
    up = [(s, s + 1) for s in range(S - 1)]

    def run(p, xs):
        p = jax.tree.map(lambda a: a[0], p)
        s = jax.lax.axis_index("stage")

        def tick(carry, t):
            act, outs = carry
            x_in = jnp.where(s == 0, xs[jnp.minimum(t, M - 1)], act)
            h = block(p, x_in)
            m_out = t - (S - 1)
            outs = jnp.where((s == S - 1) & (m_out >= 0), outs.at[jnp.clip(m_out, 0, M - 1)].set(h), outs)
            return (jax.lax.ppermute(h, "stage", up), outs), None

        init = (jnp.zeros_like(xs[0]), jnp.zeros_like(xs))
        (_, outs), _ = jax.lax.scan(tick, init, jnp.arange(M + S - 1))
        return jax.lax.psum(outs, "stage")  # only the last stage holds them

    stage_spec = jax.tree.map(lambda _: P("stage"), params)
    return jax.shard_map(run, mesh=mesh, in_specs=(stage_spec, P(None, "data")), out_specs=P(None, "data"),
                         axis_names={"stage", "data"}, check_vma=False)(params, xs)
