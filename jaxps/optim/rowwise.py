"""Row-wise optimizers: update only the rows a batch touched, plus their optimizer slots.

Each update is written once against an array namespace `xp` (`numpy` on a host parameter
server, `jax.numpy` inside a jitted device step), so both places run the same algorithm
and a PS process never imports JAX. Arguments are the gathered row slices `[U, dim]` of
the parameters, of every slot and of the summed gradient of each unique row.

Hyper-parameter names and formulas follow Keras/TensorFlow (`tf.keras.optimizers.Ftrl`,
`Adagrad`, `Adam`), since that is what users of sparse LR tune by.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

Array = Any  # numpy.ndarray or jax.Array


@dataclass(frozen=True)
class RowOptimizer:
    """Base: subclasses name their slots, their initial values and the update."""

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()

    def slot_init(self, slot: str) -> float:
        """Initial value of every element of `slot` (a fresh row starts here too)."""
        return 0.0

    def update(self, xp, param: Array, slots: dict[str, Array], grad: Array,
               step: Array) -> tuple[Array, dict[str, Array]]:
        """Return the new (param, slots) rows. `step` is the 1-based global step."""
        raise NotImplementedError


@dataclass(frozen=True)
class SGD(RowOptimizer):
    learning_rate: float = 0.01
    name: ClassVar[str] = "sgd"

    def update(self, xp, param, slots, grad, step):
        return param - self.learning_rate * grad, {}


@dataclass(frozen=True)
class Adagrad(RowOptimizer):
    learning_rate: float = 0.05
    initial_accumulator_value: float = 0.1
    epsilon: float = 1e-7
    name: ClassVar[str] = "adagrad"
    slots: ClassVar[tuple[str, ...]] = ("accumulator",)

    def slot_init(self, slot):
        return self.initial_accumulator_value

    def update(self, xp, param, slots, grad, step):
        acc = slots["accumulator"] + grad * grad
        param = param - self.learning_rate * grad / (xp.sqrt(acc) + self.epsilon)
        return param, {"accumulator": acc}


@dataclass(frozen=True)
class Adam(RowOptimizer):
    """Lazy Adam: moments of untouched rows are not decayed (TF's LazyAdam); bias
    correction uses the global step, as in TF."""

    learning_rate: float = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    name: ClassVar[str] = "adam"
    slots: ClassVar[tuple[str, ...]] = ("m", "v")

    def update(self, xp, param, slots, grad, step):
        t = xp.asarray(step, dtype=param.dtype)
        m = self.beta_1 * slots["m"] + (1.0 - self.beta_1) * grad
        v = self.beta_2 * slots["v"] + (1.0 - self.beta_2) * grad * grad
        lr_t = self.learning_rate * xp.sqrt(1.0 - self.beta_2 ** t) / (1.0 - self.beta_1 ** t)
        param = param - lr_t * m / (xp.sqrt(v) + self.epsilon)
        return param, {"m": m, "v": v}


@dataclass(frozen=True)
class FTRL(RowOptimizer):
    """FTRL-proximal (McMahan et al. 2013), the standard optimizer for sparse LR.

    Keras semantics: `beta` enters as extra L2 of beta / (2 lr); `l2_shrinkage` is an L2
    penalty on the weights applied through the gradient of the linear term only.
    Defaults: learning_rate 0.2 and beta 1 (the paper's beta) gave the best one-pass
    logloss on generated Criteo-like data with summed batch gradients (benchmarks/sparse_lr.py);
    Keras's own defaults (0.001, beta 0) are tuned for mean-reduced dense losses.
    """

    learning_rate: float = 0.2
    learning_rate_power: float = -0.5
    initial_accumulator_value: float = 0.1
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    l2_shrinkage: float = 0.0
    name: ClassVar[str] = "ftrl"
    slots: ClassVar[tuple[str, ...]] = ("accumulator", "linear")

    def slot_init(self, slot):
        return self.initial_accumulator_value if slot == "accumulator" else 0.0

    def _pow(self, xp, x):
        # -lr_power == 0.5 is the common case; sqrt is exact and much cheaper than pow.
        p = -self.learning_rate_power
        return xp.sqrt(x) if p == 0.5 else xp.power(x, p)

    def update(self, xp, param, slots, grad, step):
        lr = self.learning_rate
        acc = slots["accumulator"]
        shrunk_grad = grad + 2.0 * self.l2_shrinkage * param
        new_acc = acc + grad * grad
        new_acc_pow = self._pow(xp, new_acc)
        sigma = (new_acc_pow - self._pow(xp, acc)) / lr
        linear = slots["linear"] + shrunk_grad - sigma * param
        quadratic = new_acc_pow / lr + 2.0 * (self.l2 + self.beta / (2.0 * lr))
        param = xp.where(xp.abs(linear) > self.l1,
                         (xp.clip(linear, -self.l1, self.l1) - linear) / quadratic,
                         xp.zeros_like(linear))
        return param, {"accumulator": new_acc, "linear": linear}


OPTIMIZERS: dict[str, type[RowOptimizer]] = {c.name: c for c in (SGD, Adagrad, Adam, FTRL)}


def make(name: str, **hparams: float) -> RowOptimizer:
    """Build a row-wise optimizer by name ('sgd', 'adagrad', 'adam', 'ftrl')."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown row optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}") from None
    known = {f.name for f in dataclasses.fields(cls)}
    bad = set(hparams) - known
    if bad:
        raise ValueError(f"optimizer {name!r} has no hyper-parameter(s) {sorted(bad)}; "
                         f"it takes {sorted(known)}")
    return cls(**hparams)
