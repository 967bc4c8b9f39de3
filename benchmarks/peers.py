"""Peer baselines on libsvm files: Vowpal Wabbit and scikit-learn's SGDClassifier.

Each runner reports end-to-end training examples/s *including parsing its own input* plus test
log loss / AUC from ``jaxps.metrics``, so jaxps (which reads libsvm) is compared against peers
doing the same job. Importable by benchmark scripts (``from peers import run_vw``); run directly
(``python benchmarks/peers.py``) it validates both peers on a generated planted-logistic file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):  # `_common` and `jaxps` whichever way we are run
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import emit, machine_info, parser, timer  # noqa: E402
from jaxps.metrics import StreamingBinaryMetrics  # noqa: E402

_BLOCK = 32 << 20  # bytes per read; large enough that per-block Python overhead vanishes


# ----------------------------------------------------------------------------- file helpers
def count_lines(path: str | os.PathLike[str]) -> int:
    """Newline count, streamed (the examples/s denominators)."""
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            n += chunk.count(b"\n")
    return n


def _line_blocks(path: str | os.PathLike[str], size: int = 1 << 20) -> Iterator[bytes]:
    """Blocks of whole lines (each ends with a newline), about ``size`` bytes each.

    Small blocks on purpose: buffers of a few MB are recycled by malloc, while ones above its
    mmap threshold (32 MB at most) are fresh pages each time, and page faults on these VMs
    cost more than the text processing.
    """
    rest = b""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            rest = chunk[cut:]
            if cut:
                yield chunk[:cut]
    if rest.strip():
        yield rest + b"\n"


def read_first_column(path: str | os.PathLike[str]) -> np.ndarray:
    """First token of every non-blank line as float64 (labels of a libsvm or VW file)."""
    parts = [np.array(re.findall(rb"(?m)^[ \t]*([^\s|]+)", block)).astype(np.float64)
             for block in _line_blocks(path)]
    return np.concatenate(parts) if parts else np.zeros(0)


# ------------------------------------------------------------------------------ Vowpal Wabbit
def libsvm_to_vw(src: str | os.PathLike[str], dst: str | os.PathLike[str], namespace: str = "f") -> int:
    """Rewrite ``label idx:val ...`` as ``{-1,1} |ns idx:val ...``; returns lines written.

    Only the label column changes. Fast path (labels exactly ``0``/``1``): two C-level
    ``bytes.replace`` per 32 MB block. Otherwise one ``re.sub`` whose callback runs once per
    line (not per token) and hits a tiny label cache.
    """
    cache: dict[bytes, bytes] = {}
    neg, pos = f"\n-1 |{namespace} ".encode(), f"\n1 |{namespace} ".encode()

    def repl(m: re.Match[bytes]) -> bytes:
        lab = m.group(1)
        out = cache.get(lab)
        if out is None:
            out = cache[lab] = (b"1" if float(lab) > 0 else b"-1") + f" |{namespace} ".encode()
        return out

    pat = re.compile(rb"(?m)^[ \t]*(\S+)[ \t]*")
    n = 0
    with open(dst, "wb") as out_f:
        for block in _line_blocks(src):
            lines = block.count(b"\n")
            nl_block = b"\n" + block  # every line now starts right after a newline
            if nl_block.count(b"\n0 ") + nl_block.count(b"\n1 ") == lines:
                out_f.write(nl_block.replace(b"\n0 ", neg).replace(b"\n1 ", pos)[1:])
            else:
                out_f.write(pat.sub(repl, block))
            n += lines
    return n


def prepare_vw(train_svm: str | os.PathLike[str], test_svm: str | os.PathLike[str],
               out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert both files to VW text (VW's own input format); timed, reported separately."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train_vw": out / (Path(train_svm).stem + ".vw"),
             "test_vw": out / (Path(test_svm).stem + ".vw")}
    with timer() as t:
        n_train = libsvm_to_vw(train_svm, paths["train_vw"])
        n_test = libsvm_to_vw(test_svm, paths["test_vw"])
    return {"train_vw": str(paths["train_vw"]), "test_vw": str(paths["test_vw"]),
            "train_lines": n_train, "test_lines": n_test, "prepare_seconds": t.seconds,
            "prepare_lines_per_sec": (n_train + n_test) / max(t.seconds, 1e-9)}


def _vw(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run the pip wheel's VW (it ships no ``vw`` binary) and fail loudly on error."""
    cmd = [sys.executable, "-m", "vowpalwabbit", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


def run_vw(train_vw: str | os.PathLike[str], test_vw: str | os.PathLike[str], *, bits: int = 24,
           passes: int = 1, learning_rate: float | None = None,
           extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Train VW logistic regression, time it, then score the test set with jaxps.metrics.

    VW hashes features itself: a purely numeric name such as ``123`` is used as the integer
    ``123`` plus the namespace hash, masked to ``bits`` bits, so indices need no pre-hashing.
    Every line also gets VW's constant (bias) feature. ``train_seconds`` is the whole
    subprocess, interpreter start included (``startup_seconds`` measures that alone).
    """
    n_train = count_lines(train_vw)
    with tempfile.TemporaryDirectory(prefix="peer_vw_") as tmp:
        model, preds = Path(tmp) / "model.vw", Path(tmp) / "preds.txt"
        args: list[str] = ["-d", str(train_vw), "--loss_function", "logistic", "-b", str(bits),
                           "-f", str(model), "--quiet"]
        if passes > 1:  # multi-pass needs a cache; holdout off so all rows train, like the peers
            args += ["-c", "-k", "--cache_file", str(Path(tmp) / "train.cache"),
                     "--passes", str(passes), "--holdout_off"]
        if learning_rate is not None:
            args += ["-l", str(learning_rate)]
        args += list(extra_args)
        with timer() as t_start:
            _vw(["--version"])
        with timer() as t_train:
            _vw(args)
        with timer() as t_pred:  # the model does not store the loss: restate it
            _vw(["-d", str(test_vw), "-t", "-i", str(model), "--loss_function", "logistic",
                 "--link", "logistic", "-p", str(preds), "--quiet"])
        p = read_first_column(preds)
    y = read_first_column(test_vw) > 0
    if p.size != y.size:
        raise RuntimeError(f"VW wrote {p.size} predictions for {y.size} test rows")
    m = StreamingBinaryMetrics()
    m.update(p, y)
    r = m.result()
    return {"peer": "vowpalwabbit", "bits": bits, "passes": passes,
            "learning_rate": learning_rate, "train_examples": n_train * passes,
            "train_seconds": t_train.seconds, "startup_seconds": t_start.seconds,
            "examples_per_sec": n_train * passes / t_train.seconds,
            "predict_seconds": t_pred.seconds, "test_examples": r["examples"],
            "logloss": r["logloss"], "auc": r["auc"]}


# ------------------------------------------------------------------------------ libsvm parser
try:
    from numba import njit
except ImportError:  # numba is a jaxps dependency, but keep the baselines runnable without it
    njit = None


def _scan_py(buf: np.ndarray, start: int, max_lines: int, final: bool) -> tuple[int, int, int]:
    """(end offset or -1, lines, feature bound) of the next max_lines whole lines."""
    nl = np.flatnonzero(buf[start:] == 10)[:max_lines]
    end = start + int(nl[-1]) + 1 if nl.size else start
    lines = int(nl.size)
    if lines < max_lines:
        if not final:
            return -1, 0, 0
        if end < buf.size:
            end, lines = buf.size, lines + 1
    return end, lines, int(np.count_nonzero(buf[start:end] == 58))


def _fill_py(buf: np.ndarray, start: int, end: int, modulus: int, labels: np.ndarray,
             indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> tuple[int, int]:
    """Fallback without numba: sklearn's C parser (about 5x slower than the numba one)."""
    import io

    from sklearn.datasets import load_svmlight_file

    data = buf[start:end].tobytes()
    if not data.strip():
        return 0, 0
    x, y = load_svmlight_file(io.BytesIO(data), zero_based=True)
    rows, nnz = y.size, x.nnz
    labels[:rows], indptr[: rows + 1] = y, x.indptr
    indices[:nnz], values[:nnz] = x.indices % modulus, x.data
    return rows, nnz


if njit is not None:
    _jit = njit(cache=True, nogil=True)

    @_jit
    def _num(buf, i, n):  # pragma: no cover - jitted
        """Parse a decimal float at ``buf[i]``; returns (value, next index)."""
        sign = 1.0
        if i < n and (buf[i] == 45 or buf[i] == 43):
            sign = -1.0 if buf[i] == 45 else 1.0
            i += 1
        v = 0.0
        while i < n and 48 <= buf[i] <= 57:
            v = v * 10.0 + (buf[i] - 48)
            i += 1
        if i < n and buf[i] == 46:
            i += 1
            scale = 0.1
            while i < n and 48 <= buf[i] <= 57:
                v += (buf[i] - 48) * scale
                scale *= 0.1
                i += 1
        if i < n and (buf[i] == 101 or buf[i] == 69):
            i += 1
            esign = 1
            if i < n and (buf[i] == 45 or buf[i] == 43):
                esign = -1 if buf[i] == 45 else 1
                i += 1
            e = 0
            while i < n and 48 <= buf[i] <= 57:
                e = e * 10 + (buf[i] - 48)
                i += 1
            v *= 10.0 ** (esign * e)
        return sign * v, i

    @_jit
    def _scan(buf, start, max_lines, final):  # pragma: no cover - jitted
        n = buf.size
        end, lines, colons, i = start, 0, 0, start
        while i < n and lines < max_lines:
            c = buf[i]
            if c == 58:
                colons += 1
            elif c == 10:
                lines += 1
                end = i + 1
            i += 1
        if lines < max_lines:
            if not final:
                return -1, 0, 0
            if end < n:
                for j in range(end, n):
                    colons += buf[j] == 58
                end, lines = n, lines + 1
        return end, lines, colons

    @_jit
    def _fill(buf, start, end, modulus, labels, indptr, indices, values):  # pragma: no cover
        """Label, then idx:val tokens; '#' starts a comment; blank lines and qid: skipped."""
        row, nnz, i = 0, 0, start
        indptr[0] = 0
        while i < end:
            while i < end and (buf[i] == 32 or buf[i] == 9 or buf[i] == 13):
                i += 1
            if i >= end:
                break
            if buf[i] == 10:
                i += 1
                continue
            labels[row], i = _num(buf, i, end)
            while i < end and buf[i] != 10:
                c = buf[i]
                if c == 32 or c == 9 or c == 13:
                    i += 1
                elif c == 35:
                    while i < end and buf[i] != 10:
                        i += 1
                else:
                    idx = 0
                    while i < end and 48 <= buf[i] <= 57:
                        idx = idx * 10 + (buf[i] - 48)
                        i += 1
                    if i < end and buf[i] == 58:
                        v, i = _num(buf, i + 1, end)
                        indices[nnz] = idx % modulus
                        values[nnz] = v
                        nnz += 1
                    else:  # not idx:val (e.g. qid:...): skip the token
                        while i < end and buf[i] != 32 and buf[i] != 9 and buf[i] != 10:
                            i += 1
            i += 1
            row += 1
            indptr[row] = nnz
        return row, nnz

    _scan_impl, _fill_impl = _scan, _fill
else:
    _scan_impl, _fill_impl = _scan_py, _fill_py


class LibsvmBatchParser:
    """Parses the next ``max_lines`` lines of a byte buffer into reusable CSR arrays.

    Reuse matters: on the VMs used here a fresh 50 MB array costs ~80 ms of page faults,
    as much as parsing it; with ``reuse`` the returned arrays are views, valid until the
    next call.
    """

    def __init__(self, modulus: int, reuse: bool = True) -> None:
        self.modulus, self.reuse = modulus, reuse
        self._cap_rows, self._cap_nnz = -1, -1

    def _ensure(self, rows: int, nnz: int) -> None:
        if not self.reuse or rows > self._cap_rows or nnz > self._cap_nnz:
            self._cap_rows, self._cap_nnz = max(rows, self._cap_rows), max(nnz, self._cap_nnz)
            self.labels = np.empty(self._cap_rows, np.float64)
            if self._cap_nnz >= 2**31:
                raise ValueError("batch too large for int32 CSR indices; lower batch_size")
            self.indptr = np.empty(self._cap_rows + 1, np.int32)  # int32: what sklearn uses
            self.indices = np.empty(self._cap_nnz, np.int32)
            self.values = np.empty(self._cap_nnz, np.float64)

    def __call__(self, buf: np.ndarray, start: int, max_lines: int, final: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
        """(labels, indptr, indices % modulus, values, end offset), or None when fewer than
        ``max_lines`` whole lines remain and not ``final`` (read more first)."""
        end, lines, colons = _scan_impl(buf, start, max_lines, final)
        if end < 0:
            return None
        self._ensure(lines, colons)
        rows, nnz = _fill_impl(buf, start, end, self.modulus, self.labels, self.indptr,
                               self.indices, self.values)
        return (self.labels[:rows], self.indptr[: rows + 1], self.indices[:nnz],
                self.values[:nnz], end)


def warm_up_parser() -> float:
    """Compile (or load from cache) the numba parser; returns seconds, not counted as parsing."""
    with timer() as t:
        buf = np.frombuffer(b"1 3:1 5:0.5e1\n0 2:-1\n", np.uint8).copy()  # writable, as in use
        LibsvmBatchParser(8)(buf, 0, 10, True)
    return t.seconds


def iter_libsvm_batches(path: str | os.PathLike[str], batch_size: int, bits: int,
                        reuse: bool = False) -> Iterator[tuple[Any, np.ndarray]]:
    """Stream ``(csr_matrix n x 2**bits, labels in {0,1})`` batches of ``batch_size`` lines.

    With ``reuse`` each batch's arrays are overwritten by the next one (consume, don't keep).
    """
    import scipy.sparse as sp

    modulus = 1 << bits
    parse = LibsvmBatchParser(modulus, reuse)
    # One read buffer, refilled in place with readinto (no per-block allocation); it doubles
    # whenever a whole batch does not fit.
    buf = np.empty(max(_BLOCK, 512 * batch_size), np.uint8)
    start, stop, eof = 0, 0, False
    with open(path, "rb") as f:
        while True:
            if not eof:
                rem = stop - start
                if rem == buf.size:
                    buf = np.concatenate([buf, np.empty_like(buf)])
                buf[:rem] = buf[start:stop]
                got = f.readinto(memoryview(buf)[rem:])
                start, stop, eof = 0, rem + got, got == 0
            while (out := parse(buf[:stop], start, batch_size, eof)) is not None:
                y, indptr, idx, val, start = out
                if y.size:
                    x = sp.csr_matrix((val, idx, indptr), shape=(y.size, modulus), copy=False)
                    yield x, (y > 0).astype(np.float64)
                elif eof and start >= stop:
                    return


# ------------------------------------------------------------------------------ scikit-learn
def run_sklearn(train_svm: str | os.PathLike[str], test_svm: str | os.PathLike[str], *,
                bits: int = 24, batch_size: int = 100_000, eta0: float = 0.02,
                alpha: float = 1e-7, epochs: int = 1) -> dict[str, Any]:
    """Stream-train ``SGDClassifier(log_loss)`` with partial_fit on hashed CSR batches.

    Tuned (python benchmarks/peers.py --sweep, and by hand on 1M x 39-feature planted-logistic
    rows, 2 CPUs): batch_size 50k/100k/200k all ran 550-650k rows/s end to end (parsing ~2/3
    of it), 10k ~2x slower (each partial_fit call touches the whole 2**bits coefficient
    vector), so 100k. eta0 (constant schedule, alpha 1e-7): test log loss 0.5877 @0.005,
    0.5750 @0.01, 0.5674 @0.02, 0.5930 @0.05 (VW: 0.5631), same speed, so 0.02; 0.2 does not
    converge and the default 'optimal' schedule diverges. Parsing (numba, or sklearn's parser
    as fallback) is inside ``train_seconds``; the one-time JIT is ``jit_seconds``.
    """
    from sklearn.linear_model import SGDClassifier

    jit = warm_up_parser()
    clf = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=eta0, alpha=alpha)
    n, parse_s = 0, 0.0
    with timer() as t_train:
        for _ in range(epochs):
            it = iter_libsvm_batches(train_svm, batch_size, bits, reuse=True)
            while True:
                with timer() as t_parse:
                    batch = next(it, None)
                parse_s += t_parse.seconds
                if batch is None:
                    break
                x, y = batch
                clf.partial_fit(x, y, classes=np.array([0.0, 1.0]))
                n += y.size
    m = StreamingBinaryMetrics()
    with timer() as t_pred:
        for x, y in iter_libsvm_batches(test_svm, batch_size, bits, reuse=True):
            m.update(clf.predict_proba(x)[:, 1], y)
    r = m.result()
    return {"peer": "sklearn_sgd", "bits": bits, "batch_size": batch_size, "eta0": eta0,
            "alpha": alpha, "epochs": epochs, "parser": "numba" if njit else "load_svmlight_file",
            "train_examples": n, "train_seconds": t_train.seconds, "parse_seconds": parse_s,
            "jit_seconds": jit, "examples_per_sec": n / t_train.seconds,
            "predict_seconds": t_pred.seconds, "test_examples": r["examples"],
            "logloss": r["logloss"], "auc": r["auc"]}


# ------------------------------------------------------------------------------ validation
def make_synthetic_libsvm(path: str | os.PathLike[str], lines: int, *, fields: int = 39,
                          vocab: int = 10_000, seed: int = 0, weight_seed: int = 123) -> float:
    """Criteo-like file: one ``field*vocab+value+1:1`` per field, skewed values, labels drawn
    from a planted logistic model (same ``weight_seed`` = same model). Returns positive rate."""
    w = np.random.default_rng(weight_seed).normal(0.0, 0.25, (fields, vocab))
    rng = np.random.default_rng(seed)
    pos = 0
    with open(path, "w") as f:
        for s in range(0, lines, 50_000):
            m = min(50_000, lines - s)
            v = np.minimum((vocab * rng.random((m, fields)) ** 3).astype(np.int64), vocab - 1)
            logit = w[np.arange(fields), v].sum(1) - 1.0
            y = (rng.random(m) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
            pos += int(y.sum())
            idx = (np.arange(fields) * vocab + v + 1).tolist()
            f.write("\n".join(f"{lab} " + " ".join(f"{i}:1" for i in row)
                              for lab, row in zip(y.tolist(), idx)) + "\n")
    return pos / max(lines, 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate a planted-logistic libsvm file and run both peers on it."""
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--test-lines", type=int, default=50_000)
    ap.add_argument("--workdir", default=None, help="keep generated files here")
    ap.add_argument("--sweep", action="store_true", help="sklearn batch_size x eta0 grid")
    args = ap.parse_args(argv)
    if args.quick:
        args.lines, args.test_lines = min(args.lines, 20_000), min(args.test_lines, 5_000)
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, test = work / "train.svm", work / "test.svm"
        make_synthetic_libsvm(train, args.lines, seed=0)
        make_synthetic_libsvm(test, args.test_lines, seed=1)
        prep = prepare_vw(train, test, work)
        result: dict[str, Any] = {"lines": args.lines, "test_lines": args.test_lines,
                                  "vw_prepare_seconds": prep["prepare_seconds"],
                                  "vw_prepare_lines_per_sec": prep["prepare_lines_per_sec"]}
        for key, val in run_vw(prep["train_vw"], prep["test_vw"]).items():
            result[f"vw_{key}"] = val
        for key, val in run_sklearn(train, test).items():
            result[f"sklearn_{key}"] = val
        if args.sweep:
            for bs in (10_000, 50_000, 100_000, 200_000):
                for eta0 in (0.005, 0.01, 0.02, 0.05):
                    r = run_sklearn(train, test, batch_size=bs, eta0=eta0)
                    print(f"sweep batch={bs} eta0={eta0}: {r['examples_per_sec']:.0f} rows/s "
                          f"logloss={r['logloss']:.4f} auc={r['auc']:.4f}", flush=True)
        result["ratio_sklearn_vs_vw"] = (result["sklearn_examples_per_sec"]
                                         / result["vw_examples_per_sec"])
        result["machine"] = machine_info()
    emit("peers", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
