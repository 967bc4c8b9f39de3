"""StreamingBinaryMetrics against exact numpy references."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxps.metrics import StreamingBinaryMetrics, binary_metrics  # noqa: E402


def exact_auc(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted Mann-Whitney AUC with ties counted 1/2 (O(n log n), exact)."""
    w = np.ones_like(probs) if weights is None else weights
    pos = labels > 0.5
    uniq, inv = np.unique(probs, return_inverse=True)
    pos_w = np.bincount(inv, weights=w * pos, minlength=uniq.size)
    neg_w = np.bincount(inv, weights=w * ~pos, minlength=uniq.size)
    neg_below = np.cumsum(neg_w) - neg_w
    return float((pos_w @ neg_below + 0.5 * pos_w @ neg_w) / (pos_w.sum() * neg_w.sum()))


def rank_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Classic rank-sum form with average ranks for ties (unweighted)."""
    order = np.argsort(probs, kind="stable")
    ranks = np.empty(probs.size)
    sorted_p = probs[order]
    uniq, start, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-1.5 * logits))).astype(np.float32)
    return 1 / (1 + np.exp(-logits)), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_rank_auc(seed: int) -> None:
    p, y = _data(200_000, seed)
    m = StreamingBinaryMetrics()
    m.update(p, y)
    ref = rank_auc(p, y)
    assert abs(ref - exact_auc(p, y)) < 1e-12
    assert abs(m.result()["auc"] - ref) < 1e-4


def test_auc_with_ties_is_exact() -> None:
    rng = np.random.default_rng(3)
    p = rng.integers(0, 10, 50_000) / 10.0  # heavy ties, each value in its own bin
    y = (rng.random(p.size) < p).astype(np.int64)
    assert abs(binary_metrics(p, y)["auc"] - rank_auc(p, y)) < 1e-12


def test_weighted_auc_and_logloss() -> None:
    p, y = _data(100_000, 4)
    w = np.random.default_rng(5).uniform(0.1, 3.0, p.size)
    r = binary_metrics(p, y, w)
    assert abs(r["auc"] - exact_auc(p, y, w)) < 1e-4
    ll = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum()
    assert r["logloss"] == pytest.approx(ll, rel=1e-10)
    assert r["positive_rate"] == pytest.approx((w * y).sum() / w.sum())
    assert r["mean_prediction"] == pytest.approx((w * p).sum() / w.sum())


def test_logloss_closed_form_and_clipping() -> None:
    p = np.array([0.9, 0.2, 0.0, 1.0])
    y = np.array([1, 0, 1, 0])
    r = binary_metrics(p, y)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    expected = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    assert r["logloss"] == pytest.approx(expected, rel=1e-12)
    assert r["examples"] == 4
    assert r["positive_rate"] == 0.5
    assert r["mean_prediction"] == pytest.approx(p.mean())


def test_merge_of_halves_equals_one_pass() -> None:
    p, y = _data(100_001, 6)
    whole = StreamingBinaryMetrics()
    whole.update(p, y)
    a, b = StreamingBinaryMetrics(), StreamingBinaryMetrics()
    a.update(p[:40_000], y[:40_000])
    b.update(p[40_000:], y[40_000:])
    merged = a.merge(b).result()
    for k, v in whole.result().items():
        assert merged[k] == pytest.approx(v, rel=1e-12), k


def test_state_roundtrip_and_summed_states() -> None:
    p, y = _data(10_000, 7)
    parts = []
    for i in range(4):
        m = StreamingBinaryMetrics(1024)
        m.update(p[i::4], y[i::4])
        parts.append(m.state())
    assert all(isinstance(v, np.ndarray) for v in parts[0].values())
    summed = {k: np.sum([s[k] for s in parts], axis=0) for k in parts[0]}  # an all-gather + sum
    whole = StreamingBinaryMetrics(1024)
    whole.update(p, y)
    got = StreamingBinaryMetrics.from_state(summed).result()
    for k, v in whole.result().items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


def test_zero_weight_rows_ignored() -> None:
    p, y = _data(20_000, 8)
    w = np.ones(p.size)
    w[::3] = 0.0
    p_junk, y_junk = p.copy(), y.copy()
    p_junk[::3], y_junk[::3] = 0.999, 0.0  # would change every metric if counted
    a = binary_metrics(p_junk, y_junk, w)
    keep = w != 0
    b = binary_metrics(p[keep], y[keep])
    for k, v in b.items():
        assert a[k] == pytest.approx(v, rel=1e-12), k
    assert a["examples"] == keep.sum()


def test_single_class_auc_is_nan_and_empty_is_nan() -> None:
    r = binary_metrics(np.array([0.2, 0.7]), np.array([1, 1]))
    assert np.isnan(r["auc"]) and np.isfinite(r["logloss"])
    e = StreamingBinaryMetrics().result()
    assert e["examples"] == 0 and np.isnan(e["logloss"]) and np.isnan(e["auc"])


def test_repeated_updates_accumulate() -> None:
    p, y = _data(1_000_000, 9)
    m = StreamingBinaryMetrics()
    m.update(p, y)
    m.update(p, y)  # the same data twice: same rates, twice the examples
    once = binary_metrics(p, y)
    r = m.result()
    assert r["examples"] == 2 * once["examples"]
    for k in ("auc", "logloss", "positive_rate", "mean_prediction"):
        assert r[k] == pytest.approx(once[k], rel=1e-9), k
