"""gRPC transport for the host PS: a `PSServer` in another process or on another host.

Requests and replies are `jaxps.ps.wire` messages (typed header + raw arrays, no pickle and
no protoc: generic handlers move bytes). A message of any size travels as a stream of raw
byte pieces of at most `CHUNK_BYTES`, concatenated on the other side and decoded there:

    /jaxps.ps.PS/Pull   stream -> stream   request: keys [n] uint64   reply: rows [n, dim] float32
    /jaxps.ps.PS/Push   stream -> unary    request: keys, grads       reply: applied (bool)
    /jaxps.ps.PS/Stats  unary  -> unary    reply: JSON meta
    /jaxps.ps.PS/CreateTable unary -> unary  request: the table spec as JSON meta  reply: created (bool)
    /jaxps.ps.PS/Clock  unary  -> unary    request: group, clock, groups, staleness  reply: settled (i64)
    /jaxps.ps.PS/Export unary  -> stream   request: table          reply: keys, values, slots (meta: names)
    /jaxps.ps.PS/Load   stream -> unary    request: keys, values, slots (meta: names, only_missing)
    /jaxps.ps.PS/Admin  unary  -> unary    the manager's: {"op": ping | freeze | unfreeze | set_ring, ...}
    /jaxps.ps.PS/ExportParts unary -> stream, /LoadParts stream -> unary: partition copies

A pull or push carries its worker group and clock/step in the header (see `wire`); a
pull may wait at the server for slower groups, so give `timeout` room for that.

The first piece must hold the whole header, so a server checks kind and token before it
buffers the rest; it stops reading once a request passes `max_request_bytes`. Failures are
gRPC statuses with a message: INVALID_ARGUMENT (malformed, or refused by the PSServer),
FAILED_PRECONDITION (a key the server does not own), UNAUTHENTICATED, RESOURCE_EXHAUSTED.
Every rejection ends only that call: the server keeps serving.
"""
from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from jaxps.ps import wire
from jaxps.ps.clock import GATE_TIMEOUT, Sync, SyncTimeout
from jaxps.ps.ring import Ring
from jaxps.ps.server import Frozen, PSError, PSServer, TableSpec, WrongOwner

SERVICE = "jaxps.ps.PS"
(PULL_METHOD, PUSH_METHOD, STATS_METHOD, CREATE_METHOD, CLOCK_METHOD, EXPORT_METHOD, LOAD_METHOD, ADMIN_METHOD,
 EXPORT_PARTS_METHOD, LOAD_PARTS_METHOD) = (
    f"/{SERVICE}/{m}" for m in ("Pull", "Push", "Stats", "CreateTable", "Clock", "Export", "Load", "Admin",
                                "ExportParts", "LoadParts"))
LOAD_BATCH_BYTES = 64 << 20      # a snapshot is loaded in requests of at most about this size
CHUNK_BYTES = 2 << 20            # one gRPC message carries at most this much of a wire message
MAX_MESSAGE_BYTES = 4 << 20      # gRPC's per-message limit, set explicitly on both sides
DEFAULT_MAX_REQUEST_BYTES = 512 << 20   # a whole request (all its pieces), server side
DEFAULT_MAX_REPLY_BYTES = 4 << 30       # a pull's rows, allocated whole before they are chunked
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A worker group's pull that finds every clock-gate slot of a server taken is refused with
# RESOURCE_EXHAUSTED and this text; the client waits and sends it again (until its gate limit).
GATE_BUSY = "clock gate busy"
# A worker group's push that would wait for the servers' pending SSP/ASP cuts
# (`PSServer.push_would_wait`) is refused with RESOURCE_EXHAUSTED and this text, and
# retried like GATE_BUSY: no handler thread waits for a cut.
CUTS_PENDING = "cuts pending"
TOKEN_METADATA = "x-jaxps-token-bin"  # the shared token, also in each call's metadata (binary: "-bin")
MAX_VNODES = 4096  # a set_ring message's bound: building a ring hashes vnodes x servers points

log = logging.getLogger("jaxps.ps.grpc")


def message_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


# ---------------------------------------------------------------------------------- errors
class PSRPCError(RuntimeError):
    """A PS call over gRPC failed: `code` (a grpc.StatusCode) and the server's message."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str):
        self.address, self.method, self.code, self.details = address, method, code, details
        super().__init__(f"PS {method} to {address} failed: {code.name}: {details}")


class PSRemoteError(PSRPCError, PSError):
    """The server refused the request (INVALID_ARGUMENT or FAILED_PRECONDITION): also a
    `PSError`, as the same request to an in-process server would raise."""


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ---------------------------------------------------------------------------------- server
class PSServicer:
    """Serves one `PSServer` over gRPC (`generic_handler()` for `add_generic_rpc_handlers`)."""

    def __init__(self, server: PSServer, token: str | bytes | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, chunk_bytes: int = CHUNK_BYTES,
                 gate_slots: int | None = None, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES):
        """gate_slots: at most this many worker-group pulls at once (each may block a handler
        thread at the clock gate for up to the gate's limit); more are refused (GATE_BUSY)
        and retried by the client, so the pushes and clocks that open the gate always find a
        thread. None: no limit."""
        self.server = server
        self.token = token.encode("utf-8") if isinstance(token, str) else token
        self.max_request_bytes = int(max_request_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self._gate_slots = threading.BoundedSemaphore(gate_slots) if gate_slots else None
        # a pull's reply is allocated whole (and encoded once more): one request must not be
        # able to take the server's memory (a pull of 64M keys at dim 64 would be 16 GB)
        self.max_reply_bytes = int(max_reply_bytes)
        self.gate_refusals = 0
        self.cut_refusals = 0   # pushes refused while too many cuts were pending (CUTS_PENDING)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Pull": grpc.stream_stream_rpc_method_handler(self._pull),
            "Push": grpc.stream_unary_rpc_method_handler(self._push),
            "Stats": grpc.unary_unary_rpc_method_handler(self._stats),
            "CreateTable": grpc.unary_unary_rpc_method_handler(self._create),
            "Clock": grpc.unary_unary_rpc_method_handler(self._clock),
            "Export": grpc.unary_stream_rpc_method_handler(self._export),
            "Load": grpc.stream_unary_rpc_method_handler(self._load),
            "Admin": grpc.unary_unary_rpc_method_handler(self._admin),
            "ExportParts": grpc.unary_stream_rpc_method_handler(self._export_parts),
            "LoadParts": grpc.stream_unary_rpc_method_handler(self._load_parts),
        })

    # ------------------------------------------------------------------ request intake
    def _receive(self, pieces, kind: int, context, check_head=None) -> wire.Message:
        """Check the call's token (metadata: before reading anything, so a caller without it
        cannot hold a handler thread by sending nothing), then the header of the first piece
        (kind, token; then `check_head(header)`, which may refuse the call before its
        arrays are read), then gather and decode."""
        if self.token is not None:
            sent = dict(context.invocation_metadata()).get(TOKEN_METADATA)
            if sent is None:
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "missing token")
            if not hmac.compare_digest(bytes(sent), self.token):
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        it = iter(pieces)
        first = next(it, None)
        if first is None:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "empty request")
        try:
            head = wire.decode_header(first)
        except wire.WireError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed request (the first piece must hold the whole header): {e}")
        if head.kind != kind:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed request: expected a {wire.KINDS[kind]} message, got {wire.KINDS[head.kind]}")
        if self.token is not None and not hmac.compare_digest(head.token, self.token):
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                          "missing token" if not head.token else "bad token")
        if check_head is not None:
            check_head(head)
        parts, total = [first], len(first)
        while True:
            if total > self.max_request_bytes:
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"request larger than this server's limit of {self.max_request_bytes} bytes")
            piece = next(it, None)
            if piece is None:
                break
            parts.append(piece)
            total += len(piece)
        try:
            return wire.decode(parts[0] if len(parts) == 1 else b"".join(parts), kind)
        except wire.WireError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {e}")

    @staticmethod
    def _arrays(msg: wire.Message, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        if len(msg.arrays) != len(names):
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed request: a {wire.KINDS[msg.kind]} carries {len(names)} arrays "
                          f"({', '.join(names)}), got {len(msg.arrays)}")
        return msg.arrays

    def _fail(self, context, method: str, exc: BaseException):
        """End the call with a status (raises)."""
        level = logging.WARNING  # malformed, oversized, unauthenticated
        if isinstance(exc, _Reject):
            code, message = exc.code, exc.message
        elif isinstance(exc, Frozen):  # a membership change: the client retries on the new ring
            code, message, level = grpc.StatusCode.UNAVAILABLE, str(exc), logging.INFO
        elif isinstance(exc, (PSError, ValueError)):  # an ordinary refusal (e.g. an older ring)
            message, level = str(exc), logging.INFO
            code = (grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, WrongOwner)
                    else grpc.StatusCode.INVALID_ARGUMENT)
        elif isinstance(exc, SyncTimeout):  # the gate's own limit passed: final, not retried (as
            # DEADLINE_EXCEEDED it was retried by the transport and the client: 30+ minutes)
            code, message = grpc.StatusCode.ABORTED, str(exc)
        else:
            log.exception("PS %s: internal error", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        log.log(level, "PS %s from %s rejected: %s: %s", method, context.peer(), code.name, message)
        context.abort(code, message)

    # ------------------------------------------------------------------ methods
    def _pull(self, pieces, context):
        try:
            msg = self._receive(pieces, wire.PULL, context)
            (keys,) = self._arrays(msg, ("keys",))
            spec = self.server.tables.get(msg.table)
            if spec is not None and keys.shape[0] * spec.dim * 4 > self.max_reply_bytes:
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"a pull of {keys.shape[0]} rows of {spec.dim} floats exceeds this server's reply "
                              f"limit of {self.max_reply_bytes} bytes: split it")
            gated = msg.group >= 0 and self._gate_slots is not None
            if gated and not self._gate_slots.acquire(blocking=False):
                self.gate_refusals += 1
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{GATE_BUSY}: every slot holds a waiting pull")
            try:  # client id 0 on the wire: a pull that leaves no memo (PSClient ids are never 0)
                rows = self.server.pull(msg.table, keys, msg.group, msg.step, msg.ring, msg.client_id or -1)
            finally:
                if gated:
                    self._gate_slots.release()
            reply = wire.encode(wire.Message(wire.PULL_REPLY, msg.table, msg.client_id, msg.seq,
                                             arrays=(rows,)))
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            self._fail(context, "pull", e)
        yield from wire.chunks(reply, self.chunk_bytes)

    def _push(self, pieces, context):
        try:
            msg = self._receive(pieces, wire.PUSH, context, check_head=self._refuse_past_pending_cuts)
            keys, grads = self._arrays(msg, ("keys", "grads"))
            applied = self.server.push(msg.table, keys, grads, msg.request_id, msg.step, msg.group, msg.ring)
            return wire.encode(wire.Message(wire.PUSH_REPLY, msg.table, msg.client_id, msg.seq,
                                            arrays=(np.array(applied),)))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "push", e)

    def _refuse_past_pending_cuts(self, head: wire.Header) -> None:
        """A push that would wait for pending cuts is refused from its header (the client
        sends it again; its rows are not read meanwhile)."""
        if self.server.push_would_wait(head.step, head.group):
            self.cut_refusals += 1
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{CUTS_PENDING}: step {head.step} is more than "
                          f"{self.server.MAX_PENDING_CUTS} cuts ahead of the slowest worker group")

    def _stats(self, request: bytes, context):
        try:
            self._receive((request,), wire.STATS, context)
            return wire.encode(wire.Message(wire.STATS_REPLY, meta=wire.json_meta(self.server.stats())))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "stats", e)

    def _clock(self, request: bytes, context):
        try:
            msg = self._receive((request,), wire.CLOCK, context)
            meta = msg.json()
            staleness = meta.get("staleness") if isinstance(meta, dict) else None
            if not isinstance(meta, dict) or "staleness" not in meta or not (
                    staleness is None or isinstance(staleness, int)):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              'malformed request: a clock message carries meta {"staleness": int | null}')
            cut_every = meta.get("cut_every", 0)
            if not isinstance(cut_every, int) or cut_every < 0:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "malformed request: cut_every must be an int >= 0")
            settled = self.server.clock(msg.group, msg.step, msg.seq, Sync(staleness), cut_every)
            return wire.encode(wire.Message(wire.CLOCK_REPLY, arrays=(np.array(settled, np.int64),)))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "clock", e)

    def _export(self, request: bytes, context):
        try:
            msg = self._receive((request,), wire.EXPORT, context)
            meta = msg.json() if msg.meta else {}
            at, ticket = meta.get("at"), meta.get("ticket")
            if ticket is not None:
                rows = self.server.export(msg.table, int(ticket))
            else:
                rows = self.server.export(msg.table) if at is None else self.server.export_cut(msg.table, int(at))
            reply = wire.encode(wire.named(wire.EXPORT_REPLY, rows, msg.table))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "export", e)
        yield from wire.chunks(reply, self.chunk_bytes)

    def _load(self, pieces, context):
        try:
            msg = self._receive(pieces, wire.LOAD, context)
            rows = wire.fields(msg)
            if "keys" not in rows:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "malformed request: a load without keys")
            n = rows["keys"].shape[0]
            if any(a.shape[:1] != (n,) for a in rows.values()):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "malformed request: arrays of unequal length")
            self.server.load(msg.table, rows, bool(msg.json().get("only_missing", False)))
            return wire.encode(wire.Message(wire.LOAD_REPLY, arrays=(np.array(True),)))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "load", e)

    def _admin(self, request: bytes, context):
        try:
            msg = self._receive((request,), wire.ADMIN, context)
            meta = msg.json()
            op = meta.get("op") if isinstance(meta, dict) else None
            if op == "ping":
                pass
            elif op == "freeze":
                self.server.freeze()
            elif op == "unfreeze":
                self.server.unfreeze()
            elif op == "fence":
                self.server.fence()
            elif op == "clear":
                self.server.clear(str(meta.get("table")))
            elif op == "mark":
                return wire.encode(wire.Message(wire.ADMIN_REPLY, meta=wire.json_meta(
                    {"ticket": self.server.mark(str(meta.get("table")))})))
            elif op == "tables":
                return wire.encode(wire.Message(wire.ADMIN_REPLY, meta=wire.json_meta(
                    {"tables": [t.to_json() for t in self.server.table_specs()]})))
            elif op == "set_ring":
                if not 1 <= int(meta["vnodes"]) <= MAX_VNODES or int(meta["partitions"]) != self.server.ring.num_partitions:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"malformed request: set_ring needs this group's {self.server.ring.num_partitions} "
                                  f"partitions and 1..{MAX_VNODES} virtual nodes")
                self.server.set_ring(Ring(int(meta["partitions"]), int(meta["vnodes"]), list(meta["servers"]),
                                          int(meta["version"])), drop=bool(meta.get("drop", True)))
            else:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"malformed request: unknown admin op {op!r} (ping, freeze, unfreeze, fence, set_ring, tables, clear, mark)")
            return wire.encode(wire.Message(wire.ADMIN_REPLY, meta=wire.json_meta({"version": self.server.ring.version})))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "admin", e)

    def _export_parts(self, request: bytes, context):
        try:
            msg = self._receive((request,), wire.EXPORT, context)
            parts = msg.json().get("partitions")
            if not isinstance(parts, list) or not all(isinstance(p, int) for p in parts):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, 'malformed request: meta {"partitions": [int]}')
            reply = wire.encode(wire.named(wire.EXPORT_REPLY, self.server.export_partitions(parts)))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "export-parts", e)
        yield from wire.chunks(reply, self.chunk_bytes)

    def _load_parts(self, pieces, context):
        try:
            msg = self._receive(pieces, wire.LOAD, context)
            n = self.server.load_partitions(wire.fields(msg))
            return wire.encode(wire.Message(wire.LOAD_REPLY, arrays=(np.array(n, np.int64),)))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "load-parts", e)

    def _create(self, request: bytes, context):
        try:
            msg = self._receive((request,), wire.CREATE, context)
            created = self.server.create_table(TableSpec.from_json(msg.json()))
            return wire.encode(wire.Message(wire.CREATE_REPLY, arrays=(np.array(created),)))
        except Exception as e:  # noqa: BLE001
            self._fail(context, "create-table", e)


def make_server(ps: PSServer, host: str = "127.0.0.1", port: int = 0, token: str | bytes | None = None,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_workers: int = 16,
                chunk_bytes: int = CHUNK_BYTES) -> tuple[grpc.Server, int]:
    """A started gRPC server for `ps` on host:port (port 0: any free port) and its port.
    Worker-group pulls may hold all but 4 of the `max_workers` handler threads at the clock
    gate (the rest serve the pushes and clocks that open it)."""
    servicer = PSServicer(ps, token, max_request_bytes, chunk_bytes, gate_slots=max(1, max_workers - 4))
    return start_grpc_server(servicer.generic_handler(), host, port,
                             f"PS server {ps.name}", f"jaxps-{ps.name}", max_workers,
                             message_options() + [("grpc.so_reuseport", 0)])


def start_grpc_server(handler, host: str, port: int, what: str, thread_prefix: str, max_workers: int,
                      options: list[tuple[str, object]] | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server of `handler` on host:port (port 0: any free port; an IPv6
    host is bracketed) and its port; a failed bind raises OSError naming `what`. The PS
    servers' and the manager's."""
    srv = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_prefix), options=options)
    srv.add_generic_rpc_handlers((handler,))
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = srv.add_insecure_port(where)
    except RuntimeError as e:  # grpc raises on a failed bind in recent versions
        raise OSError(f"{what}: cannot bind {where}: {e}") from None
    if not bound:
        raise OSError(f"{what}: cannot bind {where}")
    srv.start()
    return srv, bound


# ---------------------------------------------------------------------------------- client
class GrpcTransport:
    """The `Transport` protocol over gRPC to one server at `address` ("host:port").

    timeout: seconds per attempt. Calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED are
    tried up to `attempts` times in all (a push keeps its request id, so the server applies
    it once; `push` then returns False for a retry whose first attempt had landed). Other
    failures raise at once: `PSRemoteError` (a `PSError`) when the server refused the
    request, `PSRPCError` otherwise. A worker group's pull may also wait up to `wait_timeout`
    seconds at the server for slower groups (the server's own limit, GATE_TIMEOUT unless set,
    decides first)."""

    def __init__(self, address: str, token: str | bytes | None = None, timeout: float = 30.0,
                 attempts: int = 3, backoff: float = 0.05, chunk_bytes: int = CHUNK_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, wait_timeout: float = GATE_TIMEOUT + 60.0):
        if chunk_bytes + 4096 > max_message_bytes:
            raise ValueError("chunk_bytes must leave room under max_message_bytes")
        if chunk_bytes < wire.HEADER_BYTES + wire.MAX_TABLE + wire.MAX_TOKEN:
            raise ValueError("chunk_bytes must hold a whole header")
        self.address, self.timeout, self.attempts, self.backoff = address, timeout, max(1, attempts), backoff
        self.wait_timeout = wait_timeout
        self.token = token.encode("utf-8") if isinstance(token, str) else (token or b"")
        self.chunk_bytes = chunk_bytes
        self.channel = grpc.insecure_channel(address, options=message_options(max_message_bytes))
        # every call carries the token in its metadata too: the server checks it before it
        # reads a request (and again in the request's header)
        sign = functools.partial(functools.partial, metadata=((TOKEN_METADATA, self.token),) if self.token else None)
        self._pull = sign(self.channel.stream_stream(PULL_METHOD))
        self._push = sign(self.channel.stream_unary(PUSH_METHOD))
        self._stats = sign(self.channel.unary_unary(STATS_METHOD))
        self._create = sign(self.channel.unary_unary(CREATE_METHOD))
        self._clock = sign(self.channel.unary_unary(CLOCK_METHOD))
        self._export = sign(self.channel.unary_stream(EXPORT_METHOD))
        self._load = sign(self.channel.stream_unary(LOAD_METHOD))
        self._admin = sign(self.channel.unary_unary(ADMIN_METHOD))
        self._export_parts = sign(self.channel.unary_stream(EXPORT_PARTS_METHOD))
        self._load_parts = sign(self.channel.stream_unary(LOAD_PARTS_METHOD))

    def _call(self, method: str, fn, gate_deadline: float | None = None):
        """fn() with this transport's retries: UNAVAILABLE and DEADLINE_EXCEEDED up to
        `attempts` times; a worker group's pull refused because every clock-gate slot is
        taken (GATE_BUSY), or its push because cuts are pending (CUTS_PENDING), again and
        again until `gate_deadline` (monotonic seconds), as long as it would have waited."""
        attempt, busy_delay = 0, 0.01
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
                details = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
                if (gate_deadline is not None and code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        and (GATE_BUSY in details or CUTS_PENDING in details) and time.monotonic() + busy_delay < gate_deadline):
                    time.sleep(busy_delay)
                    busy_delay = min(2 * busy_delay, 0.2)
                    continue
                attempt += 1
                if code in RETRY_CODES and attempt < self.attempts:
                    time.sleep(self.backoff * 4 ** (attempt - 1))
                    continue
                cls = (PSRemoteError if code in (grpc.StatusCode.INVALID_ARGUMENT,
                                                 grpc.StatusCode.FAILED_PRECONDITION) else PSRPCError)
                raise cls(self.address, method, code, details) from None

    def _reply(self, method: str, buf, kind: int) -> wire.Message:
        try:
            return wire.decode(buf, kind)
        except wire.WireError as e:
            raise PSRPCError(self.address, method, grpc.StatusCode.DATA_LOSS, f"malformed reply: {e}") from None

    def pull(self, table: str, keys: np.ndarray, group: int = -1, clock: int = 0,
             ring_version: int = -1, client: int = -1) -> np.ndarray:
        keys = np.asarray(keys)
        data = wire.encode(wire.Message(wire.PULL, table, max(client, 0), step=clock, token=self.token,
                                        arrays=(keys,), group=group, ring=ring_version))

        limit = self.timeout + (self.wait_timeout if group >= 0 else 0.0)

        def call():  # a bytearray: the rows come back writable, with one copy
            return bytearray().join(self._pull(wire.chunks(data, self.chunk_bytes), timeout=limit))

        gated = time.monotonic() + limit if group >= 0 else None
        rows = self._reply("pull", self._call("pull", call, gate_deadline=gated), wire.PULL_REPLY)
        out = rows.arrays[0] if len(rows.arrays) == 1 else None
        if out is None or out.dtype != np.float32 or out.ndim != 2 or out.shape[0] != keys.shape[0]:
            raise PSRPCError(self.address, "pull", grpc.StatusCode.DATA_LOSS,
                             f"reply does not hold [{keys.shape[0]}, dim] float32 rows")
        return out

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, request_id: tuple[int, int],
             step: int, group: int = -1, ring_version: int = -1) -> bool:
        cid, seq = request_id
        data = wire.encode(wire.Message(wire.PUSH, table, cid, seq, step, self.token, (keys, grads),
                                        group=group, ring=ring_version))
        waits = time.monotonic() + self.timeout + self.wait_timeout if group >= 0 else None  # CUTS_PENDING
        reply = self._reply("push", self._call(
            "push", lambda: self._push(wire.chunks(data, self.chunk_bytes), timeout=self.timeout),
            gate_deadline=waits), wire.PUSH_REPLY)
        if len(reply.arrays) != 1 or reply.arrays[0].dtype != np.bool_ or reply.arrays[0].size != 1:
            raise PSRPCError(self.address, "push", grpc.StatusCode.DATA_LOSS, "reply does not hold a bool")
        return bool(reply.arrays[0].reshape(()))

    def stats(self) -> dict:
        data = wire.encode(wire.Message(wire.STATS, token=self.token))
        reply = self._reply("stats", self._call("stats", lambda: self._stats(data, timeout=self.timeout)),
                            wire.STATS_REPLY)
        try:
            return reply.json()
        except wire.WireError as e:
            raise PSRPCError(self.address, "stats", grpc.StatusCode.DATA_LOSS, str(e)) from None

    def create_table(self, spec: TableSpec) -> bool:
        data = wire.encode(wire.Message(wire.CREATE, spec.name, token=self.token, meta=wire.json_meta(spec.to_json())))
        reply = self._reply("create-table",
                            self._call("create-table", lambda: self._create(data, timeout=self.timeout)),
                            wire.CREATE_REPLY)
        return bool(reply.arrays[0].reshape(()))

    def clock(self, group: int, clock: int, groups: int, sync: Sync, cut_every: int = 0) -> int:
        data = wire.encode(wire.Message(wire.CLOCK, seq=groups, step=clock, token=self.token, group=group,
                                        meta=wire.json_meta({"staleness": sync.staleness,
                                                             "cut_every": int(cut_every)})))
        reply = self._reply("clock", self._call("clock", lambda: self._clock(data, timeout=self.timeout)),
                            wire.CLOCK_REPLY)
        if len(reply.arrays) != 1 or reply.arrays[0].dtype != np.int64 or reply.arrays[0].size != 1:
            raise PSRPCError(self.address, "clock", grpc.StatusCode.DATA_LOSS, "reply does not hold an int64")
        return int(reply.arrays[0].reshape(()))

    def export(self, table: str, at: int | None = None, ticket: int | None = None) -> dict[str, np.ndarray]:
        """Every row this server stores for `table` (keys, values, optimizer slots); `at`:
        the rows of the cut at that step; `ticket`: the rows at that `mark`."""
        meta = {k: v for k, v in (("at", at), ("ticket", ticket)) if v is not None}
        data = wire.encode(wire.Message(wire.EXPORT, table, token=self.token,
                                        meta=wire.json_meta(meta) if meta else b""))
        buf = self._call("export", lambda: bytearray().join(self._export(data, timeout=self.timeout * 10)))
        return self._fields("export", self._reply("export", buf, wire.EXPORT_REPLY))

    def export_pieces(self, table: str, ticket: int | None = None) -> list[dict[str, np.ndarray]]:
        """`export` as a list of pieces: one (the server joins its partitions into one reply)."""
        return [self.export(table, ticket=ticket)]

    def _fields(self, method: str, reply: wire.Message) -> dict[str, np.ndarray]:
        """A reply's named arrays; a reply that does not name them is lost data."""
        try:
            return wire.fields(reply)
        except wire.WireError as e:
            raise PSRPCError(self.address, method, grpc.StatusCode.DATA_LOSS, f"malformed reply: {e}") from None

    def load(self, table: str, rows: dict[str, np.ndarray], only_missing: bool = False) -> None:
        """Store snapshot rows on this server, in requests of about LOAD_BATCH_BYTES."""
        n = int(rows["keys"].shape[0])
        row_bytes = max(1, sum(a[:1].nbytes for a in rows.values()))
        step = max(1, LOAD_BATCH_BYTES // row_bytes)
        for lo in range(0, max(n, 1), step):
            data = wire.encode(wire.named(wire.LOAD, {k: a[lo:lo + step] for k, a in rows.items()}, table,
                                          self.token, only_missing=bool(only_missing)))
            self._reply("load", self._call("load", lambda: self._load(wire.chunks(data, self.chunk_bytes),
                                                                       timeout=self.timeout * 10)),
                        wire.LOAD_REPLY)

    # ------------------------------------------------------------------ the manager's calls
    def _admin_call(self, op: str, timeout: float | None = None, **args) -> dict:
        data = wire.encode(wire.Message(wire.ADMIN, token=self.token, meta=wire.json_meta(dict(args, op=op))))
        reply = self._reply("admin", self._call("admin", lambda: self._admin(data, timeout=timeout or self.timeout)),
                            wire.ADMIN_REPLY)
        return reply.json()

    def ping(self, timeout: float = 1.0) -> int:
        """The server's ring version; one attempt (a heartbeat: a dead server must fail fast)."""
        data = wire.encode(wire.Message(wire.ADMIN, token=self.token, meta=wire.json_meta({"op": "ping"})))
        try:
            reply = self._admin(data, timeout=timeout)
        except grpc.RpcError as e:
            raise PSRPCError(self.address, "ping", e.code(), e.details() or "") from None
        return int(self._reply("ping", reply, wire.ADMIN_REPLY).json()["version"])

    def freeze(self) -> None:
        self._admin_call("freeze", timeout=self.timeout * 4)

    def clear(self, table: str) -> None:
        self._admin_call("clear", table=table)

    def mark(self, table: str) -> int:
        return int(self._admin_call("mark", table=table)["ticket"])

    def table_specs(self) -> list[TableSpec]:
        return [TableSpec.from_json(t, f"{self.address} tables[{i}]")
                for i, t in enumerate(self._admin_call("tables")["tables"])]

    def unfreeze(self) -> None:
        self._admin_call("unfreeze")

    def fence(self) -> None:
        self._admin_call("fence")

    def set_ring(self, ring: Ring, drop: bool = True) -> None:
        self._admin_call("set_ring", servers=list(ring.servers), version=ring.version,
                         partitions=ring.num_partitions, vnodes=ring.vnodes, drop=bool(drop))

    def export_partitions(self, parts) -> dict[str, np.ndarray]:
        data = wire.encode(wire.Message(wire.EXPORT, token=self.token,
                                        meta=wire.json_meta({"partitions": [int(p) for p in parts]})))
        buf = self._call("export-parts", lambda: bytearray().join(self._export_parts(data, timeout=self.timeout * 10)))
        return self._fields("export-parts", self._reply("export-parts", buf, wire.EXPORT_REPLY))

    def load_partitions(self, data: dict[str, np.ndarray]) -> int:
        msg = wire.encode(wire.named(wire.LOAD, data, token=self.token))
        reply = self._reply("load-parts", self._call("load-parts", lambda: self._load_parts(
            wire.chunks(msg, self.chunk_bytes), timeout=self.timeout * 10)), wire.LOAD_REPLY)
        return int(reply.arrays[0].reshape(()))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
