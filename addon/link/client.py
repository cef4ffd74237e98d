"""Clients of the ImFace++ backend (protocol v1, see docs/protocol.md). No torch, no bpy.

Two front ends over one engine:

- `AsyncClient` for Blender: `pump()` is called from a `bpy.app.timers` callback (or a handler) and
  only ever makes non-blocking calls (`recv(NOBLOCK)`, `send(NOBLOCK)`), so it cannot wait by
  construction. Requests return `Pending` handles whose state `pump()` updates; decodes are
  coalesced per face (one in flight, the newest edit replaces a queued one); a byte-bounded
  `FrameCache` answers decodes of codes seen before without a round trip; `stream()` fills the same
  cache from `stream_frame` pushes. Heartbeats are watched: no heartbeat for 1.5 s -> state "gone"
  with a reason; when the backend is back (same or new session) the client re-handshakes by itself.
- `Client` for scripts and tests: blocking `request()` with timeouts and Lazy Pirate retries of
  idempotent requests (socket closed with LINGER 0, reopened, request resent with a fresh id),
  `run_job()`, `stream()` as an iterator, `events()`, `upload()`.

Single-threaded: use one client from one thread (Blender: the main thread). Arrays handed to a
request are sent without copying: do not modify them after the call.

API summary
    AsyncClient(source, *, name="imface-blender", timeout=5.0, retries=3, cache_bytes=256 MiB,
                limits=CLIENT_LIMITS, context=None, reopen_on_retry=False)
        .start() .close() .pump(max_messages=256) -> int
        .sockets -> [DEALER, SUB]   .wait_readable(seconds) -> bool  (BLOCKING helper, for bakes/scripts)
        .state ("closed"|"connecting"|"ready"|"gone") .reason .server (hello reply) .server_session
        .model_id .topology (dict: faces/uvs of the current model or None)
        .submit(type, body=None, *, key=None, timeout=None, retries=None) -> Pending
        .decode(face, codes, *, neutral=False, with_topology=None) -> Pending  (done at once on a cache hit)
        .cached_vertices(codes, *, neutral=False) -> np.ndarray | None
        .stream(face, frames, codes, *, neutral=False, focus=None) -> StreamHandle
        .focus(handle, frame) -> None
        .jobs: dict[job id, latest job event body]   .events: deque[(topic, Message)]
        .on_state(state, reason) / .on_event(topic, message) / .on_frame(face, frame, vertices) callbacks
    Pending: .type .state ("queued"|"sent"|"done"|"failed"|"superseded") .result .error .done() .ok
        .add_done_callback(fn) .value() (result or raise)
    StreamHandle: .id .face .frames .state .received .vertices(frame) .complete
    Client(source, *, name="imface-script", timeout=2.5, retries=3, ...)  (context manager)
        .connect(timeout=None) -> hello body   .request(type, body=None, *, timeout=None, retries=None) -> body
        .ping() -> seconds   .run_job(type, body, *, timeout=None, on_event=None) -> result
        .wait_job(job_id, ...) -> result   .stream(face, frames, codes, ...) -> Iterator[(frame, vertices)]
        .events(timeout) -> Iterator[(topic, Message)]   .upload(path_or_bytes, name=None) -> upload id
        .decode(face, codes, ...) -> vertices   .close()
    Errors: ClientError > BackendGone, RequestTimeout, BackendRestarted; error replies raise ProtocolError.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import protocol as P
from .protocol import ConnectionInfo, Limits, Message, ProtocolError

log = logging.getLogger(__name__)

Source = ConnectionInfo | str | os.PathLike[str]
StateCallback = Callable[[str, str], None]
EventCallback = Callable[[str, Message], None]
FrameCallback = Callable[[str, int, np.ndarray], None]

# How often a gone client looks for the backend again (re-reads the connection file, offers hello).
RECONNECT_INTERVAL_S = 1.0
# Recent streams remembered so late stream frames still land in the cache under the right codes.
_STREAMS_KEPT = 16


# ------------------------------------------------------------------------------------------ errors


class ClientError(Exception):
    """A failure on the client side of the link (no error reply from the server)."""


class BackendGone(ClientError):
    """The backend stopped answering (no heartbeat) or cannot be reached."""


class RequestTimeout(ClientError):
    """No reply within the timeout (after the retries allowed for the request type)."""


class BackendRestarted(ClientError):
    """The backend restarted while a non-idempotent request was in flight; its outcome is unknown."""


# ------------------------------------------------------------------------------------------ handles


class Pending:
    """A request handle whose state `pump()` updates. Callbacks run inside `pump()` (the caller's thread)."""

    def __init__(self, type: str, body: Mapping[str, Any] | None, *, key: Any, idempotent: bool,
                 timeout: float, retries: int) -> None:
        self.type = type
        self.body: dict[str, Any] = dict(body or {})
        self.key = key
        self.idempotent = idempotent
        self.timeout = timeout
        self.retries_left = retries
        self.ids: list[str] = []            # one per attempt; a late reply to any attempt counts
        self.state = "queued"
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.created = time.monotonic()
        self.deadline = float("inf")       # reply deadline while sent
        self.meta: dict[str, Any] = {}      # engine bookkeeping (cache keys, stream handle)
        self._callbacks: list[Callable[[Pending], None]] = []

    @property
    def id(self) -> str | None:
        return self.ids[-1] if self.ids else None

    def done(self) -> bool:
        return self.state in ("done", "failed", "superseded")

    @property
    def ok(self) -> bool:
        return self.state == "done"

    def value(self) -> dict[str, Any]:
        """The reply body; raises the error (ProtocolError, ClientError) or RuntimeError when not done."""
        if self.state == "done":
            assert self.result is not None
            return self.result
        if self.error is not None:
            raise self.error
        raise RuntimeError(f"request {self.type} is {self.state}")

    def add_done_callback(self, fn: Callable[[Pending], None]) -> None:
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def _finish(self, state: str, result: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        if self.done():
            return
        self.state, self.result, self.error = state, result, error
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a UI callback must not break the pump
                log.exception("done callback of %s failed", self.type)

    def __repr__(self) -> str:
        return f"<Pending {self.type} {self.state} id={self.id}>"


class StreamHandle:
    """A stream of frames for one face; frames land in the client's FrameCache as they arrive."""

    def __init__(self, client: AsyncClient, face: str, frames: list[int], keys: dict[int, str],
                 codes: dict[str, np.ndarray], neutral: bool, focus: int | None) -> None:
        self._client = client
        self.face = face
        self.frames = frames
        self.keys = keys                    # frame -> cache key
        self.codes = codes                  # stacked float32 (F, size), row i = frames[i]
        self.neutral = neutral
        self.focus_frame = focus
        self.received: set[int] = set()
        self.state = "running"              # running | done | superseded | failed | interrupted
        self.error: BaseException | None = None
        self.ids: list[str] = []            # stream request ids (a resend after a restart adds one)
        self.pending: Pending | None = None
        # Frames as they arrive, for a consumer that must not depend on the cache keeping them
        # (the blocking Client's iterator); None in Blender, where the cache is the store.
        self.inbox: deque[tuple[int, np.ndarray]] | None = None

    @property
    def id(self) -> str | None:
        return self.ids[-1] if self.ids else None

    @property
    def complete(self) -> bool:
        return all(self._client.cache.get(self.keys[f], touch=False) is not None for f in self.frames)

    def missing(self) -> list[int]:
        return [f for f in self.frames if self._client.cache.get(self.keys[f], touch=False) is None]

    def vertices(self, frame: int) -> np.ndarray | None:
        key = self.keys.get(frame)
        return None if key is None else self._client.cache.get(key)

    def __repr__(self) -> str:
        return f"<StreamHandle {self.face} {self.state} {len(self.received)}/{len(self.frames)}>"


# ------------------------------------------------------------------------------------------ frame cache


class FrameCache:
    """LRU of decoded vertex arrays, bounded in bytes. Keys come from `protocol.codes_key`
    (model id, codes, neutral), so any face whose codes were decoded before is answered locally."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str, *, touch: bool = True) -> np.ndarray | None:
        arr = self._d.get(key)
        if touch:
            if arr is None:
                self.misses += 1
            else:
                self.hits += 1
                self._d.move_to_end(key)
        return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._d[key] = arr
        self.nbytes += arr.nbytes
        while self.nbytes > self.max_bytes and self._d:
            _, dropped = self._d.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        self._d.clear()
        self.nbytes = 0


# ------------------------------------------------------------------------------------------ transport


class _Transport:
    """The two client sockets (DEALER for requests, SUB for broadcasts), with CURVE, limits and
    reconnection options, and the connection file they came from."""

    def __init__(self, source: Source, context: zmq.Context | None, limits: Limits) -> None:
        P.require_curve()
        self.path: Path | None = None
        self._stamp: tuple[int, int] | None = None
        if isinstance(source, ConnectionInfo):
            self.info = source
        else:
            self.path = Path(source)
            self.info = P.read_connection_file(self.path)
            self._stamp = self._file_stamp()
        self.limits = limits
        self._own_context = context is None
        self.ctx = context if context is not None else zmq.Context()
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def refresh_info(self) -> bool:
        """Re-read the connection file when it changed (a restarted server may have new ports);
        True when the endpoints or keys differ. Only a stat when nothing changed."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            info = P.read_connection_file(self.path)
        except (OSError, ValueError) as e:  # half-written by a starting server: try again later
            log.debug("connection file not readable yet: %s", e)
            return False
        self._stamp = stamp
        changed = (info.router_endpoint, info.pub_endpoint, info.server_public_key, info.client_secret_key) != (
            self.info.router_endpoint, self.info.pub_endpoint, self.info.server_public_key,
            self.info.client_secret_key)
        self.info = info
        return changed

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        P.apply_socket_limits(s, self.limits)
        P.curve_client(s, self.info.server_public_key, self.info.client_public_key, self.info.client_secret_key)
        # Reconnect fast after a restart (default back-off would make "back" take seconds).
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # ZMTP heartbeats notice a dead TCP peer (remote machine lost) even without traffic.
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        return s

    def open_dealer(self) -> None:
        """(Re)open the DEALER: close the old one with LINGER 0 so nothing queued for a dead server
        is delivered later, then connect a fresh one (Lazy Pirate's reset)."""
        if self.dealer is not None:
            self.dealer.close(0)
        d = self._socket(zmq.DEALER)
        # IMMEDIATE: queue only on a completed (authenticated) connection; a send while the backend
        # is away fails with EAGAIN and the request stays in our own queue instead of piling up.
        d.setsockopt(zmq.IMMEDIATE, 1)
        d.connect(self.info.router_endpoint)
        self.dealer = d

    def open_sub(self) -> None:
        if self.sub is not None:
            self.sub.close(0)
        s = self._socket(zmq.SUB)
        for topic in P.TOPICS:
            s.setsockopt(zmq.SUBSCRIBE, topic)
        s.connect(self.info.pub_endpoint)
        self.sub = s

    def close(self) -> None:
        for s in (self.dealer, self.sub):
            if s is not None:
                s.close(0)
        self.dealer = self.sub = None
        if self._own_context:
            self.ctx.term()


# ------------------------------------------------------------------------------------------ async client


class AsyncClient:
    """Non-blocking client for Blender; see the module docstring. Call `start()`, then `pump()` often."""

    def __init__(self, source: Source, *, name: str = "imface-blender", timeout: float = 5.0, retries: int = 3,
                 cache_bytes: int = 256 * 2**20, limits: Limits = P.CLIENT_LIMITS,
                 context: zmq.Context | None = None, reopen_on_retry: bool = False) -> None:
        self.name = name
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.limits = limits
        self.reopen_on_retry = reopen_on_retry
        self.session = P.new_session_id()       # ours; new for every client object
        self.cache = FrameCache(cache_bytes)
        self._transport = _Transport(source, context, limits)
        self.state = "closed"
        self.reason = "not started"
        self.server: dict[str, Any] | None = None   # the hello reply
        self.server_session: str | None = None
        self.model_id: str | None = None
        self.topology: dict[str, Any] | None = None  # {"faces", "uvs"?} of the current model
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: deque[tuple[str, Message]] = deque(maxlen=10_000)
        self.on_state: StateCallback | None = None
        self.on_event: EventCallback | None = None
        self.on_frame: FrameCallback | None = None
        self.heartbeat_timeout = P.HEARTBEAT_TIMEOUT_S
        self.stats = {"sent": 0, "received": 0, "bad_messages": 0, "retries": 0, "restarts": 0, "reopens": 0,
                      "events": 0}
        self._queue: deque[Pending] = deque()                    # not sent yet (waiting to send)
        self._inflight: dict[str, Pending] = {}                  # every attempt id -> pending
        self._active_keys: dict[Any, Pending] = {}               # key -> the one sent request
        self._queued_keys: dict[Any, Pending] = {}               # key -> the newest waiting one
        self._streams: OrderedDict[str, StreamHandle] = OrderedDict()   # stream request id -> handle
        self._face_streams: dict[str, StreamHandle] = {}
        self._hello: Pending | None = None
        self._heartbeat_armed = False
        self._last_heard = 0.0
        self._last_reconnect = 0.0
        self._state_since = time.monotonic()
        # Server clock minus ours, measured at hello: header times are written in the server's clock
        # so a machine with a skewed clock is not refused as "stale" by the replay window.
        self._clock_offset = 0.0

    # -------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Open the sockets and offer the hello (connect is asynchronous in ZeroMQ: nothing waits)."""
        if self.state != "closed":
            return
        self._transport.open_dealer()
        self._transport.open_sub()
        self._set_state("connecting", f"connecting to {self._transport.info.router_endpoint}")
        self._last_heard = time.monotonic()
        self._send_hello()

    def close(self) -> None:
        for p in list(self._queue) + list(self._inflight.values()):
            p._finish("failed", error=ClientError("client closed"))
        self._queue.clear()
        self._inflight.clear()
        self._active_keys.clear()
        self._queued_keys.clear()
        self._transport.close()
        self._set_state("closed", "closed")

    def __enter__(self) -> AsyncClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> ConnectionInfo:
        return self._transport.info

    @property
    def sockets(self) -> list[zmq.Socket]:
        """The open sockets (DEALER, SUB), for a caller that wants to sleep until something arrives."""
        return [s for s in (self._transport.dealer, self._transport.sub) if s is not None]

    def wait_readable(self, seconds: float) -> bool:
        """BLOCKING helper, never called by pump(): sleep until a message is waiting or `seconds`
        passed (for scripts, bakes and operators that need an answer; follow with pump())."""
        socks = self.sockets
        if not socks:
            time.sleep(max(0.0, seconds))
            return False
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        return bool(poller.poll(max(1, int(seconds * 1000))))

    def _set_state(self, state: str, reason: str) -> None:
        changed = (state, reason) != (self.state, self.reason)
        if state != self.state:
            self._state_since = time.monotonic()
        self.state, self.reason = state, reason
        if changed and self.on_state is not None:
            try:
                self.on_state(state, reason)
            except Exception:
                log.exception("on_state callback failed")

    # -------------------------------------------------------------------- submitting

    def submit(self, type: str, body: Mapping[str, Any] | None = None, *, key: Any = None,
               timeout: float | None = None, retries: int | None = None) -> Pending:
        """Queue a request and send it now if possible (never blocks). With `key`, at most one request
        per key is in flight and only the newest waiting one is kept: an older waiting one ends
        "superseded" (latest wins). Idempotent types are retried on timeout; others are not."""
        idem = type in P.IDEMPOTENT_TYPES
        p = Pending(type, body, key=key, idempotent=idem, timeout=self.timeout if timeout is None else timeout,
                    retries=(self.retries if retries is None else retries) if idem else 0)
        if self.state == "closed":
            p._finish("failed", error=ClientError("client not started"))
            return p
        if self.state == "gone" and key is None:
            p._finish("failed", error=BackendGone(self.reason))
            return p
        self._enqueue(p)
        self._flush()
        return p

    def _enqueue(self, p: Pending) -> None:
        if p.key is not None:
            older = self._queued_keys.pop(p.key, None)
            if older is not None:
                older._finish("superseded")
                try:
                    self._queue.remove(older)
                except ValueError:
                    pass
            self._queued_keys[p.key] = p
        p.state = "queued"
        self._queue.append(p)

    def _requeue(self, p: Pending) -> None:
        """Put a request that was sent back in line to be sent again (with a fresh id)."""
        if p is self._hello:
            p.state = "queued"  # pump() sends the hello itself
        elif p.key is not None and p.key in self._queued_keys:
            p._finish("superseded")  # a newer edit is waiting: send that instead
        else:
            self._enqueue(p)

    def _flush(self) -> None:
        """Send what may be sent: all queued requests when ready, only the hello otherwise; keyed
        requests wait while their key has one in flight."""
        if self.state != "ready" or not self._queue:
            return
        kept: deque[Pending] = deque()
        while self._queue:
            p = self._queue.popleft()
            if p.done():
                if p.key is not None and self._queued_keys.get(p.key) is p:
                    del self._queued_keys[p.key]
                continue
            if p.key is not None and p.key in self._active_keys:
                kept.append(p)
                continue
            if not self._send(p):
                kept.append(p)
                kept.extend(self._queue)
                self._queue.clear()
                break
            if p.key is not None:
                if self._queued_keys.get(p.key) is p:
                    del self._queued_keys[p.key]
                if p.state == "sent":  # (not when it failed to encode)
                    self._active_keys[p.key] = p
        self._queue = kept

    def _send(self, p: Pending) -> bool:
        """One attempt with a fresh id (the server refuses repeated ids). False when ZeroMQ cannot
        take it now (no connection to the backend yet): the caller keeps it queued."""
        dealer = self._transport.dealer
        if dealer is None:
            return False
        mid = P.new_id()
        wall = time.time()
        try:
            frames = P.encode(p.type, p.body, session=self.session, msg_id=mid, now=wall + self._clock_offset)
        except (TypeError, ValueError) as e:
            p._finish("failed", error=e)
            return True
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:  # e.g. the context is terminating: keep it queued, say why once
            if self.reason != f"send failed: {e}":
                log.warning("send of %s failed: %s", p.type, e)
            return False
        p.ids.append(mid)
        p.meta["sent_wall"] = wall
        p.state = "sent"
        p.deadline = time.monotonic() + p.timeout
        self._inflight[mid] = p
        self.stats["sent"] += 1
        if p.meta.get("stream") is not None:
            handle: StreamHandle = p.meta["stream"]
            handle.ids.append(mid)
            self._remember_stream(mid, handle)
        return True

    def _send_hello(self) -> None:
        if self._hello is not None and not self._hello.done():
            return
        p = Pending("hello", {"protocol": P.PROTOCOL_VERSION, "client": self.name}, key=None, idempotent=True,
                    timeout=self.timeout, retries=self.retries)
        self._hello = p
        if not self._send(p):
            p.state = "queued"  # sent from pump() once the DEALER has a connection

    # -------------------------------------------------------------------- decode, cache, streams

    def cache_key(self, codes: Mapping[str, np.ndarray], *, neutral: bool = False, model: str | None = None) -> str:
        return P.codes_key(codes, model=model if model is not None else self.model_id, neutral=bool(neutral))

    def cached_vertices(self, codes: Mapping[str, np.ndarray], *, neutral: bool = False) -> np.ndarray | None:
        return self.cache.get(self.cache_key(codes, neutral=neutral))

    def decode(self, face: str, codes: Mapping[str, np.ndarray], *, neutral: bool = False,
               with_topology: bool | None = None) -> Pending:
        """Vertices for one face's codes. A cache hit returns a Pending already done (`result`:
        {"face", "vertices", "model", "local": True}); otherwise a request coalesced per face."""
        codes = {part: np.ascontiguousarray(codes[part], dtype=np.float32) for part in P.CODE_PARTS}
        key = self.cache_key(codes, neutral=neutral)
        hit = self.cache.get(key)
        if hit is not None and (with_topology is not True or self.topology is not None):
            p = Pending("decode", None, key=None, idempotent=True, timeout=0.0, retries=0)
            p._finish("done", {"face": face, "vertices": hit, "model": self.model_id, "local": True,
                               **((self.topology or {}) if with_topology else {})})
            return p
        if with_topology is None:
            with_topology = self.topology is None
        body = {"face": face, "codes": codes, "neutral": bool(neutral), "with_topology": bool(with_topology)}
        p = Pending("decode", body, key=("decode", face), idempotent=True, timeout=self.timeout,
                    retries=self.retries)
        p.meta.update(codes=codes, neutral=bool(neutral))
        if self.state == "closed":
            p._finish("failed", error=ClientError("client not started"))
            return p
        self._enqueue(p)
        self._flush()
        return p

    def stream(self, face: str, frames: Sequence[int], codes: Mapping[str, np.ndarray], *, neutral: bool = False,
               focus: int | None = None) -> StreamHandle:
        """Ask for many frames of one face (codes stacked, row i = frames[i]). Frames already cached
        are not asked for; a new stream for the same face supersedes the previous one."""
        frames = [int(f) for f in frames]
        stacked = P.check_codes({part: np.asarray(codes[part]) for part in P.CODE_PARTS}, rows=len(frames))
        keys = {f: self.cache_key({part: stacked[part][i] for part in P.CODE_PARTS}, neutral=neutral)
                for i, f in enumerate(frames)}
        handle = StreamHandle(self, face, frames, keys, stacked, bool(neutral), focus)
        old = self._face_streams.get(face)
        if old is not None and old.state in ("running", "interrupted"):
            old.state = "superseded"
            if old.pending is not None and not old.pending.done():
                old.pending._finish("superseded")
        self._face_streams[face] = handle
        self._send_stream(handle)
        return handle

    def _send_stream(self, handle: StreamHandle) -> None:
        missing = handle.missing()
        if not missing:
            handle.state = "done"
            return
        index = {f: i for i, f in enumerate(handle.frames)}
        rows = [index[f] for f in missing]
        body: dict[str, Any] = {"face": handle.face, "frames": missing,
                                "codes": {part: np.ascontiguousarray(handle.codes[part][rows])
                                          for part in P.CODE_PARTS},
                                "neutral": handle.neutral}
        if handle.focus_frame is not None:
            body["focus"] = int(handle.focus_frame)
        p = Pending("stream", body, key=None, idempotent=False, timeout=self.timeout, retries=0)
        p.meta["stream"] = handle
        handle.pending = p
        handle.state = "running"
        if self.state == "closed":
            p._finish("failed", error=ClientError("client not started"))
            handle.state = "failed"
            return
        self._enqueue(p)
        self._flush()

    def focus(self, handle: StreamHandle, frame: int) -> None:
        """Tell the server which frame the playhead is on (served next). Coalesced: one in flight."""
        handle.focus_frame = int(frame)
        if handle.state != "running" or handle.id is None or frame in handle.received:
            return
        self.submit("stream.focus", {"stream": handle.id, "frame": int(frame)}, key=("focus", handle.face))

    def _remember_stream(self, sid: str, handle: StreamHandle) -> None:
        self._streams[sid] = handle
        while len(self._streams) > _STREAMS_KEPT:
            self._streams.popitem(last=False)

    # -------------------------------------------------------------------- pump

    def pump(self, max_messages: int = 256) -> int:
        """Handle what has arrived, check timeouts and heartbeats, send what waits. Never blocks:
        only `recv(NOBLOCK)` / `send(NOBLOCK)`; returns the number of messages handled."""
        if self.state == "closed":
            return 0
        n = 0
        for sock_name in ("dealer", "sub"):
            while n < max_messages:
                sock = getattr(self._transport, sock_name)
                if sock is None:
                    break
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                n += 1
                self._receive(frames, from_sub=sock_name == "sub")
        now = time.monotonic()
        self._check_heartbeat(now)
        self._check_timeouts(now)
        if self.state == "connecting" and now - self._state_since > 2 * self.timeout:
            # never "stuck on connecting": say so, and keep looking for the backend
            self._on_gone(f"no backend answering at {self._transport.info.router_endpoint} "
                          f"(is it running, and are the keys in the connection file current?)")
        if self.state == "gone" and now - self._last_reconnect >= RECONNECT_INTERVAL_S:
            self._last_reconnect = now
            if self._transport.refresh_info():
                self._transport.open_dealer()
                self._transport.open_sub()
                self.stats["reopens"] += 1
            self._send_hello()
        if self._hello is not None and self._hello.state == "queued":
            self._send(self._hello)
        self._flush()
        return n

    def _receive(self, frames: list[Any], *, from_sub: bool) -> None:
        topic = "reply"
        if from_sub:
            if len(frames) < 1:
                return
            topic = bytes(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0]).decode("ascii", "replace")
            frames = frames[1:]
        try:
            msg = P.decode(frames, limits=self.limits)
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            log.warning("dropped a malformed message from the backend: %s", e)
            return
        self.stats["received"] += 1
        self._last_heard = time.monotonic()
        if (self.server_session is not None and msg.session != self.server_session
                and not (msg.type == "hello_reply" and self._hello is not None and msg.parent in self._hello.ids)):
            if msg.parent is not None and msg.parent in self._inflight:
                self._on_reply(msg)  # the new server answered a request that reached it: keep the answer
            self._on_restart(msg.session)
            return
        if msg.type == "heartbeat":
            if msg.session == self.server_session:
                self._heartbeat_armed = True
                interval = msg.body.get("interval_s")
                if isinstance(interval, (int, float)) and 0 < interval <= 10:
                    self.heartbeat_timeout = max(P.HEARTBEAT_TIMEOUT_S, 3.0 * float(interval))
                if self.state == "gone":  # the same server is back (it was paused or unreachable)
                    self._set_state("ready", "backend answering again")
                    self._resume_streams()
            elif self.state == "gone":
                self._send_hello()  # a server is up again; the hello reply tells us which
            return
        if from_sub or msg.parent is None:
            self._on_event(topic if from_sub else msg.type, msg)
            return
        self._on_reply(msg)

    def _on_reply(self, msg: Message) -> None:
        if msg.type == "stream_frame":
            self._on_stream_frame(msg)
            return
        if msg.type == "job":
            self._on_event("job", msg)
            return
        p = self._inflight.get(msg.parent or "")
        if p is None:
            return  # a reply to an abandoned attempt (already answered, superseded or failed)
        if msg.type != "error" and msg.type != P.reply_type(p.type):
            self.stats["bad_messages"] += 1
            log.warning("reply of type %s to a %s request", msg.type, p.type)
            return
        for mid in p.ids:
            self._inflight.pop(mid, None)
        if p.key is not None and self._active_keys.get(p.key) is p:
            del self._active_keys[p.key]
        if (msg.type == "error" and msg.body.get("code") == P.E_STALE and p.idempotent
                and not p.meta.get("clock_retry")):
            # Our clock is off from the server's: learn the offset from its header and resend once.
            self._measure_clock(p, msg)
            p.meta["clock_retry"] = True
            self._requeue(p)
            return
        if msg.type == "error":
            p._finish("failed", error=msg.error())
            if p.meta.get("stream") is not None:
                handle: StreamHandle = p.meta["stream"]
                handle.state, handle.error = "failed", p.error
        else:
            self._on_result(p, msg)
            p._finish("done", msg.body)
        if p is self._hello:
            self._on_hello(msg)

    def _on_result(self, p: Pending, msg: Message) -> None:
        body = msg.body
        if p.type == "decode":
            model = body.get("model") if isinstance(body.get("model"), str) else self.model_id
            if isinstance(model, str) and model != self.model_id:  # another client loaded a model
                self.model_id, self.topology = model, None
            if "faces" in body and model == self.model_id:
                self.topology = {k: body[k] for k in ("faces", "uvs") if k in body}
            v = body.get("vertices")
            if isinstance(v, np.ndarray) and "codes" in p.meta:
                self.cache.put(P.codes_key(p.meta["codes"], model=model, neutral=p.meta["neutral"]), v)
        elif p.type == "stream":
            handle = p.meta["stream"]
            if handle.state == "running":
                handle.state = "done" if body.get("done", True) else "superseded"
        elif p.type == "models.load":
            model = body.get("model")
            if isinstance(model, dict):
                self._adopt_model(model)

    def _on_hello(self, msg: Message) -> None:
        if msg.type == "error":
            err = msg.error()
            self._set_state("gone", f"the backend refused the handshake: {err.message}")
            return
        body = msg.body
        if body.get("protocol") != P.PROTOCOL_VERSION:
            self._set_state("gone", f"the backend speaks protocol {body.get('protocol')}, this add-on "
                            f"{P.PROTOCOL_VERSION}: update one of them")
            return
        restarted = self.server_session is not None and msg.session != self.server_session
        if restarted:  # first heard of the restart through this reply: settle what was in flight
            self.stats["restarts"] += 1
            self._drop_inflight(lambda: BackendRestarted("the backend restarted while this request was in flight"))
        self.server = body
        self.server_session = msg.session
        if self._hello is not None:
            self._measure_clock(self._hello, msg)
        hb = body.get("heartbeat_s")
        if isinstance(hb, (int, float)) and 0 < hb <= 10:
            self.heartbeat_timeout = max(P.HEARTBEAT_TIMEOUT_S, 3.0 * float(hb))
            # The server promises heartbeats: watch from now (the SUB connected before the hello
            # was sent, so its first beat is due within one interval), not only from the first beat,
            # or a backend dying in its first second would go unnoticed.
            self._heartbeat_armed = True
        self._adopt_model(body.get("model") if isinstance(body.get("model"), dict) else None)
        self._last_heard = time.monotonic()
        self._set_state("ready", "backend restarted; reconnected" if restarted else "connected")
        self._resume_streams()

    def _resume_streams(self) -> None:
        """Streams cut by a restart, an outage or a socket reopen: ask again for what is missing."""
        for handle in list(self._face_streams.values()):
            if handle.state == "interrupted":
                self._send_stream(handle)

    def _measure_clock(self, p: Pending, msg: Message) -> None:
        """Server clock minus ours from a reply's header time (midpoint of the round trip)."""
        sent = p.meta.get("sent_wall")
        if isinstance(sent, float):
            offset = msg.time - (sent + time.time()) / 2.0
            self._clock_offset = offset if abs(offset) > 1.0 else 0.0  # ignore ordinary jitter

    def _adopt_model(self, model: dict[str, Any] | None) -> None:
        mid = model.get("id") if model else None
        if mid != self.model_id:
            self.topology = None  # a new model: faces/uvs come again with the next decode
        self.model_id = mid if isinstance(mid, str) else None

    def _on_stream_frame(self, msg: Message) -> None:
        body = msg.body
        sid = body.get("stream") if isinstance(body.get("stream"), str) else msg.parent
        handle = self._streams.get(sid or "")
        frame, v = body.get("frame"), body.get("vertices")
        if handle is None or not isinstance(frame, int) or not isinstance(v, np.ndarray):
            return
        key = handle.keys.get(frame)
        if key is None:
            return
        self.cache.put(key, v)
        handle.received.add(frame)
        if handle.inbox is not None:
            handle.inbox.append((frame, v))
        p = handle.pending
        if p is not None and p.state == "sent":
            p.deadline = time.monotonic() + p.timeout  # a live stream is not timing out
        if self.on_frame is not None and handle.state == "running":
            try:
                self.on_frame(handle.face, frame, v)
            except Exception:
                log.exception("on_frame callback failed")

    def _on_event(self, topic: str, msg: Message) -> None:
        if msg.type == "job":
            jid = msg.body.get("job")
            if isinstance(jid, str):
                entry = self.jobs.setdefault(jid, {})
                result = entry.get("result")
                entry.update(msg.body)
                if result is not None and "result" not in msg.body:
                    entry["result"] = result
                while len(self.jobs) > 1_000:  # bounded: forget the oldest jobs
                    self.jobs.pop(next(iter(self.jobs)))
        self.events.append((topic, msg))
        self.stats["events"] += 1
        if self.on_event is not None:
            try:
                self.on_event(topic, msg)
            except Exception:
                log.exception("on_event callback failed")

    # -------------------------------------------------------------------- failure handling

    def _check_heartbeat(self, now: float) -> None:
        if self.state != "ready" or not self._heartbeat_armed:
            return
        silent = now - self._last_heard
        if silent > self.heartbeat_timeout:
            self._on_gone(f"no heartbeat from the backend for {silent:.1f} s "
                          f"({self._transport.info.router_endpoint}, pid {self._transport.info.pid})")

    def _on_gone(self, reason: str) -> None:
        self._set_state("gone", reason)
        self._heartbeat_armed = False
        self._last_reconnect = time.monotonic()
        self._drop_inflight(lambda: BackendGone(reason))

    def _on_restart(self, new_session: str) -> None:
        """A message from another server session: the backend restarted. Reopen the DEALER, requeue
        what may be resent, fail the rest, and hand-shake again."""
        if self._hello is not None and not self._hello.done() and self.state == "connecting":
            return  # already re-handshaking
        self._set_state("connecting", "backend restarted; reconnecting")
        self._heartbeat_armed = False
        self._transport.open_dealer()
        self.stats["reopens"] += 1
        self._drop_inflight(lambda: BackendRestarted("the backend restarted while this request was in flight"))
        self._hello = None
        self._send_hello()

    def _drop_inflight(self, error: Callable[[], ClientError]) -> None:
        """After an outage or restart: idempotent requests go back to the queue (keyed ones keep only
        the newest), streams wait to be resent, everything else fails with `error`."""
        pendings = {id(p): p for p in self._inflight.values()}.values()
        self._inflight.clear()
        self._active_keys.clear()
        for p in pendings:
            if p is self._hello:
                continue
            if p.meta.get("stream") is not None:
                handle: StreamHandle = p.meta["stream"]
                p._finish("failed", error=error())
                if handle.state == "running":
                    handle.state = "interrupted"
            elif p.idempotent and (p.key is not None or self.state != "gone"):
                self._requeue(p)
            else:
                p._finish("failed", error=error())
        if self.state == "gone":
            for p in list(self._queue):
                if p.key is None:
                    self._queue.remove(p)
                    p._finish("failed", error=error())

    def _check_timeouts(self, now: float) -> None:
        expired = {id(p): p for p in self._inflight.values() if now > p.deadline}.values()
        reopen = False
        for p in expired:
            for mid in p.ids:
                self._inflight.pop(mid, None)
            if p.key is not None and self._active_keys.get(p.key) is p:
                del self._active_keys[p.key]
            if p.idempotent and p.retries_left > 0:
                p.retries_left -= 1
                self.stats["retries"] += 1
                self._requeue(p)
                reopen = reopen or self.reopen_on_retry
            else:
                err = RequestTimeout(f"no reply to {p.type} within {p.timeout:g} s")
                p._finish("failed", error=err)
                if p.meta.get("stream") is not None:
                    handle: StreamHandle = p.meta["stream"]
                    if handle.state == "running":
                        handle.state, handle.error = "failed", err
                if p is self._hello and self.state != "gone":
                    self._on_gone(f"the backend at {self._transport.info.router_endpoint} does not answer "
                                  f"(no reply to hello in {(1 + self.retries) * p.timeout:g} s)")
        if reopen:
            # Lazy Pirate: a fresh socket; replies to requests sent on the old one are lost, so
            # idempotent ones are resent and the others fail.
            self._transport.refresh_info()
            self._transport.open_dealer()
            self.stats["reopens"] += 1
            self._drop_inflight(lambda: RequestTimeout("the request was lost when the socket was reopened"))
            self._resume_streams()


# ------------------------------------------------------------------------------------------ blocking client


class Client:
    """Blocking client for scripts and tests (one thread). Error replies raise ProtocolError."""

    def __init__(self, source: Source, *, name: str = "imface-script", timeout: float = 2.5, retries: int = 3,
                 cache_bytes: int = 64 * 2**20, limits: Limits = P.CLIENT_LIMITS,
                 context: zmq.Context | None = None) -> None:
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.engine = AsyncClient(source, name=name, timeout=timeout, retries=retries, cache_bytes=cache_bytes,
                                  limits=limits, context=context, reopen_on_retry=True)

    # -------------------------------------------------------------------- plumbing

    @property
    def state(self) -> str:
        return self.engine.state

    @property
    def server_session(self) -> str | None:
        return self.engine.server_session

    @property
    def hello(self) -> dict[str, Any] | None:
        return self.engine.server

    def _wait(self, done: Callable[[], bool], deadline: float) -> bool:
        """Pump until `done()` or the deadline; sleeps in `poll` on both sockets, so a reply is handled
        as soon as it arrives."""
        eng = self.engine
        while True:
            eng.pump()
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            eng.wait_readable(min(deadline - now, 0.05))

    def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Open the sockets and hand-shake; the hello reply. BackendGone when nobody answers."""
        eng = self.engine
        if eng.state == "closed":
            eng.start()
        elif eng.state == "gone":
            eng._transport.refresh_info()
            eng._transport.open_dealer()
            eng._transport.open_sub()
            eng._send_hello()
        limit = (self.timeout * (1 + self.retries)) if timeout is None else timeout
        if not self._wait(lambda: eng.state == "ready", time.monotonic() + limit):
            raise BackendGone(f"{eng.reason} (no handshake with {eng.connection.router_endpoint} in {limit:g} s)")
        assert eng.server is not None
        return eng.server

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.close()

    def _ensure_ready(self) -> None:
        if self.engine.state != "ready":
            self.connect()

    # -------------------------------------------------------------------- requests

    def request(self, type: str, body: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                retries: int | None = None) -> dict[str, Any]:
        """Send a request and wait for its reply body. Idempotent types are retried (Lazy Pirate:
        fresh socket, fresh id) up to `retries` times, each attempt waiting `timeout`.
        Raises ProtocolError (error reply), RequestTimeout, BackendGone, BackendRestarted."""
        self._ensure_ready()
        p = self.engine.submit(type, body, timeout=timeout, retries=retries)
        self._wait_pending(p)
        return p.value()

    def _wait_pending(self, p: Pending) -> None:
        limit = p.timeout * (1 + max(p.retries_left, 0)) + 1.0
        if not self._wait(p.done, time.monotonic() + limit):
            p._finish("failed", error=RequestTimeout(f"no reply to {p.type} within {limit:g} s"))

    def ping(self) -> float:
        """Round-trip time in seconds."""
        t0 = time.perf_counter()
        self.request("ping", {})
        return time.perf_counter() - t0

    def decode(self, face: str, codes: Mapping[str, np.ndarray], *, neutral: bool = False,
               with_topology: bool | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The decode reply body (or the local cache's answer, with "local": True)."""
        self._ensure_ready()
        p = self.engine.decode(face, codes, neutral=neutral, with_topology=with_topology)
        if timeout is not None:
            p.timeout = timeout
        self._wait_pending(p)
        return p.value()

    def wait_job(self, job_id: str, *, timeout: float | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Wait until the job ends; its `result` (done), or ProtocolError (failed / cancelled).

        Progress events are passed to `on_event`. While waiting, a lost backend raises BackendGone
        within the heartbeat timeout."""
        eng = self.engine
        deadline = time.monotonic() + (1e9 if timeout is None else timeout)
        seen = eng.stats["events"]
        last_status = time.monotonic()

        def finished() -> bool:
            return eng.jobs.get(job_id, {}).get("state") in ("done", "failed", "cancelled") or eng.state != "ready"

        while True:
            self._wait(lambda: finished() or eng.stats["events"] != seen, min(deadline, time.monotonic() + 1.0))
            seen = eng.stats["events"]
            entry = eng.jobs.get(job_id, {})
            if on_event is not None and entry:
                on_event(dict(entry))
            if eng.state != "ready":
                raise BackendGone(eng.reason)
            state = entry.get("state")
            if state == "done":
                if "result" not in entry:
                    # The PUB copy (no result) came first; ours comes over the DEALER: wait a moment
                    # for it, then ask for the full record.
                    self._wait(lambda: "result" in eng.jobs.get(job_id, {}), time.monotonic() + 1.0)
                    entry = eng.jobs.get(job_id, {})
                    if "result" not in entry:
                        entry = self.request("job.status", {"job": job_id})
                return dict(entry.get("result") or {})
            if state in ("failed", "cancelled"):
                err = entry.get("error")
                if isinstance(err, Mapping):
                    raise P.error_from_body(err)
                raise ProtocolError(P.E_CANCELLED if state == "cancelled" else P.E_INTERNAL,
                                    str(entry.get("message") or f"job {state}"))
            if time.monotonic() >= deadline:
                raise RequestTimeout(f"job {job_id} did not finish within {timeout:g} s")
            if time.monotonic() - last_status > 5.0:  # events are best effort (PUB drops); poll too
                last_status = time.monotonic()
                eng.jobs.setdefault(job_id, {}).update(self.request("job.status", {"job": job_id}))

    def run_job(self, type: str, body: Mapping[str, Any], *, timeout: float | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Start a job (fit, extract, train) and wait for its result."""
        job_id = self.request(type, body)["job"]
        return self.wait_job(job_id, timeout=timeout, on_event=on_event)

    def stream(self, face: str, frames: Sequence[int], codes: Mapping[str, np.ndarray], *, neutral: bool = False,
               focus: int | None = None, timeout: float | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame, vertices) as frames arrive (cached ones first). BackendGone within the
        heartbeat timeout when the backend dies mid-stream; RequestTimeout after `timeout` s of silence."""
        self._ensure_ready()
        eng = self.engine
        handle = eng.stream(face, frames, codes, neutral=neutral, focus=focus)
        handle.inbox = deque()
        wanted = set(handle.frames)
        yielded: set[int] = set()
        for f in handle.frames:  # what the cache already holds (the stream did not ask for these)
            v = handle.vertices(f)
            if v is not None and f not in handle.received:
                yielded.add(f)
                yield f, v
        silence = self.timeout if timeout is None else timeout
        while True:
            while handle.inbox:
                f, v = handle.inbox.popleft()
                if f in wanted and f not in yielded:
                    yielded.add(f)
                    yield f, v
            if yielded >= wanted:
                return
            if handle.state == "failed":
                assert handle.error is not None
                raise handle.error
            if handle.state == "superseded":
                return
            if handle.state == "done":
                raise ClientError(f"stream for {face} ended without frames {sorted(wanted - yielded)[:10]}")
            if eng.state == "gone":
                raise BackendGone(eng.reason)
            arrived = self._wait(lambda: bool(handle.inbox) or handle.state != "running" or eng.state == "gone",
                                 time.monotonic() + silence)
            if not arrived and eng.state == "ready":
                raise RequestTimeout(f"stream for {face}: no frame in {silence:g} s")

    def events(self, timeout: float = 1.0) -> Iterator[tuple[str, Message]]:
        """Yield broadcast and job events until none arrives for `timeout` seconds."""
        eng = self.engine
        while True:
            if eng.events:
                yield eng.events.popleft()
                continue
            if not self._wait(lambda: bool(eng.events), time.monotonic() + timeout):
                return

    def upload(self, data: bytes | str | os.PathLike[str], name: str | None = None, *,
               chunk_bytes: int | None = None) -> str:
        """Upload a file (path) or bytes in chunks; the upload id to pass to `fit`."""
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            size = path.stat().st_size
            name = name or path.name
            reader = path.open("rb")
        else:
            import io

            size = len(data)
            name = name or "upload"
            reader = io.BytesIO(data)
        with reader:
            digest = hashlib.sha256()
            began = self.request("upload.begin", {"name": name, "size": size})
            uid = began["upload"]
            step = min(int(began.get("chunk_bytes", P.UPLOAD_CHUNK_BYTES)), chunk_bytes or P.UPLOAD_CHUNK_BYTES)
            offset = 0
            while offset < size:
                chunk = reader.read(step)
                if not chunk:
                    raise OSError(f"{name} shrank while uploading")
                digest.update(chunk)
                self.request("upload.chunk", {"upload": uid, "offset": offset,
                                              "data": np.frombuffer(chunk, dtype=np.uint8)},
                             timeout=max(self.timeout, 30.0))
                offset += len(chunk)
            end = self.request("upload.end", {"upload": uid})
            if end.get("sha256") not in (None, digest.hexdigest()):
                raise ProtocolError(P.E_BAD_FIELD, "the server's hash of the upload differs from ours",
                                    {"upload": uid})
        return uid
