"""Realm 4 inside the CTR trainer: Wide&Deep's deep tower Staged over `stage` runs the
schedule its placement names (GPipe or 1F1B, the loss head on the last stage, the wide
logits an input of the head) and equals the replicated tower: loss, dense gradients and
embedding-row gradients of one step, and losses over a few trained steps."""
import jax
import numpy as np
import pytest

import jaxps.parallel.pipeline as pipeline
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models import WideDeep, WideDeepConfig
from jaxps.placement import Replicated, Staged
from jaxps.step import StepBuilder, dense_optimizer
from test_sparse_lr_exact import make_batches


def _model(deep_placement):
    return WideDeep(WideDeepConfig(num_slots=6, embed_rows=2048, embed_dim=4, wide_rows=2048,
                                   embed_placement=Replicated(), wide_placement=Replicated(),
                                   deep_blocks=4, deep_width=16, deep_placement=deep_placement))


def _loss_and_grads(deep_placement, mesh, batch):
    sb = StepBuilder(_model(deep_placement), mesh, dense_optimizer("adam", 0.01))
    state = sb.init_state(0)
    dev = sb.to_device(batch, sb.plan_batch(batch))

    def f(state, dev):  # loss_and_grads sets the mesh its pipelined tower needs itself
        return sb.loss_and_grads(state["dense"], sb._gather(state, dev), dev)

    return jax.jit(f)(state, dev)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "1f1b-paired", "zb-h1"])
def test_staged_tower_step_equals_replicated(schedule, monkeypatch):
    calls = []
    real = pipeline.pipeline_value_and_grad

    def spy(*args, **kwargs):
        calls.append(args[5].kind)  # the schedule table the step executes
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "pipeline_value_and_grad", spy)
    batch = make_batches(1, seed=21)[0]
    loss, (g_dense, g_rows) = _loss_and_grads(Staged(microbatches=4, schedule=schedule),
                                              make_mesh(MeshConfig(data=2, stage=4)), batch)
    assert calls == [schedule]
    loss_ref, (g_dense_ref, g_rows_ref) = _loss_and_grads(Replicated(), make_mesh(MeshConfig(data=8)), batch)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    assert np.abs(np.asarray(g_dense_ref["blocks_w"])).max() > 1e-4
    assert set(g_dense) == set(g_dense_ref) >= {"blocks_w", "blocks_b", "proj", "out", "bias"}
    for name in g_dense_ref:
        for got, want in zip(jax.tree.leaves(g_dense[name]), jax.tree.leaves(g_dense_ref[name])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("embed", "wide"):  # row gradients reach the tables through the head and the inputs
        assert np.abs(np.asarray(g_rows_ref[name])).max() > 1e-4
        np.testing.assert_allclose(np.asarray(g_rows[name]), np.asarray(g_rows_ref[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_staged_schedule_is_checked_and_parsed():
    from jaxps.placement import parse
    with pytest.raises(ValueError, match="schedule"):
        Staged(schedule="interleaved")
    assert parse("staged") == Staged() and parse("staged:8:gpipe") == Staged(microbatches=8, schedule="gpipe")
    with pytest.raises(ValueError, match="microbatches"):
        parse("staged:0")
    with pytest.raises(ValueError, match="'stage' mesh axis"):
        Staged(axis="model")


def test_cli_trains_wide_deep_with_a_1f1b_staged_tower(tmp_path):
    import json
    from test_end_to_end import _jaxps
    common = ["train", "model.name=wide_deep", "model.placement=row_sharded", "model.rows=65536",
              "model.embed_dim=4", "model.deep_blocks=4", "model.deep_width=16", "data.synthetic.n_train=4000",
              "data.synthetic.n_test=1000", "data.batch_size=512", "train.progress=false", "train.checkpoint=false",
              "train.tensorboard=false", "train.dense_optimizer=adam", "train.dense_learning_rate=0.003"]
    staged = _jaxps(common + ["model.deep_placement=staged:4:1f1b", "mesh.stage=4"], tmp_path)
    assert staged.returncode == 0, staged.stderr[-3000:]
    assert "Staged(stage)" in staged.stdout and "'stage': 4" in staged.stdout
    got = json.loads((tmp_path / "runs/jaxps/metrics.json").read_text())["eval"]["logloss"]
    plain = _jaxps(common, tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    want = json.loads((tmp_path / "runs/jaxps/metrics.json").read_text())["eval"]["logloss"]
    assert got == pytest.approx(want, rel=1e-4)
    bad = _jaxps(common + ["model.deep_placement=staged:4:1f1b", "mesh.stage=2"], tmp_path)
    assert bad.returncode != 0 and "stacked per stage" in bad.stderr
