"""The best SSP can do against BSP under a straggler pattern: an event simulation of the
clock gate with zero overhead and no convergence effects (the bound behind the README's
ssp_straggler figures). A group's step k starts once its step k-1 finished and the
slowest group completed step k-s-1 (BSP: s = 0), then takes its device time.

Usage: python benchmarks/_ssp_gate_bound.py [--steps 60] [--burst 4]
"""
from __future__ import annotations

import argparse

import numpy as np

GROUPS, SLOWDOWN, DEVICE = 4, 3.0, 0.08


def finish_times(s: int | None, steps: int, duration) -> np.ndarray:
    """[groups, steps] finish time of every step; duration(group, step, start) -> seconds."""
    fin = np.zeros((GROUPS, steps))
    for k in range(steps):
        for g in range(GROUPS):
            gate = fin[:, k - s - 1].max() if s is not None and k - s >= 1 else 0.0
            start = max(fin[g, k - 1] if k else 0.0, gate)
            fin[g, k] = start + duration(g, k, start)
    return fin


def step_indexed(burst: int, steps: int, seed: int = 0):
    slow = np.repeat(np.random.default_rng(seed).integers(0, GROUPS, -(-steps // burst)), burst)[:steps]
    return lambda g, k, t: DEVICE * (SLOWDOWN if slow[k] == g else 1.0)


def time_windowed(burst: int, seed: int = 0):
    who, window = np.random.default_rng(seed).integers(0, GROUPS, 1 << 16), burst * DEVICE

    def duration(g, k, start):
        work, t = DEVICE, start
        while True:
            w = int(t / window + 1e-9)
            speed = 1.0 / SLOWDOWN if who[w] == g else 1.0
            room = ((w + 1) * window - t) * speed
            if room >= work:
                return t + work / speed - start
            work, t = work - room, (w + 1) * window
    return duration


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--burst", type=int, default=4)
    a = p.parse_args()
    patterns = {"rotating (time windows)": time_windowed(a.burst), "rotating_steps": step_indexed(a.burst, a.steps),
                "persistent": lambda g, k, t: DEVICE * (SLOWDOWN if g == GROUPS - 1 else 1.0)}
    for name, duration in patterns.items():
        fin = {n: np.sort(finish_times(s, a.steps, duration).ravel()) for n, s in
               (("bsp", 0), ("ssp1", 1), ("ssp3", 3), ("asp", None))}
        half = {n: f[f.size // 2 - 1] / fin["bsp"][fin["bsp"].size // 2 - 1] for n, f in fin.items()}
        end = {n: f[-1] / fin["bsp"][-1] for n, f in fin.items()}
        print(f"{name:24s} time / BSP's to half the data: " + " ".join(f"{n} {v:.2f}" for n, v in half.items())
              + " | to all: " + " ".join(f"{n} {v:.2f}" for n, v in end.items()))


if __name__ == "__main__":
    main()
