"""Sparse LR with each row-wise optimizer on 8 devices equals numpy, step by step, and
equals a 1-device run."""
import jax
import numpy as np
import pytest

from jaxps.data.batch import Batch
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import rowwise
from jaxps.placement import Replicated, RowSharded
from jaxps.step import StepBuilder, dense_optimizer
from reference import sparse_lr_reference

ROWS = 4096
B, F = 64, 6

OPTIMIZERS = {
    "sgd": dict(learning_rate=0.5),
    "adagrad": dict(learning_rate=0.3, initial_accumulator_value=0.1),
    "adam": dict(learning_rate=0.05),
    "ftrl": dict(learning_rate=0.3, l1=0.001, l2=0.01, l2_shrinkage=0.001, beta=0.1),
}


def make_batches(n: int, seed: int = 0) -> list[Batch]:
    """Zipf ids (many duplicates within a batch), padded slots and a padded last rows."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.zipf(1.3, size=(B, F)).astype(np.uint64)
        mask = rng.random((B, F)) < 0.85
        vals = np.where(mask, rng.uniform(0.5, 2.0, (B, F)), 0).astype(np.float32)
        weights = np.ones(B, np.float32)
        if i == n - 1:
            weights[-10:] = 0  # padding rows of a short last batch
        labels = (rng.random(B) < 0.3).astype(np.float32)
        out.append(Batch(labels, np.where(mask, ids, 0).astype(np.uint64), vals, mask, weights))
    return out


def run_jaxps(batches, opt, hp, devices, placement=None, capacity=None, mesh=None, reduction="mean"):
    mesh = mesh or make_mesh(MeshConfig(data=len(devices)), devices)
    model = SparseLR(SparseLRConfig(rows=ROWS, optimizer=rowwise.make(opt, **hp),
                                    placement=placement or RowSharded("data"), capacity=capacity))
    sb = StepBuilder(model, mesh, dense_optimizer("sgd", 0.2 if reduction == "mean" else 0.002),
                     loss_reduction=reduction)
    state = sb.init_state(0)
    losses = []
    for b in batches:
        state, m = sb.train_step(state, sb.to_device(b, sb.plan_batch(b)))
        losses.append(float(m["loss"]))
    table = np.asarray(state["tables"]["weights"]["params"])[:ROWS, 0]
    return table, float(state["dense"]["bias"]), losses, sb


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_matches_numpy_and_one_device(opt):
    hp = OPTIMIZERS[opt]
    batches = make_batches(6)
    table = SparseLR(SparseLRConfig(rows=ROWS)).tables()[0]
    ref, ref_bias, ref_losses = sparse_lr_reference(batches, table.rows_for, ROWS, opt, hp, 0.2)
    w8, b8, l8, _ = run_jaxps(batches, opt, hp, jax.devices())
    w1, b1, l1, _ = run_jaxps(batches, opt, hp, jax.devices()[:1])
    assert np.abs(ref.w[:, 0]).max() > 1e-3  # the rows did move
    np.testing.assert_allclose(l8, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(w8, ref.w[:, 0], rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(b8, ref_bias, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w8, w1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l8, l1, rtol=1e-6)


def test_bucket_overflow_is_exact_and_counted():
    batches = make_batches(4, seed=1)
    hp = OPTIMIZERS["adagrad"]
    w_small, _, l_small, sb = run_jaxps(batches, "adagrad", hp, jax.devices(), capacity=4)
    w_auto, _, l_auto, _ = run_jaxps(batches, "adagrad", hp, jax.devices())
    assert sb.routers["weights"].overflows >= 1
    assert sb.routers["weights"].capacity > 4
    np.testing.assert_allclose(w_small, w_auto, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(l_small, l_auto, rtol=1e-6)


@pytest.mark.parametrize("placement,mesh_shape", [
    (Replicated(), dict(data=8)),
    (RowSharded("model"), dict(data=4, model=2)),
    (RowSharded(("data", "model")), dict(data=4, model=2)),
    (Replicated(), dict(data=2, stage=2, model=2)),
])
def test_placements_and_mesh_shapes_agree(placement, mesh_shape):
    """Where the table lives changes nothing in the numbers."""
    batches = make_batches(3, seed=2)
    hp = OPTIMIZERS["ftrl"]
    w_rs, _, l_rs, _ = run_jaxps(batches, "ftrl", hp, jax.devices())
    mesh = make_mesh(MeshConfig(**mesh_shape))
    w, _, l, _ = run_jaxps(batches, "ftrl", hp, jax.devices(), placement=placement, mesh=mesh)
    np.testing.assert_allclose(w, w_rs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l, l_rs, rtol=1e-6)


@pytest.mark.parametrize("opt", ["adagrad", "ftrl"])
def test_summed_loss_gradients_match_numpy(opt):
    """The trainer's default: gradients of the summed batch logloss."""
    batches = make_batches(4, seed=3)
    hp = OPTIMIZERS[opt]
    table = SparseLR(SparseLRConfig(rows=ROWS)).tables()[0]
    ref, ref_bias, ref_losses = sparse_lr_reference(batches, table.rows_for, ROWS, opt, hp, 0.002,
                                                    reduction="sum")
    w, b, losses, _ = run_jaxps(batches, opt, hp, jax.devices(), reduction="sum")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(w, ref.w[:, 0], rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(b, ref_bias, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ndev", [1, 8])
def test_train_step_compiles_once(ndev):
    """The initial state already has the shardings the step returns: no second compile."""
    *_, sb = run_jaxps(make_batches(3, seed=4), "ftrl", OPTIMIZERS["ftrl"], jax.devices()[:ndev],
                       capacity=512)  # fixed capacity: no legitimate recompile either
    assert sb.train_step._cache_size() == 1
