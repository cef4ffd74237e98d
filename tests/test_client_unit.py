"""The link client (addon/link/client.py) against a small in-test fake backend speaking protocol v1.

The fake is test infrastructure (ROUTER + PUB with CURVE, heartbeats, a handful of request types); the
real server and its subprocess tests live elsewhere. Here: handshake, errors, Lazy Pirate retries,
latest-wins coalescing, the frame cache, streams, jobs, a killed backend reported within 2 s, a
restarted one (same or new ports) reconnected to, and a client without the keys getting nothing."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from addon.link import protocol as P
from addon.link.client import AsyncClient, BackendGone, Client, Pending, RequestTimeout

V = 500
SIZES = {"identity": 4, "expression": 3, "detail": 2}


def codes_for(x: float) -> dict[str, np.ndarray]:
    return {p: np.full(n, x, np.float32) for p, n in SIZES.items()}


def vertices_for(codes: dict[str, np.ndarray]) -> np.ndarray:
    """What the fake 'decodes': a deterministic function of the codes."""
    s = float(sum(float(np.asarray(codes[p], np.float64).sum()) for p in P.CODE_PARTS))
    return np.full((V, 3), s, np.float32) + np.arange(V, dtype=np.float32)[:, None]


class FakeServer:
    """In-process backend stand-in on a thread. `stop()` plays kill -9 (no goodbye)."""

    def __init__(self, keys: P.KeyFiles, conn_file: Path, ports: tuple[int, int] | None = None) -> None:
        self.keys = keys
        self.conn_file = conn_file
        self.ports = ports
        self.session = P.new_session_id()
        self.drop: dict[str, int] = {}          # type -> how many requests of it to ignore
        self.delay: dict[str, float] = {}       # type -> seconds before replying (blocks the loop)
        self.received: list[P.Message] = []
        self._jobs: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def count(self, type: str) -> int:
        return sum(1 for m in self.received if m.type == type)

    def _run(self) -> None:
        ctx = zmq.Context()
        auth = P.start_authenticator(ctx, self.keys.allowed_dir)
        spub, ssec = P.load_keypair(self.keys.server_secret)
        router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        for s in (router, pub):
            P.apply_socket_limits(s)
            P.curve_server(s, spub, ssec)
        if self.ports is None:
            self.ports = (router.bind_to_random_port("tcp://127.0.0.1"), pub.bind_to_random_port("tcp://127.0.0.1"))
        else:
            router.bind(f"tcp://127.0.0.1:{self.ports[0]}")
            pub.bind(f"tcp://127.0.0.1:{self.ports[1]}")
        cpub, csec = P.load_keypair(self.keys.client_secret)
        P.write_connection_file(self.conn_file, P.ConnectionInfo(
            host="127.0.0.1", router_port=self.ports[0], pub_port=self.ports[1], server_public_key=spub.decode(),
            client_public_key=cpub.decode(), client_secret_key=csec.decode(), pid=0))
        guard = P.ReplayGuard()
        self._router, self._pub = router, pub
        self._next_beat, self._seq = 0.0, 0
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._beat()
                if not router.poll(10):
                    continue
                ids, frames = P.split_routed(router.recv_multipart(copy=False))
                try:
                    msg = P.decode(frames)
                    guard.check(msg)
                except P.ProtocolError as e:
                    hdr = P.peek_header(frames)
                    router.send_multipart(ids + P.encode_error(e, session=self.session,
                                                               parent=hdr["id"] if hdr else None))
                    continue
                self.received.append(msg)
                if self.drop.get(msg.type, 0) > 0:
                    self.drop[msg.type] -= 1
                    continue
                if msg.type in self.delay:
                    time.sleep(self.delay[msg.type])
                try:
                    for out in self._handle(msg):
                        if self._stop.is_set():
                            break  # killed mid-reply
                        router.send_multipart(ids + out, copy=False)
                        self._beat()  # heartbeats keep going while a long reply streams
                except P.ProtocolError as e:
                    router.send_multipart(ids + P.encode_error(e, session=self.session, parent=msg.id))
        finally:
            router.close(0)
            pub.close(0)
            auth.stop()
            ctx.term()

    def _beat(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self._pub.send_multipart([P.TOPIC_HEARTBEAT] + P.encode(
                "heartbeat", {"seq": self._seq, "busy": False, "jobs": 0, "interval_s": P.HEARTBEAT_INTERVAL_S},
                session=self.session))
            self._seq += 1
            self._next_beat = now + P.HEARTBEAT_INTERVAL_S

    def _reply(self, msg: P.Message, body: dict[str, Any]) -> list:
        return P.encode(P.reply_type(msg.type), body, session=self.session, parent=msg.id)

    def _handle(self, msg: P.Message):
        b = msg.body
        if msg.type == "hello":
            if b.get("protocol") != 1:
                raise P.ProtocolError(P.E_VERSION, "protocol 1 only")
            yield self._reply(msg, {"protocol": 1, "session": self.session, "version": "fake", "device": "cpu",
                                    "model": {"id": "m1", "sizes": SIZES}, "heartbeat_s": P.HEARTBEAT_INTERVAL_S})
        elif msg.type in ("ping", "info", "models.load"):
            yield self._reply(msg, {"time": time.time()})
        elif msg.type == "decode":
            codes = P.check_codes(b.get("codes"), sizes=SIZES, rows=1)
            out = {"face": b["face"], "model": "m1", "vertices": vertices_for(codes), "unconverged": 0,
                   "cached": False}
            if b.get("with_topology"):
                out["faces"] = np.zeros((10, 3), np.int32)
            yield self._reply(msg, out)
        elif msg.type == "stream":
            frames = b["frames"]
            codes = P.check_codes(b["codes"], sizes=SIZES, rows=len(frames))
            order = list(range(len(frames)))
            if "focus" in b and b["focus"] in frames:
                i = frames.index(b["focus"])
                order = [i] + order[:i] + order[i + 1:]
            for seq, i in enumerate(order):
                v = vertices_for({p: codes[p][i] for p in P.CODE_PARTS})
                yield P.encode("stream_frame", {"stream": msg.id, "face": b["face"], "frame": frames[i],
                                                "seq": seq, "vertices": v, "cached": False},
                               session=self.session, parent=msg.id)
                if self.delay.get("stream_frame"):
                    time.sleep(self.delay["stream_frame"])
            yield self._reply(msg, {"stream": msg.id, "done": True, "sent": len(frames)})
        elif msg.type == "job.status":
            yield self._reply(msg, dict(self._jobs[b["job"]]))
        elif msg.type == "fit":
            jid = P.new_id()
            yield self._reply(msg, {"job": jid})
            for state, prog in (("running", 0.5), ("done", 1.0)):
                event = {"job": jid, "kind": "fit", "state": state, "progress": prog, "message": state,
                         "metrics": {"loss": 1.0 - prog}}
                self._pub.send_multipart([P.TOPIC_JOB] + P.encode("job", event, session=self.session))
                if state == "done":
                    event["result"] = {"codes": codes_for(0.25)}
                    self._jobs[jid] = dict(event)
                yield P.encode("job", event, session=self.session, parent=msg.id)
        elif msg.type == "upload.begin":
            self._upload = bytearray()
            yield self._reply(msg, {"upload": "u" * 32, "chunk_bytes": 1000})
        elif msg.type == "upload.chunk":
            if b["offset"] != len(self._upload):
                raise P.ProtocolError(P.E_BAD_FIELD, "offset")
            self._upload += bytes(b["data"])
            yield self._reply(msg, {"upload": b["upload"], "received": len(self._upload)})
        elif msg.type == "upload.end":
            import hashlib

            yield self._reply(msg, {"upload": b["upload"], "size": len(self._upload),
                                    "sha256": hashlib.sha256(self._upload).hexdigest()})
        else:
            raise P.ProtocolError(P.E_UNKNOWN_TYPE, f"unknown type {msg.type}")


@pytest.fixture()
def keys(tmp_path: Path) -> P.KeyFiles:
    return P.ensure_keys(tmp_path / "keys")


@pytest.fixture()
def server(keys: P.KeyFiles, tmp_path: Path):
    s = FakeServer(keys, tmp_path / "conn.json").start()
    yield s
    s.stop()


def pump_until(client: AsyncClient, cond: Callable[[], bool], timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        client.pump()
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met in {timeout} s (state {client.state}: {client.reason})")
        time.sleep(0.002)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------ blocking


def test_handshake_requests_errors_and_topology_once(server: FakeServer) -> None:
    with Client(server.conn_file, timeout=2.0) as c:
        assert c.hello["session"] == server.session == c.server_session
        assert c.ping() < 1.0
        r = c.decode("face-a", codes_for(0.5))
        assert np.array_equal(r["vertices"], vertices_for(codes_for(0.5))) and "faces" in r
        r2 = c.decode("face-b", codes_for(0.75))
        assert "faces" not in r2 and not r2.get("local")
        # the cache answers the same codes for any face without a round trip
        n = server.count("decode")
        r3 = c.decode("face-c", codes_for(0.5))
        assert r3["local"] and np.array_equal(r3["vertices"], r["vertices"]) and server.count("decode") == n
        with pytest.raises(P.ProtocolError) as e:
            c.request("nonsense")
        assert e.value.code == P.E_UNKNOWN_TYPE
        with pytest.raises(P.ProtocolError) as e:
            c.request("decode", {"face": "x", "codes": dict(codes_for(0.1), identity=np.full(4, np.nan, np.float32))})
        assert e.value.code == P.E_BAD_ARRAY


def test_lazy_pirate_retries_idempotent_requests_only(server: FakeServer) -> None:
    with Client(server.conn_file, timeout=0.4, retries=2) as c:
        server.drop["info"] = 1
        c.request("info")
        assert c.engine.stats["retries"] == 1 and c.engine.stats["reopens"] >= 1
        ids = [m.id for m in server.received if m.type == "info"]
        assert len(ids) == 2 and ids[0] != ids[1]            # resent with a fresh id
        server.drop["info"] = 5
        with pytest.raises(RequestTimeout):
            c.request("info")                               # bounded: 1 + 2 retries
        assert server.count("info") == 2 + 3
        server.drop["models.load"] = 1
        with pytest.raises(RequestTimeout):
            c.request("models.load", {"id": "m1"})          # not idempotent: never resent
        assert server.count("models.load") == 1
        c.request("ping")                                   # and the client still works


def test_stream_iterates_frames_and_fills_the_cache(server: FakeServer) -> None:
    frames = list(range(10, 30))
    stacked = {p: np.stack([codes_for(f / 100)[p] for f in frames]) for p in P.CODE_PARTS}
    with Client(server.conn_file) as c:
        got = dict(c.stream("face", frames, stacked, focus=20))
        assert sorted(got) == frames
        for f in frames:
            assert np.array_equal(got[f], vertices_for(codes_for(f / 100)))
        assert server.received[-1].body["focus"] == 20
        n = server.count("stream")
        again = list(c.stream("other-face", frames, stacked))   # everything cached: no request
        assert [f for f, _ in again] == frames and server.count("stream") == n
        assert c.decode("face", codes_for(0.15))["local"]


def test_jobs_events_and_upload(server: FakeServer) -> None:
    with Client(server.conn_file) as c:
        seen: list[str] = []
        result = c.run_job("fit", {"path": "/x"}, timeout=5, on_event=lambda e: seen.append(e["state"]))
        assert np.array_equal(result["codes"]["identity"], codes_for(0.25)["identity"])
        assert seen[-1] == "done"
        assert any(t == "job" for t, _ in c.events(timeout=0.2))
        data = bytes(range(256)) * 20
        uid = c.upload(data, "scan.ply")
        assert uid == "u" * 32 and bytes(server._upload) == data
        assert server.count("upload.chunk") == 6            # 5,120 bytes in 1,000-byte chunks


def test_a_client_without_the_keys_gets_nothing(server: FakeServer, tmp_path: Path) -> None:
    info = P.read_connection_file(server.conn_file)
    pub, sec = zmq.curve_keypair()
    stranger = P.ConnectionInfo(host=info.host, router_port=info.router_port, pub_port=info.pub_port,
                                server_public_key=info.server_public_key, client_public_key=pub.decode(),
                                client_secret_key=sec.decode())
    c = Client(stranger, timeout=0.3, retries=1)
    try:
        with pytest.raises(BackendGone):
            c.connect(timeout=1.5)
        assert c.engine.stats["received"] == 0              # not even a heartbeat
    finally:
        c.close()
    assert server.count("hello") == 0


# ------------------------------------------------------------------------------------------ async


def test_pump_never_blocks_and_decodes_coalesce_per_face(server: FakeServer) -> None:
    server.delay["decode"] = 0.25
    c = AsyncClient(server.conn_file)
    c.start()
    try:
        pump_until(c, lambda: c.state == "ready")
        handles: list[Pending] = [c.decode("face", codes_for(i / 10)) for i in range(6)]
        other = c.decode("other", codes_for(0.9))
        times = []
        while not (handles[-1].done() and other.done()):
            t0 = time.perf_counter()
            c.pump()
            times.append(time.perf_counter() - t0)
            time.sleep(0.001)
        assert [h.state for h in handles] == ["done"] + ["superseded"] * 4 + ["done"]
        assert np.array_equal(handles[-1].result["vertices"], vertices_for(codes_for(0.5)))
        assert other.ok and server.count("decode") == 3     # first, newest, other face
        p99 = float(np.percentile(times, 99))
        print(f"\npump(): {len(times)} calls while waiting, p99 {p99 * 1e6:.0f} us, max {max(times) * 1e6:.0f} us")
        assert max(times) < 0.1                           # never waits for the 250 ms decode
        # cache hit: done at once, no request
        hit = c.decode("third", codes_for(0.5))
        assert hit.ok and hit.result["local"]
    finally:
        c.close()


def test_killed_backend_is_reported_within_2s_and_a_restart_is_reconnected(keys: P.KeyFiles, tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    first = FakeServer(keys, conn).start()
    c = AsyncClient(conn, timeout=1.0)
    states: list[tuple[str, str]] = []
    c.on_state = lambda s, r: states.append((s, r))
    c.start()
    try:
        pump_until(c, lambda: c.state == "ready" and c._heartbeat_armed)
        old_session = c.server_session
        first.delay["decode"] = 0.3
        p = c.decode("face", codes_for(0.3))
        c.pump()
        t_kill = time.monotonic()
        first.stop()                                       # no goodbye, like kill -9
        took = pump_until(c, lambda: c.state == "gone", timeout=5)
        print(f"\nbackend loss reported after {time.monotonic() - t_kill:.2f} s: {c.reason}")
        assert took < 2.0
        assert not p.done() or p.ok                       # the face's decode waits to be resent
        # restarted on the same ports: a new session, noticed and handshaken
        second = FakeServer(keys, conn, ports=first.ports).start()
        try:
            pump_until(c, lambda: c.state == "ready", timeout=8)
            assert c.server_session == second.session != old_session
            pump_until(c, p.done, timeout=5)
            assert p.ok and np.array_equal(p.result["vertices"], vertices_for(codes_for(0.3)))
            assert c.submit("ping").state in ("sent", "queued")
        finally:
            second.stop()
        # restarted on other ports: found again through the rewritten connection file
        pump_until(c, lambda: c.state == "gone", timeout=5)
        third = FakeServer(keys, conn).start()
        try:
            assert third.ports != first.ports
            pump_until(c, lambda: c.state == "ready", timeout=8)
            assert c.server_session == third.session
        finally:
            third.stop()
        assert [s for s, _ in states].count("gone") >= 2
    finally:
        c.close()


def test_restart_without_outage_is_noticed_by_session_id(keys: P.KeyFiles, tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    first = FakeServer(keys, conn).start()
    c = Client(conn, timeout=1.0)
    try:
        c.connect()
        old = c.server_session
        first.stop()
        second = FakeServer(keys, conn, ports=first.ports).start()   # back before the heartbeat timeout
        try:
            assert c.request("ping")["time"] > 0
            t0 = time.monotonic()
            while c.server_session == old and time.monotonic() - t0 < 5:
                c.request("ping")
            assert c.server_session == second.session
            assert c.engine.stats["restarts"] >= 1
        finally:
            second.stop()
    finally:
        c.close()


def test_kill_mid_stream_raises_within_2s_and_the_stream_resumes_after_restart(keys: P.KeyFiles,
                                                                               tmp_path: Path) -> None:
    conn = tmp_path / "conn.json"
    first = FakeServer(keys, conn).start()
    first.delay["stream_frame"] = 0.05
    frames = list(range(40))
    stacked = {p: np.stack([codes_for(f / 50)[p] for f in frames]) for p in P.CODE_PARTS}
    c = Client(conn, timeout=2.0)
    try:
        c.connect()
        c.request("ping")
        got: list[int] = []
        t_kill = None
        with pytest.raises(BackendGone):
            for f, _ in c.stream("face", frames, stacked):
                got.append(f)
                if len(got) == 5:
                    threading.Thread(target=first.stop).start()
                    t_kill = time.monotonic()
        assert t_kill is not None and time.monotonic() - t_kill < 2.0
        assert 5 <= len(got) < len(frames)
        # the non-blocking client resumes the cut stream after a restart, asking only for missing frames
        eng = c.engine
        handle = eng._face_streams["face"]
        assert handle.state == "interrupted"
        missing = handle.missing()
        second = FakeServer(keys, conn, ports=first.ports).start()
        try:
            pump_until(eng, lambda: handle.complete, timeout=10)
            last = [m for m in second.received if m.type == "stream"][-1]
            assert last.body["frames"] == missing
            for f in frames:
                assert np.array_equal(handle.vertices(f), vertices_for(codes_for(f / 50)))
        finally:
            second.stop()
    finally:
        c.close()


def test_a_client_with_a_skewed_clock_learns_the_offset(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import addon.link.client as client_module

    class SkewedTime:
        monotonic = staticmethod(time.monotonic)
        perf_counter = staticmethod(time.perf_counter)

        @staticmethod
        def time() -> float:
            return time.time() + 300.0   # five minutes fast: far outside the replay window

    monkeypatch.setattr(client_module, "time", SkewedTime)
    with Client(server.conn_file) as c:
        assert abs(c.engine._clock_offset + 300.0) < 1.0
        assert c.request("ping")["time"] > 0
        assert np.array_equal(c.decode("f", codes_for(0.2))["vertices"], vertices_for(codes_for(0.2)))
