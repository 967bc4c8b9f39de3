"""64-bit hashing shared by readers (field ids) and tables (id -> row).

splitmix64's finalizer: cheap, well mixed, and identical in numpy (vectorised, wrapping
uint64 arithmetic) and numba (scalar) so host kernels and numpy code agree bit for bit.
"""
from __future__ import annotations

import numba
import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of a uint64 array (wraps silently, as a hash should)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def mix64_scalar(x):
    x = np.uint64(x)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_mask(seed: int) -> np.uint64:
    """Per-table salt so two tables hashing the same ids use unrelated rows."""
    return mix64(np.array([seed], dtype=np.uint64) * GOLDEN + GOLDEN)[0]
