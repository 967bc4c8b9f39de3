"""Bubble timing for benchmarks/pipeline.py in a process of its own (`pipeline.bubble_in_subprocess`).

The parent sets XLA_FLAGS, NPROC and GLIBC_TUNABLES (`pipeline.bubble_env`: one simulated
CPU device per core of the bubble layout) before this process imports jax, which reads
them only then; here `pipeline.measure_bubble` times the schedules and a block's ops on
that layout. Prints its result as one JSON object, the last stdout line.

Usage: python benchmarks/_pipeline_bubble.py '{"stages": 2, "width": 1024, "batch": 256, ...}'
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pipeline  # noqa: E402

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    print(json.dumps({"layout": cfg["layout"], **pipeline.measure_bubble(cfg)}), flush=True)
