"""Host PS over gRPC: server processes on loopback give the same tables as an in-process
group, large requests are chunked, bad requests get a status while the server keeps
serving, pushes apply once under retries, and the wire format checks what it decodes."""
import functools
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from jaxps.ps import wire
from jaxps.ps.client import PSClient, embedded
from jaxps.ps.grpc_transport import (PULL_METHOD, PUSH_METHOD, TOKEN_METADATA, GrpcTransport, PSRemoteError,
                                     PSRPCError, message_options)
from jaxps.ps.ring import Ring, partition_of
from jaxps.ps.serve import serve, table_specs
from jaxps.ps.server import PSError

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ["ps-0", "ps-1"]
PARTITIONS = 64
TOKEN = "t0k3n-for-tests"
CAP = 16 << 20  # --max-request-bytes of the test servers
TABLES = [
    {"name": "t", "dim": 8, "init_scale": 0.01, "seed": 5, "optimizer": {"name": "adagrad", "learning_rate": 0.2}},
    {"name": "ftrl", "dim": 3, "optimizer": {"name": "ftrl", "learning_rate": 0.3, "l1": 0.01}},
    {"name": "big", "dim": 8, "optimizer": {"name": "sgd", "learning_rate": 0.5}},
    {"name": "once", "dim": 2, "optimizer": {"name": "sgd", "learning_rate": 1.0}},
    {"name": "h", "dim": 4, "kind": "hashed", "rows": 1000, "init_scale": 0.1,
     "optimizer": {"name": "sgd", "learning_rate": 0.1}},
]
SPECS = table_specs(TABLES)
RING = Ring(PARTITIONS, 64, SERVERS)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _start(name, tables_json, timeout=30.0):
    """Start a server process; its port comes from its first stdout line. stderr goes to a
    file next to tables.json (a pipe nobody reads could fill and block the server)."""
    log = open(tables_json.parent / f"{name}.stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxps.ps.serve", "--name", name, "--servers", ",".join(SERVERS),
         "--partitions", str(PARTITIONS), "--tables", str(tables_json), "--token-env", "JAXPS_PS_TOKEN",
         "--max-request-bytes", str(CAP), "--workers", "4", "--grace", "2"],
        cwd=ROOT, env=_env(JAXPS_PS_TOKEN=TOKEN), stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    prefix = f"jaxps ps-server {name} listening on 127.0.0.1:"
    if not line.startswith(prefix):
        proc.kill()
        proc.wait(timeout=10)
        err = (tables_json.parent / f"{name}.stderr").read_text()[-2000:]
        raise RuntimeError(f"server {name} did not start: {line!r} {err}")
    return proc, int(line[len(prefix):])


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Two server processes: {name: (process, address)}; stopped with SIGTERM at the end."""
    tables_json = tmp_path_factory.mktemp("ps") / "tables.json"
    tables_json.write_text(json.dumps(TABLES))
    procs = {}
    try:
        for name in SERVERS:
            proc, port = _start(name, tables_json)
            procs[name] = (proc, f"127.0.0.1:{port}")
        yield procs
    finally:
        codes = {}
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, (proc, _) in procs.items():
            try:
                codes[name] = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                codes[name] = "killed"
        assert all(c == 0 for c in codes.values()), f"servers did not stop gracefully: {codes}"


@pytest.fixture()
def transports(group):
    ts = {name: GrpcTransport(addr, token=TOKEN, timeout=20) for name, (_, addr) in group.items()}
    yield ts
    for t in ts.values():
        t.close()


def _owned(keys, server):
    owners = RING.owners()[partition_of(keys, PARTITIONS)]
    return keys[owners == RING.servers.index(server)]


def _status(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


# ---------------------------------------------------------------------------------- (1)
def test_two_server_processes_equal_in_process_group(transports):
    remote = PSClient(RING, transports, SPECS)
    local = embedded(SPECS, servers=2, num_partitions=PARTITIONS)
    rng = np.random.default_rng(1)
    universe = np.unique(rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True))
    for step in range(1, 5):
        for table, dim in (("t", 8), ("ftrl", 3)):
            keys = rng.permutation(universe)[:2000]
            grads = rng.normal(size=(keys.size, dim)).astype(np.float32)
            remote.push(table, keys, grads, step)
            local.push(table, keys, grads, step)
    hashed = np.arange(0, 1000, 3, dtype=np.uint64)
    remote.push("h", hashed, np.ones((hashed.size, 4), np.float32), 1)
    local.push("h", hashed, np.ones((hashed.size, 4), np.float32), 1)
    for table, keys in (("t", universe), ("ftrl", universe), ("h", np.arange(1000, dtype=np.uint64))):
        got = remote.pull(table, keys)
        assert got.flags.writeable
        np.testing.assert_array_equal(got, local.pull(table, keys))
    rs, ls = remote.stats(), local.stats()
    for name in SERVERS:
        for table in ("t", "ftrl", "h"):
            assert rs[name][table]["keys"] == ls[name][table]["keys"] > 0
    remote.close()
    local.close()


# ---------------------------------------------------------------------------------- (2)
def test_push_and_pull_larger_than_a_chunk(transports):
    client = PSClient(RING, transports, SPECS)
    keys = np.arange(300_000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # 12 MB of push
    grads = np.random.default_rng(2).normal(size=(keys.size, 8)).astype(np.float32)
    client.push("big", keys, grads, 1)
    np.testing.assert_array_equal(client.pull("big", keys), -0.5 * grads)
    client.close()


# ---------------------------------------------------------------------------------- (3)
def test_bad_requests_are_rejected_and_the_server_keeps_serving(group, transports):
    addr = group["ps-0"][1]
    good = transports["ps-0"]
    mine = _owned(np.arange(1000, dtype=np.uint64), "ps-0")
    others = _owned(np.arange(1000, dtype=np.uint64), "ps-1")
    expected = good.pull("h", mine)
    pushes_before = good.stats()["h"]["pushes"]
    # a raw channel that may send one message above the servers' 4 MiB limit
    channel = grpc.insecure_channel(addr, options=message_options(32 << 20))
    signed = ((TOKEN_METADATA, TOKEN.encode()),)  # the token in the call's metadata, as GrpcTransport sends it
    unsigned_pull = channel.stream_stream(PULL_METHOD)
    raw_pull = functools.partial(unsigned_pull, metadata=signed)
    raw_push = functools.partial(channel.stream_unary(PUSH_METHOD), metadata=signed)
    never = threading.Event()

    def silent():  # a stream that sends nothing (until the test ends)
        never.wait(30)
        yield from ()

    def pull_msg(keys, token=TOKEN, table="h"):
        return wire.encode(wire.Message(wire.PULL, table, token=token.encode(), arrays=(keys,)))

    msg = pull_msg(mine)
    dtype_at = wire.decode_header(msg).end
    bad_code = msg[:dtype_at] + bytes([9]) + msg[dtype_at + 1:]
    big_keys = np.arange(500_000, dtype=np.uint64)
    big_push = wire.encode(wire.Message(wire.PUSH, "h", 1, 1, 1, TOKEN.encode(),
                                        (big_keys, np.zeros((big_keys.size, 8), np.float32))))
    cases = [
        ("truncated", lambda: list(raw_pull(iter([msg[:-3]]))), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("garbage", lambda: list(raw_pull(iter([b"\x00" * 100]))), grpc.StatusCode.INVALID_ARGUMENT, "bad magic"),
        ("empty", lambda: list(raw_pull(iter([]))), grpc.StatusCode.INVALID_ARGUMENT, "empty request"),
        ("dtype code", lambda: list(raw_pull(iter([bad_code]))), grpc.StatusCode.INVALID_ARGUMENT, "allow-list"),
        ("float keys", lambda: list(raw_pull(iter([pull_msg(mine.astype(np.float32))]))),
         grpc.StatusCode.INVALID_ARGUMENT, "uint64"),
        ("kind", lambda: raw_push(iter([msg])), grpc.StatusCode.INVALID_ARGUMENT, "expected a push"),
        ("oversized", lambda: raw_push(iter(wire.chunks(big_push, 2 << 20))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        ("one huge message", lambda: raw_push(iter([big_push])), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("missing token", lambda: list(raw_pull(iter([pull_msg(mine, token="")]))),
         grpc.StatusCode.UNAUTHENTICATED, "missing token"),
        ("bad token", lambda: list(raw_pull(iter([pull_msg(mine, token="nope")]))),
         grpc.StatusCode.UNAUTHENTICATED, "bad token"),
        ("no metadata token", lambda: list(unsigned_pull(iter([msg]))), grpc.StatusCode.UNAUTHENTICATED,
         "missing token"),
        ("bad metadata token", lambda: list(unsigned_pull(iter([msg]), metadata=((TOKEN_METADATA, b"nope"),))),
         grpc.StatusCode.UNAUTHENTICATED, "bad token"),
        # refused before the server reads the stream: an idle caller holds no handler thread
        ("idle unauthenticated stream", lambda: list(unsigned_pull(silent(), timeout=10)),
         grpc.StatusCode.UNAUTHENTICATED, "missing token"),
    ]
    for what, call, code, text in cases:
        got_code, details = _status(call)
        assert got_code == code and text in (details or ""), (what, got_code, details)
        np.testing.assert_array_equal(good.pull("h", mine), expected, err_msg=what)

    # the same through GrpcTransport: clear exceptions, PSError where the server refused
    with pytest.raises(PSRemoteError, match="unknown table") as e:
        good.pull("nope", mine)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and isinstance(e.value, PSError)
    with pytest.raises(PSRemoteError, match="belongs to ps-1") as e:
        good.pull("h", others)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(PSRemoteError, match="out of range"):
        good.pull("h", np.array([5000], np.uint64))
    with pytest.raises(PSRemoteError, match="grads must be float32"):
        good.push("h", mine, np.zeros((mine.size, 3), np.float32), (9, 9), 1)
    with pytest.raises(PSRPCError, match="bad token") as e:
        GrpcTransport(addr, token="wrong").stats()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and not isinstance(e.value, PSError)
    with pytest.raises(wire.WireError, match="float64 is not allowed"):
        good.pull("h", mine.astype(np.float64))
    np.testing.assert_array_equal(good.pull("h", mine), expected)
    assert good.stats()["h"]["pushes"] == pushes_before  # nothing rejected was applied
    never.set()
    channel.close()


# ---------------------------------------------------------------------------------- (4)
def test_exactly_once_over_grpc_and_bounded_retry(transports, monkeypatch):
    t = transports["ps-1"]
    keys = _owned(np.arange(200, dtype=np.uint64), "ps-1")
    g = np.ones((keys.size, 2), np.float32)
    assert t.push("once", keys, g, (42, 0), 1) is True
    assert t.push("once", keys, g, (42, 0), 1) is False  # same request id: not applied again
    np.testing.assert_array_equal(t.pull("once", keys), -g)
    assert t.stats()["once"]["duplicate_pushes"] == 1

    class Lost(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "reply lost"

    real, calls = t._push, []

    def flaky(pieces, timeout):  # the first attempt lands, but its reply is lost
        reply = real(pieces, timeout=timeout)
        calls.append(1)
        if len(calls) == 1:
            raise Lost()
        return reply

    monkeypatch.setattr(t, "_push", flaky)
    assert t.push("once", keys, g, (42, 1), 2) is False  # the retry found it applied
    assert len(calls) == 2
    np.testing.assert_array_equal(t.pull("once", keys), -2 * g)

    sleeps = []
    monkeypatch.setattr("jaxps.ps.grpc_transport.time.sleep", sleeps.append)
    dead = GrpcTransport("127.0.0.1:1", timeout=2, attempts=3)  # nothing listens on port 1
    start = time.monotonic()
    with pytest.raises(PSRPCError) as e:
        dead.push("once", keys, g, (42, 2), 3)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and len(sleeps) == 2
    assert time.monotonic() - start < 10
    dead.close()


# ---------------------------------------------------------------------------------- serve()
def test_serve_in_process_without_token_and_stop():
    srv, port = serve("ps-0", Ring(8, 4, ["ps-0"]), SPECS)
    try:
        with GrpcTransport(f"127.0.0.1:{port}", token="ignored", timeout=10) as t:
            keys = np.array([3, 2**64 - 1], np.uint64)
            assert t.push("once", keys, np.ones((2, 2), np.float32), (1, 1), 1)
            np.testing.assert_array_equal(t.pull("once", keys), -np.ones((2, 2), np.float32))
            assert t.pull("once", keys[:0]).shape == (0, 2)
    finally:
        srv.stop(0).wait(5)
    with pytest.raises(ValueError, match="not on the ring"):
        serve("ps-9", Ring(8, 4, ["ps-0"]), SPECS)


def _ipv6_loopback() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_servers_and_the_manager_listen_on_an_ipv6_host():
    """Both start through `start_grpc_server` (the manager's own copy bound "::1:0")."""
    from jaxps.ps.manager import RemoteRing, ServerManager, serve_manager

    srv, port = serve("ps-0", Ring(8, 4, ["ps-0"]), SPECS, host="::1")
    group = embedded([], servers=2, num_partitions=8)
    msrv, mport = serve_manager(ServerManager(group.ring, group.transports), {"ps-0": "a:1", "ps-1": "b:2"},
                                host="::1")
    try:
        with GrpcTransport(f"[::1]:{port}", timeout=10) as t:
            assert t.push("once", np.array([7], np.uint64), np.ones((1, 2), np.float32), (1, 1), 1)
            np.testing.assert_array_equal(t.pull("once", np.array([7], np.uint64)), -np.ones((1, 2)))
        source = RemoteRing(f"[::1]:{mport}")
        ring, transports = source()
        assert (ring.servers, ring.version) == (group.ring.servers, group.ring.version)
        for t in transports.values():
            t.close()
        source.channel.close()
    finally:
        srv.stop(0).wait(5)
        msrv.stop(0).wait(5)


def test_server_process_imports_no_jax_and_needs_its_token(tmp_path):
    code = ("import jaxps.ps.serve, jaxps.ps.grpc_transport, jaxps.ps.wire, sys; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=True, timeout=60)
    (tmp_path / "tables.json").write_text(json.dumps(TABLES))
    env = _env()
    env.pop("JAXPS_PS_TOKEN_UNSET", None)  # --token-env names a variable that is not set
    r = subprocess.run([sys.executable, "-m", "jaxps.ps.serve", "--name", "ps-0", "--servers", "ps-0",
                        "--tables", str(tmp_path / "tables.json"), "--token-env", "JAXPS_PS_TOKEN_UNSET"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unset or empty" in r.stderr


def test_table_specs_reject_bad_entries():
    with pytest.raises(ValueError, match="unknown field"):
        table_specs([{"name": "a", "dim": 1, "optimizer": {"name": "sgd"}, "lr": 1}])
    with pytest.raises(ValueError, match="no hyper-parameter"):
        table_specs([{"name": "a", "dim": 1, "optimizer": {"name": "sgd", "beta": 1}}])
    assert table_specs({"tables": TABLES})[4].rows == 1000


# ---------------------------------------------------------------------------------- (5)
def test_wire_round_trip():
    arrays = (np.array([0, 1, 2**64 - 1], np.uint64), np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
              np.array([-1, 2**62], np.int64), np.arange(5, dtype=">i4"), np.array([True, False]),
              np.array(True), np.zeros((0, 7), np.float32))
    m = wire.Message(wire.PUSH, "tåble", 2**64 - 1, 17, -3, b"tok", arrays, b'{"a":1}')
    data = wire.encode(m)
    d = wire.decode(data, wire.PUSH)
    assert (d.kind, d.table, d.request_id, d.step, d.token, d.json()) == \
        (wire.PUSH, "tåble", (2**64 - 1, 17), -3, b"tok", {"a": 1})
    assert len(d.arrays) == len(arrays)
    for a, b in zip(arrays, d.arrays):
        assert a.shape == b.shape and np.dtype(a.dtype).newbyteorder("=") == b.dtype
        np.testing.assert_array_equal(a, b)
        assert b.ctypes.data % 8 == 0 or b.size == 0
    assert wire.decode(wire.encode(wire.Message(wire.STATS))) == wire.Message(wire.STATS)
    assert b"".join(wire.chunks(data, 7)) == data and max(map(len, wire.chunks(data, 7))) == 7


def test_wire_decode_errors():
    good = wire.encode(wire.Message(wire.PULL, "t", 1, 2, 3, b"k", (np.arange(4, dtype=np.uint64),)))
    end = wire.decode_header(good).end
    H = wire.HEADER_BYTES

    def patch(at, new):
        return good[:at] + new + good[at + len(new):]

    bad_head = wire._HEAD.pack(wire.MAGIC, wire.VERSION, wire.PULL, 0, 0, 0, 0, -1, -1, 1, 0, 0, 0)
    cases = [
        (good[:10], "truncated header"),
        (patch(0, b"XXXX"), "bad magic"),
        (patch(4, b"\x07"), "unsupported version"),
        (patch(5, b"\x63"), "unknown message kind"),
        (patch(6, b"\x01"), "unknown flags"),
        (patch(32, struct.pack("<i", -2)), "group -2 or ring -1 out of range"),
        (good[:H + 1], "truncated header strings"),
        (bad_head + b"\xff", "not UTF-8"),
        (patch(H - 2, struct.pack("<H", 65)), "arrays (limit"),
        (patch(end, b"\x09"), "not in the allow-list"),
        (patch(end + 1, b"\x09"), "ndim 9"),
        (good[:end + 5], "truncated shape"),
        (patch(end + 2, struct.pack("<Q", 5)), "truncated?"),
        (patch(end + 2, struct.pack("<Q", 2**62)), "needs"),
        (good[:-1], "truncated?"),
        (good + b"\0", "1 trailing bytes"),
        (good[:end] + b"\x01\x00" + good[end + 10:], "trailing bytes"),  # 0-d: 8 bytes left over
    ]
    empty = wire.encode(wire.Message(wire.PULL, "t", arrays=(np.zeros((0, 2), np.uint64),)))
    e2 = wire.decode_header(empty).end  # dtype, ndim, then the dims: (0, 2^63) holds no bytes
    cases.append((empty[:e2 + 10] + struct.pack("<Q", 2**63) + empty[e2 + 18:], "above numpy's"))
    for data, text in cases:
        with pytest.raises(wire.WireError, match=re.escape(text)):
            wire.decode(data)
    # non-zero alignment padding, bool bytes other than 0/1, the wrong kind, bad meta JSON
    with pytest.raises(wire.WireError, match="padding"):
        odd = wire.encode(wire.Message(wire.PULL, "abc", arrays=(np.arange(2, dtype=np.int32),)))
        pad_at = wire.decode_header(odd).end + 2 + 8
        assert pad_at % 8 != 0
        wire.decode(odd[:pad_at] + b"\x01" + odd[pad_at + 1:])
    flags = wire.encode(wire.Message(wire.PULL, arrays=(np.array([True, False]),)))
    with pytest.raises(wire.WireError, match="bool bytes"):
        wire.decode(flags[:-1] + b"\x02")
    with pytest.raises(wire.WireError, match="expected a push message"):
        wire.decode(good, wire.PUSH)
    with pytest.raises(wire.WireError, match="meta is not UTF-8 JSON"):
        wire.decode(wire.encode(wire.Message(wire.STATS_REPLY, meta=b"{nope"))).json()
    # encode refuses what decode would refuse
    with pytest.raises(wire.WireError, match="float64 is not allowed"):
        wire.encode(wire.Message(wire.PULL, arrays=(np.zeros(2),)))
    with pytest.raises(wire.WireError, match="table name"):
        wire.encode(wire.Message(wire.PULL, "x" * 300))
    with pytest.raises(wire.WireError, match="does not fit"):
        wire.encode(wire.Message(wire.PULL, seq=-1))


def test_a_marked_snapshot_over_grpc_holds_the_rows_at_the_mark(transports):
    """mark + export(marks=...) through server processes: pushes after the mark change the
    live rows, not the exported ones."""
    client = PSClient(RING, transports, SPECS)
    rng = np.random.default_rng(11)
    keys = np.unique(rng.integers(0, 2**63, 3000, dtype=np.uint64))
    client.push("ftrl", keys[:2000], rng.normal(size=(2000, 3)).astype(np.float32), 1)
    want = client.export("ftrl")
    marks = client.mark("ftrl")
    assert sorted(marks) == SERVERS
    client.push("ftrl", keys[1000:], rng.normal(size=(keys.size - 1000, 3)).astype(np.float32), 2)
    got = client.export("ftrl", marks=marks)
    for k in want:
        np.testing.assert_array_equal(got[k][np.argsort(got["keys"])], want[k][np.argsort(want["keys"])])
    assert client.export("ftrl")["keys"].size > want["keys"].size
    client.close()


def test_a_pull_whose_reply_exceeds_the_limit_is_refused_before_allocating():
    from jaxps.optim import rowwise
    from jaxps.ps.grpc_transport import PSServicer, start_grpc_server
    from jaxps.ps.server import PSServer, TableSpec
    server = PSServer("ps-0", Ring(16, 8, ["ps-0"]), [TableSpec("t", 8, rowwise.SGD())])
    srv, port = start_grpc_server(PSServicer(server, max_reply_bytes=32 * 100).generic_handler(),
                                  "127.0.0.1", 0, "test PS", "t", 4)
    try:
        transport = GrpcTransport(f"127.0.0.1:{port}")
        assert transport.pull("t", np.arange(100, dtype=np.uint64)).shape == (100, 8)
        with pytest.raises(PSRPCError, match="reply limit") as e:
            transport.pull("t", np.arange(101, dtype=np.uint64))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert transport.pull("t", np.arange(3, dtype=np.uint64)).shape == (3, 8)  # still serving
    finally:
        srv.stop(None)


def test_a_client_from_the_environment_closes_the_channels_it_opened(monkeypatch):
    """`from_env` makes the client's gRPC transports and its ring source (a manager's
    `RemoteRing`) for that client alone: closing the client closes them all, the transport
    a moved server left behind included. A client given transports leaves them open."""
    from jaxps.ps.client import ENV_MANAGER, ENV_PARTITIONS, ENV_SERVERS, from_env
    from jaxps.ps.manager import ServerManager, serve_manager

    srv, port = serve("ps-0", Ring(8, 64, ["ps-0"]), SPECS)
    msrv, mport = serve_manager(ServerManager(Ring(8, 64, ["ps-0"]), {}), {"ps-0": f"127.0.0.1:{port}"})
    try:
        monkeypatch.setenv(ENV_SERVERS, f"ps-0=127.0.0.1:{port}")
        monkeypatch.setenv(ENV_PARTITIONS, "8")
        monkeypatch.setenv(ENV_MANAGER, f"127.0.0.1:{mport}")
        client = from_env()
        keys = np.array([5, 9], np.uint64)
        client.push("once", keys, np.ones((2, 2), np.float32), 1)
        opened = [client.transports["ps-0"]]
        fetch = client.ring_source.fetch
        for address in (f"127.0.0.1:{port}", f"localhost:{port}"):  # the server "moves": a new transport
            client.ring_source.fetch = lambda a=address: dict(fetch(), addresses={"ps-0": a})
            _, transports = client.ring_source()
            opened.append(transports["ps-0"])
            client.transports.update(transports)  # as a retry on a newer ring does
            np.testing.assert_array_equal(client.pull("once", keys), -np.ones((2, 2), np.float32))
        assert len({id(t) for t in opened}) == 3
        client.close()
        client.close()  # idempotent
        for t in opened:
            with pytest.raises(ValueError, match="closed channel"):
                t.stats()
        with pytest.raises(ValueError, match="closed channel"):
            fetch()

        shared = GrpcTransport(f"127.0.0.1:{port}", timeout=10)
        borrowed = PSClient(Ring(8, 64, ["ps-0"]), {"ps-0": shared}, [])
        borrowed.close()
        assert shared.stats()  # still open: it belongs to whoever made it
        shared.close()
    finally:
        srv.stop(0).wait(5)
        msrv.stop(0).wait(5)
