"""64-bit id mixing shared by readers (field ids), tables (id -> row) and routing.

splitmix64's finalizer: cheap and well mixed. Criteo's (field, value) pairs become one
uint64 id per feature; tables salt and mix ids again to pick rows. The numpy and numba
forms must agree bit for bit (tested).

Note (numba cache): kernels inline `mix64_scalar`/`field_id_scalar`, and numba's on-disk
cache is keyed on the kernel's own file; after editing this file, clear the `__pycache__`
folders of jaxps/data and jaxps/tables (or touch the kernels' files).
"""
from __future__ import annotations

import numpy as np
from numba import njit

M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_ONE = np.uint64(1)


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finalizer over a uint64 array (wraps silently); scalars give a uint64."""
    z = np.array(x, dtype=np.uint64, ndmin=1)
    z = z ^ (z >> 30)
    z *= M1
    z ^= z >> 27
    z *= M2
    z ^= z >> 31
    return z if np.ndim(x) else z[0]


def field_id(field: np.ndarray | int, value: np.ndarray | int) -> np.ndarray:
    """Id of `value` in `field`: mix64(value ^ (field + 1) * GOLDEN), vectorized."""
    f = np.array(field, dtype=np.uint64, ndmin=1) + _ONE
    v = np.array(value, dtype=np.uint64, ndmin=1)
    out = mix64(v ^ (f * GOLDEN))
    return out if (np.ndim(field) or np.ndim(value)) else out[0]


@njit(cache=True, nogil=True)
def mix64_scalar(x: np.uint64) -> np.uint64:
    """numba scalar twin of `mix64` (uint64 ops only: mixed signedness would go to float)."""
    z = np.uint64(x)
    z = (z ^ (z >> _S30)) * M1
    z = (z ^ (z >> _S27)) * M2
    return z ^ (z >> _S31)


@njit(cache=True, nogil=True)
def field_id_scalar(field: int, value: np.uint64) -> np.uint64:
    """numba scalar twin of `field_id`."""
    f = np.uint64(field) + _ONE
    return mix64_scalar(np.uint64(value) ^ (f * GOLDEN))


@njit(cache=True, nogil=True, inline="always")
def hashed_row(key: np.uint64, salt: np.uint64, num_rows: int) -> np.uint64:
    """numba scalar twin of `Table.rows_for`: mix64(key ^ salt) % num_rows, the one
    id -> row rule of device tables (routing) and hashed host tables (host_plan). A
    power-of-two row count takes a mask (same value, no 64-bit division; the test is
    loop-invariant where this is inlined)."""
    m = mix64_scalar(np.uint64(key) ^ salt)
    n = np.uint64(num_rows)
    if (n & (n - _ONE)) == 0:
        return m & (n - _ONE)
    return m % n


def seed_mask(seed: int) -> np.uint64:
    """Per-table salt so two tables hashing the same ids use unrelated rows."""
    return mix64(np.array([seed], dtype=np.uint64) * GOLDEN + GOLDEN)[0]  # arrays wrap silently
