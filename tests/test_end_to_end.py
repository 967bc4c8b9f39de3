"""End to end: convergence to the planted model, the CLI's default run, restore."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxps.data.synthetic import PlantedModel, SyntheticConfig
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.models.mlp import MLPClassifier, MLPConfig
from jaxps.models.sparse_lr import SparseLR, SparseLRConfig
from jaxps.optim import rowwise
from jaxps.optim.rowwise import FTRL
from jaxps.placement import RowSharded
from jaxps.trainer import TrainConfig, Trainer


def _split(b, size):
    return [b.slice(i, i + size) for i in range(0, b.size - b.size % size, size)]


def test_sparse_lr_reaches_bayes_optimal_logloss(tmp_path):
    planted = PlantedModel(SyntheticConfig(num_fields=10, vocab_size=100, seed=0))
    train, _ = planted.sample(400_000, 1)
    test, p_true = planted.sample(50_000, 2)
    bayes = PlantedModel.bayes_logloss(p_true, test.labels)
    trainer = Trainer(SparseLR(SparseLRConfig(rows=1 << 16, optimizer=FTRL(0.3))), MeshConfig(),
                      TrainConfig(epochs=2, progress=False, checkpoint=False, tensorboard=False,
                                  out_dir=str(tmp_path)))
    result = trainer.fit(_split(train, 2048), _split(test, 2048))
    assert result["eval"]["logloss"] <= bayes * 1.01, (result["eval"], bayes)
    assert result["eval"]["auc"] > 0.8


def test_predict_matches_numpy_forward_and_restore_on_fewer_devices(tmp_path):
    planted = PlantedModel(SyntheticConfig(num_fields=5, vocab_size=50, seed=3))
    data, _ = planted.sample(4096, 1)
    batches = _split(data, 512)
    cfg = TrainConfig(progress=False, tensorboard=False, out_dir=str(tmp_path))
    model = SparseLR(SparseLRConfig(rows=1000))
    t8 = Trainer(model, MeshConfig(), cfg)
    t8.fit(batches)
    # predict = sigmoid(bias + sum w[row] * val), computed in numpy from the state
    w = np.asarray(t8.state["tables"]["weights"]["params"])[:, 0]
    rows = model.tables()[0].rows_for(data.ids)
    logits = (w[rows] * data.vals * data.mask).sum(1) + float(t8.state["dense"]["bias"])
    np.testing.assert_allclose(t8.predict(batches), 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    # restore the checkpoint written by fit onto a 4-device mesh
    t4 = Trainer(model, make_mesh(MeshConfig(data=4), jax.devices()[:4]), cfg)
    assert t4.restore() == t8.step
    np.testing.assert_array_equal(np.asarray(t4.state["tables"]["weights"]["params"]), w[:, None])
    np.testing.assert_allclose(t4.predict(batches), t8.predict(batches), rtol=1e-6)


def test_mlp_data_parallel_learns(tmp_path):
    planted = PlantedModel(SyntheticConfig(num_fields=8, vocab_size=50, seed=1))
    train, _ = planted.sample(60_000, 1)
    test, p_true = planted.sample(10_000, 2)
    trainer = Trainer(MLPClassifier(MLPConfig(rows=4096, embed_dim=8, hidden=(32,))), MeshConfig(),
                      TrainConfig(epochs=2, progress=False, checkpoint=False, tensorboard=False,
                                  dense_optimizer="adam", dense_learning_rate=0.003,
                                  out_dir=str(tmp_path)))
    result = trainer.fit(_split(train, 1024), _split(test, 1024))
    base = PlantedModel.bayes_logloss(np.full_like(p_true, train.labels.mean()), test.labels)
    assert result["eval"]["logloss"] < base - 0.05, (result["eval"], base)


def _jaxps(args, cwd):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the CLI sets up 8 CPU devices itself
    return subprocess.run([sys.executable, "-m", "jaxps.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_default_run_writes_metrics_tensorboard_checkpoint(tmp_path):
    out = _jaxps(["train", "data.synthetic.n_train=20000", "data.synthetic.n_test=5000",
                  "model.rows=65536", "train.progress=false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval logloss" in out.stdout and "AUC" in out.stdout
    assert "mesh {'data': 8" in out.stdout
    metrics = json.loads((tmp_path / "runs/jaxps/metrics.json").read_text())
    assert metrics["train"]["examples"] == 20000
    assert 0 < metrics["eval"]["logloss"] < 0.69 and metrics["eval"]["auc"] > 0.6
    tb = list((tmp_path / "runs/jaxps/tensorboard").glob("events.out.tfevents.*"))
    assert tb and tb[0].stat().st_size > 0
    ckpt = tmp_path / "runs/jaxps/checkpoints" / str(metrics["train"]["steps"])
    assert ckpt.is_dir() and any(ckpt.rglob("*"))
    ev = _jaxps(["evaluate", "data.synthetic.n_train=20000", "data.synthetic.n_test=5000",
                 "model.rows=65536"], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["logloss"] == pytest.approx(
        metrics["eval"]["logloss"], rel=1e-6)
    pr = _jaxps(["predict", "data.synthetic.n_train=20000", "data.synthetic.n_test=5000",
                 "model.rows=65536", "--out", "p.txt"], tmp_path)
    assert pr.returncode == 0, pr.stderr[-3000:]
    probs = np.loadtxt(tmp_path / "p.txt")
    labels = np.array([float(l.split()[0]) for l in (tmp_path / "runs/data/test.svm").read_text().splitlines()])
    assert probs.shape == (5000,) and ((probs > 0) & (probs < 1)).all()
    logloss = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    assert logloss == pytest.approx(metrics["eval"]["logloss"], rel=1e-3)  # 6-digit text


def test_cli_plan_and_config_errors(tmp_path):
    out = _jaxps(["plan", "model.rows=1000000", "model.optimizer.name=adam"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "weights" in out.stdout and "RowSharded" in out.stdout
    bad = _jaxps(["plan", "model.optimzer.name=adam"], tmp_path)
    assert bad.returncode != 0 and "model.optimzer" in bad.stderr
    cfg = tmp_path / "job.toml"
    cfg.write_text("[mesh]\ndata = 'x'\n")
    bad = _jaxps(["plan", str(cfg)], tmp_path)
    assert bad.returncode != 0 and "mesh.data" in bad.stderr


def _criteo_lines(n: int, seed: int) -> list[str]:
    """Criteo TSV lines whose label depends on the first categorical and first integer."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        c0 = rng.integers(0, 20)
        i0 = rng.integers(0, 50)
        p = 1 / (1 + np.exp(-(1.5 * (c0 % 2) - 0.8 + 0.02 * i0)))
        ints = [str(i0)] + [str(rng.integers(-1, 100)) if rng.random() > 0.2 else "" for _ in range(12)]
        cats = [f"{c0:08x}"] + [f"{rng.integers(0, 1 << 32):08x}" if rng.random() > 0.1 else ""
                                for _ in range(25)]
        lines.append("\t".join([str(int(rng.random() < p))] + ints + cats))
    return lines


@pytest.mark.slow
def test_cli_criteo_mlp_with_bad_lines(tmp_path):
    lines = _criteo_lines(3000, 0)
    lines.insert(1234, "1\t2\tnot-a-row")  # wrong column count, line 1235
    (tmp_path / "day0.tsv").write_text("\n".join(lines) + "\n")
    args = ["train", "data.format=criteo", "data.train=day0.tsv", "data.eval=day0.tsv",
            "model.name=mlp", "model.rows=4096", "data.batch_size=256", "train.progress=false",
            "train.checkpoint=false", "train.epochs=2", "train.dense_optimizer=adam",
            "train.dense_learning_rate=0.003"]
    bad = _jaxps(args, tmp_path)
    assert bad.returncode != 0
    assert "day0.tsv:1235: wrong column count" in bad.stderr
    out = _jaxps(args + ["data.skip_bad_lines=true"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped" in out.stdout
    metrics = json.loads((tmp_path / "runs/jaxps/metrics.json").read_text())
    assert metrics["data"]["train"]["skipped"] == 2  # once per epoch
    assert metrics["data"]["train"]["skipped_by_reason"] == {"wrong column count": 2}
    assert metrics["train"]["examples"] == 2 * 3000
    assert metrics["eval"]["auc"] > 0.65  # learned the planted dependence


def test_restore_onto_a_mesh_with_other_row_padding(tmp_path):
    """1000 rows pad to 1000 on 8 shards and to 1002 on 3: values survive, and a checkpoint
    of another model is refused with the namespace named."""
    planted = PlantedModel(SyntheticConfig(num_fields=5, vocab_size=50, seed=3))
    data, _ = planted.sample(2048, 1)
    batches = _split(data, 512)
    cfg = TrainConfig(progress=False, tensorboard=False, out_dir=str(tmp_path))
    t8 = Trainer(SparseLR(SparseLRConfig(rows=1000)), MeshConfig(), cfg)
    t8.fit(batches)
    # rows split 3 ways over `model` now (the batch stays whole on data=1)
    t3 = Trainer(SparseLR(SparseLRConfig(rows=1000, placement=RowSharded("model"))),
                 make_mesh(MeshConfig(data=1, model=3), jax.devices()[:3]), cfg)
    t3.restore()
    assert t3.state["tables"]["weights"]["params"].shape == (1002, 1)
    np.testing.assert_array_equal(np.asarray(t3.state["tables"]["weights"]["params"])[:1000],
                                  np.asarray(t8.state["tables"]["weights"]["params"]))
    np.testing.assert_allclose(t3.predict(batches), t8.predict(batches), rtol=1e-6)
    other = Trainer(SparseLR(SparseLRConfig(rows=999)), MeshConfig(data=-1), cfg)
    with pytest.raises(ValueError, match=r"weights is \{'rows': 1000.*this model has \{'rows': 999"):
        other.restore()
    adam = Trainer(SparseLR(SparseLRConfig(rows=1000, optimizer=rowwise.Adam())), MeshConfig(), cfg)
    with pytest.raises(ValueError, match=r"'slots': \['accumulator', 'linear'\]\}, this model has .*'m', 'v'"):
        adam.restore()


@pytest.mark.slow
def test_cli_wide_deep_on_criteo_with_host_embeddings(tmp_path):
    (tmp_path / "day0.tsv").write_text("\n".join(_criteo_lines(2000, 1)) + "\n")
    out = _jaxps(["train", "data.format=criteo", "data.train=day0.tsv", "data.eval=day0.tsv",
                  "model.name=wide_deep", "model.placement=host", "model.rows=65536", "model.embed_dim=4",
                  "model.hidden=16", "data.batch_size=256", "train.progress=false", "train.checkpoint=false",
                  "train.epochs=2", "train.dense_optimizer=adam", "train.dense_learning_rate=0.003"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HostTable(kind='collisionless'" in out.stdout
    metrics = json.loads((tmp_path / "runs/jaxps/metrics.json").read_text())
    assert metrics["ps"]["embed"]["keys"] > 1000 and metrics["ps"]["embed"]["pushes"] == metrics["train"]["steps"]
    assert metrics["eval"]["auc"] > 0.65


def test_loss_log_is_one_curve(tmp_path):
    """train_loss.jsonl holds every step's loss once, in order: a second fit appends its
    steps, a fresh trainer in the same out_dir starts the file anew (it does not add to
    the old run's curve), and the losses are the ones `fit` kept in `history`."""
    planted = PlantedModel(SyntheticConfig(num_fields=5, vocab_size=50, seed=4))
    data, _ = planted.sample(2048, 1)
    batches = _split(data, 512)
    cfg = TrainConfig(progress=False, tensorboard=False, checkpoint=False, log_every=1, out_dir=str(tmp_path))
    path = tmp_path / "train_loss.jsonl"

    def curve():
        return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]

    first = Trainer(SparseLR(SparseLRConfig(rows=1000)), MeshConfig(), cfg)
    first.fit(batches)
    first.fit(batches[:2])
    assert [s for s, _ in curve()] == [1, 2, 3, 4, 5, 6]
    assert curve() == [(r["step"], r["loss"]) for r in first.history]
    again = Trainer(SparseLR(SparseLRConfig(rows=1000)), MeshConfig(), cfg)
    again.fit(batches[:3])
    assert curve() == [(r["step"], r["loss"]) for r in again.history] and len(curve()) == 3
