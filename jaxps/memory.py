"""Host buffers the accelerator runtime can adopt without a copy.

On the CPU backend, `jax.device_put` of a 64-byte aligned numpy array aliases it instead of
copying (measured: 0.02 ms vs 1.5 ms for 10 MB; numpy's own allocations are only 16-byte
aligned). Per-batch arrays built on the host (lookup plans) are allocated here, so placing
them on the device costs nothing. They must not be written after being placed.
"""
from __future__ import annotations

import numpy as np

ALIGN = 64


def aligned_empty(shape: int | tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def aligned_full(shape: int | tuple[int, ...], value, dtype) -> np.ndarray:
    out = aligned_empty(shape, dtype)
    out.fill(value)
    return out
