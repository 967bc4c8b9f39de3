"""jaxps's pipeline schedules vs torch.distributed.pipelining on one MLP, in the same run.

The model is torch's peer's (peers_torch_pipeline.py): L x (Linear(D) + ReLU), float32,
batch split into M microbatches, S stages. jaxps runs it as one SPMD program on a
(data 1 x stage S) mesh of S host devices, torch as S gloo processes; both take a full
training step (forward, backward, SGD). Rounds alternate jaxps and torch so drift on a
noisy machine hits both; each schedule's figure is the median over rounds. The ratio is
best jaxps schedule over best torch schedule: each side at its best setting.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from _torchrun import torchrun
from jaxps.mesh import MeshConfig, make_mesh
from jaxps.parallel.pipeline import pipeline_value_and_grad
from jaxps.parallel.schedule import build

SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2))


@dataclass(frozen=True)
class MLPSpec:
    """Sizes both sides share (torch's peer reads the same flags)."""

    stages: int = 2
    layers: int = 8
    width: int = 1024
    batch: int = 512
    microbatches: int = 8
    virtual: int = 2
    lr: float = 1e-4

    def peer_args(self, warmup: int, reps: int) -> list[str]:
        return ["--layers", str(self.layers), "--width", str(self.width), "--batch", str(self.batch),
                "--microbatches", str(self.microbatches), "--chunks", str(self.virtual),
                "--lr", str(self.lr), "--warmup", str(warmup), "--reps", str(reps)]


def block(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """One stage (or chunk): its layers of Linear + ReLU, as torch's nn.Sequential runs them."""
    for i in range(p["w"].shape[0]):
        x = jax.nn.relu(x @ p["w"][i] + p["b"][i])
    return x


def mse(h: jax.Array, y: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum((h - y) ** 2)


def _params(spec: MLPSpec, V: int, key: jax.Array) -> dict[str, jax.Array]:
    """[S, (V,) layers per chunk, ...], torch's Linear init range (uniform +-1/sqrt(D))."""
    lead = (spec.stages, V) if V > 1 else (spec.stages,)
    per = spec.layers // (spec.stages * V)
    bound = spec.width ** -0.5
    kw, kb = jax.random.split(key)
    return {"w": jax.random.uniform(kw, lead + (per, spec.width, spec.width), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, lead + (per, spec.width), jnp.float32, -bound, bound)}


@functools.cache  # one compilation per (schedule, sizes) in a process
def _jitted_step(kind: str, V: int, spec: MLPSpec) -> Callable[..., Any]:
    S = spec.stages
    mesh = make_mesh(MeshConfig(data=1, stage=S, model=1), jax.devices()[:S])
    sched = build(kind, S, spec.microbatches, V)

    def step(p, xs, ys):
        g = pipeline_value_and_grad(block, mse, p, xs, ys, sched, mesh)
        return jax.tree.map(lambda w, d: w - spec.lr * d, p, g.params), g.loss

    return jax.jit(step)


def train_step(kind: str, V: int, spec: MLPSpec) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A jitted SGD step over the pipelined gradient, and its first arguments."""
    M = spec.microbatches
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    shape = (M, spec.batch // M, spec.width)
    return _jitted_step(kind, V, spec), (_params(spec, V, kp), jax.random.normal(kx, shape),
                                          jax.random.normal(ky, shape))


def _jaxps_round(steps: dict[str, tuple[Callable[..., Any], list[Any]]], spec: MLPSpec,
                 reps: int) -> dict[str, float]:
    out = {}
    for kind, (fn, state) in steps.items():
        p, xs, ys = state
        t0 = time.perf_counter()
        for _ in range(reps):
            p, loss = fn(p, xs, ys)
        jax.block_until_ready((p, loss))
        out[kind] = reps * spec.batch / (time.perf_counter() - t0)
        state[0] = p
    return out


def compare(spec: MLPSpec, rounds: int, reps: int, timeout: float = 600.0) -> dict[str, Any]:
    """Median samples/s per schedule on both sides and ``ratio_vs_torch_pipelining``."""
    if len(jax.devices()) < spec.stages:
        raise ValueError(f"{spec.stages} stages need {spec.stages} devices, have {len(jax.devices())}")
    steps: dict[str, tuple[Callable[..., Any], list[Any]]] = {}
    for kind, V in SCHEDULES:
        v = spec.virtual if V > 1 else 1
        if spec.layers % (spec.stages * v) == 0 and (v == 1 or spec.microbatches % spec.stages == 0):
            fn, args = train_step(kind, v, spec)
            state = list(args)
            for _ in range(3):  # compile, then warm (the first runs after compiling are slow)
                state[0], _ = jax.block_until_ready(fn(*state))
            steps[kind] = (fn, state)
    mine: dict[str, list[float]] = {k: [] for k in steps}
    theirs: dict[str, list[float]] = {}
    why: str | None = None
    peer: dict[str, Any] | None = None
    for _ in range(rounds):
        for k, v in _jaxps_round(steps, spec, reps).items():
            mine[k].append(v)
        if why is None:
            res, why = torchrun("peers_torch_pipeline.py", spec.stages, spec.peer_args(2, reps), timeout)
            for k, v in (res or {}).get("samples_per_sec", {}).items():
                theirs.setdefault(k, []).append(v)
            if res is not None:
                peer = {k: res[k] for k in ("peer", "torch", "processes", "torch_threads", "omp_num_threads")
                        if k in res}
    jaxps_sps = {k: statistics.median(v) for k, v in mine.items()}
    torch_sps = {k: statistics.median(v) for k, v in theirs.items()} if why is None else {}
    ratio = max(jaxps_sps.values()) / max(torch_sps.values()) if torch_sps else None
    return {"torch_spec": asdict(spec), "torch_rounds": rounds, "torch_reps": reps,
            "jaxps_samples_per_sec": jaxps_sps, "torch_samples_per_sec": torch_sps,
            "jaxps_samples_per_sec_rounds": mine, "torch_samples_per_sec_rounds": theirs,
            "ratio_vs_torch_pipelining": ratio,
            "torch_peer": peer if why is None else None, "torch_note": why}
