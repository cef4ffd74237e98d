"""Wire protocol v1 (addon/link/protocol.py): round trips, zero copy, every malformed category, replay
guard, connection file and keys, and CURVE on real sockets (a minimal in-test echo, not the server)."""
from __future__ import annotations

import json
import os
import random
import stat
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from addon.link import protocol as P

SESSION = P.new_session_id()


def _roundtrip(body: dict, **kw) -> P.Message:
    return P.decode(P.encode("test", body, session=SESSION, **kw))


def _frames(header: dict | None = None, body: object = None, arrays: list[bytes] | None = None,
            raw_header: bytes | None = None, raw_body: bytes | None = None) -> list[bytes]:
    h = {"v": 1, "type": "decode", "id": P.new_id(), "session": SESSION, "time": time.time()}
    if header:
        h.update(header)
    return [raw_header if raw_header is not None else msgpack.packb(h),
            raw_body if raw_body is not None else msgpack.packb({} if body is None else body),
            *(arrays or [])]


def _code(frames: list, **kw) -> str:
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, **kw)
    return e.value.code


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_every_value_kind() -> None:
    arrays = {name: (np.arange(12).reshape(3, 4) * 3).astype(name) for name in sorted(P.DTYPES)}
    body = {
        "none": None, "t": True, "f": False, "int": -7, "big": 2**63 - 1, "neg": -(2**63), "u64": 2**64 - 1,
        "float": 1.5, "nan_ok_outside_codes": float("inf"), "str": "ünïcode ✓", "empty": "", "bytes": b"\x00\xff",
        "list": [1, "a", None, [2, [3.0]]], "tuple": (1, 2), "map": {"a": {"b": {"c": []}}},
        "arrays": arrays, "scalar0d": np.array(3.25, dtype=np.float32), "empty_arr": np.zeros((0, 3), np.float32),
        "np_scalar": np.int64(5), "np_float": np.float32(0.5), "np_bool": np.bool_(True),
        "nested": [{"x": np.ones(2, np.uint8)}, [np.full((1, 1, 1), 9, np.int32)]],
    }
    m = _roundtrip(body, parent=P.new_id())
    b = m.body
    assert m.type == "test" and m.session == SESSION and m.parent is not None
    for k in ("none", "t", "f", "int", "big", "neg", "u64", "float", "str", "empty", "bytes", "list", "map"):
        assert b[k] == body[k], k
    assert b["nan_ok_outside_codes"] == float("inf")
    assert b["tuple"] == [1, 2] and b["np_scalar"] == 5 and b["np_float"] == 0.5 and b["np_bool"] is True
    for name, a in arrays.items():
        got = b["arrays"][name]
        assert got.dtype == np.dtype(name) and got.shape == (3, 4) and np.array_equal(got, a)
        assert not got.flags.writeable
    assert b["scalar0d"].shape == () and float(b["scalar0d"]) == 3.25
    assert b["empty_arr"].shape == (0, 3)
    assert np.array_equal(b["nested"][0]["x"], [1, 1]) and b["nested"][1][0].shape == (1, 1, 1)


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base[:, ::2]
    fortran = np.asfortranarray(base)
    be = base.astype(">f4")
    m = _roundtrip({"s": strided, "f": fortran, "be": be})
    assert np.array_equal(m.body["s"], strided)
    assert np.array_equal(m.body["f"], base)
    assert np.array_equal(m.body["be"], base) and m.body["be"].dtype == np.dtype("<f4")


def test_encode_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(TypeError):
        P.encode("x", {"a": np.zeros(3, np.float16)}, session=SESSION)
    with pytest.raises(TypeError):
        P.encode("x", {"a": object()}, session=SESSION)
    with pytest.raises(TypeError):
        P.encode("x", {"a": {1: 2}}, session=SESSION)
    with pytest.raises(ValueError):
        P.encode("x", {"a": {"__nd__": 0}}, session=SESSION)
    with pytest.raises(ValueError):
        P.encode("Bad Type", {}, session=SESSION)
    with pytest.raises(ValueError):
        P.encode("x", {}, session="not-hex")


def test_zero_copy_frames_share_memory_with_the_source_array() -> None:
    v = np.random.default_rng(0).random((20_000, 3)).astype(np.float32)
    frames = P.encode("decode_reply", {"vertices": v}, session=SESSION, parent=P.new_id())
    assert isinstance(frames[2], memoryview)
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.uint8), v)
    m = P.decode(frames)
    # the decoded array views the received frame too (here: the same memory again)
    assert np.shares_memory(m.body["vertices"], v)
    # and a zmq.Frame made with copy=False keeps pointing at the array's memory
    fr = zmq.Frame(frames[2], copy=False)
    assert np.shares_memory(np.frombuffer(fr.buffer, dtype=np.uint8), v)
    m2 = P.decode([frames[0], frames[1], fr])
    assert np.array_equal(m2.body["vertices"], v)


def test_encode_decode_timing_for_a_20k_vertex_frame() -> None:
    v = np.random.default_rng(1).random((20_000, 3)).astype(np.float32)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        P.decode(P.encode("decode_reply", {"face": "f", "vertices": v}, session=SESSION, parent=P.new_id()))
    dt = (time.perf_counter() - t0) / n
    print(f"\nencode+decode of a 20k x 3 float32 frame: {dt * 1e6:.1f} us")


def test_replies_and_errors() -> None:
    req = P.decode(P.encode("decode", {}, session=SESSION))
    err = P.ProtocolError(P.E_NOT_FOUND, "no such model", {"id": "abc"})
    m = P.decode(P.encode_error(err, session=SESSION, parent=req.id))
    assert m.is_error() and m.parent == req.id
    with pytest.raises(P.ProtocolError) as e:
        m.raise_for_error()
    assert (e.value.code, e.value.message, e.value.details) == (P.E_NOT_FOUND, "no such model", {"id": "abc"})
    assert P.reply_type("models.list") == "models.list_reply"
    assert P.error_from_body({"code": 3}).code == P.E_INTERNAL
    assert set(P.IDEMPOTENT_TYPES) <= set(P.REQUEST_TYPES)


# ------------------------------------------------------------------------------------------ malformed


def test_random_bytes_are_bad_message() -> None:
    rng = random.Random(0)
    for _ in range(200):
        frames = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(2, 5))]
        assert _code(frames) in (P.E_BAD_MESSAGE, P.E_TOO_LARGE, P.E_VERSION)
    assert _code([b"\xc1", b"\x80"]) == P.E_BAD_MESSAGE     # 0xc1 is never valid msgpack
    assert _code(_frames(raw_body=b"\xc1")) == P.E_BAD_MESSAGE


def test_truncated_and_extra_frames() -> None:
    good = P.encode("decode", {"a": np.ones(4, np.float32)}, session=SESSION)
    assert _code([]) == P.E_BAD_MESSAGE
    assert _code(good[:1]) == P.E_BAD_MESSAGE
    assert _code(good[:2]) == P.E_BAD_ARRAY                 # the descriptor names a missing frame
    assert _code([good[0], bytes(good[1])[:-3], good[2]]) == P.E_BAD_MESSAGE  # truncated msgpack
    assert _code([bytes(good[0])[:-1], good[1], good[2]]) == P.E_BAD_MESSAGE
    assert _code([good[0], bytes(good[1]) + b"\x00", good[2]]) == P.E_BAD_MESSAGE  # trailing bytes
    assert _code(good + [b"extra"]) == P.E_BAD_MESSAGE        # unreferenced frame
    assert _code(good[:2] + [bytes(good[2])[:-4]]) == P.E_BAD_ARRAY  # truncated array frame


def test_wrong_types_in_header_and_body() -> None:
    assert _code(_frames({"id": 5})) == P.E_BAD_MESSAGE
    assert _code(_frames({"id": "A" * 32})) == P.E_BAD_MESSAGE      # upper-case hex
    assert _code(_frames({"session": "ab"})) == P.E_BAD_MESSAGE
    assert _code(_frames({"time": "now"})) == P.E_BAD_MESSAGE
    assert _code(_frames({"time": True})) == P.E_BAD_MESSAGE
    assert _code(_frames({"time": float("nan")})) == P.E_BAD_MESSAGE
    assert _code(_frames({"v": "1"})) == P.E_BAD_MESSAGE
    assert _code(_frames({"v": True})) == P.E_BAD_MESSAGE
    assert _code(_frames({"type": "Bad Type"})) == P.E_BAD_MESSAGE
    assert _code(_frames({"type": 3})) == P.E_BAD_MESSAGE
    assert _code(_frames({"parent": 1})) == P.E_BAD_MESSAGE
    assert _code(_frames(raw_header=msgpack.packb([1, 2]))) == P.E_BAD_MESSAGE
    assert _code(_frames(body=[1, 2])) == P.E_BAD_MESSAGE
    assert _code(_frames(body="str")) == P.E_BAD_MESSAGE
    assert _code(_frames(raw_body=msgpack.packb({b"k": 1}))) == P.E_BAD_MESSAGE   # bytes key
    assert _code(_frames(raw_body=msgpack.packb({1: 1}, strict_types=False))) == P.E_BAD_MESSAGE
    assert _code(_frames(raw_body=msgpack.packb({"t": msgpack.ExtType(1, b"x")}))) == P.E_BAD_MESSAGE
    assert _code(_frames(raw_body=msgpack.packb({"t": msgpack.Timestamp(1)}))) == P.E_BAD_MESSAGE
    assert _code(_frames(raw_body=b"\x81\xa1k\xa2\xff\xfe")) == P.E_BAD_MESSAGE   # invalid utf-8


def test_wrong_header_keys_and_version() -> None:
    assert _code(_frames({"extra": 1})) == P.E_BAD_MESSAGE
    h = {"v": 1, "type": "ping", "id": P.new_id(), "session": SESSION}  # no time
    assert _code(_frames(raw_header=msgpack.packb(h))) == P.E_BAD_MESSAGE
    assert _code(_frames({"v": 2})) == P.E_VERSION
    assert P.peek_header(_frames({"v": 2})) is None
    hdr = P.peek_header(_frames())
    assert hdr is not None and hdr["type"] == "decode"


def test_wrong_body_keys_and_field_types() -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.check_keys({"face": "a", "colour": 1}, ("face", "codes"), ("face", "codes"))
    assert e.value.code == P.E_BAD_FIELD and e.value.details["unknown"] == ["colour"]
    assert e.value.details["missing"] == ["codes"]
    body = {"n": 3, "flag": True, "x": 2, "s": "a", "inf": float("inf")}
    assert P.get_field(body, "n", int) == 3
    assert P.get_field(body, "x", float) == 2.0 and isinstance(P.get_field(body, "x", float), float)
    assert P.get_field(body, "missing", int, 7) == 7
    for name, types in (("flag", int), ("s", int), ("n", str), ("missing", int), ("inf", float)):
        with pytest.raises(P.ProtocolError) as e:
            P.get_field(body, name, types)
        assert e.value.code == P.E_BAD_FIELD, name


def test_array_descriptor_problems() -> None:
    def desc(**kw):
        d = {"__nd__": 0, "dtype": "float32", "shape": [2, 2]}
        d.update(kw)
        return {"a": d}

    data = np.zeros(4, np.float32).tobytes()
    assert _code(_frames(body=desc(), arrays=[data[:-1]])) == P.E_BAD_ARRAY       # byte mismatch
    assert _code(_frames(body=desc(shape=[3, 2]), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(dtype="float16"), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(dtype="object"), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(dtype="<f4"), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(shape=[-1, 4]), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(shape=[2.0, 2]), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(shape=[True, 4]), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(shape="2,2"), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(shape=[1] * 9), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(__nd__=1), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(__nd__=-1), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(__nd__="0"), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body=desc(extra=1), arrays=[data])) == P.E_BAD_ARRAY
    assert _code(_frames(body={"a": {"__nd__": 0}}, arrays=[data])) == P.E_BAD_ARRAY
    twice = {"a": desc()["a"], "b": desc()["a"]}
    assert _code(_frames(body=twice, arrays=[data])) == P.E_BAD_ARRAY
    # the error names the request so the reply can correlate
    f = _frames(body=desc(), arrays=[data[:-1]])
    with pytest.raises(P.ProtocolError) as e:
        P.decode(f)
    assert e.value.details["request"] == msgpack.unpackb(f[0])["id"]


def test_oversize_messages_and_arrays() -> None:
    # claims 2**40 elements in a tiny frame: refused before anything is allocated
    huge = {"a": {"__nd__": 0, "dtype": "float64", "shape": [2**20, 2**20]}}
    assert _code(_frames(body=huge, arrays=[b"\x00" * 8])) == P.E_TOO_LARGE
    absurd = {"a": {"__nd__": 0, "dtype": "uint8", "shape": [2**62, 2**62, 2**62]}}
    assert _code(_frames(body=absurd, arrays=[b""])) == P.E_TOO_LARGE
    small = P.Limits(max_message_bytes=1000, max_frames=4, max_header_bytes=200, max_body_bytes=300,
                     max_array_elements=10)
    assert _code(P.encode("x", {"a": np.zeros(300, np.float32)}, session=SESSION), limits=small) == P.E_TOO_LARGE
    assert _code(P.encode("x", {"a": np.zeros(11, np.uint8)}, session=SESSION), limits=small) == P.E_TOO_LARGE
    assert _code(P.encode("x", {"a": [np.zeros(1, np.uint8)] * 3}, session=SESSION), limits=small) == P.E_TOO_LARGE
    assert _code(P.encode("x", {"s": "x" * 400}, session=SESSION), limits=small) == P.E_TOO_LARGE
    assert _code(_frames(raw_header=b"\x00" * 300), limits=small) == P.E_TOO_LARGE
    # msgpack length limits: a long list or map inside a small frame
    assert _code(_frames(body={"l": list(range(100_001))})) == P.E_BAD_MESSAGE
    assert _code(_frames(body={"m": {str(i): 0 for i in range(1_025)}})) == P.E_BAD_MESSAGE
    # a header claiming a 4 GiB string in a few bytes
    assert _code([b"\xdb\xff\xff\xff\xff", b"\x80"]) == P.E_BAD_MESSAGE


def test_deep_nesting() -> None:
    def nest(n: int):
        v: object = 1
        for _ in range(n):
            v = [v]
        return v

    assert _roundtrip({"d": nest(30)}).body["d"] == nest(30)
    assert _code(_frames(body={"d": nest(40)})) == P.E_BAD_MESSAGE
    raw = b"\x81\xa1d" + b"\x91" * 5000 + b"\x01"   # past msgpack's own 1,024-deep stack
    assert _code(_frames(raw_body=raw)) == P.E_BAD_MESSAGE
    maps = b"\x81\xa1d" * 3000 + b"\x01"
    assert _code(_frames(raw_body=maps)) == P.E_BAD_MESSAGE
    with pytest.raises(ValueError):
        P.encode("x", {"d": nest(40)}, session=SESSION)


def test_codes_checks() -> None:
    sizes = {"identity": 4, "expression": 3, "detail": 2}
    good = {p: np.zeros(n, np.float32) for p, n in sizes.items()}
    out = P.check_codes(P.decode(P.encode("d", {"codes": good}, session=SESSION)).body["codes"], sizes=sizes)
    assert all(out[p].shape == (1, n) and out[p].dtype == np.float32 for p, n in sizes.items())
    stacked = {p: np.zeros((5, n), np.float64) for p, n in sizes.items()}
    assert P.check_codes(stacked, sizes=sizes, rows=5)["identity"].dtype == np.float32

    def code_of(codes, **kw) -> str:
        with pytest.raises(P.ProtocolError) as e:
            P.check_codes(codes, sizes=sizes, **kw)
        return e.value.code

    for bad in (np.nan, np.inf, -np.inf):
        c = dict(good, expression=np.array([0, bad, 0], np.float32))
        assert code_of(c) == P.E_BAD_ARRAY
    assert code_of(dict(good, detail=np.array([1e300, 0.0]))) == P.E_BAD_ARRAY  # inf once float32
    assert code_of(dict(good, identity=np.zeros(5, np.float32))) == P.E_BAD_ARRAY
    assert code_of(dict(good, identity=np.zeros((1, 1, 4), np.float32))) == P.E_BAD_ARRAY
    assert code_of(dict(good, identity=np.zeros(4, np.int32))) == P.E_BAD_ARRAY
    assert code_of(dict(good, identity=np.zeros((0, 4), np.float32))) == P.E_BAD_ARRAY
    assert code_of(dict(good, identity=np.zeros((2, 4), np.float32))) == P.E_BAD_ARRAY  # rows differ
    assert code_of(good, rows=2) == P.E_BAD_ARRAY
    assert code_of({k: v for k, v in good.items() if k != "detail"}) == P.E_BAD_FIELD
    assert code_of(dict(good, extra=np.zeros(1, np.float32))) == P.E_BAD_FIELD
    assert code_of(dict(good, identity=[0.0] * 4)) == P.E_BAD_FIELD
    assert code_of([1, 2]) == P.E_BAD_FIELD


def test_codes_key_is_stable_and_sensitive() -> None:
    c = {"identity": np.arange(4, dtype=np.float32), "expression": np.ones(3, np.float32),
         "detail": np.zeros(2, np.float32)}
    k = P.codes_key(c, model="m", neutral=False)
    assert k == P.codes_key({p: v.astype(np.float64) for p, v in c.items()}, neutral=False, model="m")
    assert k != P.codes_key(c, model="m", neutral=True)
    c2 = dict(c, detail=np.array([0, 1e-7], np.float32))
    assert k != P.codes_key(c2, model="m", neutral=False)


def test_fuzzed_mutations_only_raise_protocol_errors() -> None:
    rng = random.Random(7)
    base = P.encode("decode", {"face": "f", "codes": {"identity": np.ones(8, np.float32)},
                               "l": [1, 2, {"x": "y"}]}, session=SESSION)
    base = [bytes(f) for f in base]
    seen: set[str] = set()
    for _ in range(2_000):
        frames = list(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(frames))
            b = bytearray(frames[i])
            op = rng.randrange(4)
            if op == 0 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 1:
                b = b[:rng.randrange(len(b) + 1)]
            elif op == 2:
                b += rng.randbytes(rng.randint(1, 8))
            else:
                frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randint(0, 16)))
            frames[i] = bytes(b)
        try:
            P.decode(frames)
        except P.ProtocolError as e:
            assert e.code in P.ERROR_CODES
            seen.add(e.code)
    assert {P.E_BAD_MESSAGE, P.E_BAD_ARRAY} <= seen


# ------------------------------------------------------------------------------------------ replay guard


def test_replayed_and_stale() -> None:
    g = P.ReplayGuard(window_s=60, max_skew_s=10)
    m = P.decode(P.encode("ping", {}, session=SESSION))
    g.check(m)
    with pytest.raises(P.ProtocolError) as e:
        g.check(m)
    assert e.value.code == P.E_REPLAYED
    g.check(P.decode(P.encode("ping", {}, session=P.new_session_id(), msg_id=m.id)))  # other session: fine
    now = time.time()
    for t in (now - 75, now + 11):
        with pytest.raises(P.ProtocolError) as e:
            g.check(P.decode(P.encode("ping", {}, session=SESSION, now=t)))
        assert e.value.code == P.E_STALE
    g.check(P.decode(P.encode("ping", {}, session=SESSION, now=now - 65)))  # within window + skew
    g.check(P.decode(P.encode("ping", {}, session=SESSION, now=now + 9)))


def test_replay_guard_memory_stays_bounded() -> None:
    g = P.ReplayGuard(window_s=10, max_skew_s=1, max_ids=5_000)
    t = 1_000_000.0
    sessions = [P.new_session_id() for _ in range(4)]
    # 1,000 messages per second for 60 s: the window keeps at most 11 s worth, the cap 5,000
    for i in range(60_000):
        t += 0.001
        g.check(sessions[i % 4], P.new_id(), t, now=t)
        assert len(g) <= 5_000
    assert len(g._heap) <= 5_000
    # slow traffic: expiry alone keeps memory to the window
    g2 = P.ReplayGuard(window_s=10, max_skew_s=1, max_ids=100_000)
    for i in range(10_000):
        t += 0.1
        g2.check(SESSION, P.new_id(), t, now=t)
    assert len(g2) <= 111


def test_an_id_evicted_by_the_cap_cannot_be_replayed() -> None:
    g = P.ReplayGuard(window_s=60, max_skew_s=10, max_ids=10)
    now = 5_000.0
    first = P.new_id()
    g.check(SESSION, first, now - 5, now=now)
    for i in range(20):
        g.check(SESSION, P.new_id(), now - 4 + i * 0.01, now=now)
    assert len(g) == 10
    with pytest.raises(P.ProtocolError) as e:
        g.check(SESSION, first, now - 5, now=now + 1)
    assert e.value.code == P.E_STALE


# ------------------------------------------------------------------------------------------ files, keys


def _info(**kw) -> P.ConnectionInfo:
    d = dict(host="127.0.0.1", router_port=5555, pub_port=5556, server_public_key="a" * 40,
             client_public_key="b" * 40, client_secret_key="c" * 40, pid=123)
    d.update(kw)
    return P.ConnectionInfo(**d)


def test_connection_file_is_0600_atomic_and_round_trips(tmp_path: Path) -> None:
    old = os.umask(0o000)  # even with a permissive umask
    try:
        path = P.write_connection_file(tmp_path / "sub" / "conn.json", _info())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["conn.json"]  # no temporary left behind
    info = P.read_connection_file(path)
    assert info == _info() and info.router_endpoint == "tcp://127.0.0.1:5555"
    assert json.loads(path.read_text())["protocol"] == 1
    P.write_connection_file(path, _info(pid=9))                      # replaced in place, still 0600
    assert P.read_connection_file(path).pid == 9 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _info(host="::1").pub_endpoint == "tcp://[::1]:5556"


def test_connection_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = P.write_connection_file(tmp_path / "c.json", _info())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        P.read_connection_file(path)
    assert P.read_connection_file(path, allow_insecure=True).pid == 123
    os.chmod(path, 0o600)
    path.write_text(json.dumps(dict(_info().to_dict(), protocol=2)))
    with pytest.raises(ValueError):
        P.read_connection_file(path)
    path.write_text(json.dumps({"host": "x"}))
    with pytest.raises(ValueError):
        P.read_connection_file(path)


def test_keys_are_created_kept_and_rotated(tmp_path: Path) -> None:
    files = P.ensure_keys(tmp_path / "keys")
    assert stat.S_IMODE(files.keys_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.server_secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.client_secret.stat().st_mode) == 0o600
    spub, ssec = P.load_keypair(files.server_secret)
    assert len(spub) == 40 and ssec is not None and len(ssec) == 40
    assert [p.name for p in files.allowed_dir.iterdir()] == ["client.key"]
    again = P.ensure_keys(tmp_path / "keys")                           # kept across restarts
    assert P.load_keypair(again.server_secret) == (spub, ssec)
    cpub, csec = P.add_client_key(tmp_path / "keys", "laptop")
    assert (files.allowed_dir / "laptop.key").is_file() and len(csec) == 40
    rotated = P.ensure_keys(tmp_path / "keys", rotate=True)
    assert P.load_keypair(rotated.server_secret)[0] != spub
    assert [p.name for p in rotated.allowed_dir.iterdir()] == ["client.key"]   # old clients dropped
    with pytest.raises(ValueError):
        P.add_client_key(tmp_path / "keys", "../evil")


# ------------------------------------------------------------------------------------------ CURVE


def _echo_server(ctx: zmq.Context, files: P.KeyFiles, stop: threading.Event, ready: threading.Event,
                 ports: dict) -> None:
    """A minimal ROUTER echo speaking the protocol (infrastructure for this test, not the product server)."""
    spub, ssec = P.load_keypair(files.server_secret)
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    session = P.new_session_id()
    for s in (router, pub):
        P.apply_socket_limits(s)
        P.curve_server(s, spub, ssec)
    ports["router"] = router.bind_to_random_port("tcp://127.0.0.1")
    ports["pub"] = pub.bind_to_random_port("tcp://127.0.0.1")
    ready.set()
    guard = P.ReplayGuard()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    try:
        while not stop.is_set():
            pub.send_multipart([P.TOPIC_HEARTBEAT] + P.encode("heartbeat", {"seq": 0}, session=session),
                               copy=False)
            if not poller.poll(20):
                continue
            ids, frames = P.split_routed(router.recv_multipart(copy=False))
            try:
                msg = P.decode(frames)
                guard.check(msg)
                out = P.encode(P.reply_type(msg.type), msg.body, session=session, parent=msg.id)
            except P.ProtocolError as e:
                hdr = P.peek_header(frames)
                out = P.encode_error(e, session=session, parent=hdr["id"] if hdr else None)
            router.send_multipart(ids + out, copy=False)
    finally:
        router.close(0)
        pub.close(0)


def _client_socket(ctx: zmq.Context, kind: int, server_public: bytes | None,
                   keypair: tuple[bytes, bytes] | None) -> zmq.Socket:
    s = ctx.socket(kind)
    P.apply_socket_limits(s)
    if server_public is not None and keypair is not None:
        P.curve_client(s, server_public, keypair[0], keypair[1])
    return s


def test_curve_only_allowlisted_clients_get_replies_and_events(tmp_path: Path) -> None:
    P.require_curve()
    files = P.ensure_keys(tmp_path / "keys")
    ctx = zmq.Context()
    auth = P.start_authenticator(ctx, files.allowed_dir)
    stop, ready, ports = threading.Event(), threading.Event(), {}
    th = threading.Thread(target=_echo_server, args=(ctx, files, stop, ready, ports), daemon=True)
    th.start()
    sockets: list[zmq.Socket] = []
    try:
        assert ready.wait(5)
        spub, _ = P.load_keypair(files.server_public)
        cpub, csec = P.load_keypair(files.client_secret)
        stranger = zmq.curve_keypair()                           # right server key, not allowlisted
        cases = {"allowed": (spub, (cpub, csec)), "stranger": (spub, stranger), "plain": (None, None)}
        got: dict[str, tuple[bool, bool]] = {}
        for name, (server_key, pair) in cases.items():
            dealer = _client_socket(ctx, zmq.DEALER, server_key, pair)
            sub = _client_socket(ctx, zmq.SUB, server_key, pair)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sockets += [dealer, sub]
            dealer.connect(f"tcp://127.0.0.1:{ports['router']}")
            sub.connect(f"tcp://127.0.0.1:{ports['pub']}")
            rid = P.new_id()
            v = np.arange(6, dtype=np.float32).reshape(2, 3)
            dealer.send_multipart(P.encode("ping", {"v": v}, session=SESSION, msg_id=rid), copy=False)
            reply = dealer.poll(1500 if name == "allowed" else 600)
            event = sub.poll(1500 if name == "allowed" else 600)
            got[name] = (bool(reply), bool(event))
            if reply:
                m = P.decode(dealer.recv_multipart(copy=False))
                assert m.type == "ping_reply" and m.parent == rid and np.array_equal(m.body["v"], v)
                # the same id again is refused by the replay guard
                dealer.send_multipart(P.encode("ping", {}, session=SESSION, msg_id=rid), copy=False)
                assert dealer.poll(1500)
                err = P.decode(dealer.recv_multipart())
                assert err.is_error() and err.error().code == P.E_REPLAYED and err.parent == rid
            if event:
                topic, *frames = sub.recv_multipart()
                assert topic == P.TOPIC_HEARTBEAT and P.decode(frames).type == "heartbeat"
        assert got == {"allowed": (True, True), "stranger": (False, False), "plain": (False, False)}
    finally:
        stop.set()
        th.join(5)
        for s in sockets:
            s.close(0)
        auth.stop()
        ctx.term()
