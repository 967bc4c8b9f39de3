"""Initial rows of never-pushed keys: N(0, scale^2) from a counter-based hash of
(table seed, key, column), so every server, replica, restore and device table of the same
seed computes the same row without storing it.

One numba pass per request: each row costs 2*dim splitmix64 mixes and dim Box-Muller
transforms computed in registers. The numpy form it replaced made five passes over
[n, 2*dim] uint64/float64 temporaries and was ~12% of a HostTable training step (the
push thread's largest item after the optimizer) while a table is warming up.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from jaxps.hashing import GOLDEN, mix64, mix64_scalar

_S11 = np.uint64(11)
_INV53 = 1.0 / float(1 << 53)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def fill_row(key, base_salt, scale, out, row):
    """out[row] = the initial row of `key` (the batched PS kernels call it too)."""
    dim = out.shape[1]
    base = mix64_scalar(key ^ base_salt)
    for j in range(dim):
        b1 = mix64_scalar(base + np.uint64(j) * GOLDEN)
        b2 = mix64_scalar(base + np.uint64(j + dim) * GOLDEN)
        u1 = (float(b1 >> _S11) + 0.5) * _INV53   # (0, 1)
        u2 = (float(b2 >> _S11) + 0.5) * _INV53
        out[row, j] = np.float32(scale * (math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fill(keys: np.ndarray, base_salt: np.uint64, scale: float, out: np.ndarray) -> None:
    for i in range(keys.shape[0]):
        fill_row(keys[i], base_salt, scale, out, i)


def init_salt(seed: int) -> np.uint64:
    """The per-table salt of `fill_row` (from the table seed)."""
    return mix64(np.array([seed], np.uint64) * GOLDEN)[0]


def init_rows(keys: np.ndarray, dim: int, scale: float, seed: int) -> np.ndarray:
    """Initial rows [n, dim] float32 of `keys`; zeros when scale is 0 (a linear model's
    weights)."""
    if not scale:
        return np.zeros((keys.shape[0], dim), np.float32)
    out = np.empty((keys.shape[0], dim), np.float32)
    _fill(np.ascontiguousarray(keys, np.uint64), init_salt(seed), float(scale), out)
    return out
