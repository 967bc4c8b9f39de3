"""Realm 3: blocked sparse LR and a blocked dense layer equal their unsharded versions; a
`Blocked` table trains through the trainer's step like a row-sharded one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.optim.rowwise import FTRL
from jaxps.parallel.blocked import blocked_dense, blocked_logits, blocked_lr_step, split_by_block
from jaxps.tables.routing import Router
from jaxps.placement import Blocked, Replicated, RowSharded
from reference import NumpyRowOptimizer, sigmoid
from test_sparse_lr_exact import OPTIMIZERS, ROWS as LR_ROWS, make_batches, run_jaxps

ROWS, BLOCKS = 4096, 8


def wide_batch(rng, B=16, F=300):
    """Few examples, each with hundreds of nonzeros (duplicates and padding included)."""
    rows = rng.integers(0, ROWS, (B, F))
    mask = rng.random((B, F)) < 0.9
    vals = np.where(mask, rng.uniform(0.5, 1.5, (B, F)), 0).astype(np.float32)
    return np.where(mask, rows, 0), vals, mask, (rng.random(B) < 0.4).astype(np.float32)


def test_split_keeps_every_nonzero_in_its_block():
    rng = np.random.default_rng(0)
    rows, vals, mask, _ = wide_batch(rng)
    rpb = ROWS // BLOCKS
    bb = split_by_block(rows, vals, mask, rpb, BLOCKS, Router(rpb, BLOCKS))
    for b in range(BLOCKS):
        for e in range(rows.shape[0]):
            got = sorted(zip((bb.rows[b][bb.inverse[b, e]] + b * rpb)[bb.vals[b, e] != 0],
                             bb.vals[b, e][bb.vals[b, e] != 0]))
            sel = mask[e] & (rows[e] // rpb == b)
            assert got == sorted(zip(rows[e][sel], vals[e][sel]))


def test_blocked_lr_equals_numpy_ftrl():
    rng = np.random.default_rng(1)
    mesh = make_mesh(MeshConfig(data=1, model=BLOCKS))
    rpb = ROWS // BLOCKS
    router = Router(rpb, BLOCKS)
    opt = FTRL(0.3, l1=0.001, l2=0.01, beta=0.5)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    table = jax.device_put(jnp.zeros((ROWS, 1)), sh)
    slots = {n: jax.device_put(jnp.full((ROWS, 1), opt.slot_init(n)), sh) for n in opt.slots}
    bias = jnp.zeros(())
    ref = NumpyRowOptimizer("ftrl", ROWS, 1, learning_rate=0.3, l1=0.001, l2=0.01, beta=0.5)
    ref_bias = 0.0
    for step in range(1, 5):
        rows, vals, mask, labels = wide_batch(rng)
        bb = split_by_block(rows, vals, mask, rpb, BLOCKS, router)
        put = lambda a: jax.device_put(a, sh)  # noqa: E731
        weights = np.ones(rows.shape[0], np.float32)
        z_blocked = blocked_logits(table, put(bb.rows), put(bb.inverse), put(bb.vals), mesh, "model")
        table, slots, bias, loss = blocked_lr_step(opt, table, slots, bias, put(bb.rows), put(bb.inverse),
                                                   put(bb.vals), jnp.asarray(labels), jnp.asarray(weights),
                                                   jnp.asarray(step), 0.01, mesh, "model")
        # numpy: the unsharded computation
        z = (ref.w[rows, 0] * vals * mask).sum(1) + ref_bias
        np.testing.assert_allclose(np.asarray(z_blocked) + ref_bias, z, rtol=1e-5, atol=1e-6)
        dz = sigmoid(z) - labels
        g = np.zeros(ROWS)
        np.add.at(g, rows[mask], (dz[:, None] * vals)[mask])
        touched = np.unique(rows[mask])
        ref.apply(touched, g[touched][:, None], step)
        ref_bias -= 0.01 * dz.sum()
        np.testing.assert_allclose(np.asarray(table)[:, 0], ref.w[:, 0], rtol=2e-4, atol=2e-6)
    assert np.abs(ref.w).max() > 1e-3


def test_blocked_dense_layer_equals_matmul():
    rng = np.random.default_rng(2)
    mesh = make_mesh(MeshConfig(data=1, model=8))
    x = jnp.asarray(rng.normal(size=(4, 4096)), jnp.float32)   # an example wider than a "device"
    w = jnp.asarray(rng.normal(size=(4096, 16)), jnp.float32)
    np.testing.assert_allclose(np.asarray(blocked_dense(x, w, mesh, "model")), np.asarray(x @ w),
                               rtol=1e-4, atol=1e-3)
    # and its gradient (each block's stays local)
    g_blocked = jax.grad(lambda w: jnp.sum(blocked_dense(x, w, mesh, "model") ** 2))(w)
    g_ref = jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
    np.testing.assert_allclose(np.asarray(g_blocked), np.asarray(g_ref), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, model=4), dict(data=1, stage=2, model=4)])
def test_blocked_placement_trains_like_row_sharded_and_replicated(mesh_shape):
    """Sparse LR through the trainer's step with its table `Blocked("model")` (each
    example split by owner block over `model`, the batch over `data`) equals the same
    model RowSharded and Replicated, step for step: losses, rows and bias."""
    batches = make_batches(4, seed=5)
    hp = OPTIMIZERS["ftrl"]
    w_rs, b_rs, l_rs, _ = run_jaxps(batches, "ftrl", hp, jax.devices())
    w_rep, _, l_rep, _ = run_jaxps(batches, "ftrl", hp, jax.devices(), placement=Replicated(),
                                   mesh=make_mesh(MeshConfig(data=8)))
    w, b, l, sb = run_jaxps(batches, "ftrl", hp, jax.devices(), placement=Blocked("model"),
                            mesh=make_mesh(MeshConfig(**mesh_shape)))
    assert sb.layouts["weights"].blocked and sb.layouts["weights"].shards == 4
    assert np.abs(w_rs).max() > 1e-3
    np.testing.assert_allclose(l, l_rs, rtol=1e-6)
    np.testing.assert_allclose(l, l_rep, rtol=1e-6)
    np.testing.assert_allclose(w, w_rs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w, w_rep, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, b_rs, rtol=1e-5, atol=1e-7)


def test_blocked_embeddings_sum_pooled_equal_row_sharded():
    """A multi-column table read sum-pooled (the MLP's embeddings) may be Blocked too."""
    from jaxps.models import MLPClassifier, MLPConfig
    from jaxps.step import StepBuilder, dense_optimizer
    batches = make_batches(3, seed=6)

    def train(placement, mesh):
        model = MLPClassifier(MLPConfig(rows=LR_ROWS, embed_dim=4, hidden=(8,), placement=placement))
        sb = StepBuilder(model, mesh, dense_optimizer("adam", 0.01))
        state, losses = sb.init_state(0), []
        for b in batches:
            state, m = sb.train_step(state, sb.to_device(b, sb.plan_batch(b)))
            losses.append(float(m["loss"]))
        return losses, np.asarray(state["tables"]["embed"]["params"])[:LR_ROWS]

    l_rs, t_rs = train(RowSharded("data"), make_mesh(MeshConfig(data=8)))
    l_bl, t_bl = train(Blocked("model"), make_mesh(MeshConfig(data=4, model=2)))
    np.testing.assert_allclose(l_bl, l_rs, rtol=1e-5)
    np.testing.assert_allclose(t_bl, t_rs, rtol=1e-4, atol=1e-6)


def test_blocked_placement_parses_and_plans_as_realm_3():
    from jaxps.models import SparseLR, SparseLRConfig
    from jaxps.placement import parse
    from jaxps.plan import plan_model
    from jaxps.step import dense_optimizer
    assert parse("blocked") == Blocked("model") and parse("blocked:stage") == Blocked("stage")
    with pytest.raises(ValueError, match="Blocked axis"):
        parse("blocked:data")
    mesh = make_mesh(MeshConfig(data=2, model=4))
    plan = plan_model(SparseLR(SparseLRConfig(rows=1 << 12, placement=Blocked("model"))), mesh,
                      dense_optimizer("sgd", 0.1))
    w = next(p for p in plan if p.name == "weights")
    assert w.realm == 3 and "Blocked" in w.placement
    assert w.bytes_per_device == w.total_bytes // 4


def test_cli_trains_blocked_sparse_lr(tmp_path):
    import json
    from test_end_to_end import _jaxps
    out = _jaxps(["train", "model.placement=blocked", "mesh.model=4", "data.synthetic.n_train=8000",
                  "data.synthetic.n_test=2000", "data.batch_size=2048", "model.rows=65536",
                  "train.progress=false", "train.checkpoint=false", "train.tensorboard=false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Blocked(axis='model')  3" in out.stdout and "'model': 4" in out.stdout
    metrics = json.loads((tmp_path / "runs/jaxps/metrics.json").read_text())
    assert metrics["train"]["examples"] == 8000 and 0 < metrics["eval"]["logloss"] < 0.69
