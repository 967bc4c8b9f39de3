"""numba kernels that parse a buffer of whole text lines into fixed-width feature arrays.

Why numba: a Python or numpy tokenizer tops out far below the device step's appetite;
these byte loops run at ~1-2 ns/byte and release the GIL, so a reader thread overlaps
the training step. Kernels touch only arrays and scalars; error text is built in Python
(readers.py) from the (code, line index) they report.

Formats:
- libsvm/svmlight: ``label idx:val ...  # comment`` (label in {-1,0,1}, -1 -> 0; idx a
  uint64 decimal; val a finite float).
- Criteo TSV: ``label \\t I1..I13 \\t C1..C26``; slot f holds field f; integer fields get
  the Kaggle-winner bucket and a log1p dense value, categoricals are 1-16 hex digits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from jaxps.hashing import field_id_scalar

# Error codes (index into REASONS). 0 = ok.
OK = 0
BAD_LABEL = 1
BAD_INDEX = 2
MISSING_COLON = 3
BAD_VALUE = 4
NONFINITE = 5
INDEX_RANGE = 6
TOO_MANY = 7
COLUMNS = 8
BAD_HEX = 9
BAD_INT = 10
REASONS = (
    "ok", "bad label", "bad feature index", "missing ':'", "bad feature value",
    "non-finite value", "index out of range", "too many features", "wrong column count",
    "bad categorical (hex)", "bad integer field",
)

CRITEO_INT_FIELDS = 13
CRITEO_CAT_FIELDS = 26
CRITEO_FIELDS = CRITEO_INT_FIELDS + CRITEO_CAT_FIELDS
# Kaggle-winner buckets for x > 2 are tagged so they never meet the raw small values
# (the winners prefixed small values with "SP" for the same reason).
BUCKET_TAG = 1 << 62

_POW10 = np.array([10.0 ** k for k in range(23)])
_U64_LIM = np.uint64(1844674407370955161)  # (2**64 - 1) // 10
_I64_LIM = 922337203685477580  # (2**63 - 1) // 10
_TEN = np.uint64(10)
_TAG = np.uint64(BUCKET_TAG)
_NL = 10


_WS = np.zeros(256, np.bool_)
_WS[[32, 9, 13, 11, 12]] = True
_STOP = _WS.copy()
_STOP[[10, 35]] = True  # newline, '#'


@njit(cache=True, nogil=True)
def _match_word(buf, i, end, word) -> bool:
    """Case-insensitive match of buf[i:end] against the ASCII lowercase codes in word."""
    if end - i != len(word):
        return False
    for k in range(len(word)):
        if (buf[i + k] | 0x20) != word[k]:
            return False
    return True


_NAN = np.array([ord(c) for c in "nan"], np.uint8)
_INF = np.array([ord(c) for c in "inf"], np.uint8)
_INFINITY = np.array([ord(c) for c in "infinity"], np.uint8)


@njit(cache=True, nogil=True)
def _token_end(buf, i, n):
    while i < n and not _STOP[buf[i]]:
        i += 1
    return i


@njit(cache=True, nogil=True, inline="always")
def _digits(buf, i, n, mant, ndig, exp10, fraction):
    """Accumulate a run of decimal digits into (mant, ndig significant digits, exp10).
    Past 19 significant digits, integer digits only scale (exp10 += 1) and fraction
    digits are dropped; fraction digits that are kept shift exp10 down."""
    any_digit = False
    while i < n:
        d = buf[i] - 48
        if d < 0 or d > 9:
            break
        any_digit = True
        if ndig < 19:
            mant = mant * _TEN + np.uint64(d)
            if mant != 0:
                ndig += 1
            if fraction:
                exp10 -= 1
        elif not fraction:
            exp10 += 1
        i += 1
    return i, mant, ndig, exp10, any_digit


@njit(cache=True, nogil=True, inline="always")
def _parse_float(buf, i, n):
    """Parse a decimal float token starting at i -> (float64 value, code, token end).

    The token must end at a stop byte (whitespace, newline, '#') or at n. Up to 19
    significant digits with |exp10| <= 22 are correctly rounded (Clinger's fast path),
    so a float32 cast equals np.float32(float(text)); longer inputs are within a few ulp.
    """
    if i >= n or _STOP[buf[i]]:
        return 0.0, BAD_VALUE, i
    neg = False
    c = buf[i]
    if c == 43 or c == 45:
        neg = c == 45
        i += 1
        if i >= n:
            return 0.0, BAD_VALUE, i
    c = buf[i] | 0x20
    if c == 110 or c == 105:  # 'n' / 'i'
        e = _token_end(buf, i, n)
        if _match_word(buf, i, e, _NAN) or _match_word(buf, i, e, _INF) or \
                _match_word(buf, i, e, _INFINITY):
            return 0.0, NONFINITE, e
        return 0.0, BAD_VALUE, e
    i, mant, ndig, exp10, any_digit = _digits(buf, i, n, np.uint64(0), 0, 0, False)
    if i < n and buf[i] == 46:  # '.'
        i, mant, ndig, exp10, any_frac = _digits(buf, i + 1, n, mant, ndig, exp10, True)
        any_digit = any_digit or any_frac
    if not any_digit:
        return 0.0, BAD_VALUE, _token_end(buf, i, n)
    if i < n and (buf[i] | 0x20) == 101:  # 'e'
        i += 1
        eneg = False
        if i < n and (buf[i] == 43 or buf[i] == 45):
            eneg = buf[i] == 45
            i += 1
        e = 0
        edig = False
        while i < n:
            d = buf[i] - 48
            if d < 0 or d > 9:
                break
            edig = True
            if e < 100000:
                e = e * 10 + d
            i += 1
        if not edig:
            return 0.0, BAD_VALUE, _token_end(buf, i, n)
        exp10 += -e if eneg else e
    if i < n and not _STOP[buf[i]]:
        return 0.0, BAD_VALUE, _token_end(buf, i, n)
    if mant == 0:
        v = 0.0
    elif exp10 == 0:
        v = float(mant)
    elif mant <= np.uint64(1 << 53) and -22 <= exp10 <= 22:
        if exp10 > 0:
            v = float(mant) * _POW10[exp10]
        else:
            v = float(mant) / _POW10[-exp10]
    elif exp10 > 400:
        v = math.inf
    elif exp10 < -400:
        v = 0.0
    else:
        v = float(mant) * 10.0 ** exp10
    if neg:
        v = -v
    if not math.isfinite(v) or not np.isfinite(np.float32(v)):
        return 0.0, NONFINITE, i
    return v, OK, i


@njit(cache=True, nogil=True)
def _bad_feature(buf, s, n):
    """Classify a token at s whose index part did not parse -> (code, token end)."""
    e = _token_end(buf, s, n)
    for j in range(s, e):
        if buf[j] == 58:
            return BAD_INDEX, e
    return MISSING_COLON, e


@njit(cache=True, nogil=True)
def parse_libsvm(buf, pos, line, max_nnz, max_index, has_max_index, skip_bad,
                 labels, ids, vals, mask, row_line, line_err):
    """Parse libsvm lines from buf[pos:] into rows 0.. of the output arrays.

    Stops at the end of buf, when the row capacity (labels.size) is full, or (unless
    skip_bad) at the first bad line. line_err[line] gets each line's error code.
    Returns (rows, next_pos, next_line, err_line); err_line = -1 when none stopped us,
    else next_pos is that line's first byte.
    """
    n = buf.size
    cap = labels.size
    row = 0
    while pos < n and row < cap:
        start = pos
        i = pos
        while i < n and _WS[buf[i]]:
            i += 1
        if i >= n or buf[i] == _NL or buf[i] == 35:  # blank or comment-only line
            while i < n and buf[i] != _NL:
                i += 1
            pos = i + 1
            line += 1
            continue
        lab, code, i = _parse_float(buf, i, n)
        if code != OK or not (lab == 1.0 or lab == 0.0 or lab == -1.0):
            code = BAD_LABEL
        k = 0
        while code == OK:
            while i < n and _WS[buf[i]]:
                i += 1
            if i >= n or buf[i] == _NL or buf[i] == 35:
                break
            s = i
            idx = np.uint64(0)
            over = False
            while i < n:
                d = buf[i] - 48
                if d < 0 or d > 9:
                    break
                if idx > _U64_LIM or (idx == _U64_LIM and d > 5):
                    over = True
                idx = idx * _TEN + np.uint64(d)
                i += 1
            if i == s or i >= n or buf[i] != 58:
                code, i = _bad_feature(buf, s, n)
                break
            if over or (has_max_index and idx >= max_index):
                code = INDEX_RANGE
                break
            i += 1
            d = buf[i] - 48 if i < n else -1
            if 0 <= d <= 9 and (i + 1 >= n or _STOP[buf[i + 1]]):  # fast path: "idx:1"
                v = float(d)
                i += 1
            else:
                v, code, i = _parse_float(buf, i, n)
                if code != OK:
                    break
            if k >= max_nnz:
                code = TOO_MANY
                break
            ids[row, k] = idx
            vals[row, k] = np.float32(v)
            mask[row, k] = True
            k += 1
        while i < n and buf[i] != _NL:
            i += 1
        if code != OK:
            for j in range(k):
                ids[row, j] = 0
                vals[row, j] = 0.0
                mask[row, j] = False
            line_err[line] = code
            if not skip_bad:
                return row, start, line, line
        else:
            labels[row] = 1.0 if lab == 1.0 else 0.0
            row_line[row] = line
            row += 1
        pos = i + 1
        line += 1
    return row, pos, line, -1


@njit(cache=True, nogil=True)
def _criteo_line(buf, s, e, row, ids, vals, mask, dense, labels):
    """Parse one non-empty Criteo line buf[s:e] (no newline/CR) into `row` -> code."""
    tabs = 0
    for i in range(s, e):
        if buf[i] == 9:
            tabs += 1
    if tabs != CRITEO_FIELDS:
        return COLUMNS
    i = s
    if i + 1 >= e or buf[i + 1] != 9 or (buf[i] != 48 and buf[i] != 49):
        return BAD_LABEL
    lab = buf[i] == 49
    i += 2
    for f in range(CRITEO_FIELDS):
        t = i
        while t < e and buf[t] != 9:
            t += 1
        if t > i:
            if f < CRITEO_INT_FIELDS:
                neg = buf[i] == 45
                j = i + 1 if neg else i
                if j >= t:
                    return BAD_INT
                x = 0
                while j < t:
                    d = buf[j] - 48
                    if d < 0 or d > 9 or x > _I64_LIM or (x == _I64_LIM and d > 7):
                        return BAD_INT
                    x = x * 10 + d
                    j += 1
                if neg:
                    x = -x
                if x <= 2:
                    b = np.uint64(x)
                    dense[row, f] = 0.0 if x <= 0 else np.float32(math.log1p(x))
                else:
                    lx = math.log(x)
                    b = _TAG | np.uint64(int(math.floor(lx * lx)))
                    dense[row, f] = np.float32(math.log1p(x))
                ids[row, f] = field_id_scalar(f, b)
            else:
                if t - i > 16:
                    return BAD_HEX
                h = np.uint64(0)
                for j in range(i, t):
                    c = buf[j]
                    if 48 <= c <= 57:
                        d = c - 48
                    elif 97 <= (c | 0x20) <= 102:
                        d = (c | 0x20) - 87
                    else:
                        return BAD_HEX
                    h = (h << np.uint64(4)) | np.uint64(d)
                ids[row, f] = field_id_scalar(f, h)
            vals[row, f] = 1.0
            mask[row, f] = True
        i = t + 1
    labels[row] = 1.0 if lab else 0.0
    return OK


@njit(cache=True, nogil=True)
def parse_criteo(buf, pos, line, skip_bad, labels, ids, vals, mask, dense, row_line,
                 line_err):
    """Criteo TSV twin of `parse_libsvm` (same stopping rules and return value)."""
    n = buf.size
    cap = labels.size
    row = 0
    while pos < n and row < cap:
        e = pos
        while e < n and buf[e] != _NL:
            e += 1
        le = e
        if le > pos and buf[le - 1] == 13:
            le -= 1
        if le > pos:
            code = _criteo_line(buf, pos, le, row, ids, vals, mask, dense, labels)
            if code != OK:
                for f in range(CRITEO_FIELDS):
                    ids[row, f] = 0
                    vals[row, f] = 0.0
                    mask[row, f] = False
                    if f < CRITEO_INT_FIELDS:
                        dense[row, f] = 0.0
                line_err[line] = code
                if not skip_bad:
                    return row, pos, line, line
            else:
                row_line[row] = line
                row += 1
        pos = e + 1
        line += 1
    return row, pos, line, -1


@dataclass
class Parsed:
    """Rows parsed from one call; `line_err` covers the whole buffer's lines."""

    labels: np.ndarray
    ids: np.ndarray
    vals: np.ndarray
    mask: np.ndarray
    dense: np.ndarray | None
    row_line: np.ndarray  # line index (within the buffer) of each row
    next_pos: int
    next_line: int
    err_line: int  # -1, or the line (within the buffer) that stopped the parse


def parse_buffer(buf: np.ndarray, fmt: str, max_nnz: int, *, pos: int = 0, line: int = 0,
                 line_err: np.ndarray, max_index: int | None = None, skip_bad: bool = False,
                 max_rows: int = 1 << 16) -> Parsed:
    """Parse buf[pos:] (uint8, whole lines) into at most `max_rows` rows.

    `line_err` (int8, at least one entry per line of buf, e.g. `new_line_err(buf)`) gets
    each line's error code; call again from `next_pos`/`next_line` until
    next_pos >= buf.size, when next_line is the number of lines in buf.
    """
    rows = max(1, min(max_rows, (int(buf.size) - pos + 1) // 2))  # a row needs >= 2 bytes
    labels = np.zeros(rows, np.float32)
    ids = np.zeros((rows, max_nnz), np.uint64)
    vals = np.zeros((rows, max_nnz), np.float32)
    mask = np.zeros((rows, max_nnz), np.bool_)
    row_line = np.zeros(rows, np.int64)
    if fmt == "libsvm":
        dense = None
        has_max = max_index is not None and max_index < (1 << 64)  # 2**64 bounds nothing
        mi = np.uint64(max_index if has_max else 0)
        r, p, ln, err = parse_libsvm(buf, pos, line, max_nnz, mi, has_max, skip_bad,
                                     labels, ids, vals, mask, row_line, line_err)
    elif fmt == "criteo":
        if max_nnz < CRITEO_FIELDS:
            raise ValueError(f"max_nnz={max_nnz} < {CRITEO_FIELDS} Criteo fields")
        dense = np.zeros((rows, CRITEO_INT_FIELDS), np.float32)
        r, p, ln, err = parse_criteo(buf, pos, line, skip_bad, labels, ids, vals, mask,
                                     dense, row_line, line_err)
        dense = dense[:r]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return Parsed(labels[:r], ids[:r], vals[:r], mask[:r], dense, row_line[:r], int(p),
                  int(ln), int(err))


def new_line_err(buf: np.ndarray) -> np.ndarray:
    """Zeroed per-line error codes for buf: one entry per byte bounds the line count
    without a counting pass (calloc'd pages stay untouched unless a line is bad)."""
    return np.zeros(int(buf.size) + 1, np.int8)


def warm_up(fmt: str = "libsvm") -> None:
    """Load the parse kernel from numba's cache (~0.1-0.3 s) with a one-line input, so a
    caller can do it on a background thread while the trainer initialises."""
    line = b"1 1:1\n" if fmt == "libsvm" else b"1" + b"\t1" * 13 + b"\ta" * 26 + b"\n"
    buf = np.frombuffer(line, np.uint8)
    parse_buffer(buf, fmt, max(CRITEO_FIELDS, 1), line_err=new_line_err(buf))
