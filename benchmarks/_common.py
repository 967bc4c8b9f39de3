"""Shared plumbing for benchmark scripts.

Contract with ``run_all.py``: every script accepts ``--quick`` and ``--out DIR`` and prints its
result as ONE JSON object on the LAST stdout line (``emit``), so the runner needs no knowledge
of any benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = "bench_results"


def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags run_all.py passes to every benchmark."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, for CI and run_all")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for result files")
    return p


def _jsonable(x: Any) -> Any:
    """json.dumps fallback for numpy scalars/arrays and paths."""
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def emit(name: str, result: dict[str, Any], out_dir: str | os.PathLike[str] = DEFAULT_OUT) -> Path:
    """Write ``{out_dir}/{name}.json`` and print ``result`` as the last stdout line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=_jsonable, allow_nan=True) + "\n")
    sys.stdout.flush()
    print(json.dumps(result, default=_jsonable, allow_nan=True), flush=True)
    return path


@dataclass
class Timing:
    """Filled in when the ``timer`` block exits."""

    seconds: float = float("nan")


@contextmanager
def timer() -> Iterator[Timing]:
    """``with timer() as t: ...`` then ``t.seconds`` (wall clock, perf_counter)."""
    t = Timing()
    start = time.perf_counter()
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - start


def machine_info() -> dict[str, Any]:
    """Enough context to tell two result files' machines apart."""
    import numpy as np

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        info["sched_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        import jax

        info["jax"] = jax.__version__
    except Exception:  # noqa: BLE001 - any import failure just means "no jax"
        info["jax"] = None
    return info


def server_address(proc: "subprocess.Popen[str]", name: str, timeout: float = 240.0) -> str:
    """HOST:PORT from a started `jaxps.ps.serve` process's first stdout line (`... listening
    on HOST:PORT`). The wait is long: a fresh checkout compiles the numba kernels first
    (over 60 s measured on a loaded 2-core machine)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if " listening on " not in line:
        raise RuntimeError(f"server {name} did not start within {timeout:.0f}s: {line!r}")
    return line.rsplit(" listening on ", 1)[1].strip()
