"""Run every benchmark script and collect a Markdown report with ratio bar charts.

Each ``benchmarks/*.py`` (except ``_*.py``, ``peers*.py``: peer runners that benchmarks launch
themselves, and this file) runs in its own subprocess (isolation: a crash, hang or leaked
accelerator state stays in that process) with ``--quick`` unless ``--full``; its last stdout
line must be a JSON object (``_common.emit``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SKIP = {Path(__file__).name}


@dataclass
class Outcome:
    """One benchmark run: parsed result or the reason it has none."""

    name: str
    seconds: float
    result: dict[str, Any] | None = None
    error: str | None = None
    stderr_tail: str = ""
    chart: str | None = None


def discover(scripts_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Benchmark scripts in ``scripts_dir``, filtered by name (with or without ``.py``)."""
    scripts = sorted(p for p in scripts_dir.glob("*.py")
                     if not p.name.startswith(("_", "peers")) and p.name not in SKIP)
    if only:
        wanted = {o.removesuffix(".py") for o in only}
        scripts = [p for p in scripts if p.stem in wanted]
    return scripts


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_one(script: Path, out_dir: Path, quick: bool, timeout: float) -> Outcome:
    """Run one script; the last non-blank stdout line must parse as a JSON object."""
    cmd = [sys.executable, str(script), "--out", str(out_dir.resolve())]
    cmd += ["--quick"] if quick else []
    env = dict(os.environ)  # repo root on the path, so `import jaxps` works from any cwd
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        return Outcome(script.stem, time.perf_counter() - start,
                       error=f"timeout after {timeout:g}s", stderr_tail=_tail(err or ""))
    seconds = time.perf_counter() - start
    tail = _tail(proc.stderr)
    if proc.returncode != 0:
        return Outcome(script.stem, seconds, error=f"exit status {proc.returncode}",
                       stderr_tail=tail)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError as e:
        return Outcome(script.stem, seconds, error=f"last stdout line is not JSON: {e}",
                       stderr_tail=_tail(proc.stdout + "\n" + proc.stderr))
    if not isinstance(result, dict):
        return Outcome(script.stem, seconds, error="last stdout line is not a JSON object",
                       stderr_tail=_tail(proc.stdout + "\n" + proc.stderr))
    return Outcome(script.stem, seconds, result=result, stderr_tail=tail)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys, so every value gets one table row."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_ratio(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith("ratio")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        v = json.dumps(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def ratio_chart(name: str, flat: dict[str, Any], out_dir: Path) -> str | None:
    """Bar chart of the numeric ``ratio*`` keys; returns the PNG file name, or None."""
    ratios = {k: float(v) for k, v in flat.items() if is_ratio(k) and _is_number(v)}
    if not ratios:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(ratios) + 2), 3.5))
    bars = ax.bar(range(len(ratios)), list(ratios.values()), color="tab:blue")
    ax.bar_label(bars, fmt="%.3g")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(ratios)), list(ratios), rotation=30, ha="right", fontsize=8)
    ax.set_title(name)
    ax.set_ylabel("ratio")
    fig.tight_layout()
    png = f"{name}_ratios.png"
    fig.savefig(out_dir / png, dpi=100)
    plt.close(fig)
    return png


def write_report(outcomes: list[Outcome], out_dir: Path, mode: str) -> Path:
    """``report.md``: one table per benchmark (ratios in bold), then the failures."""
    ok = [o for o in outcomes if o.result is not None]
    bad = [o for o in outcomes if o.result is None]
    lines = [f"# Benchmark report ({mode})", "",
             f"{len(ok)} succeeded, {len(bad)} failed; generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    for o in ok:
        assert o.result is not None
        flat = flatten(o.result)
        lines += [f"## {o.name}", "", f"wall time {o.seconds:.1f}s", ""]
        if o.chart:
            lines += [f"![{o.name} ratios]({o.chart})", ""]
        lines += ["| key | value |", "|---|---|"]
        for k, v in flat.items():
            cell = f"**{_fmt(v)}**" if is_ratio(k) else _fmt(v)
            key = f"**{k}**" if is_ratio(k) else k
            lines.append(f"| {key} | {cell} |")
        lines.append("")
    if bad:
        lines += ["## Failures", ""]
        for o in bad:
            lines += [f"### {o.name}: {o.error}", "", "```", o.stderr_tail or "(no output)",
                      "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None, scripts_dir: str | os.PathLike[str] | None = None) -> int:
    """Run the benchmarks; exit status 1 if any failed (or none matched ``--only``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full sizes (drop --quick)")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only NAME (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-script seconds")
    ap.add_argument("--out", default="bench_results", help="report directory")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scripts = discover(Path(scripts_dir) if scripts_dir else HERE, args.only)
    if not scripts:
        print(f"no benchmark scripts matched {args.only or ''}", file=sys.stderr)
        return 1
    outcomes = []
    for script in scripts:
        print(f"[run_all] {script.name} ...", file=sys.stderr, flush=True)
        o = run_one(script, out_dir, quick=not args.full, timeout=args.timeout)
        if o.result is not None:
            o.chart = ratio_chart(o.name, flatten(o.result), out_dir)
        status = "ok" if o.result is not None else f"FAILED ({o.error})"
        print(f"[run_all] {script.name}: {status} in {o.seconds:.1f}s", file=sys.stderr, flush=True)
        outcomes.append(o)
    report = write_report(outcomes, out_dir, "full" if args.full else "quick")
    print(f"[run_all] report: {report}", file=sys.stderr)
    return 0 if all(o.result is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
