"""Streaming, mergeable binary-classification metrics (log loss, AUC) in plain numpy.

Why histograms: an exact AUC needs every prediction sorted, which does not stream and does not
merge across processes. Quantizing probabilities into ``num_bins`` bins and keeping one weighted
histogram per class gives an AUC within ~1/num_bins of the exact value, constant memory, an
``update`` that is one ``np.bincount`` per class, and a state that is a few fixed-shape arrays a
distributed job can all-gather and sum. No JAX import: evaluation runs on host arrays and must
not touch (or initialize) an accelerator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_EPS = 1e-7
# Order of the scalar accumulators in the ``sums`` state array.
_SUM_KEYS = ("examples", "weight", "weighted_logloss", "weighted_prediction", "weighted_label")


class StreamingBinaryMetrics:
    """Accumulates weighted log loss and a histogram AUC over many ``update`` calls."""

    def __init__(self, num_bins: int = 1 << 16) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.pos_hist = np.zeros(self.num_bins, np.float64)
        self.neg_hist = np.zeros(self.num_bins, np.float64)
        self.sums = np.zeros(len(_SUM_KEYS), np.float64)

    def update(self, probs: Any, labels: Any, weights: Any = None) -> None:
        """Add a batch; ``labels`` > 0.5 count as positive, rows with weight 0 are ignored."""
        p = np.asarray(probs, np.float64).ravel()
        y = np.asarray(labels).ravel().astype(np.float64, copy=False)
        if p.shape != y.shape:
            raise ValueError(f"probs {p.shape} and labels {y.shape} differ in size")
        if weights is None:
            w = None
        else:
            w = np.broadcast_to(np.asarray(weights, np.float64).ravel(), p.shape)
            keep = w != 0
            if not keep.all():
                p, y, w = p[keep], y[keep], w[keep]
        if p.size == 0:
            return
        pos = y > 0.5
        # One bincount over [neg bins | pos bins] instead of two masked ones.
        bins = np.clip((p * self.num_bins).astype(np.int64), 0, self.num_bins - 1)
        bins += pos * self.num_bins
        raw, p = p, np.clip(p, _EPS, 1.0 - _EPS)
        # log(p) for positives, log(1 - p) for negatives, one transcendental per row.
        row_loss = -np.log(np.where(pos, p, 1.0 - p))
        hist = np.bincount(bins, w, minlength=2 * self.num_bins)
        self.neg_hist += hist[: self.num_bins]
        self.pos_hist += hist[self.num_bins:]
        if w is None:
            wsum, loss = float(p.size), row_loss.sum()
            wp, wy = raw.sum(), float(np.count_nonzero(pos))
        else:
            wsum, loss = float(w.sum()), float(w @ row_loss)
            wp, wy = float(w @ raw), float(w @ pos)
        self.sums += np.array([p.size, wsum, loss, wp, wy], np.float64)

    def merge(self, other: StreamingBinaryMetrics) -> StreamingBinaryMetrics:
        """Add another accumulator's counts into this one (in place); returns self."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"num_bins differ: {self.num_bins} vs {other.num_bins}")
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        self.sums += other.sums
        return self

    def state(self) -> dict[str, np.ndarray]:
        """Fixed-shape float64 arrays; element-wise sums of states are valid merged states."""
        return {"pos_hist": self.pos_hist.copy(), "neg_hist": self.neg_hist.copy(),
                "sums": self.sums.copy()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamingBinaryMetrics:
        """Rebuild from ``state()`` output (or the element-wise sum of several)."""
        pos = np.asarray(state["pos_hist"], np.float64).ravel()
        out = cls(num_bins=pos.size)
        out.pos_hist[:] = pos
        out.neg_hist[:] = np.asarray(state["neg_hist"], np.float64).ravel()
        out.sums[:] = np.asarray(state["sums"], np.float64).ravel()
        return out

    def auc(self) -> float:
        """Weighted ROC AUC; a positive and a negative in the same bin count 1/2."""
        pos_total, neg_total = self.pos_hist.sum(), self.neg_hist.sum()
        if pos_total <= 0 or neg_total <= 0:
            return float("nan")
        neg_below = np.cumsum(self.neg_hist) - self.neg_hist
        wins = self.pos_hist @ neg_below + 0.5 * (self.pos_hist @ self.neg_hist)
        return float(wins / (pos_total * neg_total))

    def result(self) -> dict[str, float]:
        """Current metrics; NaN where undefined (no data, or AUC with one class only)."""
        n, w, loss, wp, wy = (float(v) for v in self.sums)
        nan = float("nan")
        return {
            "logloss": loss / w if w > 0 else nan,
            "auc": self.auc(),
            "examples": int(n),
            "weight": w,
            "positive_rate": wy / w if w > 0 else nan,
            "mean_prediction": wp / w if w > 0 else nan,
        }


def binary_metrics(probs: Any, labels: Any, weights: Any = None,
                   num_bins: int = 1 << 16) -> dict[str, float]:
    """One-shot convenience: metrics of a single set of predictions."""
    m = StreamingBinaryMetrics(num_bins)
    m.update(probs, labels, weights)
    return m.result()
