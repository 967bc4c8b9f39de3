"""Launch a torch peer script under torchrun and read its JSON result, without importing torch.

Peers (torch.distributed.pipelining, TorchRec) are benchmark-only and optional: a benchmark
must still run, and say why, when they are missing. So the launcher lives apart from the
peer scripts (which import torch at the top) and reports a reason instead of raising.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def missing(*modules: str) -> str | None:
    """Why the peer cannot run (the first module that is not importable), or None."""
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed (see README, Benchmarks: optional peers)"
        except (ImportError, ValueError) as e:  # a parent package that fails to import
            return f"{name} cannot be located: {e}"
    return None


def last_json(text: str) -> dict[str, Any] | None:
    """The last non-blank line of ``text`` as a JSON object, or None (the emit contract)."""
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


def _tail(text: str, n: int = 1500) -> str:
    return text.strip()[-n:]


_CAUSE = re.compile(r"Error|Exception|terminate called|what\(\)|Signal \d+|exitcode")


def failure(text: str, lines: int = 12) -> str:
    """The lines of a torchrun log that say why (the children's errors, deduplicated), not
    the agent's own traceback, which only says that a child failed."""
    hits = [ln.strip() for ln in text.splitlines()
            if _CAUSE.search(ln) and "ChildFailedError" not in ln and "elastic/" not in ln]
    return "\n".join(list(dict.fromkeys(hits))[:lines]) if hits else _tail(text)


def _once(script: str, cmd: list[str], env: dict[str, str], timeout: float
          ) -> tuple[dict[str, Any] | None, str | None]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"{script}: timeout after {timeout:g}s"
    if proc.returncode != 0:
        return None, f"{script}: exit status {proc.returncode}: {failure(proc.stderr + proc.stdout)}"
    result = last_json(proc.stdout)
    if result is None:
        return None, f"{script}: last stdout line is not a JSON object: {_tail(proc.stdout, 300)!r}"
    return result, None


def torchrun(script: str, nproc: int, args: Sequence[str], timeout: float,
             threads_per_proc: int | None = None, retries: int = 0
             ) -> tuple[dict[str, Any] | None, str | None]:
    """Run ``benchmarks/{script}`` on ``nproc`` local processes (``torchrun --standalone``).

    Returns ``(result, None)`` from rank 0's last stdout line, or ``(None, reason)`` on a
    missing torch, a failure or a timeout. ``threads_per_proc`` sets OMP_NUM_THREADS, which
    torchrun would otherwise force to 1 (said in the result so ratios are read right). A
    failed run is retried ``retries`` times (peers crash now and then on a loaded machine);
    a result after a failure says so in ``failed_before``.
    """
    why = missing("torch")
    if why:
        return None, why
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(HERE / script), *map(str, args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads_per_proc or max(1, (os.cpu_count() or 1) // nproc))
    env.pop("XLA_FLAGS", None)  # only jaxps reads it; keep the peer's environment plain
    failures: list[str] = []
    for _ in range(retries + 1):
        result, why = _once(script, cmd, env, timeout)
        if result is not None:
            result.setdefault("omp_num_threads", int(env["OMP_NUM_THREADS"]))
            if failures:
                result["failed_before"] = failures
            return result, None
        failures.append(why or "")
    return None, "\n--- retry ---\n".join(failures)
