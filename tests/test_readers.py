"""Readers: exact parsing vs a slow Python reference, exact error locations, sharding."""
from __future__ import annotations

import gzip
import math
import re

import numpy as np
import pytest

from jaxps.data import parse as P
from jaxps.data.batch import Batch, concat
from jaxps.hashing import field_id, field_id_scalar, mix64, mix64_scalar
from jaxps.data.readers import (DataError, ReaderConfig, ReadStats, batches, prefetch,
                                read_examples)

U64 = (1 << 64) - 1
FLOAT_RE = re.compile(rb"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NONFINITE_RE = re.compile(rb"[+-]?(nan|inf|infinity)", re.I)


# ---------------------------------------------------------------- slow reference parsers
def _ref_float(tok: bytes) -> tuple[float, int]:
    if NONFINITE_RE.fullmatch(tok):
        return 0.0, P.NONFINITE
    if not FLOAT_RE.fullmatch(tok):
        return 0.0, P.BAD_VALUE
    v = float(tok)
    with np.errstate(over="ignore"):
        if not math.isfinite(v) or not np.isfinite(np.float32(v)):
            return 0.0, P.NONFINITE
    return v, P.OK


def ref_libsvm_line(raw: bytes, max_nnz: int, max_index: int | None):
    """None for a blank line, else (code, label, [(idx, val)])."""
    toks = raw.split(b"#", 1)[0].split()
    if not toks:
        return None
    lab, code = _ref_float(toks[0])
    if code or lab not in (-1.0, 0.0, 1.0):
        return P.BAD_LABEL, 0.0, []
    feats = []
    for tok in toks[1:]:
        if b":" not in tok:
            return P.MISSING_COLON, 0.0, []
        i, v = tok.split(b":", 1)
        if not i.isdigit():
            return P.BAD_INDEX, 0.0, []
        idx = int(i)
        if idx > U64 or (max_index is not None and idx >= max_index):
            return P.INDEX_RANGE, 0.0, []
        val, code = _ref_float(v)
        if code:
            return code, 0.0, []
        if len(feats) >= max_nnz:
            return P.TOO_MANY, 0.0, []
        feats.append((idx, np.float32(val)))
    return P.OK, float(lab == 1.0), feats


def ref_criteo_line(raw: bytes):
    """None for a blank line, else (code, label, [(slot, id)], dense[13])."""
    line = raw[:-1] if raw.endswith(b"\r") else raw
    if not line:
        return None
    cols = line.split(b"\t")
    if len(cols) != 40:
        return P.COLUMNS, 0.0, [], None
    if cols[0] not in (b"0", b"1"):
        return P.BAD_LABEL, 0.0, [], None
    feats, dense = [], np.zeros(13, np.float32)
    for f in range(39):
        c = cols[1 + f]
        if not c:
            continue
        if f < 13:
            if not re.fullmatch(rb"-?\d+", c) or abs(int(c)) > (1 << 63) - 1:
                return P.BAD_INT, 0.0, [], None
            x = int(c)
            b = x & U64 if x <= 2 else P.BUCKET_TAG | int(math.floor(math.log(x) ** 2))
            dense[f] = np.float32(math.log1p(max(x, 0)))
        else:
            if len(c) > 16 or not re.fullmatch(rb"[0-9a-fA-F]+", c):
                return P.BAD_HEX, 0.0, [], None
            b = int(c, 16)
        feats.append((f, int(field_id(f, b))))
    return P.OK, float(cols[0] == b"1"), feats, dense


def ref_read(data: bytes, fmt: str, max_nnz: int = 39, max_index: int | None = None):
    """Expected (labels, ids, vals, mask, dense, [(line_no, code)]) of a whole file."""
    labels, ids, vals, mask, dense, bad = [], [], [], [], [], []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for no, raw in enumerate(lines, 1):
        r = ref_libsvm_line(raw, max_nnz, max_index) if fmt == "libsvm" else ref_criteo_line(raw)
        if r is None:
            continue
        if r[0]:
            bad.append((no, r[0]))
            continue
        row_i = np.zeros(max_nnz, np.uint64)
        row_v = np.zeros(max_nnz, np.float32)
        row_m = np.zeros(max_nnz, bool)
        for k, (a, b) in enumerate(r[2]):
            if fmt == "libsvm":
                row_i[k], row_v[k], row_m[k] = a, b, True
            else:
                row_i[a], row_v[a], row_m[a] = b, 1.0, True
        labels.append(r[1])
        ids.append(row_i)
        vals.append(row_v)
        mask.append(row_m)
        if fmt == "criteo":
            dense.append(r[3])
    n = len(labels)
    return (np.array(labels, np.float32), np.array(ids, np.uint64).reshape(n, max_nnz),
            np.array(vals, np.float32).reshape(n, max_nnz), np.array(mask, bool).reshape(n, max_nnz),
            np.array(dense, np.float32).reshape(n, 13) if fmt == "criteo" else None, bad)


# ---------------------------------------------------------------- random valid files
def _rand_value(rng: np.random.Generator) -> str:
    k = rng.integers(8)
    if k == 0:
        return str(int(rng.integers(-1000, 1000)))
    if k == 1:
        return repr(float(np.float32(rng.normal())))
    if k == 2:
        return f"{rng.normal() * 10.0 ** rng.integers(-30, 30):.7e}"
    if k == 3:
        return f"{rng.random():.4f}".lstrip("0")  # ".1234"
    if k == 4:
        return f"{int(rng.integers(0, 100))}."
    if k == 5:
        return f"{rng.normal():+.9g}".replace("e", "E")
    return "1"


def _rand_index(rng: np.random.Generator) -> str:
    k = rng.integers(5)
    if k == 0:
        return str(U64 - int(rng.integers(0, 1000)))
    if k == 1:
        return str(int(rng.integers(0, 1 << 62)) * 3)
    if k == 2:
        return "000" + str(int(rng.integers(0, 50)))
    return str(int(rng.integers(0, 100_000)))


def random_libsvm(rng: np.random.Generator, n: int, max_nnz: int = 12) -> bytes:
    out = []
    for _ in range(n):
        k = rng.integers(8)
        if k == 0:
            out.append(rng.choice(["", "   ", "# only a comment", "\t"]))
            continue
        lab = rng.choice(["1", "0", "-1", "+1", "1.0", "0.0", "-1e0", "1.000"])
        feats = [f"{_rand_index(rng)}:{_rand_value(rng)}" for _ in range(rng.integers(0, max_nnz + 1))]
        sep = rng.choice([" ", "\t", "  "])
        line = lab + "".join(sep + f for f in feats)
        if k == 1:
            line += " # comment 1:2 x"
        if k == 2:
            line += "\r"
        out.append(line)
    text = "\n".join(out)
    if rng.random() < 0.5:
        text += "\n"
    return text.encode()


def random_criteo(rng: np.random.Generator, n: int) -> bytes:
    out = []
    for _ in range(n):
        if rng.random() < 0.05:
            out.append("")
            continue
        cols = [str(rng.integers(2))]
        for _f in range(13):
            r = rng.random()
            cols.append("" if r < 0.2 else str(int(rng.integers(-3, 3) if r < 0.5 else rng.integers(0, 10**6))))
        for _j in range(26):
            r = rng.random()
            if r < 0.2:
                cols.append("")
            elif r < 0.9:
                cols.append(f"{int(rng.integers(0, 1 << 32)):08x}")
            else:
                cols.append(f"{int(rng.integers(0, 1 << 63)):X}"[: int(rng.integers(1, 17))])
        out.append("\t".join(cols) + ("\r" if rng.random() < 0.1 else ""))
    return ("\n".join(out) + ("\n" if rng.random() < 0.5 else "")).encode()


def read_all(paths, cfg: ReaderConfig, **kw) -> Batch:
    chunks = list(read_examples(paths, cfg, **kw))
    if not chunks:
        d = cfg.max_nnz
        return Batch(np.zeros(0, np.float32), np.zeros((0, d), np.uint64), np.zeros((0, d), np.float32),
                     np.zeros((0, d), bool), np.zeros(0, np.float32))
    return concat(chunks)


def assert_matches(b: Batch, ref) -> None:
    labels, ids, vals, mask, dense, _ = ref
    np.testing.assert_array_equal(b.labels, labels)
    np.testing.assert_array_equal(b.ids, ids)
    np.testing.assert_array_equal(b.vals, vals)
    np.testing.assert_array_equal(b.mask, mask)
    np.testing.assert_array_equal(b.weights, np.ones(len(labels), np.float32))
    if dense is None:
        assert b.dense is None
    else:
        np.testing.assert_allclose(b.dense, dense, rtol=1e-6)


# ---------------------------------------------------------------- hashing
def test_hash_numpy_and_numba_agree():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, U64, 200, dtype=np.uint64, endpoint=True),
                        np.array([0, 1, U64], np.uint64)])
    np.testing.assert_array_equal(mix64(x), [mix64_scalar(v) for v in x])
    for f in (0, 5, 38):
        np.testing.assert_array_equal(field_id(f, x), [field_id_scalar(f, v) for v in x])
    assert mix64(int(x[0])) == mix64(x[:1])[0]
    assert len(set(field_id(np.arange(39), 7).tolist())) == 39


# ---------------------------------------------------------------- valid files vs reference
@pytest.mark.parametrize("chunk_bytes", [1, 17, 300, 8 << 20])
def test_libsvm_matches_reference(tmp_path, chunk_bytes):
    rng = np.random.default_rng(chunk_bytes)
    data = random_libsvm(rng, 400)
    path = tmp_path / "a.svm"
    path.write_bytes(data)
    cfg = ReaderConfig(max_nnz=12, chunk_bytes=chunk_bytes)
    ref = ref_read(data, "libsvm", 12)
    assert ref[5] == []
    assert_matches(read_all(str(path), cfg), ref)


@pytest.mark.parametrize("chunk_bytes", [1, 200, 8 << 20])
def test_criteo_matches_reference(tmp_path, chunk_bytes):
    rng = np.random.default_rng(chunk_bytes + 1)
    data = random_criteo(rng, 300)
    path = tmp_path / "a.tsv"
    path.write_bytes(data)
    ref = ref_read(data, "criteo", 40)
    assert ref[5] == []
    b = read_all(str(path), ReaderConfig(format="criteo", max_nnz=40, chunk_bytes=chunk_bytes))
    assert_matches(b, ref)
    assert b.dense.shape == (len(ref[0]), 13)


def test_gzip_and_last_line_without_newline(tmp_path):
    data = b"1 1:1\n0 2:2\n\n1 18446744073709551615:0.5"
    (tmp_path / "a.svm.gz").write_bytes(gzip.compress(data))
    b = read_all(str(tmp_path / "a.svm.gz"), ReaderConfig(max_nnz=2, chunk_bytes=4))
    assert_matches(b, ref_read(data, "libsvm", 2))
    assert b.ids[2, 0] == U64


def test_max_index_bounds(tmp_path):
    (tmp_path / "m.svm").write_bytes(b"1 18446744073709551615:1 9:1\n")
    b = read_all(str(tmp_path / "m.svm"), ReaderConfig(max_nnz=2, max_index=1 << 64))
    assert b.ids[0, 0] == U64
    with pytest.raises(DataError, match="m.svm:1: index out of range"):
        read_all(str(tmp_path / "m.svm"), ReaderConfig(max_nnz=2, max_index=U64))


def test_long_floats_close_to_python(tmp_path):
    vals = ["3.14159265358979323846264338", "1234567890123456789012e-30", "0.1e-40",
            "123456789012345678901234567890", "7e-46", "3.4028234e38"]
    data = ("1 " + " ".join(f"{i}:{v}" for i, v in enumerate(vals)) + "\n").encode()
    (tmp_path / "f.svm").write_bytes(data)
    b = read_all(str(tmp_path / "f.svm"), ReaderConfig(max_nnz=8))
    np.testing.assert_allclose(b.vals[0, :6], np.float32([float(v) for v in vals]), rtol=1e-6)


# ---------------------------------------------------------------- errors
GOOD = "1 3:1 4:0.5\n0 5:2\n"
LIBSVM_BAD = [
    ("2 3:1", "bad label"),
    ("x 3:1", "bad label"),
    ("nan 3:1", "bad label"),
    ("1 3:1 abc", "missing ':'"),
    ("1 3:1 7", "missing ':'"),
    ("1 a3:1", "bad feature index"),
    ("1 :1", "bad feature index"),
    ("1 -3:1", "bad feature index"),
    ("1 3:x", "bad feature value"),
    ("1 3:", "bad feature value"),
    ("1 3:1e", "bad feature value"),
    ("1 3:1:2", "bad feature value"),
    ("1 3:nan", "non-finite value"),
    ("1 3:NaN", "non-finite value"),
    ("1 3:inf", "non-finite value"),
    ("1 3:-Infinity", "non-finite value"),
    ("1 3:1e999", "non-finite value"),
    ("1 3:1e39", "non-finite value"),
    ("1 18446744073709551616:1", "index out of range"),
    ("1 99999999999999999999999:1", "index out of range"),
    ("1 1000:1", "index out of range"),  # max_index=1000
    ("1 " + " ".join(f"{i}:1" for i in range(5)), "too many features"),  # max_nnz=4
]


def _check_error(tmp_path, text: str, bad_line_no: int, reason: str, bad_text: str, **cfg):
    path = tmp_path / ("f.tsv" if cfg.get("format") == "criteo" else "f.svm")
    path.write_bytes(text.encode())
    for chunk_bytes in (3, 64, 8 << 20):
        c = ReaderConfig(chunk_bytes=chunk_bytes, **cfg)
        got = []
        with pytest.raises(DataError) as ei:
            for b in read_examples(str(path), c):
                got.append(b)
        assert str(ei.value) == f"{path}:{bad_line_no}: {reason}: {bad_text[:120]}"
        assert (ei.value.line, ei.value.reason) == (bad_line_no, reason)
        # nothing before the bad line is lost
        expected_rows = sum(1 for ln in text.split("\n")[:bad_line_no - 1] if ln.strip())
        assert sum(b.size for b in got) == expected_rows
        # skipping: counted by reason, all good lines returned
        stats = ReadStats()
        c = ReaderConfig(chunk_bytes=chunk_bytes, skip_bad_lines=True, **cfg)
        n = sum(b.size for b in read_examples(str(path), c, stats=stats))
        assert stats.skipped == 1 and stats.skipped_by_reason == {reason: 1}
        assert n == stats.examples == sum(1 for ln in text.split("\n") if ln.strip()) - 1
        assert stats.first_skipped == [f"{path}:{bad_line_no}: {reason}: {bad_text[:120]}"]
        assert reason in stats.summary()


@pytest.mark.parametrize("bad,reason", LIBSVM_BAD)
def test_libsvm_errors(tmp_path, bad, reason):
    text = GOOD * 7 + "\n" + bad + "\r\n" + GOOD  # bad line is line 16 (after a blank)
    _check_error(tmp_path, text, 16, reason, bad, max_nnz=4, max_index=1000)


def _criteo_row(label="1", ints=None, cats=None) -> list[str]:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{j:08x}" for j in range(26)]
    return [label] + ints + cats


CRITEO_BAD = [
    ("\t".join(_criteo_row()[:-1]), "wrong column count"),
    ("\t".join(_criteo_row() + ["x"]), "wrong column count"),
    ("\t".join(_criteo_row(label="2")), "bad label"),
    ("\t".join(_criteo_row(label="")), "bad label"),
    ("\t".join(_criteo_row(ints=["1.5"] + ["1"] * 12)), "bad integer field"),
    ("\t".join(_criteo_row(ints=["-"] + ["1"] * 12)), "bad integer field"),
    ("\t".join(_criteo_row(ints=["99999999999999999999"] + ["1"] * 12)), "bad integer field"),
    ("\t".join(_criteo_row(cats=["xyz"] * 26)), "bad categorical (hex)"),
    ("\t".join(_criteo_row(cats=["1" * 17] * 26)), "bad categorical (hex)"),
]


@pytest.mark.parametrize("bad,reason", CRITEO_BAD)
def test_criteo_errors(tmp_path, bad, reason):
    good = "\t".join(_criteo_row()) + "\n" + "\t".join(_criteo_row("0", [""] * 13, [""] * 26)) + "\n"
    text = good * 5 + bad + "\n" + good
    _check_error(tmp_path, text, 11, reason, bad, format="criteo")


def test_error_in_byte_range_shard(tmp_path):
    lines = [f"1 {i}:1" for i in range(300)]
    lines[217] = "1 217:oops"
    path = tmp_path / "f.svm"
    path.write_bytes(("\n".join(lines) + "\n").encode())
    for count in (2, 3, 4):
        errors = []
        for p in range(count):
            try:
                for _ in read_examples(str(path), ReaderConfig(chunk_bytes=50), process_index=p,
                                       process_count=count):
                    pass
            except DataError as e:
                errors.append(str(e))
        assert errors == [f"{path}:218: bad feature value: 1 217:oops"]


def test_error_in_gzip_line_shard(tmp_path):
    lines = [f"1 {i}:1" for i in range(50)]
    lines[33] = "1 33:oops"
    path = tmp_path / "f.svm.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    errors, rows = [], 0
    for p in range(3):
        try:
            rows += sum(b.size for b in read_examples(str(path), ReaderConfig(chunk_bytes=30),
                                                      process_index=p, process_count=3))
        except DataError as e:
            errors.append(str(e))
    assert errors == [f"{path}:34: bad feature value: 1 33:oops"]


def test_long_line_text_truncated(tmp_path):
    bad = "1 " + " ".join(f"{i}:1" for i in range(100)) + " 5:x"
    _check_error(tmp_path, "1 1:1\n" + bad + "\n", 2, "bad feature value", bad, max_nnz=200)


# ---------------------------------------------------------------- sharding
def _numbered_file(path, n: int, start: int) -> None:
    path.write_bytes("".join(f"{i % 2} {start + i}:1 {i % 7}:2\n" if i % 10 else "\n"
                             for i in range(n)).encode())


@pytest.mark.parametrize("nfiles", [1, 3])
@pytest.mark.parametrize("gz", [False, True])
def test_sharding_covers_every_line_once(tmp_path, nfiles, gz):
    paths, expected = [], []
    for k in range(nfiles):
        p = tmp_path / f"part{k}.svm"
        _numbered_file(p, 97 + 13 * k, 1000 * (k + 1))
        if gz:
            p2 = tmp_path / f"part{k}.svm.gz"
            p2.write_bytes(gzip.compress(p.read_bytes()))
            p = p2
        paths.append(str(p))
        expected += [1000 * (k + 1) + i for i in range(97 + 13 * k) if i % 10]
    for count in (1, 2, 3, 4):
        for chunk_bytes in (8, 1 << 20):
            seen, lines = [], 0
            for p in range(count):
                stats = ReadStats()
                b = read_all(paths, ReaderConfig(max_nnz=2, chunk_bytes=chunk_bytes),
                             process_index=p, process_count=count, stats=stats)
                seen += b.ids[:, 0].tolist()
                lines += stats.lines
            assert sorted(seen) == sorted(expected)
            assert lines == sum(97 + 13 * k for k in range(nfiles))


def test_byte_ranges_split_one_file_evenly(tmp_path):
    p = tmp_path / "a.svm"
    _numbered_file(p, 1000, 0)
    sizes = [read_all(str(p), ReaderConfig(max_nnz=2), process_index=i, process_count=4).size
             for i in range(4)]
    assert sum(sizes) == 900 and min(sizes) > 200


# ---------------------------------------------------------------- batches, config, prefetch
def test_batches_fixed_shapes_and_padding(tmp_path):
    p = tmp_path / "a.svm"
    _numbered_file(p, 110, 0)  # 99 examples
    cfg = ReaderConfig(max_nnz=2, chunk_bytes=40)
    out = list(batches(str(p), cfg, 16))
    assert len(out) == 7
    for b in out:
        assert b.labels.shape == (16,) and b.ids.shape == (16, 2) and b.weights.shape == (16,)
    assert [b.num_real for b in out] == [16] * 6 + [3]
    last = out[-1]
    assert np.all(last.weights[3:] == 0) and not last.mask[3:].any() and np.all(last.ids[3:] == 0)
    ids = np.concatenate([b.ids[b.weights > 0, 0] for b in out])
    np.testing.assert_array_equal(ids, [i for i in range(110) if i % 10])
    assert len(list(batches(str(p), cfg, 16, drop_remainder=True))) == 6
    stats = ReadStats()
    two = list(batches(str(p), cfg, 16, epochs=2, stats=stats))
    assert len(two) == 13 and sum(b.num_real for b in two) == 198 and stats.examples == 198
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(str(p), cfg, 0))


@pytest.mark.parametrize("kw,name", [
    ({"format": "csv"}, "format"), ({"max_nnz": 0}, "max_nnz"), ({"max_nnz": 2.5}, "max_nnz"),
    ({"format": "criteo", "max_nnz": 20}, "max_nnz"), ({"skip_bad_lines": "yes"}, "skip_bad_lines"),
    ({"max_index": 0}, "max_index"), ({"chunk_bytes": 0}, "chunk_bytes"),
])
def test_config_validation(kw, name):
    with pytest.raises(ValueError, match=f"ReaderConfig.{name}"):
        ReaderConfig(**kw)


def test_process_index_validated(tmp_path):
    p = tmp_path / "a.svm"
    p.write_bytes(b"1 1:1\n")
    with pytest.raises(ValueError, match="process_index"):
        list(read_examples(str(p), ReaderConfig(), process_index=2, process_count=2))


def test_prefetch_order_errors_and_close(tmp_path):
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def gen():
        yield 1
        yield 2
        raise RuntimeError("boom")

    got = []
    with pytest.raises(RuntimeError, match="boom"):
        for x in prefetch(gen()):
            got.append(x)
    assert got == [1, 2]
    it = prefetch(iter(range(10**9)), depth=2)
    assert next(it) == 0
    it.close()  # must not hang
    p = tmp_path / "a.svm"
    _numbered_file(p, 110, 0)
    cfg = ReaderConfig(max_nnz=2, chunk_bytes=40)
    a = [b.ids for b in prefetch(batches(str(p), cfg, 16))]
    b = [b.ids for b in batches(str(p), cfg, 16)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- lines_upper_bound
def test_lines_upper_bound_counts_whole_gz_files_decompressed(tmp_path):
    from jaxps.data.readers import lines_upper_bound
    paths = []
    for k in range(2):
        p = tmp_path / f"part{k}.svm.gz"
        with gzip.open(p, "wb") as f:  # very compressible: few newline bytes compressed
            f.write(b"1 3:1\n" * 20_000)
        paths.append(str(p))
    # two files over two processes: each process gets one whole file (step 1, gzip)
    assert [lines_upper_bound(paths, i, 2) for i in range(2)] == [20_000, 20_000]
    assert lines_upper_bound(paths, 0, 1) == 40_000


def test_lines_upper_bounds_counts_each_gz_file_once(tmp_path, monkeypatch):
    import jaxps.data.readers as R
    p = tmp_path / "a.svm.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"1 3:1\n" * 100 + b"0 4:1")  # last line without newline counts too
    calls = []
    orig = R._count_lines_gz
    monkeypatch.setattr(R, "_count_lines_gz", lambda path: calls.append(path) or orig(path))
    assert R.lines_upper_bounds([str(p)], 4) == [26, 25, 25, 25]
    assert calls == [str(p)]


def test_count_newlines_reads_only_its_range(tmp_path, monkeypatch):
    import jaxps.data.readers as R
    data = b"".join(b"x" * (i % 7) + b"\n" for i in range(500))
    p = tmp_path / "a.svm"
    p.write_bytes(data)
    for s, e in [(0, 0), (0, len(data)), (10, 11), (123, 1777), (len(data) - 3, len(data))]:
        assert R._count_newlines(str(p), s, e) == data[s:e].count(b"\n")
    # byte ranges: the total read over all processes is the file once, not P times
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n=-1):
            b = self.f.read(n)
            read.append(len(b))
            return b

    # shadow open in the readers module only
    monkeypatch.setattr(R, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    bounds = R.lines_upper_bounds([str(p)], 8)
    monkeypatch.undo()
    assert sum(read) <= len(data) + 8  # each range once, plus one last byte per range
    assert sum(bounds) <= 500 + 8 and all(b >= 1 for b in bounds)
