"""Synthetic planted-model data: determinism, Zipf skew, Bayes logloss, libsvm round trip."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxps.data.batch import Batch, concat
from jaxps.data.readers import ReaderConfig, read_examples
from jaxps.data.synthetic import (PlantedModel, SyntheticConfig, format_libsvm,
                                  generate_dataset, write_libsvm)

SMALL = SyntheticConfig(num_fields=5, vocab_size=1000, seed=3)


def test_deterministic_for_a_seed():
    a, b = PlantedModel(SMALL), PlantedModel(SMALL)
    np.testing.assert_array_equal(a.weights, b.weights)
    (ba, pa), (bb, pb) = a.sample(500, seed=7), b.sample(500, seed=7)
    for x, y in zip((ba.labels, ba.ids, pa), (bb.labels, bb.ids, pb)):
        np.testing.assert_array_equal(x, y)
    bc, _ = a.sample(500, seed=8)
    assert not np.array_equal(ba.ids, bc.ids)
    other = PlantedModel(SyntheticConfig(num_fields=5, vocab_size=1000, seed=4))
    assert not np.array_equal(a.weights, other.weights)


def test_sample_shapes_ids_and_weights():
    m = PlantedModel(SMALL)
    b, p = m.sample(300, seed=0)
    assert b.ids.shape == (300, 5) and b.ids.dtype == np.uint64
    assert b.mask.all() and np.all(b.vals == 1) and np.all(b.weights == 1) and b.dense is None
    f = (b.ids - 1) // 1000
    np.testing.assert_array_equal(f, np.broadcast_to(np.arange(5), (300, 5)))
    v = ((b.ids - 1) % 1000).astype(np.int64)
    u = np.random.default_rng([SMALL.seed, 1, 0]).random((300, 5))
    np.testing.assert_array_equal(v, np.searchsorted(m.cdf, u, side="right"))
    logits = SMALL.bias + m.weights[np.arange(5), v].sum(1)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-logits)))
    assert set(np.unique(b.labels)) <= {0.0, 1.0}
    assert m.weights.std() == pytest.approx(SMALL.weight_scale, rel=0.1)


def test_zipf_skew_visible():
    m = PlantedModel(SMALL)
    b, _ = m.sample(20_000, seed=1)
    v = ((b.ids - 1) % 1000).ravel().astype(np.int64)
    counts = np.bincount(v, minlength=1000) / v.size
    assert counts[0] == pytest.approx(m.popularity[0], rel=0.05)
    assert counts[0] > 5 * counts[9] > 0
    assert np.sort(counts)[::-1][:10].sum() > 0.4  # top 1% of values carry > 40% of the mass
    flat = PlantedModel(SyntheticConfig(num_fields=5, vocab_size=1000, zipf_exponent=0.0))
    assert flat.popularity.max() == pytest.approx(1e-3)


@pytest.mark.parametrize("exponent,vocab", [(0.0, 7), (3.0, 50), (1.1, 3000)])
def test_sampled_values_equal_searchsorted(exponent, vocab):
    cfg = SyntheticConfig(num_fields=3, vocab_size=vocab, zipf_exponent=exponent, seed=9)
    m = PlantedModel(cfg)
    b, _ = m.sample(4000, seed=11)
    u = np.random.default_rng([cfg.seed, 1, 11]).random((4000, 3))
    np.testing.assert_array_equal((b.ids - 1) % vocab, np.searchsorted(m.cdf, u, side="right"))


def test_labels_follow_probabilities():
    m = PlantedModel(SMALL)
    b, p = m.sample(50_000, seed=2)
    assert b.labels.mean() == pytest.approx(p.mean(), abs=0.01)


def test_bayes_logloss_matches_numpy():
    m = PlantedModel(SMALL)
    b, p = m.sample(2000, seed=0)
    y = b.labels.astype(np.float64)
    direct = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert PlantedModel.bayes_logloss(p, b.labels) == pytest.approx(direct, rel=1e-12)
    entropy = -np.mean(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert PlantedModel.bayes_logloss(p) == pytest.approx(entropy, rel=1e-12)
    assert PlantedModel.bayes_logloss(np.array([0.0, 1.0]), np.array([0.0, 1.0])) < 1e-12


def _read(path: str, max_nnz: int) -> Batch:
    return concat(list(read_examples(path, ReaderConfig(max_nnz=max_nnz, chunk_bytes=4096))))


def test_write_libsvm_round_trip(tmp_path):
    m = PlantedModel(SMALL)
    b, _ = m.sample(1000, seed=5)
    path = str(tmp_path / "a.svm")
    write_libsvm(path, b)
    r = _read(path, 5)
    for name in ("labels", "ids", "vals", "mask", "weights"):
        np.testing.assert_array_equal(getattr(r, name), getattr(b, name))
    write_libsvm(path, b.slice(0, 10), append=True)
    assert _read(path, 5).size == 1010


def test_format_float_values_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    vals = (rng.normal(size=(n, 3)) * 10.0 ** rng.integers(-40, 39, (n, 3))).astype(np.float32)
    vals[:5, 0] = [0.0, -0.0, 1e-45, 3.4028235e38, -16777217.0]
    vals[5:10, 1] = [7.0, -3.0, 0.1, 16777216.0, 123456789.0]
    ids = rng.integers(0, 2**64 - 1, (n, 3), dtype=np.uint64, endpoint=True)
    mask = np.arange(3) < rng.integers(0, 4, (n, 1))  # libsvm packs features to the front
    ids[~mask] = 0
    vals[~mask] = 0
    weights = np.ones(n, np.float32)
    weights[::7] = 0  # padding rows are not written
    b = Batch((rng.random(n) < 0.5).astype(np.float32), ids, vals, mask, weights)
    path = str(tmp_path / "v.svm")
    write_libsvm(path, b)
    r = _read(path, 3)
    real = weights > 0
    np.testing.assert_array_equal(r.ids, ids[real])
    np.testing.assert_array_equal(r.vals, vals[real])
    np.testing.assert_array_equal(r.mask, mask[real])
    np.testing.assert_array_equal(r.labels, b.labels[real])
    bad = Batch(b.labels[:1], ids[:1], np.full((1, 3), np.nan, np.float32), np.ones((1, 3), bool),
                weights[:1])
    with pytest.raises(ValueError, match="non-finite"):
        format_libsvm(bad)


def test_generate_dataset_and_cache(tmp_path, monkeypatch):
    import jaxps.data.synthetic as S
    monkeypatch.setattr(S, "_CHUNK_ROWS", 700)  # several chunks
    cfg = SyntheticConfig(num_fields=4, vocab_size=50, seed=1)
    info = generate_dataset(tmp_path, 2000, 900, cfg)
    train, test = str(tmp_path / "train.svm"), str(tmp_path / "test.svm")
    assert _read(train, 4).size == 2000 and _read(test, 4).size == 900
    assert info["n_train"] == 2000 and info["config"] == json.loads(json.dumps(cfg.__dict__))
    assert 0 < info["bayes_expected_logloss_test"] < 0.7 and 0 < info["bayes_logloss_test"] < 0.7
    assert info["test_positives"] == int(_read(test, 4).labels.sum())
    with open(tmp_path / "info.json") as f:
        assert json.load(f) == info
    # the test loss recorded equals the planted model's loss on the test file's labels
    m = PlantedModel(cfg)
    p = np.concatenate([m.sample(700, (1 << 30) + k)[1] for k in range(2)])[:900]
    assert PlantedModel.bayes_logloss(p, _read(test, 4).labels) == pytest.approx(
        info["bayes_logloss_test"], rel=1e-9)
    mtime = os.path.getmtime(train)
    assert generate_dataset(tmp_path, 2000, 900, cfg) == info  # cached
    assert os.path.getmtime(train) == mtime
    info2 = generate_dataset(tmp_path, 1000, 900, cfg)  # different request: regenerated
    assert info2["n_train"] == 1000 and _read(train, 4).size == 1000
    again = generate_dataset(tmp_path / "other", 1000, 900, cfg)
    assert again == info2  # deterministic
    assert (tmp_path / "other" / "train.svm").read_bytes() == (tmp_path / "train.svm").read_bytes()


def test_generate_dataset_crash_leaves_no_stale_info(tmp_path, monkeypatch):
    import jaxps.data.synthetic as S
    cfg = SyntheticConfig(num_fields=3, vocab_size=20, seed=2)
    generate_dataset(tmp_path, 300, 100, cfg)
    assert (tmp_path / "info.json").exists()
    real = S.format_libsvm
    calls = []

    def crash_on_test_split(batch):
        calls.append(batch.size)
        if len(calls) > 1:  # train.svm rewritten, then a crash while writing test.svm
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(S, "format_libsvm", crash_on_test_split)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, 200, 100, cfg)
    assert not (tmp_path / "info.json").exists()  # new train.svm must not look valid
    assert _read(str(tmp_path / "train.svm"), 3).size == 200
    monkeypatch.undo()
    info = generate_dataset(tmp_path, 300, 100, cfg)  # the old request is regenerated
    assert info["n_train"] == 300 and _read(str(tmp_path / "train.svm"), 3).size == 300
