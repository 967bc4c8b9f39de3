"""Process-level runtime: compilation cache, joining a multi-process job, host all-gather.

JAX is imported inside the functions: launchers read this module's environment contract
without paying for (or initialising) JAX.
"""
from __future__ import annotations

import os

import numpy as np

# Environment contract between `jaxps launch` (and cluster templates) and worker processes.
ENV_COORDINATOR = "JAXPS_COORDINATOR"      # host:port of process 0's coordination service
ENV_COORDINATOR_BIND = "JAXPS_COORDINATOR_BIND"  # address process 0 listens on (default: all)
ENV_NUM_PROCESSES = "JAXPS_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXPS_PROCESS_ID"
ENV_CPU_DEVICES = "JAXPS_CPU_DEVICES"      # simulated CPU devices per process (default 8)


def enable_compilation_cache(path: str) -> str | None:
    """Use JAX's persistent compilation cache at `path` unless the user configured one
    (e.g. with JAX_COMPILATION_CACHE_DIR). A rerun of the same job then skips XLA
    compilation (~0.2-0.5 s per step function on CPU, far more on accelerators)."""
    import jax

    if not path or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def set_cpu_devices() -> None:
    """Give the CPU backend JAXPS_CPU_DEVICES (default 8) simulated devices, unless the
    user's XLA_FLAGS already set a count. Must run before JAX first touches devices; it does
    not affect GPU/TPU backends, which use their real devices."""
    n = os.environ.get(ENV_CPU_DEVICES, "8")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def initialize_distributed() -> bool:
    """Join a multi-process job when the launcher's variables are set (no-op otherwise).

    Call it before the first use of devices (the CLI does; a Python-API script run under
    `jaxps launch` calls it first thing); `jax.devices()` then spans every process."""
    n = int(os.environ.get(ENV_NUM_PROCESSES, "1"))
    if n <= 1:
        return False
    import jax

    jax.distributed.initialize(coordinator_address=os.environ[ENV_COORDINATOR], num_processes=n,
                               process_id=int(os.environ[ENV_PROCESS_ID]),
                               coordinator_bind_address=os.environ.get(ENV_COORDINATOR_BIND))
    return True


def allgather_host(x: np.ndarray) -> np.ndarray:
    """Stack a host array from every process: [process_count, *x.shape], in process order.

    JAX without x64 would narrow 64-bit values on the way, so 8-byte dtypes travel as
    pairs of uint32 and are viewed back. (multihost_utils is experimental in name only:
    JAX has no stable host-side all-gather.)"""
    from jax.experimental import multihost_utils

    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return multihost_utils.process_allgather(x.astype(np.uint8)).astype(np.bool_)
    if x.dtype.itemsize == 8:
        raw = multihost_utils.process_allgather(x.view(np.uint32))
        return np.ascontiguousarray(raw).view(x.dtype).reshape((-1,) + x.shape)
    return np.asarray(multihost_utils.process_allgather(x))


def allreduce_sum_host(values: dict[str, float]) -> dict[str, float]:
    """Sum scalar counters over every process (a no-op with one process)."""
    import jax

    if jax.process_count() == 1:
        return dict(values)
    keys = sorted(values)
    summed = allgather_host(np.array([values[k] for k in keys], np.float64)).sum(axis=0)
    return dict(zip(keys, (float(v) for v in summed)))


def barrier() -> None:
    """Every process gets here before any goes on (a host all-gather; a no-op alone)."""
    import jax

    if jax.process_count() > 1:
        allgather_host(np.zeros(1, np.int32))


def local_rows(x) -> np.ndarray:
    """This process's rows of an array split over its first axis (e.g. over `data`), in
    order; the whole array when this process holds all of it."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)
