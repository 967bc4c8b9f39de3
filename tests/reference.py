"""Plain numpy implementations used as independent references in tests (float64)."""
from __future__ import annotations

import threading

import numpy as np


def run_concurrently(fns, timeout: float = 120.0) -> tuple[list, list]:
    """Run each callable on its own thread (worker groups, in one process); returns
    (results, errors), after checking every thread ended within `timeout` seconds."""
    results, errors = [None] * len(fns), []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - the caller asserts on them
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"
    return results, errors


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class NumpyRowOptimizer:
    """Row-wise optimizers written from the Keras/TensorFlow documentation formulas."""

    def __init__(self, name: str, rows: int, dim: int, **hp):
        self.name, self.hp = name, hp
        self.w = np.zeros((rows, dim))
        acc0 = hp.get("initial_accumulator_value", 0.1)
        self.acc = np.full((rows, dim), acc0)
        self.lin = np.zeros((rows, dim))
        self.m = np.zeros((rows, dim))
        self.v = np.zeros((rows, dim))

    def apply(self, rows: np.ndarray, g: np.ndarray, t: int) -> None:
        hp, w = self.hp, self.w
        lr = hp["learning_rate"]
        if self.name == "sgd":
            w[rows] -= lr * g
        elif self.name == "adagrad":
            self.acc[rows] += g * g
            w[rows] -= lr * g / (np.sqrt(self.acc[rows]) + hp.get("epsilon", 1e-7))
        elif self.name == "adam":
            b1, b2, eps = hp.get("beta_1", 0.9), hp.get("beta_2", 0.999), hp.get("epsilon", 1e-7)
            self.m[rows] = b1 * self.m[rows] + (1 - b1) * g
            self.v[rows] = b2 * self.v[rows] + (1 - b2) * g * g
            lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            w[rows] -= lr_t * self.m[rows] / (np.sqrt(self.v[rows]) + eps)
        elif self.name == "ftrl":
            p = -hp.get("learning_rate_power", -0.5)
            l1, l2 = hp.get("l1", 0.0), hp.get("l2", 0.0)
            beta, shrink = hp.get("beta", 0.0), hp.get("l2_shrinkage", 0.0)
            acc = self.acc[rows]
            new_acc = acc + g * g
            g_shrunk = g + 2 * shrink * w[rows]
            self.lin[rows] += g_shrunk - (new_acc ** p - acc ** p) / lr * w[rows]
            quad = new_acc ** p / lr + 2 * (l2 + beta / (2 * lr))
            lin = self.lin[rows]
            w[rows] = np.where(np.abs(lin) > l1, (np.sign(lin) * l1 - lin) / quad, 0.0)
            self.acc[rows] = new_acc
        else:
            raise ValueError(self.name)


def sparse_lr_reference(batches, rows_of, rows: int, opt: str, hp: dict, bias_lr: float,
                        reduction: str = "mean"):
    """Train sparse LR (gradients of the mean or summed logloss over real examples, SGD on
    the bias) in numpy. The reported loss is the mean."""
    o = NumpyRowOptimizer(opt, rows, 1, **hp)
    bias = 0.0
    losses = []
    for t, b in enumerate(batches, start=1):
        r = rows_of(b.ids)
        vals = b.vals.astype(np.float64) * b.mask
        logit = (o.w[r, 0] * vals).sum(1) + bias
        p = sigmoid(logit)
        wts = b.weights.astype(np.float64)
        denom = max(wts.sum(), 1.0)
        y = b.labels.astype(np.float64)
        losses.append(float(np.sum(wts * -(y * np.log(p) + (1 - y) * np.log(1 - p))) / denom))
        dlogit = wts * (p - y) / (denom if reduction == "mean" else 1.0)
        g_occ = dlogit[:, None] * vals
        touched = np.unique(r[b.mask])
        g = np.zeros(rows)
        np.add.at(g, r[b.mask], g_occ[b.mask])
        o.apply(touched, g[touched][:, None], t)
        bias -= bias_lr * dlogit.sum()
    return o, bias, losses


def planted_parts(folder, lines: int, model_seed: int, sample_seed: int, parts: int = 2) -> list[str]:
    """`parts` libsvm files of `lines` examples each from one planted model (6 fields, 40
    ids per field), for the multi-process tests that split them over processes."""
    import os

    from jaxps.data import PlantedModel, SyntheticConfig, write_libsvm

    planted = PlantedModel(SyntheticConfig(num_fields=6, vocab_size=40, seed=model_seed))
    files = []
    for i in range(parts):
        b, _ = planted.sample(lines, seed=sample_seed + i)
        files.append(os.path.join(str(folder), f"part{i}.svm"))
        write_libsvm(files[-1], b)
    return files


def ring_move_spread(servers: int, copies: int, vnodes: int, partitions: int) -> float:
    """Relative standard deviation of the (partition, replica) pairs one server holds on a
    consistent-hash ring -- what a join or leave of that server copies -- around its mean
    share copies/servers of all partitions * copies pairs. Two independent sources:

    * geometry: the server's share of the ring is a sum of `vnodes` arcs out of
      servers * vnodes, Beta-distributed with relative variance ~(1 - f) / vnodes
      (f = 1/servers); being in a replica set of `copies` averages `copies` such regions,
      dividing it by ~copies;
    * sampling: each partition's point falls in that region independently, so the count
      is Binomial(partitions, copies * f), relative variance (1 - copies f) / (partitions copies f).
    """
    f = 1.0 / servers
    return ((1 - f) / (copies * vnodes) + (1 - copies * f) / (partitions * copies * f)) ** 0.5


def sorted_rows(rows: dict) -> dict:
    """Exported PS rows ({"keys", "values", "slot_<name>", ...}) ordered by key: servers and
    snapshots hold them in partition order, which depends on the ring."""
    order = np.argsort(rows["keys"])
    return {k: v[order] for k, v in rows.items()}


def assert_same_rows(got: dict, want: dict, what: str) -> None:
    """The same non-empty rows, field for field, bit for bit, whatever their order."""
    got, want = sorted_rows(got), sorted_rows(want)
    assert sorted(got) == sorted(want) and want["keys"].size > 0, (what, sorted(got), sorted(want))
    for field in want:
        np.testing.assert_array_equal(got[field], want[field], err_msg=f"{what}/{field}")
