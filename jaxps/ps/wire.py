"""The PS wire format: a small typed header and raw little-endian arrays (never pickle).

A message is

    header   magic b"JXPS" | version u8 | kind u8 | flags u16 (0) | client id u64 | seq u64
             | step i64 | group i32 | ring i32 | table length u16 | token length u16
             | meta length u32 | arrays u16
    strings  table (UTF-8) | token (bytes) | meta (UTF-8 JSON, replies only, e.g. stats)
    arrays   per array: dtype code u8 | ndim u8 | shape (ndim x u64) | zero padding to a
             multiple of 8 bytes from the message start | the raw little-endian bytes

`group` is the sender's worker group (-1: none). A pull with a group waits at the server
for the consistency model (step = the group's clock: steps it completed); a push with a
group is one step's gradients (step = that step, 1-based); a clock message says the group
completed `step` steps (seq = the number of groups, meta = {"staleness": s | null}).
`ring` is the ring version the sender routed by (-1: unchecked): a server on a newer ring
refuses pulls and pushes routed by an older one, so a stale client cannot write to a
replica set that has changed. A pull's client id is the id that client's pushes carry: the
server keeps the pull's lookups for a push of the same keys (`jaxps.ps.memo`; an id of
another client only misses, it cannot change a result).

Only the dtypes in `DTYPES` travel. `decode` checks everything (magic, version, kind,
lengths, dtype codes, shape against the bytes, zero padding, no trailing bytes) and raises
`WireError` naming what was wrong; decoded arrays are read-only views of the buffer.
Nothing here imports gRPC or JAX.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"JXPS"
VERSION = 3

# message kinds
PULL, PULL_REPLY, PUSH, PUSH_REPLY, STATS, STATS_REPLY, CREATE, CREATE_REPLY = 1, 2, 3, 4, 5, 6, 7, 8
EXPORT, EXPORT_REPLY, LOAD, LOAD_REPLY, CLOCK, CLOCK_REPLY, ADMIN, ADMIN_REPLY = 9, 10, 11, 12, 13, 14, 15, 16
KINDS = {PULL: "pull", PULL_REPLY: "pull-reply", PUSH: "push", PUSH_REPLY: "push-reply",
         STATS: "stats", STATS_REPLY: "stats-reply", CREATE: "create-table", CREATE_REPLY: "create-reply",
         EXPORT: "export", EXPORT_REPLY: "export-reply", LOAD: "load", LOAD_REPLY: "load-reply",
         CLOCK: "clock", CLOCK_REPLY: "clock-reply", ADMIN: "admin", ADMIN_REPLY: "admin-reply"}

# the allow-list: code -> little-endian dtype
DTYPES = {1: np.dtype("<u8"), 2: np.dtype("<f4"), 3: np.dtype("<i8"), 4: np.dtype("<i4"), 5: np.dtype("?")}
_CODE = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}  # 'Q' and 'L' are both uint64

MAX_TABLE = 256          # bytes of a table name
MAX_TOKEN = 4096         # bytes of a token
MAX_META = 16 << 20      # bytes of JSON meta
MAX_ARRAYS = 64
MAX_DIM = (1 << 63) - 1  # a dimension's bound (numpy's)
MAX_NDIM = 8

_HEAD = struct.Struct("<4sBBHQQqiiHHIH")
HEADER_BYTES = _HEAD.size
_DIM = struct.Struct("<Q")


class WireError(ValueError):
    """A message that is not valid wire format (says what was wrong)."""


@dataclass(frozen=True)
class Message:
    kind: int
    table: str = ""
    client_id: int = 0
    seq: int = 0
    step: int = 0
    token: bytes = b""
    arrays: tuple[np.ndarray, ...] = ()
    meta: bytes = b""
    group: int = -1
    ring: int = -1

    @property
    def request_id(self) -> tuple[int, int]:
        return (self.client_id, self.seq)

    def json(self):
        """The meta field parsed as JSON (WireError if it is not)."""
        try:
            return json.loads(self.meta.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise WireError(f"meta is not UTF-8 JSON: {e}") from None


def _pad(n: int) -> int:
    return -n % 8


def encode_parts(msg: Message) -> list:
    """The message as a list of bytes-like parts (arrays are not copied)."""
    if msg.kind not in KINDS:
        raise WireError(f"unknown message kind {msg.kind}")
    table = msg.table.encode("utf-8")
    token = msg.token.encode("utf-8") if isinstance(msg.token, str) else bytes(msg.token)
    meta = bytes(msg.meta)
    if len(table) > MAX_TABLE:
        raise WireError(f"table name is {len(table)} bytes (limit {MAX_TABLE})")
    if len(token) > MAX_TOKEN:
        raise WireError(f"token is {len(token)} bytes (limit {MAX_TOKEN})")
    if len(meta) > MAX_META:
        raise WireError(f"meta is {len(meta)} bytes (limit {MAX_META})")
    if len(msg.arrays) > MAX_ARRAYS:
        raise WireError(f"{len(msg.arrays)} arrays (limit {MAX_ARRAYS})")
    for name, v, lo, hi in (("client id", msg.client_id, 0, 2**64), ("seq", msg.seq, 0, 2**64),
                            ("step", msg.step, -2**63, 2**63), ("group", msg.group, -1, 2**31), ("ring", msg.ring, -1, 2**31)):
        if not lo <= int(v) < hi:
            raise WireError(f"{name} {v} does not fit its field")
    head = _HEAD.pack(MAGIC, VERSION, msg.kind, 0, int(msg.client_id), int(msg.seq), int(msg.step),
                      int(msg.group), int(msg.ring), len(table), len(token), len(meta), len(msg.arrays))
    parts: list = [head, table, token, meta]
    n = len(head) + len(table) + len(token) + len(meta)
    for i, a in enumerate(msg.arrays):
        a = np.asarray(a)
        code = _CODE.get((a.dtype.kind, a.dtype.itemsize))
        if code is None:
            raise WireError(f"array {i}: dtype {a.dtype} is not allowed "
                            f"(allowed: {', '.join(str(d) for d in DTYPES.values())})")
        if a.ndim > MAX_NDIM:
            raise WireError(f"array {i}: ndim {a.ndim} > {MAX_NDIM}")
        a = np.asarray(a, dtype=DTYPES[code], order="C")  # little-endian, C order, keeps 0-d
        desc = bytes([code, a.ndim]) + b"".join(_DIM.pack(d) for d in a.shape)
        n += len(desc)
        parts += [desc, b"\0" * _pad(n)]
        n += _pad(n) + a.nbytes
        parts.append(memoryview(a).cast("B") if a.nbytes else b"")
    return parts


def encode(msg: Message) -> bytes:
    return b"".join(encode_parts(msg))


@dataclass(frozen=True)
class Header:
    kind: int
    client_id: int
    seq: int
    step: int
    group: int
    ring: int
    table: str
    token: bytes
    meta: bytes
    num_arrays: int
    end: int  # offset of the first array


def decode_header(buf) -> Header:
    """The header and strings of a message (which may be only its first bytes)."""
    mv = memoryview(buf).cast("B")
    if len(mv) < HEADER_BYTES:
        raise WireError(f"truncated header: {len(mv)} bytes, need {HEADER_BYTES}")
    magic, version, kind, flags, cid, seq, step, group, ring, lt, lk, lm, na = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"unsupported version {version} (this side speaks {VERSION})")
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind}")
    if flags:
        raise WireError(f"unknown flags {flags:#x}")
    if group < -1 or ring < -1:
        raise WireError(f"group {group} or ring {ring} out of range (-1: none)")
    if lt > MAX_TABLE or lk > MAX_TOKEN or lm > MAX_META:
        raise WireError(f"string lengths out of range (table {lt}, token {lk}, meta {lm})")
    if na > MAX_ARRAYS:
        raise WireError(f"{na} arrays (limit {MAX_ARRAYS})")
    end = HEADER_BYTES + lt + lk + lm
    if len(mv) < end:
        raise WireError(f"truncated header strings: {len(mv)} bytes, need {end}")
    o = HEADER_BYTES
    try:
        table = bytes(mv[o:o + lt]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("table name is not UTF-8") from None
    token = bytes(mv[o + lt:o + lt + lk])
    meta = bytes(mv[o + lt + lk:end])
    return Header(kind, cid, seq, step, group, ring, table, token, meta, na, end)


def decode(buf, expect_kind: int | None = None) -> Message:
    """Parse and validate a whole message; arrays are read-only views into `buf`."""
    h = decode_header(buf)
    if expect_kind is not None and h.kind != expect_kind:
        raise WireError(f"expected a {KINDS[expect_kind]} message, got {KINDS[h.kind]}")
    mv = memoryview(buf).cast("B")
    total, o = len(mv), h.end
    arrays = []
    for i in range(h.num_arrays):
        if total - o < 2:
            raise WireError(f"array {i}: truncated descriptor at byte {o}")
        code, ndim = mv[o], mv[o + 1]
        dt = DTYPES.get(code)
        if dt is None:
            raise WireError(f"array {i}: dtype code {code} is not in the allow-list "
                            f"{ {c: str(d) for c, d in DTYPES.items()} }")
        if ndim > MAX_NDIM:
            raise WireError(f"array {i}: ndim {ndim} > {MAX_NDIM}")
        o += 2
        if total - o < 8 * ndim:
            raise WireError(f"array {i}: truncated shape")
        shape = tuple(_DIM.unpack_from(mv, o + 8 * k)[0] for k in range(ndim))
        o += 8 * ndim
        pad = _pad(o)
        if total - o < pad or any(mv[o:o + pad]):
            raise WireError(f"array {i}: missing or non-zero alignment padding")
        o += pad
        if any(d > MAX_DIM for d in shape):  # numpy refuses such a dimension even with a 0 beside it
            raise WireError(f"array {i}: a dimension of {list(shape)} is above numpy's 2^63 - 1")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dt.itemsize
        if nbytes > total - o:
            raise WireError(f"array {i}: shape {list(shape)} of {dt} needs {nbytes} bytes, "
                            f"{total - o} left (truncated?)")
        a = np.frombuffer(mv, dtype=dt, count=count, offset=o).reshape(shape)
        if dt == np.bool_ and count and np.any(a.view(np.uint8) > 1):
            raise WireError(f"array {i}: bool bytes other than 0/1")
        arrays.append(a)
        o += nbytes
    if o != total:
        raise WireError(f"{total - o} trailing bytes after {h.num_arrays} arrays")
    return Message(h.kind, h.table, h.client_id, h.seq, h.step, h.token, tuple(arrays), h.meta, h.group, h.ring)


def chunks(data: bytes, size: int):
    """`data` cut into pieces of at most `size` bytes (at least one piece)."""
    if len(data) <= size:
        yield data
        return
    mv = memoryview(data)
    for o in range(0, len(data), size):
        yield bytes(mv[o:o + size])


def json_meta(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def named(kind: int, arrays: dict[str, np.ndarray], table: str = "", token: bytes = b"", **meta) -> Message:
    """A message carrying named arrays (snapshots, partition copies): the names travel in
    meta "fields", keys and values first, the rest by name; `meta` rides along."""
    names = sorted(arrays, key=lambda k: (k != "keys", k != "values", k))
    return Message(kind, table, token=token, meta=json_meta(dict(meta, fields=names)),
                   arrays=tuple(np.ascontiguousarray(arrays[k]) for k in names))


def fields(msg: Message) -> dict[str, np.ndarray]:
    """The named arrays of a `named` message (WireError when names and arrays disagree)."""
    meta = msg.json()
    names = meta.get("fields") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != len(msg.arrays) or not all(isinstance(n, str) for n in names):
        raise WireError('meta {"fields": [names]} must name each array of the message')
    return dict(zip(names, msg.arrays))


__all__ = ["MAGIC", "VERSION", "DTYPES", "KINDS", "PULL", "PULL_REPLY", "PUSH", "PUSH_REPLY", "STATS",
           "CREATE", "CREATE_REPLY", "EXPORT", "EXPORT_REPLY", "LOAD", "LOAD_REPLY", "CLOCK", "CLOCK_REPLY", "ADMIN", "ADMIN_REPLY",
           "STATS_REPLY", "HEADER_BYTES", "Message", "named", "fields", "Header", "WireError", "encode", "encode_parts",
           "decode", "decode_header", "chunks", "json_meta"]

