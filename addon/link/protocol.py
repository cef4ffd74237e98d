"""ImFace++ wire protocol v1: one definition shared by the backend server and the Blender client.

No torch, no bpy, no pickle: numpy, pyzmq, msgpack and the standard library only. The full message
catalogue, limits and security rules are written up in `docs/protocol.md`; this module is the code.

Public API (stable; names are only ever added to)
=================================================

Constants
    PROTOCOL_VERSION = 1
    DTYPES: frozenset[str]                    the array dtype allowlist
    CODE_PARTS = ("identity", "expression", "detail")
    REQUEST_TYPES, IDEMPOTENT_TYPES, JOB_STATES: frozenset[str]
    TOPIC_STATUS, TOPIC_JOB, TOPIC_LOG, TOPIC_HEARTBEAT: bytes   PUB topic frames
    HEARTBEAT_INTERVAL_S = 0.5, HEARTBEAT_TIMEOUT_S = 1.5
    UPLOAD_CHUNK_BYTES = 8 MiB, UPLOAD_TOTAL_BYTES = 1 GiB (server default, configurable)
    Error codes: E_BAD_MESSAGE, E_VERSION, E_UNKNOWN_TYPE, E_BAD_FIELD, E_BAD_ARRAY, E_TOO_LARGE,
        E_REPLAYED, E_STALE, E_NOT_FOUND, E_FORBIDDEN_PATH, E_BAD_SCAN, E_NO_MODEL, E_BUSY,
        E_CANCELLED, E_INTERNAL; ERROR_CODES: frozenset[str]
    Limits (frozen dataclass), DEFAULT_LIMITS (what the server accepts), CLIENT_LIMITS (what a
        client accepts from the server: only the size bounds are wider, 1 GiB messages).

Errors
    ProtocolError(code, message, details=None)   .code .message .details .to_body()
    error_body(code, message, details=None) -> dict
    error_from_body(body) -> ProtocolError

Ids, types
    new_id() -> str                              32 lowercase hex (uuid4)
    new_session_id() -> str                      same shape; one per process lifetime
    reply_type(request_type) -> str              "decode" -> "decode_reply"

Framing
    encode(type, body, *, session, msg_id=None, parent=None, now=None) -> list[bytes | memoryview]
        [header, body, *array_frames]; ndarrays anywhere in body become {"__nd__", "dtype", "shape"}
        and their bytes go out as memoryviews of the array itself (no copy when C-contiguous,
        little-endian and in the allowlist). Send with `socket.send_multipart(frames, copy=False)`.
    encode_error(err, *, session, parent) -> list[...]
    decode(frames, *, limits=DEFAULT_LIMITS) -> Message
        frames = [header, body, *arrays] (routing id / topic already stripped); accepts bytes,
        bytearray, memoryview or zmq.Frame. Raises ProtocolError with the code per failure; arrays
        come back as read-only numpy views of the received frames.
    Message (dataclass): type, id, session, time, parent, body, header, nbytes; .is_error(),
        .error() -> ProtocolError, .raise_for_error() -> body
    split_routed(frames) -> (routing_ids, frames)  ROUTER side: ids are everything before the header

Body checks (server side; raise ProtocolError "bad_field" / "bad_array")
    get_field(body, name, types, default=REQUIRED, *, where="body") -> value
    check_keys(body, allowed, required=(), *, where="body") -> None
    check_codes(codes, *, sizes=None, rows=None, where="codes") -> dict[str, np.ndarray(float32, 2-D)]
    codes_key(codes, **settings) -> str      content hash for caches (server LRU, client frame cache)

Replay protection
    ReplayGuard(window_s=..., max_skew_s=..., max_ids=...).check(message | session, id, time, now=None)
        raises ProtocolError "replayed" / "stale"; memory bounded by max_ids.

Connection file and keys
    ConnectionInfo (dataclass) .router_endpoint .pub_endpoint .to_dict() .from_dict()
    write_connection_file(path, info) -> Path      JSON, mode 0600, atomic (tmp + fsync + replace)
    read_connection_file(path, *, allow_insecure=False) -> ConnectionInfo
    require_curve() -> None                        RuntimeError when libzmq lacks CURVE
    KeyFiles (dataclass): keys_dir, server_public, server_secret, client_public, client_secret,
        allowed_dir
    key_files(keys_dir) -> KeyFiles                 the paths only (nothing created)
    ensure_keys(keys_dir, *, rotate=False) -> KeyFiles    server + default client keypair,
        allowlist folder; kept across restarts; secret files 0600, folder 0700
    add_client_key(keys_dir, name) -> (public: bytes, secret: bytes)   another allowed client
    load_keypair(path) -> (public: bytes, secret: bytes | None)
    curve_server(socket, public, secret) / curve_client(socket, server_public, public, secret)
    start_authenticator(context, allowed_dir) -> zmq.auth.thread.ThreadAuthenticator
    apply_socket_limits(socket, limits=DEFAULT_LIMITS) -> None    ZMQ_MAXMSGSIZE, LINGER 0
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
import stat
import tempfile
import time as _time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np

# ------------------------------------------------------------------------------------------ constants

PROTOCOL_VERSION: Final[int] = 1

# Arrays on the wire are little-endian and C-ordered; only these element types are accepted, so a
# peer can never make us build object arrays, structured dtypes or anything numpy would interpret.
DTYPES: Final[frozenset[str]] = frozenset({"float32", "float64", "int32", "int64", "uint32", "uint8"})

CODE_PARTS: Final[tuple[str, ...]] = ("identity", "expression", "detail")

REQUEST_TYPES: Final[frozenset[str]] = frozenset({
    "hello", "ping", "info", "models.list", "models.load", "codes", "decode", "extract", "stream",
    "stream.focus", "fit", "upload.begin", "upload.chunk", "upload.end", "train", "job.status",
    "job.cancel", "shutdown",
})
# Requests that may be sent again after a timeout without changing anything on the server (Lazy
# Pirate retries only these; a retry always carries a fresh id because the server refuses repeats).
IDEMPOTENT_TYPES: Final[frozenset[str]] = frozenset({
    "hello", "ping", "info", "models.list", "codes", "decode", "job.status",
})
# Server-initiated message types (no reply expected).
EVENT_TYPES: Final[frozenset[str]] = frozenset({"stream_frame", "job", "status", "log", "heartbeat"})
JOB_STATES: Final[frozenset[str]] = frozenset({"queued", "running", "done", "failed", "cancelled"})

TOPIC_STATUS: Final[bytes] = b"status"
TOPIC_JOB: Final[bytes] = b"job"
TOPIC_LOG: Final[bytes] = b"log"
TOPIC_HEARTBEAT: Final[bytes] = b"heartbeat"
TOPICS: Final[frozenset[bytes]] = frozenset({TOPIC_STATUS, TOPIC_JOB, TOPIC_LOG, TOPIC_HEARTBEAT})

# The server publishes a heartbeat this often; a client that hears none for HEARTBEAT_TIMEOUT_S
# reports the backend gone (3 missed beats: a `kill -9` is reported well within 2 s).
HEARTBEAT_INTERVAL_S: Final[float] = 0.5
HEARTBEAT_TIMEOUT_S: Final[float] = 1.5

# Large inputs (a 300 MB scan) go up in chunks of at most this size, under a total the server
# configures (default below); or by a path resolved under the server's allowed roots.
UPLOAD_CHUNK_BYTES: Final[int] = 8 * 2**20
UPLOAD_TOTAL_BYTES: Final[int] = 2**30

# Error codes (the "code" of an error body).
E_BAD_MESSAGE: Final = "bad_message"        # framing, header or msgpack problems
E_VERSION: Final = "version"                # header "v" or hello "protocol" is not ours
E_UNKNOWN_TYPE: Final = "unknown_type"      # request type the server does not serve
E_BAD_FIELD: Final = "bad_field"            # a body field is missing, unknown, or of the wrong type
E_BAD_ARRAY: Final = "bad_array"            # array descriptor/frame mismatch, wrong shape, NaN/inf codes
E_TOO_LARGE: Final = "too_large"            # a size limit was exceeded
E_REPLAYED: Final = "replayed"              # request id seen before from this session
E_STALE: Final = "stale"                    # header time outside the replay window
E_NOT_FOUND: Final = "not_found"            # unknown model, job, upload, stream or face
E_FORBIDDEN_PATH: Final = "forbidden_path"  # path outside the configured roots (symlinks resolved)
E_BAD_SCAN: Final = "bad_scan"              # scan file unreadable as geometry or over its bounds
E_NO_MODEL: Final = "no_model"              # request needs a loaded model
E_BUSY: Final = "busy"                      # a bounded queue is full; retry later
E_CANCELLED: Final = "cancelled"            # the work was cancelled
E_INTERNAL: Final = "internal"              # a server bug; the message says what failed
ERROR_CODES: Final[frozenset[str]] = frozenset({
    E_BAD_MESSAGE, E_VERSION, E_UNKNOWN_TYPE, E_BAD_FIELD, E_BAD_ARRAY, E_TOO_LARGE, E_REPLAYED,
    E_STALE, E_NOT_FOUND, E_FORBIDDEN_PATH, E_BAD_SCAN, E_NO_MODEL, E_BUSY, E_CANCELLED, E_INTERNAL,
})

_HEADER_KEYS: Final[frozenset[str]] = frozenset({"v", "type", "id", "session", "time", "parent"})
_HEADER_REQUIRED: Final[frozenset[str]] = frozenset({"v", "type", "id", "session", "time"})
_ND_KEYS: Final[frozenset[str]] = frozenset({"__nd__", "dtype", "shape"})
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_TYPE_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}\Z")


@dataclass(frozen=True)
class Limits:
    """Every bound applied to a received message. Both ends use the same numbers by default.

    ZMQ_MAXMSGSIZE (`max_frame_bytes`) is enforced by libzmq per frame, before we see anything (the
    peer is disconnected); `decode` then checks the total, the frame count and everything inside.
    The header and body byte bounds play the role of msgpack's `max_buffer_size`: a frame larger than
    them is refused before msgpack looks at it, and the length limits below stop a small frame from
    declaring huge containers.
    """

    max_message_bytes: int = 64 * 2**20   # all frames of one message together
    max_frame_bytes: int = 64 * 2**20     # ZMQ_MAXMSGSIZE on every socket
    max_frames: int = 64                  # header + body + array frames
    max_header_bytes: int = 1024
    max_body_bytes: int = 4 * 2**20       # msgpack body (arrays travel outside it)
    max_array_len: int = 100_000          # msgpack list length
    max_map_len: int = 1_024              # msgpack map length
    max_str_len: int = 1 * 2**20
    max_bin_len: int = 4 * 2**20
    max_depth: int = 32                   # nesting of lists/maps in the body (msgpack itself stops at 1024)
    max_array_elements: int = 64 * 2**20  # elements of one numpy array (64 MiB of uint8)
    max_ndim: int = 8
    replay_window_s: float = 60.0         # a message older than this is "stale"
    max_clock_skew_s: float = 10.0        # a message this far in the future is "stale"
    replay_max_ids: int = 200_000         # ids remembered by ReplayGuard (all sessions together)

    def unpack_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `msgpack.unpackb` (ext types refused, str map keys only)."""
        return dict(raw=False, use_list=True, strict_map_key=True, max_str_len=self.max_str_len,
                    max_bin_len=self.max_bin_len, max_array_len=self.max_array_len,
                    max_map_len=self.max_map_len, max_ext_len=0)


DEFAULT_LIMITS: Final[Limits] = Limits()
# What a client accepts from the (authenticated) server: results such as a fine `extract` mesh can be
# far larger than anything a client ever sends, so only the size bounds are wider.
CLIENT_LIMITS: Final[Limits] = Limits(max_message_bytes=1 * 2**30, max_frame_bytes=1 * 2**30,
                                      max_array_elements=256 * 2**20)

# ------------------------------------------------------------------------------------------ errors


class ProtocolError(Exception):
    """An error with the one wire shape: code (see ERROR_CODES), message (words), details (a map)."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"code": str(code), "message": str(message), "details": dict(details or {})}


def error_from_body(body: Mapping[str, Any]) -> ProtocolError:
    """The ProtocolError an "error" message carries (tolerant of a malformed body: it is an error anyway)."""
    code = body.get("code") if isinstance(body, Mapping) else None
    message = body.get("message") if isinstance(body, Mapping) else None
    details = body.get("details") if isinstance(body, Mapping) else None
    return ProtocolError(code if isinstance(code, str) else E_INTERNAL,
                         message if isinstance(message, str) else "error without a message",
                         details if isinstance(details, Mapping) else None)


# ------------------------------------------------------------------------------------------ ids, types


def new_id() -> str:
    return uuid.uuid4().hex


def new_session_id() -> str:
    return uuid.uuid4().hex


def reply_type(request_type: str) -> str:
    return request_type + "_reply"


# ------------------------------------------------------------------------------------------ encode


def _wire_array(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """The array as it goes on the wire (C-contiguous, little-endian) and its dtype name.

    No copy when it already is; otherwise one copy (a strided view, a big-endian array)."""
    name = arr.dtype.name
    if name not in DTYPES:
        raise TypeError(f"array dtype {arr.dtype} is not one of {sorted(DTYPES)}")
    want = np.dtype(name).newbyteorder("<")
    if arr.dtype != want:
        arr = arr.astype(want)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr, name


def _pack_value(value: Any, buffers: list[memoryview], depth: int) -> Any:
    if depth > DEFAULT_LIMITS.max_depth:
        raise ValueError(f"body nested deeper than {DEFAULT_LIMITS.max_depth}")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.ndarray):
        arr, name = _wire_array(value)
        index = len(buffers)
        # A flat uint8 view of the same memory: pyzmq sends it with copy=False without copying
        # (frames under zmq.COPY_THRESHOLD, 64 KiB, are copied by pyzmq anyway, which is cheaper).
        buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))
        return {"__nd__": index, "dtype": name, "shape": list(arr.shape)}
    if isinstance(value, np.generic):
        return _pack_value(value.item(), buffers, depth)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"map keys must be str, got {type(k).__name__}")
            if k == "__nd__":
                raise ValueError('"__nd__" is reserved for array descriptors')
            out[k] = _pack_value(v, buffers, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_pack_value(v, buffers, depth + 1) for v in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"cannot send a {type(value).__name__} (allowed: None, bool, int, float, str, bytes, "
                    "list, tuple, dict with str keys, numpy arrays of the allowlisted dtypes)")


def encode(type: str, body: Mapping[str, Any] | None, *, session: str, msg_id: str | None = None,
           parent: str | None = None, now: float | None = None) -> list[bytes | memoryview]:
    """Frames `[header, body, *arrays]` of one message; send with `send_multipart(frames, copy=False)`.

    `msg_id` defaults to a fresh `new_id()` (pass your own to correlate the reply); `parent` is the
    request id on replies, stream frames and job events. Raises TypeError/ValueError for values the
    protocol cannot carry (a programming error on the sending side, not a wire error)."""
    if not _TYPE_RE.match(type):
        raise ValueError(f"bad message type {type!r}")
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": type, "id": msg_id or new_id(),
                              "session": session, "time": float(_time.time() if now is None else now)}
    if parent is not None:
        header["parent"] = parent
    for key in ("id", "session") + (("parent",) if parent is not None else ()):
        if not isinstance(header[key], str) or not _HEX32.match(header[key]):
            raise ValueError(f"header {key} must be 32 lowercase hex characters, got {header[key]!r}")
    buffers: list[memoryview] = []
    packed_body = _pack_value(dict(body or {}), buffers, 0)
    frames: list[bytes | memoryview] = [msgpack.packb(header, use_bin_type=True),
                                        msgpack.packb(packed_body, use_bin_type=True)]
    frames.extend(buffers)
    return frames


def encode_error(err: ProtocolError, *, session: str, parent: str | None,
                 msg_id: str | None = None) -> list[bytes | memoryview]:
    """An "error" reply to request `parent` (None when the request id could not be read)."""
    return encode("error", err.to_body(), session=session, msg_id=msg_id, parent=parent)


# ------------------------------------------------------------------------------------------ decode


@dataclass
class Message:
    """A received, checked message. Arrays in `body` are read-only numpy views of the frames."""

    type: str
    id: str
    session: str
    time: float
    parent: str | None
    body: dict[str, Any]
    header: dict[str, Any]
    nbytes: int = 0

    def is_error(self) -> bool:
        return self.type == "error"

    def error(self) -> ProtocolError:
        return error_from_body(self.body)

    def raise_for_error(self) -> dict[str, Any]:
        """The body, or the carried ProtocolError raised."""
        if self.is_error():
            raise self.error()
        return self.body


def _buffer_of(frame: Any) -> memoryview:
    """A flat byte view of a received frame without copying (bytes, bytearray, memoryview, zmq.Frame)."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame (recv_multipart(copy=False))
    try:
        view = memoryview(buf if buf is not None else frame)
    except TypeError as e:
        raise ProtocolError(E_BAD_MESSAGE, f"a frame is not a byte buffer ({type(frame).__name__})") from e
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _unpack(view: memoryview, what: str, limit: int, limits: Limits) -> Any:
    if view.nbytes > limit:
        raise ProtocolError(E_TOO_LARGE, f"the {what} frame has {view.nbytes} bytes (limit {limit})",
                            {"frame": what, "bytes": view.nbytes, "limit": limit})
    try:
        return msgpack.unpackb(view, **limits.unpack_kwargs())
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgpack.BufferFull,
            msgpack.OutOfData, UnicodeDecodeError, ValueError, TypeError, OverflowError,
            RecursionError, MemoryError) as e:
        # ExtraData/FormatError/StackError/BufferFull are ValueError subclasses in msgpack 1.x;
        # listed anyway so the intent survives a library change.
        raise ProtocolError(E_BAD_MESSAGE, f"the {what} frame is not valid msgpack within the limits "
                            f"({type(e).__name__}: {str(e)[:200]})", {"frame": what}) from None


def _check_header(header: Any) -> tuple[str, str, str, float, str | None]:
    if not isinstance(header, dict):
        raise ProtocolError(E_BAD_MESSAGE, "the header is not a map")
    keys = set(header)
    if not keys <= _HEADER_KEYS or not _HEADER_REQUIRED <= keys:
        raise ProtocolError(E_BAD_MESSAGE, "the header must have keys v, type, id, session, time "
                            "(and parent on replies)",
                            {"unknown": sorted(map(str, keys - _HEADER_KEYS)),
                             "missing": sorted(_HEADER_REQUIRED - keys)})
    v = header["v"]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(E_BAD_MESSAGE, "header v must be an integer")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(E_VERSION, f"protocol version {v} is not supported (this side speaks "
                            f"{PROTOCOL_VERSION})", {"supported": [PROTOCOL_VERSION], "got": v})
    mtype = header["type"]
    if not isinstance(mtype, str) or not _TYPE_RE.match(mtype):
        raise ProtocolError(E_BAD_MESSAGE, "header type must be a short lowercase name")
    for key in ("id", "session", "parent"):
        if key in header and (not isinstance(header[key], str) or not _HEX32.match(header[key])):
            raise ProtocolError(E_BAD_MESSAGE, f"header {key} must be 32 lowercase hex characters")
    t = header["time"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ProtocolError(E_BAD_MESSAGE, "header time must be a finite number (unix seconds)")
    return mtype, header["id"], header["session"], float(t), header.get("parent")


class _Resolver:
    """Walks a decoded body: checks value kinds and depth, turns array descriptors into arrays."""

    def __init__(self, buffers: Sequence[memoryview], limits: Limits) -> None:
        self.buffers = buffers
        self.limits = limits
        self.used = [False] * len(buffers)

    def walk(self, value: Any, depth: int) -> Any:
        if depth > self.limits.max_depth:
            raise ProtocolError(E_BAD_MESSAGE, f"the body is nested deeper than {self.limits.max_depth}")
        if isinstance(value, dict):
            if "__nd__" in value:
                return self.array(value)
            for k in value:
                if not isinstance(k, str):  # strict_map_key still allows bytes keys
                    raise ProtocolError(E_BAD_MESSAGE, "map keys must be strings")
            return {k: self.walk(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.walk(v, depth + 1) for v in value]
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return value
        raise ProtocolError(E_BAD_MESSAGE, f"unsupported value kind {type(value).__name__}")

    def array(self, desc: dict[str, Any]) -> np.ndarray:
        lim = self.limits
        if set(desc) != _ND_KEYS:
            raise ProtocolError(E_BAD_ARRAY, "an array descriptor has exactly the keys __nd__, dtype, shape",
                                {"keys": sorted(map(str, desc))})
        index, dtype, shape = desc["__nd__"], desc["dtype"], desc["shape"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.buffers):
            raise ProtocolError(E_BAD_ARRAY, f"array frame index {index!r} does not name one of the "
                                f"{len(self.buffers)} array frames", {"index": repr(index)[:40]})
        if self.used[index]:
            raise ProtocolError(E_BAD_ARRAY, f"array frame {index} is referenced twice", {"index": index})
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(E_BAD_ARRAY, f"dtype {str(dtype)[:40]!r} is not allowed",
                                {"allowed": sorted(DTYPES)})
        if (not isinstance(shape, list) or len(shape) > lim.max_ndim
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ProtocolError(E_BAD_ARRAY, f"shape must be a list of at most {lim.max_ndim} "
                                "non-negative integers", {"shape": repr(shape)[:80]})
        elements = math.prod(shape)  # Python ints: no overflow however large the claimed shape
        if elements > lim.max_array_elements:
            raise ProtocolError(E_TOO_LARGE, f"array of {elements} elements (limit {lim.max_array_elements})",
                                {"elements": elements, "limit": lim.max_array_elements})
        dt = np.dtype(dtype).newbyteorder("<")
        buf = self.buffers[index]
        if buf.nbytes != elements * dt.itemsize:
            raise ProtocolError(E_BAD_ARRAY, f"array frame {index} has {buf.nbytes} bytes, shape {shape} "
                                f"of {dtype} needs {elements * dt.itemsize}",
                                {"index": index, "bytes": buf.nbytes, "expected": elements * dt.itemsize})
        self.used[index] = True
        arr = np.frombuffer(buf, dtype=dt).reshape(shape)
        arr.flags.writeable = False  # a view of the received frame: copy before editing
        return arr


def decode(frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Check and decode `[header, body, *arrays]` (routing ids / topic frame already removed).

    Raises ProtocolError: bad_message (framing, header, msgpack, nesting, unreferenced frames),
    version, too_large (message/frame/array bounds), bad_array (descriptor and frame mismatch)."""
    n = len(frames)
    if n < 2:
        raise ProtocolError(E_BAD_MESSAGE, f"a message has a header and a body frame, got {n} frame(s)")
    if n > limits.max_frames:
        raise ProtocolError(E_TOO_LARGE, f"{n} frames (limit {limits.max_frames})",
                            {"frames": n, "limit": limits.max_frames})
    views = [_buffer_of(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        raise ProtocolError(E_TOO_LARGE, f"message of {total} bytes (limit {limits.max_message_bytes})",
                            {"bytes": total, "limit": limits.max_message_bytes})
    header = _unpack(views[0], "header", limits.max_header_bytes, limits)
    mtype, mid, session, t, parent = _check_header(header)
    try:
        raw_body = _unpack(views[1], "body", limits.max_body_bytes, limits)
        if not isinstance(raw_body, dict):
            raise ProtocolError(E_BAD_MESSAGE, "the body is not a map")
        resolver = _Resolver(views[2:], limits)
        body = resolver.walk(raw_body, 0)
        if not all(resolver.used):
            unused = [i for i, u in enumerate(resolver.used) if not u]
            raise ProtocolError(E_BAD_MESSAGE, f"array frames {unused[:8]} are not referenced by the body",
                                {"unreferenced": unused[:64]})
    except ProtocolError as e:
        # The header was readable: say which request failed so the error reply can correlate.
        e.details.setdefault("request", mid)
        e.details.setdefault("type", mtype)
        raise
    return Message(type=mtype, id=mid, session=session, time=t, parent=parent, body=body,
                   header=header, nbytes=total)


def peek_header(frames: Sequence[Any], *, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any] | None:
    """Best-effort header of a message that failed `decode`, for correlating the error reply.

    None when the header frame itself is unreadable (then the error reply has no parent)."""
    try:
        if not frames:
            return None
        header = _unpack(_buffer_of(frames[0]), "header", limits.max_header_bytes, limits)
        _check_header(header)
        return header
    except ProtocolError:
        return None


def split_routed(frames: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """ROUTER side: `(routing_ids, message_frames)`. The router prepends exactly one id per hop;
    we use one hop (DEALER -> ROUTER), so the first frame is the id and the rest the message."""
    if len(frames) < 1:
        raise ProtocolError(E_BAD_MESSAGE, "empty message")
    return list(frames[:1]), list(frames[1:])


# ------------------------------------------------------------------------------------------ body checks


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


def _type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    tt = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in tt:  # True is an int in Python; never on the wire
        return False
    if float in tt and isinstance(value, int) and not isinstance(value, bool):
        return True  # msgpack sends 1.0 as a float but a client may write 1
    return isinstance(value, tt)


def get_field(body: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = REQUIRED,
              *, where: str = "body") -> Any:
    """`body[name]` checked against `types` (bool is never accepted as int); bad_field otherwise.

    A missing field returns `default`, or raises bad_field when it is REQUIRED. An int given for a
    float field comes back as float."""
    if name not in body:
        if default is REQUIRED:
            raise ProtocolError(E_BAD_FIELD, f"{where}.{name} is required", {"field": f"{where}.{name}"})
        return default
    value = body[name]
    if not _type_ok(value, types):
        tt = types if isinstance(types, tuple) else (types,)
        raise ProtocolError(E_BAD_FIELD, f"{where}.{name} must be {' or '.join(t.__name__ for t in tt)}, "
                            f"got {type(value).__name__}", {"field": f"{where}.{name}"})
    tt = types if isinstance(types, tuple) else (types,)
    if float in tt and int not in tt and isinstance(value, int):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(E_BAD_FIELD, f"{where}.{name} must be finite", {"field": f"{where}.{name}"})
    return value


def check_keys(body: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str] = (), *,
               where: str = "body") -> None:
    """bad_field when `body` has a key outside `allowed` or misses one of `required`."""
    allowed_set, required_set = set(allowed), set(required)
    unknown = sorted(k for k in body if k not in allowed_set)
    missing = sorted(k for k in required_set if k not in body)
    if unknown or missing:
        raise ProtocolError(E_BAD_FIELD, f"{where}: unknown keys {unknown}, missing keys {missing}",
                            {"unknown": unknown[:32], "missing": missing, "allowed": sorted(allowed_set)})


def check_codes(codes: Any, *, sizes: Mapping[str, int] | None = None, rows: int | None = None,
                where: str = "codes") -> dict[str, np.ndarray]:
    """The codes map {identity, expression, detail} as float32 (rows, size) arrays, checked.

    Each part is a float32 or float64 array of shape (size,) or (rows, size); all parts have the same
    rows (and `rows` when given) and the model's `sizes` when given; every value is finite after the
    cast to float32. bad_field: not a map, missing/unknown parts, not an array. bad_array: dtype, shape,
    size mismatch, NaN or infinity."""
    if not isinstance(codes, Mapping):
        raise ProtocolError(E_BAD_FIELD, f"{where} must be a map of {list(CODE_PARTS)}", {"field": where})
    check_keys(codes, CODE_PARTS, CODE_PARTS, where=where)
    out: dict[str, np.ndarray] = {}
    n_rows: set[int] = set()
    for part in CODE_PARTS:
        a = codes[part]
        name = f"{where}.{part}"
        if not isinstance(a, np.ndarray):
            raise ProtocolError(E_BAD_FIELD, f"{name} must be an array", {"field": name})
        if a.dtype.name not in ("float32", "float64"):
            raise ProtocolError(E_BAD_ARRAY, f"{name} must be float32, got {a.dtype.name}", {"field": name})
        if a.ndim == 1:
            a = a.reshape(1, -1)
        if a.ndim != 2 or a.shape[0] < 1:
            raise ProtocolError(E_BAD_ARRAY, f"{name} must have shape (size,) or (rows, size), got "
                                f"{list(codes[part].shape)}", {"field": name, "shape": list(codes[part].shape)})
        if sizes is not None and part in sizes and a.shape[1] != sizes[part]:
            raise ProtocolError(E_BAD_ARRAY, f"{name} has {a.shape[1]} values, the model expects {sizes[part]}",
                                {"field": name, "expected": int(sizes[part]), "got": int(a.shape[1])})
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is caught just below
            # a writable copy (codes are tiny): received arrays are read-only views of the frames,
            # which torch.from_numpy would warn about
            a32 = np.array(a, dtype=np.float32)
        if not np.isfinite(a32).all():
            raise ProtocolError(E_BAD_ARRAY, f"{name} contains NaN or infinite values", {"field": name})
        n_rows.add(a32.shape[0])
        out[part] = a32
    if len(n_rows) != 1 or (rows is not None and n_rows != {rows}):
        raise ProtocolError(E_BAD_ARRAY, f"{where}: the parts have rows {sorted(n_rows)}"
                            + (f", expected {rows}" if rows is not None else ", they must match"),
                            {"field": where, "rows": sorted(n_rows)})
    return out


def codes_key(codes: Mapping[str, np.ndarray], **settings: Any) -> str:
    """A content hash of codes (as float32 bytes, part by part) plus settings, for frame caches.

    Two code sets that are equal as float32 give the same key on the client and the server; the
    settings (e.g. neutral=True, model=fingerprint) are hashed as sorted JSON."""
    h = hashlib.blake2b(digest_size=16)
    for part in CODE_PARTS:
        a = np.ascontiguousarray(np.asarray(codes[part], dtype="<f4"))
        h.update(part.encode())
        h.update(repr(a.shape).encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ replay guard


class ReplayGuard:
    """Refuses a request id seen twice from one sender session and messages outside the time window.

    Ids are remembered only while their message could still pass the time check (window + skew), so
    memory follows the request rate, and at most `max_ids` are kept. When the cap forces an id out
    before its time, the guard raises its floor to that id's time: anything not newer than the floor
    is refused as stale, so an evicted id can never be replayed (the cost is only that, under a flood,
    a slow client's old-looking message may be refused as stale and has to be resent)."""

    def __init__(self, window_s: float = DEFAULT_LIMITS.replay_window_s,
                 max_skew_s: float = DEFAULT_LIMITS.max_clock_skew_s,
                 max_ids: int = DEFAULT_LIMITS.replay_max_ids) -> None:
        self.window_s = float(window_s)
        self.max_skew_s = float(max_skew_s)
        self.max_ids = int(max_ids)
        self._seen: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, str, str]] = []  # (time, session, id), oldest first
        self._floor = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, message: Message | str, msg_id: str | None = None, msg_time: float | None = None,
              *, now: float | None = None) -> None:
        """Raise ProtocolError stale/replayed, else remember the id. Pass a Message, or its session,
        id and time."""
        if isinstance(message, Message):
            session, msg_id, msg_time = message.session, message.id, message.time
        else:
            session = message
        assert msg_id is not None and msg_time is not None
        now = _time.time() if now is None else now
        self._expire(now)
        if msg_time < now - self.window_s - self.max_skew_s or msg_time > now + self.max_skew_s:
            raise ProtocolError(E_STALE, f"message time is {now - msg_time:+.1f} s from now (window "
                                f"{self.window_s:g} s, allowed skew {self.max_skew_s:g} s)",
                                {"age_s": round(now - msg_time, 3), "window_s": self.window_s})
        if msg_time <= self._floor:
            raise ProtocolError(E_STALE, "message older than the replay memory (server under load); resend",
                                {"age_s": round(now - msg_time, 3)})
        key = (session, msg_id)
        if key in self._seen:
            raise ProtocolError(E_REPLAYED, f"request id {msg_id} was already received from this session",
                                {"id": msg_id})
        self._seen[key] = msg_time
        heapq.heappush(self._heap, (msg_time, session, msg_id))
        while len(self._seen) > self.max_ids:
            t, s, i = heapq.heappop(self._heap)
            if self._seen.pop((s, i), None) is not None:
                self._floor = max(self._floor, t)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s - self.max_skew_s
        while self._heap and self._heap[0][0] < cutoff:
            _, s, i = heapq.heappop(self._heap)
            self._seen.pop((s, i), None)


# ------------------------------------------------------------------------------------------ connection file


@dataclass
class ConnectionInfo:
    """What a client needs to reach a server: addresses and CURVE keys (Z85 text, 40 characters)."""

    host: str
    router_port: int
    pub_port: int
    server_public_key: str
    client_public_key: str
    client_secret_key: str
    pid: int = 0
    protocol: int = PROTOCOL_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept on rewrite

    @property
    def router_endpoint(self) -> str:
        return f"tcp://{_host_for_url(self.host)}:{self.router_port}"

    @property
    def pub_endpoint(self) -> str:
        return f"tcp://{_host_for_url(self.host)}:{self.pub_port}"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(protocol=self.protocol, host=self.host, router_port=self.router_port, pub_port=self.pub_port,
                 server_public_key=self.server_public_key, client_public_key=self.client_public_key,
                 client_secret_key=self.client_secret_key, pid=self.pid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ConnectionInfo":
        if not isinstance(d, Mapping):
            raise ValueError("a connection file holds a JSON object")
        known = {"protocol", "host", "router_port", "pub_port", "server_public_key", "client_public_key",
                 "client_secret_key", "pid"}
        try:
            info = cls(host=str(d["host"]), router_port=int(d["router_port"]), pub_port=int(d["pub_port"]),
                       server_public_key=str(d["server_public_key"]),
                       client_public_key=str(d["client_public_key"]),
                       client_secret_key=str(d["client_secret_key"]), pid=int(d.get("pid", 0)),
                       protocol=int(d.get("protocol", PROTOCOL_VERSION)),
                       extra={k: v for k, v in d.items() if k not in known})
        except KeyError as e:
            raise ValueError(f"the connection file lacks {e.args[0]!r}") from None
        if info.protocol != PROTOCOL_VERSION:
            raise ValueError(f"the connection file is for protocol {info.protocol}, this client speaks "
                             f"{PROTOCOL_VERSION}")
        for k in ("server_public_key", "client_public_key", "client_secret_key"):
            if len(getattr(info, k)) != 40:
                raise ValueError(f"{k} must be a 40-character Z85 key")
        return info


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def write_connection_file(path: str | os.PathLike[str], info: ConnectionInfo | Mapping[str, Any]) -> Path:
    """Write the connection file atomically with mode 0600 (created so, never chmod-ed after the fact:
    there is no moment where another user could read the client secret key)."""
    path = Path(path)
    data = info.to_dict() if isinstance(info, ConnectionInfo) else dict(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600 by spec
    try:
        os.chmod(tmp, 0o600)  # mkstemp already creates 0600; explicit for platforms that differ
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_connection_file(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> ConnectionInfo:
    """Read and check a connection file. On POSIX a file readable by group or others is refused
    (its secret key may have leaked) unless `allow_insecure`."""
    path = Path(path)
    if os.name == "posix" and not allow_insecure:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(f"{path} has mode {mode:o}; it holds a secret key and must be 0600 "
                                  "(chmod 600, or rotate the keys if others could read it)")
    with path.open(encoding="utf-8") as f:
        return ConnectionInfo.from_dict(json.load(f))


# ------------------------------------------------------------------------------------------ CURVE keys


def require_curve() -> None:
    """RuntimeError unless this libzmq has CURVE (libsodium/tweetnacl built in)."""
    import zmq

    if not zmq.has("curve"):
        raise RuntimeError(f"libzmq {zmq.zmq_version()} was built without CURVE security; install a pyzmq "
                           "wheel from PyPI (it bundles a libzmq with CURVE) instead of a system build")


@dataclass(frozen=True)
class KeyFiles:
    """Where the keys live. `allowed_dir` holds one public certificate per allowed client."""

    keys_dir: Path
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    allowed_dir: Path


def key_files(keys_dir: str | os.PathLike[str]) -> KeyFiles:
    """The key file paths of a keys folder (nothing is created or checked)."""
    keys_dir = Path(keys_dir)
    return KeyFiles(keys_dir=keys_dir, server_public=keys_dir / "server.key",
                    server_secret=keys_dir / "server.key_secret", client_public=keys_dir / "client.key",
                    client_secret=keys_dir / "client.key_secret", allowed_dir=keys_dir / "allowed")


def _create_keypair(keys_dir: Path, name: str) -> tuple[Path, Path]:
    import zmq.auth

    public, secret = zmq.auth.create_certificates(keys_dir, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def ensure_keys(keys_dir: str | os.PathLike[str], *, rotate: bool = False) -> KeyFiles:
    """The server keypair, the default client keypair and the allowlist folder, created when absent
    (or `rotate`), kept otherwise, so a restarted server accepts clients holding the old keys."""
    require_curve()
    files = key_files(keys_dir)
    files.keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(files.keys_dir, 0o700)
    files.allowed_dir.mkdir(exist_ok=True)
    os.chmod(files.allowed_dir, 0o700)
    if rotate or not (files.server_public.is_file() and files.server_secret.is_file()):
        _create_keypair(files.keys_dir, "server")
    if rotate or not (files.client_public.is_file() and files.client_secret.is_file()):
        _create_keypair(files.keys_dir, "client")
        if rotate:  # old client keys are no longer allowed
            for p in files.allowed_dir.glob("*.key"):
                p.unlink()
    allowed = files.allowed_dir / "client.key"
    if not allowed.is_file() or allowed.read_bytes() != files.client_public.read_bytes():
        allowed.write_bytes(files.client_public.read_bytes())
    return files


def add_client_key(keys_dir: str | os.PathLike[str], name: str) -> tuple[bytes, bytes]:
    """A new client keypair `name` (e.g. for a second artist's machine), allowed from now on.

    The server must reload its allowlist (`authenticator.configure_curve(...)` again) to see it."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) or name in ("server", "client"):
        raise ValueError("client key name: 1-64 letters, digits, _ or -, not 'server'/'client'")
    files = ensure_keys(keys_dir)
    public_path, secret_path = _create_keypair(files.keys_dir, name)
    (files.allowed_dir / f"{name}.key").write_bytes(public_path.read_bytes())
    public, secret = load_keypair(secret_path)
    assert secret is not None
    return public, secret


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a certificate file (secret is None for a public-only `.key`)."""
    import zmq.auth

    return zmq.auth.load_certificate(path)


def _as_key(key: str | bytes) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else key


def curve_server(socket: Any, public: str | bytes, secret: str | bytes) -> None:
    """Make `socket` a CURVE server; call before bind."""
    socket.curve_secretkey = _as_key(secret)
    socket.curve_publickey = _as_key(public)
    socket.curve_server = True


def curve_client(socket: Any, server_public: str | bytes, public: str | bytes, secret: str | bytes) -> None:
    """Make `socket` a CURVE client of the server with `server_public`; call before connect."""
    socket.curve_serverkey = _as_key(server_public)
    socket.curve_publickey = _as_key(public)
    socket.curve_secretkey = _as_key(secret)


def start_authenticator(context: Any, allowed_dir: str | os.PathLike[str]) -> Any:
    """A started ThreadAuthenticator accepting only CURVE clients whose public certificate is in
    `allowed_dir` (call `.configure_curve(domain="*", location=...)` again after adding a key; `.stop()`
    on shutdown). Without an authenticator libzmq would accept any client key."""
    require_curve()
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed_dir))
    return auth


def apply_socket_limits(socket: Any, limits: Limits = DEFAULT_LIMITS) -> None:
    """ZMQ_MAXMSGSIZE (a peer sending a bigger frame is disconnected by libzmq) and LINGER 0 (close
    never blocks on unsent messages to a dead peer)."""
    socket.maxmsgsize = limits.max_frame_bytes
    socket.linger = 0
