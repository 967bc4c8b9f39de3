"""Criteo-like synthetic data with a planted logistic model, for tests and benchmarks.

Why: a known generating model gives the Bayes-optimal logloss, so a trainer's test loss
can be judged against the best achievable value, not just against another run. Values
per field follow a finite Zipf law, so the id skew (hot rows, long tail) resembles CTR data.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit

from jaxps.data.batch import Batch

_FORMAT_VERSION = 1
_CHUNK_ROWS = 100_000


@dataclass
class SyntheticConfig:
    """Shape and strength of the planted model (all draws derive from `seed`)."""

    num_fields: int = 39
    vocab_size: int = 10_000
    zipf_exponent: float = 1.1
    weight_scale: float = 0.5
    bias: float = -1.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_fields < 1 or self.vocab_size < 1:
            raise ValueError("SyntheticConfig.num_fields and vocab_size must be >= 1")
        if self.zipf_exponent < 0:
            raise ValueError("SyntheticConfig.zipf_exponent must be >= 0")


class PlantedModel:
    """Per-field Zipf vocabularies, N(0, weight_scale^2) weights, logit = bias + sum w."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        ranks = np.arange(1, cfg.vocab_size + 1, dtype=np.float64)
        pop = ranks ** -cfg.zipf_exponent
        self.popularity = pop / pop.sum()
        self.cdf = np.cumsum(self.popularity)
        self.cdf[-1] = 1.0
        self.weights = rng.normal(0.0, cfg.weight_scale, (cfg.num_fields, cfg.vocab_size))
        # guide table: a start point for the CDF search of u in [j/G, (j+1)/G)
        self._guide = np.searchsorted(self.cdf, np.arange(cfg.vocab_size + 1) / cfg.vocab_size,
                                      side="right").astype(np.int64)

    def feature_ids(self, values: np.ndarray) -> np.ndarray:
        """Raw id of (field, value): field * vocab_size + value + 1 (0 stays 'no feature')."""
        f = np.arange(self.cfg.num_fields, dtype=np.uint64)
        return f * np.uint64(self.cfg.vocab_size) + values.astype(np.uint64) + np.uint64(1)

    def sample(self, n: int, seed: int) -> tuple[Batch, np.ndarray]:
        """n examples (one feature per field, value 1.0) and their true click probabilities."""
        c = self.cfg
        rng = np.random.default_rng([c.seed, 1, seed])
        u = rng.random((n, c.num_fields))
        ids = np.empty((n, c.num_fields), np.uint64)
        logits = _sample_values(u, self.cdf, self._guide, self.weights, c.bias, ids)
        p = 1.0 / (1.0 + np.exp(-logits))
        labels = (rng.random(n) < p).astype(np.float32)
        batch = Batch(labels, ids, np.ones((n, c.num_fields), np.float32),
                      np.ones((n, c.num_fields), np.bool_), np.ones(n, np.float32))
        return batch, p

    @staticmethod
    def bayes_logloss(p_true: np.ndarray, labels: np.ndarray | None = None) -> float:
        """Logloss of the true model on `labels`, or its expectation (mean entropy)."""
        p = np.clip(np.asarray(p_true, np.float64), 1e-15, 1 - 1e-15)
        q = p if labels is None else np.asarray(labels, np.float64)
        return float(-np.mean(q * np.log(p) + (1 - q) * np.log1p(-p)))


@njit(cache=True, nogil=True)
def _sample_values(u, cdf, guide, weights, bias, ids):
    """values = searchsorted(cdf, u, 'right') (a guide table makes it O(1)); writes the
    raw ids field * V + value + 1 and returns the logits bias + sum_f w[f, value]."""
    n, nf = u.shape
    vocab = cdf.size
    logits = np.empty(n)
    for r in range(n):
        acc = bias
        for f in range(nf):
            x = u[r, f]
            k = guide[min(int(x * vocab), vocab)]
            while k > 0 and cdf[k - 1] > x:
                k -= 1
            while k < vocab - 1 and cdf[k] <= x:
                k += 1
            acc += weights[f, k]
            ids[r, f] = np.uint64(f * vocab + k + 1)
        logits[r] = acc
    return logits


@njit(cache=True, nogil=True)
def _write_uint(out, o, x):
    if x == 0:
        out[o] = 48
        return o + 1
    tmp = np.empty(20, np.uint8)
    k = 0
    while x > 0:
        tmp[k] = 48 + np.uint8(x % np.uint64(10))
        x = x // np.uint64(10)
        k += 1
    for j in range(k):
        out[o + j] = tmp[k - 1 - j]
    return o + k


@njit(cache=True, nogil=True)
def _write_float(out, o, v):
    """Integers as integers, else 9 significant digits (float32 round-trips exactly)."""
    if v < 0:
        out[o] = 45
        o += 1
        v = -v
    if v == np.floor(v) and v < 16777216.0:
        return _write_uint(out, o, np.uint64(v))
    e = int(np.floor(np.log10(v)))
    d = int(np.round(v / 10.0 ** e * 1e8))
    if d >= 1000000000:
        d = d // 10
        e += 1
    elif d < 100000000:
        d = d * 10
        e -= 1
    digits = np.empty(9, np.uint8)
    for j in range(8, -1, -1):
        digits[j] = 48 + d % 10
        d //= 10
    last = 8
    while last > 0 and digits[last] == 48:
        last -= 1
    out[o] = digits[0]
    o += 1
    if last > 0:
        out[o] = 46
        o += 1
        for j in range(1, last + 1):
            out[o] = digits[j]
            o += 1
    if e != 0:
        out[o] = 101
        o += 1
        if e < 0:
            out[o] = 45
            o += 1
        o = _write_uint(out, o, np.uint64(abs(e)))
    return o


@njit(cache=True, nogil=True)
def _format_libsvm(labels, ids, vals, mask, weights, out):
    o = 0
    for r in range(labels.size):
        if weights[r] <= 0:
            continue
        out[o] = 49 if labels[r] > 0.5 else 48
        o += 1
        for k in range(ids.shape[1]):
            if mask[r, k]:
                out[o] = 32
                o = _write_uint(out, o + 1, ids[r, k])
                out[o] = 58
                o = _write_float(out, o + 1, np.float64(vals[r, k]))
        out[o] = 10
        o += 1
    return o


def format_libsvm(batch: Batch) -> bytes:
    """libsvm text of the batch's real rows (weight > 0), labels 0/1."""
    if not np.all(np.isfinite(batch.vals[batch.mask])):
        raise ValueError("format_libsvm: non-finite feature value")
    width = 2 + batch.ids.shape[1] * 40  # "1" + per feature " id:value" <= 40 bytes
    out = np.empty(batch.size * width, np.uint8)
    n = _format_libsvm(batch.labels, np.ascontiguousarray(batch.ids, np.uint64),
                       batch.vals, batch.mask, batch.weights, out)
    return out[:n].tobytes()


def write_libsvm(path: str | os.PathLike, batch: Batch, append: bool = False) -> None:
    """Write (or append) the batch as libsvm lines."""
    with open(path, "ab" if append else "wb") as f:
        f.write(format_libsvm(batch))


def generate_dataset(out_dir: str | os.PathLike, n_train: int, n_test: int,
                     cfg: SyntheticConfig) -> dict:
    """Write train.svm, test.svm and info.json; reuse them if info.json matches the request.

    info.json holds the config, counts and the test set's Bayes logloss (with labels:
    the true model's loss on this draw; expected: its mean entropy).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    request = {"version": _FORMAT_VERSION, "config": asdict(cfg), "n_train": n_train,
               "n_test": n_test}
    info_path = os.path.join(out_dir, "info.json")
    files = {"train": os.path.join(out_dir, "train.svm"), "test": os.path.join(out_dir, "test.svm")}
    if os.path.exists(info_path) and all(os.path.exists(p) for p in files.values()):
        with open(info_path) as f:
            info = json.load(f)
        if {k: info.get(k) for k in request} == request:
            return info
    # no info.json until every file is new: a crash below must not leave an old one that a
    # later identical request would take as describing half-written files
    try:
        os.unlink(info_path)
    except FileNotFoundError:
        pass
    model = PlantedModel(cfg)
    info = dict(request)
    for split, n, seed0 in (("train", n_train, 0), ("test", n_test, 1 << 30)):
        tmp = f"{files[split]}.tmp.{os.getpid()}"  # concurrent generators (worker groups) do not collide
        loss_sum = ent_sum = 0.0
        pos = 0
        with open(tmp, "wb") as f:
            for k, start in enumerate(range(0, n, _CHUNK_ROWS)):
                m = min(_CHUNK_ROWS, n - start)
                batch, p = model.sample(m, seed0 + k)
                f.write(format_libsvm(batch))
                loss_sum += PlantedModel.bayes_logloss(p, batch.labels) * m
                ent_sum += PlantedModel.bayes_logloss(p) * m
                pos += int(batch.labels.sum())
        os.replace(tmp, files[split])
        info[f"{split}_positives"] = pos
        if split == "test":
            info["bayes_logloss_test"] = loss_sum / max(n, 1)
            info["bayes_expected_logloss_test"] = ent_sum / max(n, 1)
    info["files"] = {k: os.path.basename(v) for k, v in files.items()}
    tmp = f"{info_path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, info_path)
    return info
