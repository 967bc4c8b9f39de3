"""SLURM host lists: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5.

`scontrol show hostnames` is the authority when it is installed; the pure-Python expander
covers the same syntax (ranges with zero padding, several bracket groups, top-level commas)
so `jaxps launch node` also works where only the environment reached the process (a
container on a SLURM node, tests).
"""
from __future__ import annotations

import itertools
import re
import shutil
import subprocess

_BRACKETS = re.compile(r"\[([^\]]*)\]")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _range(spec: str, text: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {text!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in host list {text!r}")
        width = len(lo) if lo.startswith("0") else 0  # "01-03" keeps two digits
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(text: str) -> list[str]:
    """Host names of a SLURM host list, in order (duplicates kept, as scontrol does)."""
    hosts: list[str] = []
    for part in _split_top(text):
        pieces = _BRACKETS.split(part)  # literal, range, literal, range, ..., literal
        choices = [[p] if i % 2 == 0 else _range(p, text) for i, p in enumerate(pieces)]
        hosts.extend("".join(c) for c in itertools.product(*choices))
    return hosts


def hostnames(text: str) -> list[str]:
    """`scontrol show hostnames TEXT` when scontrol is installed, else `expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(text)


def tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ("2(x3),1") as one count per node: [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node {text!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
