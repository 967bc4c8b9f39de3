"""Realm 3: blocked sparse LR and a blocked dense layer equal their unsharded versions."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxps.mesh import MeshConfig, make_mesh
from jaxps.optim.rowwise import FTRL
from jaxps.parallel.blocked import blocked_dense, blocked_logits, blocked_lr_step, split_by_block
from jaxps.tables.routing import Router
from reference import NumpyRowOptimizer, sigmoid

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
