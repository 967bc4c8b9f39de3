"""Pipelined stages (GPipe, 1F1B, interleaved; paired ticks; split backward, zero bubble) in one SPMD
program equal the unpipelined model."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.parallel.pipeline import pipeline_value_and_grad
from jaxps.parallel.schedule import build

D = 8


def block(p, x):
    return jnp.tanh(x @ p["w"] + p["b"]) + x


def loss(h, y):
    return 0.5 * jnp.sum((h - y) ** 2)


def reference(params, xs, ys):
    def total(params):
        out = 0.0
        for m in range(xs.shape[0]):
            h = xs[m]
            for s in range(params["w"].shape[0]):
                h = block(jax.tree.map(lambda a: a[s], params), h)
            out = out + loss(h, ys[m])
        return out
    return jax.value_and_grad(total)(params)


@pytest.mark.parametrize("kind,S,M,data,remat", [("gpipe", 4, 8, 2, False), ("1f1b", 4, 8, 2, False),
                                                 ("1f1b", 2, 6, 4, False), ("1f1b", 4, 4, 1, False),
                                                 ("gpipe", 2, 3, 1, False), ("gpipe", 4, 8, 2, True),
                                                 ("1f1b", 4, 8, 2, True), ("1f1b", 2, 6, 4, True),
                                                 ("1f1b-paired", 4, 8, 2, False), ("1f1b-paired", 2, 6, 4, True),
                                                 ("1f1b-paired", 4, 3, 1, False), ("zb-h1", 4, 8, 2, False),
                                                 ("zb-h1", 2, 6, 4, False), ("zb-h1", 4, 3, 1, False),
                                                 ("zb-h1", 4, 8, 2, True), ("zb-h1", 2, 6, 4, True),
                                                 ("gpipe-split", 4, 8, 2, False), ("1f1b-split", 4, 8, 1, False),
                                                 ("1f1b-split", 2, 6, 4, True)])
def test_pipeline_equals_unpipelined(kind, S, M, data, remat):
    """Both stash policies: the block's residuals (default) or its input, recomputed (remat)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (S, D, D)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.1, (S, D)), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(M, 4 * data, D)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(M, 4 * data, D)), jnp.float32)
    mesh = make_mesh(MeshConfig(data=data, stage=S, model=8 // (data * S)))
    sched = build(kind, S, M)
    l, g, dx, *_ = jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh,
                                                                 input_grads=True, remat=remat))(params, xs, ys)
    l_ref, g_ref = reference(params, xs, ys)
    dx_ref = jax.grad(lambda x: reference(params, x, ys)[0])(xs)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g_ref[k]), rtol=1e-5, atol=1e-6)


def test_1f1b_holds_fewer_activations_than_gpipe():
    """The compiled step's temporaries: 1F1B keeps S microbatches' entries whatever M,
    GPipe M, so GPipe's grow by one entry per microbatch (the block's input in its arrival
    slot, its two tanh-derived residuals in the stash, the last stage's loss gradient) and
    1F1B's do not grow at all; at M = 4S 1F1B needs about a third."""
    S, B, W = 4, 256, 64
    params = {"w": jnp.zeros((S, W, W)), "b": jnp.zeros((S, W))}
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=1))
    entry = 4 * (B // 2) * W * 4  # bytes per microbatch and stage: 4 activations of [B/2, W] f32
    temp = {}
    for kind in ("gpipe", "1f1b", "1f1b-paired"):
        for M in (2 * S, 4 * S):
            sched = build(kind, S, M)
            xs = ys = jnp.zeros((M, B, W))
            f = jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh))
            temp[kind, M] = f.lower(params, xs, ys).compile().memory_analysis().temp_size_in_bytes
    table = 4096  # the schedule table's index arrays also grow with the ticks, by bytes
    assert abs(temp["gpipe", 4 * S] - temp["gpipe", 2 * S] - 2 * S * entry) < table, temp
    assert abs(temp["1f1b", 4 * S] - temp["1f1b", 2 * S]) < table, temp
    assert temp["1f1b", 4 * S] < 0.35 * temp["gpipe", 4 * S], temp
    # paired ticks: 2S-1 stash entries and 2S-3 kept inputs instead of S and S (the price of
    # the theory bubble under synchronous ticks, see schedule.py), still independent of M
    assert abs(temp["1f1b-paired", 4 * S] - temp["1f1b-paired", 2 * S]) < table, temp
    extra = (S - 1) * 2 * entry // 4 + (S - 3) * entry // 4  # residuals: 2 activations; an input: 1
    # (+ a few activations of working set: a pair reads two inputs, and the last stage's
    # backward takes its forward's loss gradient)
    assert temp["1f1b", 4 * S] + extra <= temp["1f1b-paired", 4 * S] <= temp["1f1b", 4 * S] + extra + entry, temp
    assert temp["1f1b-paired", 4 * S] < 0.5 * temp["gpipe", 4 * S], temp


def test_zero_bubble_split_backward_costs_and_memory():
    """zb-h1's B and W take one output each of the same pullback; XLA drops the other half,
    so B and W each cost about a forward and together a backward. The compiled cost
    analysis counts the scan body once, each conditional at its costliest branch: 1F1B's
    body is F + backward, zb-h1's F + B + W, equal (within the elementwise work both halves
    redo) only if neither half computes the other's matmul (else F + 2 backwards, 5/3 as
    much). Memory: the stash bound is 1F1B's (S entries) and independent of M; what a W
    needs besides (its output gradient, received at its B) lives until the W: S-1 more
    gradient slots (the last stage keeps S of its own loss gradients in that ring) and the
    slot it reads, 4 activations at S = 4 over 1F1B's, still about a third of GPipe's.
    1f1b-split (each W right after its B) costs the same and holds exactly 1F1B's: its
    stash and gradient rings have 1F1B's sizes (a gradient is read by B and W in two
    consecutive ticks before the next one arrives)."""
    S, B, W = 4, 256, 64
    params = {"w": jnp.zeros((S, W, W)), "b": jnp.zeros((S, W))}
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=1))
    act = (B // 2) * W * 4  # bytes of one activation [B/2, W] f32
    temp, flops = {}, {}
    for kind in ("gpipe", "1f1b", "zb-h1", "1f1b-split"):
        for M in (2 * S, 4 * S):
            sched = build(kind, S, M)
            xs = ys = jnp.zeros((M, B, W))
            f = jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh))
            compiled = f.lower(params, xs, ys).compile()
            temp[kind, M] = compiled.memory_analysis().temp_size_in_bytes
            flops[kind, M] = compiled.cost_analysis()["flops"]
    matmul = 2 * (B // 2) * W * W  # one [B/2, W] x [W, W] product: a forward's
    assert flops["1f1b", 4 * S] > 3 * matmul  # F (1 matmul) + backward (2)
    assert abs(flops["zb-h1", 4 * S] - flops["1f1b", 4 * S]) < 0.02 * flops["1f1b", 4 * S], flops
    table = 4096
    assert abs(temp["zb-h1", 4 * S] - temp["zb-h1", 2 * S]) < table, temp
    assert temp["1f1b", 4 * S] + 3 * act <= temp["zb-h1", 4 * S] <= temp["1f1b", 4 * S] + 4 * act + table, temp
    assert temp["zb-h1", 4 * S] < 0.36 * temp["gpipe", 4 * S], temp
    assert abs(flops["1f1b-split", 4 * S] - flops["1f1b", 4 * S]) < 0.02 * flops["1f1b", 4 * S], flops
    assert abs(temp["1f1b-split", 4 * S] - temp["1f1b-split", 2 * S]) < table, temp
    assert abs(temp["1f1b-split", 4 * S] - temp["1f1b", 4 * S]) < table, temp


def _computations(hlo: str) -> dict[str, list[str]]:
    """A compiled module's text as {computation name: its instruction lines, in order}."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name is not None and line.startswith("  "):
            comps[name].append(line)
    return comps


@pytest.mark.parametrize("kind,V", [("zb-h1", 1), ("1f1b", 1), ("interleaved-zb", 2)])
def test_sends_wait_for_every_op_of_the_tick(kind, V):
    """A tick's ppermutes (rendezvous of all stages) come after all its op conditionals in
    the compiled schedule: else a stage running a backward beside a neighbour's forward
    waits at the activation send for that forward before its own backward, and the tick
    lasts F + B instead of max(F, B) (zb-h1 traced at S = 2: idle 0.34 of the step; 0.09
    once the sends wait; the table's lockstep model says 0.08)."""
    S, M = 2, 4
    mesh = make_mesh(MeshConfig(data=1, stage=S, model=1), jax.devices()[:S])
    shape = (S, V) if V > 1 else (S,)
    params = {"w": jnp.zeros(shape + (D, D)), "b": jnp.zeros(shape + (D,))}
    xs = ys = jnp.zeros((M, 4, D))
    sched = build(kind, S, M, V)
    f = jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh))
    comps = _computations(f.lower(params, xs, ys).compile().as_text())
    sends = {n for n, lines in comps.items() if any(" collective-permute(" in ln for ln in lines)}
    bodies = 0
    for lines in comps.values():
        conds = [(i, set(re.findall(r"%([\w.\-]+)", ln.split("branch_computations=")[1].split("}")[0])))
                 for i, ln in enumerate(lines) if " conditional(" in ln]
        send_at = [i for i, branches in conds if branches & sends]
        op_at = [i for i, branches in conds if not branches & sends]
        if send_at and op_at:
            bodies += 1
            assert max(op_at) < min(send_at), (kind, op_at, send_at)
    assert bodies == 1


@pytest.mark.parametrize("kind,S,M,V,data,remat", [("interleaved", 2, 4, 2, 2, False), ("interleaved", 4, 8, 2, 2, False),
                                                   ("interleaved", 2, 4, 3, 1, False), ("interleaved", 4, 8, 2, 2, True),
                                                   ("interleaved-paired", 4, 8, 2, 2, False),
                                                   ("interleaved-paired", 2, 4, 3, 1, False),
                                                   ("interleaved-paired", 4, 8, 2, 2, True),
                                                   ("interleaved-split", 4, 8, 2, 2, False),
                                                   ("interleaved-zb", 2, 4, 3, 1, False),
                                                   ("interleaved-zb", 4, 8, 2, 2, True),
                                                   ("interleaved", 1, 2, 2, 1, False),  # one stage: chunks in a ring
                                                   ("interleaved-zb", 1, 3, 3, 2, False)])
def test_interleaved_pipeline_equals_unpipelined(kind, S, M, V, data, remat):
    """Virtual chunks: [s, c] is global stage c*S + s; activations wrap from the last stage
    to the first (a ring ppermute). Split forms: each chunk's W accumulates into its own
    chunk's gradient."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (S, V, D, D)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.1, (S, V, D)), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(M, 2 * data, D)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(M, 2 * data, D)), jnp.float32)
    mesh = make_mesh(MeshConfig(data=data, stage=S, model=8 // (data * S)))
    sched = build(kind, S, M, V)
    l, g, *_ = jax.jit(lambda p, x, y: pipeline_value_and_grad(block, loss, p, x, y, sched, mesh,
                                                               remat=remat))(params, xs, ys)
    # reference over global stages g = c*S + s, in order
    flat = {k: jnp.swapaxes(v, 0, 1).reshape((S * V,) + v.shape[2:]) for k, v in params.items()}
    l_ref, g_ref = reference(flat, xs, ys)
    np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-5)
    for k in params:
        back = jnp.swapaxes(g_ref[k].reshape((V, S) + g_ref[k].shape[1:]), 0, 1)
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(back), rtol=1e-5, atol=1e-6)


def test_interleaved_parameters_need_one_entry_per_chunk():
    """A chunk axis shorter or longer than V is an error, not a clamped layer whose gradient
    is dropped; pipelined_loss (one chunk per stage) refuses interleaved schedules."""
    from jaxps.parallel.pipeline import pipelined_loss
    S, V, M = 2, 2, 2
    mesh = make_mesh(MeshConfig(data=1, stage=S, model=1), jax.devices()[:S])
    xs = ys = jnp.ones((M, 2, D), jnp.float32)
    for chunks in (1, 3):
        params = {"w": jnp.ones((S, chunks, D, D)), "b": jnp.zeros((S, chunks, D))}
        with pytest.raises(ValueError, match="chunks"):
            pipeline_value_and_grad(block, loss, params, xs, ys, build("interleaved", S, M, V), mesh)
    with pytest.raises(ValueError, match="one chunk per stage"):
        pipelined_loss(block, lambda head, h, y: loss(h, y), build("interleaved", S, M, V), mesh)


@pytest.mark.parametrize("kind,V,remat", [("1f1b", 1, False), ("1f1b", 1, True), ("1f1b-paired", 1, False),
                                           ("1f1b-paired", 1, True), ("zb-h1", 1, False), ("zb-h1", 1, True),
                                           ("1f1b-split", 1, False), ("interleaved-zb", 2, False),
                                           ("gpipe", 1, False), ("gpipe-split", 1, False), ("interleaved", 2, False),
                                           ("interleaved-paired", 2, False), ("interleaved-split", 2, False)])
def test_pipeline_composes_with_tensor_parallel_blocks(kind, V, remat):
    """DP x PP x TP on a 2x2x2 mesh: each stage's block is Megatron-split over `model`
    (column then row), the pipeline runs over `stage` (V chunks per stage), the batch over
    `data`."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    S, M, H = 2, 4, 16
    rng = np.random.default_rng(3)

    def mlp_block(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"] + x

    chunks = (V,) if V > 1 else ()
    params = {"w1": jnp.asarray(rng.normal(0, 0.3, (S,) + chunks + (D, H)), jnp.float32),
              "w2": jnp.asarray(rng.normal(0, 0.3, (S,) + chunks + (H, D)), jnp.float32)}
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=2))
    lead = ("stage",) + (None,) * len(chunks)
    placed = {"w1": jax.device_put(params["w1"], NamedSharding(mesh, P(*lead, None, "model"))),
              "w2": jax.device_put(params["w2"], NamedSharding(mesh, P(*lead, "model", None)))}
    xs = jnp.asarray(rng.normal(size=(M, 4, D)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(M, 4, D)), jnp.float32)
    sched = build(kind, S, M, V)
    l, g, *_ = jax.jit(lambda p, x, y: pipeline_value_and_grad(mlp_block, loss, p, x, y, sched, mesh,
                                                               remat=remat))(placed, xs, ys)

    def total(p):  # global stage c*S + s in order
        out = 0.0
        for m in range(M):
            h = xs[m]
            for gs in range(S * V):
                h = mlp_block(jax.tree.map(lambda a: a[gs % S, gs // S] if V > 1 else a[gs], p), h)
            out = out + loss(h, ys[m])
        return out

    l_ref, g_ref = jax.value_and_grad(total)(params)
    np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-5)
    for k in params:  # absolute slack 1e-7 of the largest entry: with V = 2 the entries reach ~50 and
        # the model-axis reductions' order moves small ones by a few 1e-6 (interleaved alike)
        ref = np.asarray(g_ref[k])
        np.testing.assert_allclose(np.asarray(g[k]), ref, rtol=1e-5, atol=max(1e-6, 1e-7 * np.abs(ref).max()))


@pytest.mark.parametrize("kind,remat", [("1f1b", False), ("1f1b", True), ("1f1b-paired", False), ("zb-h1", False),
                                         ("zb-h1", True)])
def test_loss_head_parameters_get_their_gradient(kind, remat):
    """An output layer inside the loss (an LM's head) is trained through the pipeline."""
    S, M = 2, 4
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (S, D, D)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.1, (S, D)), jnp.float32)}
    head = {"v": jnp.asarray(rng.normal(size=(D, 3)), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(M, 4, D)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(M, 4, 3)), jnp.float32)

    def head_loss(hd, h, y):
        return 0.5 * jnp.sum((h @ hd["v"] - y) ** 2)

    mesh = make_mesh(MeshConfig(data=2, stage=S, model=2))
    r = jax.jit(lambda p, hd, x, y: pipeline_value_and_grad(block, head_loss, p, x, y, build(kind, S, M),
                                                             mesh, head=hd, remat=remat))(params, head, xs, ys)

    def total(p, hd):
        out = 0.0
        for m in range(M):
            h = xs[m]
            for s in range(S):
                h = block(jax.tree.map(lambda a: a[s], p), h)
            out = out + head_loss(hd, h, ys[m])
        return out

    l_ref, (g_ref, gh_ref) = jax.value_and_grad(total, argnums=(0, 1))(params, head)
    np.testing.assert_allclose(float(r.loss), float(l_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.head["v"]), np.asarray(gh_ref["v"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.params["w"]), np.asarray(g_ref["w"]), rtol=1e-5, atol=1e-6)


def test_differentiable_gpipe_forward_equals_sequential():
    from jaxps.parallel.pipeline import pipeline_forward
    S, M = 4, 6
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (S, D, D)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.1, (S, D)), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(M, 4, D)), jnp.float32)
    ys = jnp.asarray(rng.normal(size=(M, 4, D)), jnp.float32)
    mesh = make_mesh(MeshConfig(data=2, stage=S, model=1))

    def piped(p, x):
        return loss(pipeline_forward(block, p, x, mesh), ys)

    l, (g, gx) = jax.jit(jax.value_and_grad(piped, argnums=(0, 1)))(params, xs)
    l_ref, g_ref = reference(params, xs, ys)
    gx_ref = jax.grad(lambda x: reference(params, x, ys)[0])(xs)
    np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g["w"]), np.asarray(g_ref["w"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,remat", [("1f1b", False), ("gpipe", False), ("1f1b", True), ("1f1b-paired", False),
                                         ("1f1b-paired", True), ("zb-h1", False), ("zb-h1", True)])
def test_pipelined_loss_is_differentiable_in_all_inputs(kind, remat):
    """`pipelined_loss`: the schedule computes every gradient, JAX sees an ordinary scalar
    loss of (params, head, xs, ys) -- what lets a staged tower sit inside a CTR model with
    layers before it (xs) and a wide part added in its head (ys)."""
    from jaxps.parallel.pipeline import pipelined_loss
    S, M = 2, 4
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.normal(0, 0.3, (S, D, D)), jnp.float32),
              "b": jnp.asarray(rng.normal(0, 0.1, (S, D)), jnp.float32)}
    head = {"v": jnp.asarray(rng.normal(size=(D,)), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(M, 4, D)), jnp.float32)
    ys = {"offset": jnp.asarray(rng.normal(size=(M, 4)), jnp.float32),
          "target": jnp.asarray(rng.normal(size=(M, 4)), jnp.float32)}

    def head_loss(hd, h, y):
        return 0.5 * jnp.sum((h @ hd["v"] + y["offset"] - y["target"]) ** 2)

    def total(p, hd, x, y):  # unpipelined reference
        out = 0.0
        for m in range(M):
            h = x[m]
            for s in range(S):
                h = block(jax.tree.map(lambda a: a[s], p), h)
            out = out + head_loss(hd, h, jax.tree.map(lambda a: a[m], y))
        return out

    mesh = make_mesh(MeshConfig(data=2, stage=S, model=2))
    f = pipelined_loss(block, head_loss, build(kind, S, M), mesh, remat=remat)
    outer = lambda fn: lambda p, hd, x, y: 3.0 * fn(p, hd, x, y)  # noqa: E731 - a cotangent != 1
    got = jax.jit(jax.value_and_grad(outer(f), argnums=(0, 1, 2, 3)))(params, head, xs, ys)
    want = jax.value_and_grad(outer(total), argnums=(0, 1, 2, 3))(params, head, xs, ys)
    np.testing.assert_allclose(float(jax.jit(f)(params, head, xs, ys)), float(want[0]) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
