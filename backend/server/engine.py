"""The decode thread: interactive decodes and streams, off the request loop, in the server process.

The request loop (main thread) owns every socket; this thread owns the model's decoders. Work comes in
through `submit_*` (thread-safe), results go out through the `Mailbox` (a queue plus a zmq wake-up),
so the loop never waits on a decode and keeps answering pings, cancels and cached frames meanwhile.

Scheduling: interactive `decode` requests first (FIFO: a slider edit never waits behind a timeline),
then one frame of each active stream in turn. A stream serves its frames in timeline order from a
cursor: the first frame is the `focus` (or the first frame), then forward to the end, then backward
from the cursor; `stream.focus` moves the cursor, so the frame the user looks at is decoded next and
the rest continue outward from it. Each stream has its own warm decoder (the previous frame's
solution starts the next), separate from the slider decoder of the same face.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from addon.link import protocol as P

from .decoders import DecoderSessions, FrameCache

log = logging.getLogger("imface.server.engine")


class Mailbox:
    """Events for the request loop: a queue and a zmq PUSH -> PULL wake-up (one socket, behind a lock)."""

    def __init__(self, context: Any, name: str) -> None:
        import zmq

        self.endpoint = f"inproc://imface-wakeup-{name}"
        self.pull = context.socket(zmq.PULL)
        self.pull.bind(self.endpoint)
        self._push = context.socket(zmq.PUSH)
        self._push.sndhwm = 16
        self._push.linger = 0
        self._push.connect(self.endpoint)
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._zmq = zmq

    def post(self, event: Any) -> None:
        self._q.put(event)
        with self._lock:
            try:
                self._push.send(b"", self._zmq.NOBLOCK)
            except self._zmq.ZMQError:
                pass  # a wake-up is already pending (HWM reached) or the loop is closing

    def drain_wakeups(self) -> None:
        while True:
            try:
                self.pull.recv(self._zmq.NOBLOCK)
            except self._zmq.ZMQError:
                return

    def get_nowait(self) -> Any | None:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        with self._lock:
            self._push.close(0)
        self.pull.close(0)


@dataclass
class DecodeTask:
    route: bytes
    request_id: str
    session: str
    face: str
    codes: dict[str, np.ndarray]
    neutral: bool
    with_topology: bool
    model: Any                  # the LoadedModel the request was checked against
    key: str                    # frame-cache key
    received: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0        # decode time on the decode thread (0 for a cache hit)


@dataclass
class StreamJob:
    id: str                     # the stream request id
    route: bytes
    session: str
    face: str
    frames: list[int]           # timeline order
    rows: list[int]             # row of `codes` for each entry of `frames`
    codes: dict[str, np.ndarray]
    neutral: bool
    model: Any
    cursor: int = 0
    seq: int = 0
    sent: np.ndarray | None = None       # bool per frame: decoded and handed to the loop
    cancelled: bool = False
    superseded: bool = False

    def __post_init__(self) -> None:
        self.sent = np.zeros(len(self.frames), dtype=bool)

    def index_of(self, frame: int) -> int:
        """Index of `frame`, or of the nearest frame of the stream."""
        arr = np.asarray(self.frames)
        return int(np.abs(arr - frame).argmin())

    def next_index(self) -> int | None:
        assert self.sent is not None
        ahead = np.flatnonzero(~self.sent[self.cursor:])
        if len(ahead):
            return self.cursor + int(ahead[0])
        behind = np.flatnonzero(~self.sent[:self.cursor])
        return int(behind[-1]) if len(behind) else None

    def row_codes(self, i: int) -> dict[str, np.ndarray]:
        r = self.rows[i]
        return {p: self.codes[p][r:r + 1] for p in P.CODE_PARTS}


class DecodeEngine(threading.Thread):
    def __init__(self, mailbox: Mailbox, cache: FrameCache, *, max_decoders: int = 32,
                 max_pending: int = 256, service: Any = None) -> None:
        super().__init__(name="imface-decode", daemon=True)
        self.mailbox = mailbox
        self.cache = cache
        self.max_pending = max_pending
        self.service = service  # the model_service module (imported by the server when a model is used)
        self.model: Any = None
        self.sessions: DecoderSessions | None = None
        self.max_decoders = max_decoders
        self._cv = threading.Condition()
        self._tasks: deque[DecodeTask] = deque()
        self._calls: deque[tuple[str, Callable[[], Any], Any]] = deque()
        self._streams: OrderedDict[str, StreamJob] = OrderedDict()
        self._stopping = False
        self.working = False
        self.decodes = 0

    # ------------------------------------------------------------------ called from the request loop
    def set_model(self, lm: Any) -> None:
        """Switch models (call from the loop only while no call runs: at start-up, or via `call`)."""
        self.model = lm
        if lm is None:
            self.sessions = None
        else:
            svc = self.service
            self.sessions = DecoderSessions(lambda: svc.new_decoder(lm.model, lm.template), self.max_decoders)

    def pending(self) -> int:
        with self._cv:
            return len(self._tasks) + len(self._calls) + len(self._streams)

    @property
    def busy(self) -> bool:
        return self.working or self.pending() > 0

    def submit_decode(self, task: DecodeTask) -> bool:
        with self._cv:
            if len(self._tasks) >= self.max_pending:
                return False
            self._tasks.append(task)
            self._cv.notify()
        return True

    def submit_stream(self, stream: StreamJob) -> None:
        with self._cv:
            self._streams[stream.id] = stream
            self._cv.notify()

    def submit_call(self, tag: str, fn: Callable[[], Any], context: Any = None) -> None:
        """Run fn() on this thread (model loads); posts ("call", tag, context, result, error)."""
        with self._cv:
            self._calls.append((tag, fn, context))
            self._cv.notify()

    def focus(self, stream_id: str, frame: int) -> bool:
        with self._cv:
            s = self._streams.get(stream_id)
            if s is None:
                return False
            s.cursor = s.index_of(frame)
            self._cv.notify()
            return True

    def requeue_frame(self, stream: StreamJob, index: int) -> None:
        """A frame the loop could not send (the client's queue was full): decode/send it again later."""
        with self._cv:
            if stream.sent is not None and not stream.cancelled:
                stream.sent[index] = False  # seq numbers keep counting: a resent frame gets a new seq
                if stream.id not in self._streams:
                    self._streams[stream.id] = stream
                self._cv.notify()

    def cancel_stream(self, stream_id: str, superseded: bool = False) -> StreamJob | None:
        with self._cv:
            s = self._streams.pop(stream_id, None)
            if s is not None:
                s.cancelled = True
                s.superseded = superseded
            return s

    def streams_of(self, session: str, face: str | None = None) -> list[StreamJob]:
        with self._cv:
            return [s for s in self._streams.values()
                    if s.session == session and (face is None or s.face == face)]

    def cancel_route(self, route: bytes) -> None:
        """The client behind `route` is gone: drop its queued decodes and streams."""
        with self._cv:
            self._tasks = deque(t for t in self._tasks if t.route != route)
            for sid in [sid for sid, s in self._streams.items() if s.route == route]:
                self._streams.pop(sid).cancelled = True

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._tasks or self._calls or self._streams):
                    self._cv.wait()
                if self._stopping:
                    return
                self.working = True
                call = self._calls.popleft() if self._calls else None
                task = self._tasks.popleft() if (call is None and self._tasks) else None
                stream = None
                if call is None and task is None and self._streams:
                    sid, stream = next(iter(self._streams.items()))
                    self._streams.move_to_end(sid)  # round robin over the active streams
            try:
                if call is not None:
                    self._run_call(*call)
                elif task is not None:
                    self._run_decode(task)
                elif stream is not None:
                    self._run_stream_step(stream)
            except Exception:  # never let the thread die: report and go on
                log.exception("decode thread error")
            finally:
                self.working = False

    def _run_call(self, tag: str, fn: Callable[[], Any], context: Any) -> None:
        try:
            result, error = fn(), None
        except Exception as exc:  # reported to the requester
            result, error = None, exc
        self.mailbox.post(("call", tag, context, result, error))

    def _run_decode(self, t: DecodeTask) -> None:
        if self.model is None or t.model is not self.model:
            self.mailbox.post(("decode_error", t, P.ProtocolError(P.E_NO_MODEL, "the model changed or was unloaded; "
                                                                   "decode again")))
            return
        verts = self.cache.get(t.key)
        unconverged = 0
        cached = verts is not None
        t.seconds = 0.0
        if verts is None:
            assert self.sessions is not None
            dec = self.sessions.get((t.session, t.face, "edit"))
            try:
                t0 = time.perf_counter()
                verts, unconverged = self.service.decode(dec, t.codes, t.neutral)
                t.seconds = time.perf_counter() - t0
            except Exception as exc:
                log.exception("decode failed")
                self.mailbox.post(("decode_error", t, P.ProtocolError(P.E_INTERNAL, f"decode failed: {exc}")))
                return
            self.decodes += 1
            self.cache.put(t.key, verts)
        self.mailbox.post(("decoded", t, verts, unconverged, cached))

    def _run_stream_step(self, s: StreamJob) -> None:
        with self._cv:
            if s.cancelled or s.id not in self._streams:
                return
            i = s.next_index()
            if i is None:
                self._streams.pop(s.id, None)
                done = True
            else:
                done = False
                assert s.sent is not None
                s.sent[i] = True
                s.cursor = i  # continue from here (forward first)
        if done:
            self.mailbox.post(("stream_done", s))
            return
        if self.model is None or s.model is not self.model:
            self.cancel_stream(s.id)
            self.mailbox.post(("stream_error", s, P.ProtocolError(P.E_NO_MODEL, "the model changed; stream again")))
            return
        codes = s.row_codes(i)
        key = P.codes_key(codes, model=s.model.fingerprint, neutral=s.neutral,
                          template=s.model.template_resolution)
        verts = self.cache.get(key)
        cached = verts is not None
        if verts is None:
            assert self.sessions is not None
            dec = self.sessions.get((s.session, s.face, "stream"))
            try:
                verts, _ = self.service.decode(dec, codes, s.neutral)
            except Exception as exc:
                log.exception("stream decode failed")
                self.cancel_stream(s.id)
                self.mailbox.post(("stream_error", s, P.ProtocolError(P.E_INTERNAL, f"decode failed: {exc}")))
                return
            self.decodes += 1
            self.cache.put(key, verts)
        with self._cv:
            seq = s.seq
            s.seq += 1
        self.mailbox.post(("frame", s, i, seq, verts, cached))
