"""The backend server as a real subprocess over real sockets (one server for the module, CURVE on).

Values are checked against the same calls made in-process (`backend.server.model_service`, which
wraps the product API). A few tests start their own short-lived server: the kill -9 / restart test, and
the non-loopback bind tests (no model: they start in a second).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import zmq
from model_fixture import loaded_model, one_thread, tiny_model  # noqa: F401  (fixtures)
from server_fixture import REPO, curve_socket, other_local_address, rss_bytes, start_server

from addon.link import protocol as P
from addon.link.client import AsyncClient, Client

TEMPLATE_RES = 64
TOL_MM = 0.01            # 1e-4 model units: warm decodes vs a cold decode of the same codes
FIT_OPTIONS = {"steps": 8, "resolution": 48}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("server_root")


@pytest.fixture(scope="module")
def server(tiny_model, root, tmp_path_factory):
    home = tmp_path_factory.mktemp("server_home")
    sp = start_server(home, model=tiny_model.path, roots=[root, tiny_model.path.parents[1]],
                      extra=["--template-resolution", TEMPLATE_RES, "--threads", 1, "--workers", 1,
                             "--worker-threads", 1])
    yield sp
    sp.stop()
    assert not sp.alive()


@pytest.fixture(scope="module")
def client(server):
    c = Client(server.connection_file, timeout=15, retries=1)
    c.connect(timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(loaded_model, tiny_model):
    """The same model in this process, with the server's template: for values computed in-process."""
    import torch

    import backend.server.model_service as ms

    model, ck = loaded_model
    template = ms.build_template(model, TEMPLATE_RES)
    lm = ms.LoadedModel(Path(tiny_model.path), model, ck, ms.model_fingerprint(tiny_model.path),
                        torch.device("cpu"), template, ms.template_uvs(template.vertices), TEMPLATE_RES)
    manifest = json.loads((tiny_model.scans / "manifest.json").read_text())
    idx = manifest["landmark_vertex_indices"]
    from backend.scans.landmarks import LANDMARK_NAMES

    return SimpleNamespace(ms=ms, lm=lm, model=model, ck=ck, template=template,
                           landmark_indices=[int(idx[n]) for n in LANDMARK_NAMES])


def cold(ref, codes, neutral=False) -> np.ndarray:
    """A cold decode in-process (a fresh decoder)."""
    return ref.ms.decode(ref.ms.new_decoder(ref.model, ref.template), codes, neutral)[0]


def codes_line(ref, n: int, seed: int, scale: float = 0.5) -> list[dict[str, np.ndarray]]:
    """n code sets along a smooth path (a timeline) between two random faces."""
    s = ref.ms.codes_sample(ref.lm, 2, seed, scale)
    return [{p: (s[p][0] * (1 - t) + s[p][1] * t)[None].astype(np.float32) for p in P.CODE_PARTS}
            for t in np.linspace(0.0, 1.0, n)]


def max_mm(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def wait_for(pred, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ------------------------------------------------------------------------------------------ round trips


def test_every_request_type_round_trips_with_in_process_values(server, client, ref, tiny_model, root):
    ms, lm = ref.ms, ref.lm
    # hello / ping / info / models
    hello = client.request("hello", {"protocol": 1, "client": "test"})
    assert hello["protocol"] == 1 and hello["session"] == client.server_session
    assert hello["model"]["id"] == lm.fingerprint and hello["heartbeat_s"] == P.HEARTBEAT_INTERVAL_S
    assert hello["model"]["n_vertices"] == len(ref.template.vertices)
    assert hello["model"]["sizes"] == lm.sizes
    assert client.request("ping", {"data": "abc"})["data"] == "abc"
    info = client.request("info")
    assert info["model"]["id"] == lm.fingerprint and str(root.resolve()) in info["roots"]
    models = client.request("models.list")["models"]
    assert any(m["id"] == lm.fingerprint and m["loaded"] for m in models)
    assert client.request("models.load", {"id": lm.fingerprint})["model"]["id"] == lm.fingerprint
    assert client.request("models.load", {"path": str(tiny_model.path)})["model"]["id"] == lm.fingerprint

    # codes: mean, scans, scan, pca, sample
    mean = client.request("codes", {"kind": "mean"})["codes"]
    for p, v in ms.codes_mean(lm).items():
        np.testing.assert_array_equal(mean[p], v)
    scans = client.request("codes", {"kind": "scans"})["scans"]
    assert [s["name"] for s in scans] == [s["key"] for s in ref.ck.dataset["scans"]]
    one = client.request("codes", {"kind": "scan", "index": 2})
    want, ident = ms.codes_scan(lm, 2)
    assert one["identity_index"] == ident
    for p in P.CODE_PARTS:
        np.testing.assert_array_equal(one["codes"][p], want[p])
    pca = client.request("codes", {"kind": "pca", "part": "expression", "n_components": 3})
    for k, v in ms.codes_pca(lm, "expression", 3).items():
        np.testing.assert_array_equal(pca[k], v)
    sample = client.request("codes", {"kind": "sample", "n": 3, "seed": 5, "scale": 0.7})["codes"]
    for p, v in ms.codes_sample(lm, 3, 5, 0.7).items():
        np.testing.assert_array_equal(sample[p], v)

    # decode: topology once, vertices within 0.01 mm of a cold decode in-process, then a cache hit
    codes = {p: sample[p][:1] for p in P.CODE_PARTS}
    r = client.request("decode", {"face": "rt", "codes": codes, "with_topology": True})
    np.testing.assert_array_equal(r["faces"], ref.template.faces)
    np.testing.assert_array_equal(r["uvs"], ms.template_uvs(ref.template.vertices))
    assert r["uvs"].min() >= 0 and r["uvs"].max() <= 1
    assert r["vertices"].dtype == np.float32 and max_mm(r["vertices"], cold(ref, codes)) <= TOL_MM
    r2 = client.request("decode", {"face": "rt", "codes": codes})
    assert r2["cached"] and "faces" not in r2
    np.testing.assert_array_equal(r2["vertices"], r["vertices"])
    rn = client.request("decode", {"face": "rt", "codes": mean, "neutral": True})
    assert max_mm(rn["vertices"], cold(ref, mean, neutral=True)) <= TOL_MM

    # stream: frames pushed in timeline order from the focus, each within 0.01 mm of a cold decode
    line = codes_line(ref, 5, seed=11)
    stacked = {p: np.concatenate([c[p] for c in line]) for p in P.CODE_PARTS}
    got = list(client.stream("rt-stream", [10, 11, 12, 13, 14], stacked, focus=12, timeout=60))
    assert [f for f, _ in got] == [12, 13, 14, 11, 10]
    for f, v in got:
        assert max_mm(v, cold(ref, line[f - 10])) <= TOL_MM

    # extract (a job in a worker process) = extract in-process
    ex = client.run_job("extract", {"codes": codes, "resolution": 48}, timeout=120)
    want = ms.extract(lm, codes, 48, False)
    np.testing.assert_array_equal(ex["faces"], want["faces"])
    assert max_mm(ex["vertices"], want["vertices"]) <= 1e-3

    # fit by path (a job) = the same fit in-process; then by upload: the same result
    scan = tiny_model.scans / "id00" / "smile.ply"
    body = {"path": str(scan), "options": {"landmark_indices": ref.landmark_indices, **FIT_OPTIONS}}
    events: list[dict] = []
    fit = client.run_job("fit", body, timeout=180, on_event=events.append)
    from backend.scans.mesh_io import read_geometry_file

    v, f = read_geometry_file(scan)
    want = ms.run_fit(lm, v, f, v[ref.landmark_indices], name="smile", **FIT_OPTIONS)
    for p in P.CODE_PARTS:
        np.testing.assert_allclose(fit["codes"][p], want["codes"][p], atol=1e-5)
    np.testing.assert_allclose(fit["normalized_from_scan"], want["normalized_from_scan"], atol=1e-9)
    assert fit["fitted"]["faces"].shape == want["fitted"]["faces"].shape
    assert max_mm(fit["fitted"]["vertices"], want["fitted"]["vertices"]) <= 1e-2
    assert max_mm(fit["registered"]["vertices"], want["registered"]["vertices"]) <= TOL_MM
    assert any(0 < e.get("progress", 0) < 1 for e in events)
    up = client.upload(scan)
    fit2 = client.run_job("fit", {"upload": up, "landmarks": v[ref.landmark_indices].astype(np.float32),
                                  "options": FIT_OPTIONS}, timeout=180)
    for p in P.CODE_PARTS:
        np.testing.assert_allclose(fit2["codes"][p], fit["codes"][p], atol=1e-5)

    # job.status / job.cancel of a finished job; unknown job
    jid = client.request("extract", {"codes": codes, "resolution": 32})["job"]
    client.wait_job(jid, timeout=60)
    st = client.request("job.status", {"job": jid})
    assert st["state"] == "done" and st["result"]["faces"].shape[1] == 3
    assert client.request("job.cancel", {"job": jid})["state"] == "done"
    with pytest.raises(P.ProtocolError) as e:
        client.request("job.status", {"job": "0" * 32})
    assert e.value.code == P.E_NOT_FOUND


def test_warm_decodes_of_two_interleaving_clients_match_cold_decodes(server, ref):
    """Per-(client, face) warm state: two clients decode different timelines into the same face name,
    interleaved; every frame stays within 0.01 mm (1e-4 model units) of a cold decode."""
    a = Client(server.connection_file, timeout=15, retries=0)
    b = Client(server.connection_file, timeout=15, retries=0)
    a.connect(timeout=30)
    b.connect(timeout=30)
    try:
        la, lb = codes_line(ref, 6, seed=21), codes_line(ref, 6, seed=22, scale=0.8)
        worst = 0.0
        for ca, cb in zip(la, lb):
            va = a.request("decode", {"face": "shared", "codes": ca})
            vb = b.request("decode", {"face": "shared", "codes": cb})
            assert not va["cached"] and not vb["cached"]
            worst = max(worst, max_mm(va["vertices"], cold(ref, ca)), max_mm(vb["vertices"], cold(ref, cb)))
        assert worst <= TOL_MM, worst
    finally:
        a.close()
        b.close()


def test_stream_focus_serves_the_frame_looked_at_next(server, ref):
    c = AsyncClient(server.connection_file, timeout=15)
    order: list[int] = []
    c.on_frame = lambda face, frame, v: order.append(frame)
    c.start()
    try:
        assert wait_for(lambda: (c.pump(), c.state == "ready")[1], 30)
        line = codes_line(ref, 30, seed=31, scale=0.6)
        stacked = {p: np.concatenate([x[p] for x in line]) for p in P.CODE_PARTS}
        h = c.stream("focus-face", list(range(30)), stacked)
        assert wait_for(lambda: (c.pump(), len(order) >= 1)[1], 30)
        c.focus(h, 25)
        assert wait_for(lambda: (c.pump(), h.complete)[1], 60)
        assert order[0] == 0
        # frame 25 comes next (or right after the one already being decoded), long before frame 10
        assert order.index(25) < order.index(10), order
        assert order[order.index(25):order.index(25) + 5] == [25, 26, 27, 28, 29], order
        assert sorted(order) == list(range(30))
        p = c.submit("stream.focus", {"stream": h.id, "frame": 3})  # finished: nothing to move
        assert wait_for(lambda: (c.pump(), p.done())[1], 15)
        assert isinstance(p.error, P.ProtocolError) and p.error.code == P.E_NOT_FOUND
    finally:
        c.close()


# ------------------------------------------------------------------------------------------ concurrency


def test_four_concurrent_clients_get_their_own_answers(server, ref):
    rng = np.random.default_rng(7)
    code_sets = [{p: v[None] for p, v in zip(P.CODE_PARTS, row)} for row in
                 zip(*(ref.ms.codes_sample(ref.lm, 6, 99, 0.6)[p] for p in P.CODE_PARTS))]
    expected_vertices = [cold(ref, c) for c in code_sets]
    samples = {seed: ref.ms.codes_sample(ref.lm, 2, seed, 1.0) for seed in range(8)}
    plans = [[int(k) for k in rng.integers(0, 5, 200)] for _ in range(4)]
    errors: list[str] = []

    def run(ci: int) -> None:
        c = Client(server.connection_file, timeout=30, retries=0)
        try:
            c.connect(timeout=30)
            for n, kind in enumerate(plans[ci]):
                if kind == 0:
                    tag = f"{ci}:{n}"
                    assert c.request("ping", {"data": tag})["data"] == tag
                elif kind == 1:
                    seed = (ci + n) % 8
                    got = c.request("codes", {"kind": "sample", "n": 2, "seed": seed})["codes"]
                    for p in P.CODE_PARTS:
                        np.testing.assert_array_equal(got[p], samples[seed][p])
                elif kind == 2:
                    k = (ci * 7 + n) % len(code_sets)
                    r = c.request("decode", {"face": f"face{ci}", "codes": code_sets[k]})
                    assert max_mm(r["vertices"], expected_vertices[k]) <= TOL_MM
                elif kind == 3:
                    i = (ci + n) % len(ref.ck.dataset["scans"])
                    r = c.request("codes", {"kind": "scan", "index": i})
                    assert r["index"] == i
                    np.testing.assert_array_equal(r["codes"]["detail"], ref.ms.codes_scan(ref.lm, i)[0]["detail"])
                else:
                    try:
                        c.request("job.status", {"job": f"{ci:02d}{n:030d}"})
                        errors.append("job.status of an unknown job answered")
                    except P.ProtocolError as e:
                        assert e.code == P.E_NOT_FOUND
        except Exception as exc:  # reported below with the client number
            errors.append(f"client {ci}: {type(exc).__name__}: {exc}")
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors[:5]


# ------------------------------------------------------------------------------------------ hostile input


def _fuzz_messages(rng: np.random.Generator, session: str, n: int):
    """(frames, expected error code or "ok") pairs covering every category, cheap for the server."""

    def header(type_: str = "ping", **over) -> bytes:
        h = {"v": 1, "type": type_, "id": P.new_id(), "session": session, "time": time.time()}
        h.update(over)
        return msgpack.packb(h)

    def pk(obj) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    def nd(i: int, shape, dtype="float32"):
        return {"__nd__": i, "dtype": dtype, "shape": list(shape)}

    def nested(depth: int):
        x: object = 1
        for _ in range(depth):
            x = [x]
        return x

    cats = ["random1", "random_n", "trunc_header", "trunc_body", "extra_frame", "wrong_type_field",
            "unknown_type", "oversized", "shape_mismatch", "deep", "deeper", "wrong_body_key", "wrong_header_key",
            "replayed", "stale", "version", "too_many_frames", "bad_dtype", "ext_type", "not_a_map", "codes_nan"]
    i = 0
    while i < n:
        c = cats[int(rng.integers(len(cats)))]
        if c == "random1":
            yield c, [rng.bytes(int(rng.integers(1, 64)))], P.E_BAD_MESSAGE
        elif c == "random_n":
            yield c, [b"\xc1" + rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(2, 5)))], P.E_BAD_MESSAGE
        elif c == "trunc_header":
            yield c, [header()[:-3], pk({})], P.E_BAD_MESSAGE
        elif c == "trunc_body":
            yield c, [header(), pk({"data": "x" * 20})[:-5]], P.E_BAD_MESSAGE
        elif c == "extra_frame":
            yield c, [header(), pk({}), rng.bytes(8)], P.E_BAD_MESSAGE
        elif c == "wrong_type_field":
            if rng.random() < 0.5:
                yield c, [header("decode"), pk({"face": 5, "codes": 1})], P.E_BAD_FIELD
            else:
                yield c, [header("codes"), pk({"kind": 7})], P.E_BAD_FIELD
        elif c == "unknown_type":
            yield c, [header("frobnicate.now"), pk({})], P.E_UNKNOWN_TYPE
        elif c == "oversized":
            yield c, [header("decode"), pk({"face": "f", "codes": {"identity": nd(0, [10**9]), "expression": 1,
                                                                  "detail": 1}}), b"\0" * 4], P.E_TOO_LARGE
        elif c == "shape_mismatch":
            yield c, [header("decode"), pk({"face": "f", "codes": {"identity": nd(0, [40]), "expression": 1,
                                                                  "detail": 1}}), b"\0" * 10], P.E_BAD_ARRAY
        elif c == "deep":
            yield c, [header(), pk({"data": nested(100)})], P.E_BAD_MESSAGE
        elif c == "deeper":
            yield c, [header(), b"\x81\xa4data" + b"\x91" * 3000 + b"\x01"], P.E_BAD_MESSAGE
        elif c == "wrong_body_key":
            yield c, [header(), pk({"bogus": 1})], P.E_BAD_FIELD
        elif c == "wrong_header_key":
            yield c, [header(extra=1), pk({})], P.E_BAD_MESSAGE
        elif c == "replayed":
            frames = [header(), pk({})]
            yield c + "/first", frames, "ok"
            yield c, frames, P.E_REPLAYED
            i += 1
        elif c == "stale":
            yield c, [header(time=time.time() - 3600), pk({})], P.E_STALE
        elif c == "version":
            yield c, [header(v=2), pk({})], P.E_VERSION
        elif c == "too_many_frames":
            yield c, [header(), pk({})] + [b"x"] * 70, P.E_TOO_LARGE
        elif c == "bad_dtype":
            yield c, [header("decode"), pk({"face": "f", "codes": {"identity": nd(0, [1], "object"), "expression": 1,
                                                                  "detail": 1}}), b"\0" * 8], P.E_BAD_ARRAY
        elif c == "ext_type":
            yield c, [header(), b"\x81\xa4data\xd4\x05\x01"], P.E_BAD_MESSAGE
        elif c == "not_a_map":
            yield c, [header(), pk([1, 2, 3])], P.E_BAD_MESSAGE
        elif c == "codes_nan":
            a = np.full(40, np.nan, np.float32)
            yield c, [header("decode"), pk({"face": "f", "codes": {"identity": nd(0, [40]), "expression": nd(1, [40]),
                                                                  "detail": nd(2, [40])}}), a.tobytes(), a.tobytes(),
                      a.tobytes()], P.E_BAD_ARRAY
        i += 1


def test_fuzz_of_10000_hostile_messages(server, client, ref):
    info = P.read_connection_file(server.connection_file)
    ctx = zmq.Context()
    keys = (info.client_public_key.encode(), info.client_secret_key.encode())
    sock = curve_socket(ctx, zmq.DEALER, info.router_endpoint, info.server_public_key, keys)
    rng = np.random.default_rng(1234)
    session = P.new_session_id()
    msgs = list(_fuzz_messages(rng, session, 10_000))
    assert len(msgs) >= 10_000
    per_cat: dict[str, dict[str, int]] = {}
    rss_at_1000 = None
    try:
        batch = 100
        for start in range(0, len(msgs), batch):
            chunk = msgs[start:start + batch]
            for _, frames, _ in chunk:
                sock.send_multipart(frames)
            for cat, frames, want in chunk:
                assert sock.poll(20_000), f"no reply to a {cat} message"
                reply = P.decode(sock.recv_multipart(), limits=P.CLIENT_LIMITS)
                got = "ok" if reply.type != "error" else reply.body["code"]
                per_cat.setdefault(cat, {}).setdefault(got, 0)
                per_cat[cat][got] += 1
                assert got == want, (cat, got, want, reply.body)
            if rss_at_1000 is None and start + batch >= 1000:
                rss_at_1000 = rss_bytes(server.pid)
        rss_end = rss_bytes(server.pid)
    finally:
        sock.close(0)
        ctx.term()
    assert len(per_cat) >= 20
    grown = (rss_end - rss_at_1000) / 2**20
    assert grown < 50, f"RSS grew {grown:.1f} MB between message 1,000 and 10,000"
    # still answering, correctly
    assert client.request("ping", {"data": 1})["data"] == 1
    codes = codes_line(ref, 2, seed=77)[1]
    assert max_mm(client.request("decode", {"face": "after-fuzz", "codes": codes})["vertices"], cold(ref, codes)) <= TOL_MM


def test_hostile_scans_and_uploads(server, client, root, tiny_model):
    bad = root / "huge.ply"
    bad.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1000000000000\nproperty float x\n"
                    b"property float y\nproperty float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                    b"end_header\n" + b"\0" * 64)
    jid = client.request("fit", {"path": str(bad), "landmarks": np.zeros((5, 3), np.float32)})["job"]
    with pytest.raises(P.ProtocolError) as e:
        client.wait_job(jid, timeout=60)
    assert e.value.code == P.E_BAD_SCAN and "limit" in e.value.message
    with pytest.raises(P.ProtocolError) as e:
        client.request("upload.begin", {"name": "big.ply", "size": 10 * 2**40})
    assert e.value.code == P.E_TOO_LARGE
    with pytest.raises(P.ProtocolError) as e:
        client.request("fit", {"path": str(tiny_model.scans / "manifest.json"), "landmarks": np.zeros((5, 3))})
    assert e.value.code == P.E_BAD_SCAN
    with pytest.raises(P.ProtocolError) as e:
        client.request("models.load", {"id": "f" * 64})
    assert e.value.code == P.E_NOT_FOUND
    with pytest.raises(P.ProtocolError) as e:
        client.request("decode", {"face": "x", "codes": {p: np.zeros(7, np.float32) for p in P.CODE_PARTS}})
    assert e.value.code == P.E_BAD_ARRAY


# ------------------------------------------------------------------------------------------ security


def _nothing_arrives(info: P.ConnectionInfo, seconds: float = 1.6) -> dict[str, int]:
    """Sockets without allowed keys (random CURVE keys, no CURVE at all) send a hello and listen for
    events: how many messages each received (all must be 0)."""
    ctx = zmq.Context()
    rogue = zmq.curve_keypair()
    socks = {
        "dealer_wrong_key": curve_socket(ctx, zmq.DEALER, info.router_endpoint, info.server_public_key, rogue),
        "dealer_plain": curve_socket(ctx, zmq.DEALER, info.router_endpoint, None, None),
        "sub_wrong_key": curve_socket(ctx, zmq.SUB, info.pub_endpoint, info.server_public_key, rogue),
        "sub_plain": curve_socket(ctx, zmq.SUB, info.pub_endpoint, None, None),
    }
    got = {k: 0 for k in socks}
    try:
        for k in ("dealer_wrong_key", "dealer_plain"):
            socks[k].send_multipart(P.encode("hello", {"protocol": 1, "client": "rogue"}, session=P.new_session_id()),
                                    zmq.NOBLOCK)
        poller = zmq.Poller()
        for s in socks.values():
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for s, _ in poller.poll(100):
                s.recv_multipart()
                got[next(k for k, v in socks.items() if v is s)] += 1
        # control: the allowed keys do hear the heartbeat on the same endpoint in the same time
        ok = curve_socket(ctx, zmq.SUB, info.pub_endpoint, info.server_public_key,
                          (info.client_public_key.encode(), info.client_secret_key.encode()))
        got["control_allowed_sub"] = int(ok.poll(int(seconds * 1000)) > 0)
        ok.close(0)
    finally:
        for s in socks.values():
            s.close(0)
        ctx.term()
    return got


def test_a_client_without_keys_gets_nothing_on_loopback(server):
    got = _nothing_arrives(P.read_connection_file(server.connection_file))
    assert got.pop("control_allowed_sub") == 1
    assert got == {k: 0 for k in got}, got
    mode = server.connection_file.stat().st_mode & 0o777
    assert mode == 0o600


def test_non_loopback_bind_needs_keys_and_refuses_clients_without_them(tmp_path):
    """Uses an address of this machine other than 127.0.0.1 (`hostname -I`); without one, 127.0.0.2
    (still loopback: then the refusal of a keyless bind cannot be shown and is skipped)."""
    addr = other_local_address()
    if addr is not None:
        refused = subprocess.run([sys.executable, "-m", "backend.server", "serve", "--bind", addr, "--home",
                                  str(tmp_path / "h0"), "--keys", str(tmp_path / "no-keys")],
                                 cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 2 and "refusing to bind" in refused.stderr
        assert not (tmp_path / "h0" / "connection.json").exists()
    keys = tmp_path / "keys"
    kg = subprocess.run([sys.executable, "-m", "backend.server", "keygen", "--keys", str(keys), "--client", "remote"],
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                        timeout=60)
    assert kg.returncode == 0, kg.stderr
    assert json.loads(kg.stdout)["client"] == "remote"
    sp = start_server(tmp_path / "h1", bind=addr or "127.0.0.2", keys=keys)
    try:
        info = P.read_connection_file(sp.connection_file)
        assert info.host == (addr or "127.0.0.2")
        with Client(sp.connection_file, timeout=10, retries=0) as c:   # the default client key
            assert c.hello["model"] is None and "train_default" in c.request("info")["offers"]
        pub, sec = P.load_keypair(keys / "remote.key_secret")        # the key made for a remote machine
        remote = P.ConnectionInfo(info.host, info.router_port, info.pub_port, info.server_public_key,
                                  pub.decode(), sec.decode())
        with Client(remote, timeout=10, retries=0) as c:
            assert c.ping() < 5
        got = _nothing_arrives(info)
        assert got.pop("control_allowed_sub") == 1
        assert got == {k: 0 for k in got}, got
    finally:
        assert sp.stop() == 0
    assert not sp.connection_file.exists()


def test_paths_outside_the_roots_are_refused(server, client, root, tmp_path_factory, tiny_model):
    outside = tmp_path_factory.mktemp("outside_roots")
    secret = outside / "secret.ply"
    secret.write_bytes((tiny_model.scans / "id00" / "smile.ply").read_bytes())
    link = root / "link.ply"
    link.symlink_to(secret)
    dir_link = root / "dir_link"
    dir_link.symlink_to(outside, target_is_directory=True)
    lm = np.zeros((5, 3), np.float32)
    for path in (str(secret), str(link), str(dir_link / "secret.ply"), str(root / ".." / outside.name / "secret.ply"),
                 "/etc/passwd"):
        with pytest.raises(P.ProtocolError) as e:
            client.request("fit", {"path": path, "landmarks": lm})
        assert e.value.code == P.E_FORBIDDEN_PATH, path
    with pytest.raises(P.ProtocolError) as e:
        client.request("models.load", {"path": str(link)})
    assert e.value.code == P.E_FORBIDDEN_PATH
    with pytest.raises(P.ProtocolError) as e:
        client.request("train", {"scans": str(dir_link), "preset": "tiny", "out": str(root / "t")})
    assert e.value.code == P.E_FORBIDDEN_PATH
    with pytest.raises(P.ProtocolError) as e:
        client.request("train", {"scans": str(tiny_model.samples), "preset": "tiny", "out": str(outside / "run")})
    assert e.value.code == P.E_FORBIDDEN_PATH


def test_an_obj_whose_mtllib_points_outside_the_roots_reads_nothing_there(server, client, root, ref, tiny_model,
                                                                          tmp_path_factory):
    """The material library is a FIFO outside the roots: opening it would block the reader forever, so
    a fit that completes proves nothing opened it. A training folder naming it is refused up front."""
    from backend.scans.mesh_io import read_geometry_file

    outside = tmp_path_factory.mktemp("mtl_outside")
    fifo = outside / "evil.mtl"
    os.mkfifo(fifo)
    v, f = read_geometry_file(tiny_model.scans / "id00" / "smile.ply")
    obj = root / "face_with_mtl.obj"
    lines = [f"mtllib {fifo}", f"mtllib ../{outside.name}/evil.mtl", "usemtl skin"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f]
    obj.write_text("\n".join(lines) + "\n")
    v2, f2 = read_geometry_file(obj)  # in-process: the geometry only
    assert max_mm(v2, v) < 1e-5 and (f2 == f).all()
    res = client.run_job("fit", {"path": str(obj), "options": {"landmark_indices": ref.landmark_indices, "steps": 2,
                                                               "resolution": 32, "registered": False}}, timeout=120)
    assert res["codes"]["identity"].shape == (1, ref.lm.sizes["identity"])
    folder = root / "obj_scans"
    folder.mkdir()
    (folder / "a.obj").write_text(obj.read_text())
    manifest = {"units": "mm", "scans": [{"path": "a.obj", "identity": "a", "expression": "neutral",
                                          "landmark_vertex_indices": dict(zip(
                                              ["right_eye_outer_corner", "left_eye_outer_corner", "nose_tip",
                                               "right_mouth_corner", "left_mouth_corner"], ref.landmark_indices))}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    jid = client.request("train", {"scans": str(folder), "preset": "tiny", "out": str(root / "obj_run")})["job"]
    with pytest.raises(P.ProtocolError) as e:  # refused before any child process could read the folder
        client.wait_job(jid, timeout=60)
    assert e.value.code == P.E_FORBIDDEN_PATH and "material library" in e.value.message
    assert not (root / "obj_run" / "samples").exists()


# ------------------------------------------------------------------------------------------ training


def _events_of(c: AsyncClient, job: str) -> list[dict]:
    return [m.body for topic, m in c.events if m.type == "job" and m.body.get("job") == job and topic == "job"]


def test_training_job_cancels_within_a_second_and_a_killed_one_resumes(server, root, tiny_model):
    c = AsyncClient(server.connection_file, timeout=15)
    c.start()
    try:
        assert wait_for(lambda: (c.pump(), c.state == "ready")[1], 30)

        def request(type_: str, body: dict) -> dict:
            p = c.submit(type_, body)
            assert wait_for(lambda: (c.pump(), p.done())[1], 30), type_
            return p.value()

        def job_state(jid: str) -> dict:
            c.pump()
            return c.jobs.get(jid, {})

        def training_step(jid: str) -> int:
            m = job_state(jid).get("metrics", {})
            return int(m["step"]) if m.get("phase") == "train" and "step" in m else -1

        # 1. cancel within 1 s of the request
        out1 = root / "train_cancel"
        jid = request("train", {"scans": str(tiny_model.samples), "preset": "tiny", "out": str(out1),
                                "steps": 100_000, "checkpoint_every": 50})["job"]
        assert wait_for(lambda: training_step(jid) >= 2, 120), job_state(jid)
        ping = request("ping", {"data": "during training"})  # the loop answers while training runs
        assert ping["data"] == "during training"
        t0 = time.monotonic()
        request("job.cancel", {"job": jid})
        assert wait_for(lambda: job_state(jid).get("state") == "cancelled", 10, step=0.005), job_state(jid)
        took = time.monotonic() - t0
        assert took <= 1.0, f"cancelled after {took:.2f} s"
        # then the checkpoint it wrote on the way out is announced, and on disk
        assert wait_for(lambda: "checkpoint written" in job_state(jid).get("message", ""), 15), job_state(jid)
        assert (out1 / "train" / "checkpoints" / "last.safetensors").is_file()

        # 2. kill -9 of the training process, then train again: it resumes from the last checkpoint
        out2 = root / "train_kill"
        jid = request("train", {"scans": str(tiny_model.samples), "preset": "tiny", "out": str(out2),
                                "steps": 100_000, "checkpoint_every": 10})["job"]
        assert wait_for(lambda: training_step(jid) >= 25, 120), job_state(jid)
        os.kill(int(job_state(jid)["metrics"]["pid"]), 9)
        assert wait_for(lambda: job_state(jid).get("state") == "failed", 15), job_state(jid)
        assert "signal 9" in job_state(jid)["error"]["message"]
        from backend.server.model_service import scan_step

        ckpt_step = scan_step(out2 / "train" / "checkpoints" / "last.safetensors")
        assert ckpt_step is not None and ckpt_step >= 20
        metrics = out2 / "train" / "metrics.jsonl"
        before = metrics.read_text().splitlines()[:ckpt_step]
        reply = request("train", {"scans": str(tiny_model.samples), "preset": "tiny", "out": str(out2),
                                  "steps": 100_000, "checkpoint_every": 10})
        assert reply["resume_from_step"] == ckpt_step
        jid = reply["job"]
        assert wait_for(lambda: training_step(jid) >= ckpt_step + 3, 120), job_state(jid)
        lines = metrics.read_text().splitlines()
        assert lines[:ckpt_step] == before  # the steps before the checkpoint were not trained again
        steps = [json.loads(x)["step"] for x in lines]
        assert steps[:ckpt_step + 3] == list(range(ckpt_step + 3))  # and it went on from there
        assert f"at step {ckpt_step}/" in (out2 / "train-server.log").read_text()
        request("job.cancel", {"job": jid})
        assert wait_for(lambda: job_state(jid).get("state") == "cancelled", 10)
    finally:
        c.close()


# ------------------------------------------------------------------------------------------ failure, restart


def test_kill_9_mid_stream_is_reported_within_2s_and_a_restart_is_reconnected(tiny_model, ref, tmp_path):
    home = tmp_path / "home"
    extra = ["--template-resolution", TEMPLATE_RES, "--threads", 1, "--workers", 0]
    sp = start_server(home, model=tiny_model.path, extra=extra)
    c = AsyncClient(sp.connection_file, timeout=5)
    states: list[tuple[float, str]] = []
    c.on_state = lambda state, reason: states.append((time.monotonic(), state))
    c.start()
    sp2 = None
    try:
        assert wait_for(lambda: (c.pump(), c.state == "ready")[1], 30)
        first_session = c.server_session
        line = codes_line(ref, 200, seed=41, scale=0.6)
        stacked = {p: np.concatenate([x[p] for x in line]) for p in P.CODE_PARTS}
        h = c.stream("doomed", list(range(200)), stacked)
        assert wait_for(lambda: (c.pump(), len(h.received) >= 3)[1], 30)
        sp.kill9()
        t0 = time.monotonic()
        assert wait_for(lambda: (c.pump(), c.state == "gone")[1], 5, step=0.01)
        gone_after = next(t for t, s in states if s == "gone") - t0
        assert gone_after <= 2.0, gone_after
        sp2 = start_server(home, model=tiny_model.path, extra=extra)
        assert wait_for(lambda: (c.pump(), c.state == "ready" and c.server_session not in (None, first_session))[1],
                        60), (c.state, c.reason)
        p = c.decode("after-restart", line[0])
        assert wait_for(lambda: (c.pump(), p.done())[1], 30)
        assert max_mm(p.value()["vertices"], cold(ref, line[0])) <= TOL_MM
    finally:
        c.close()
        sp.kill9()
        if sp2 is not None:
            assert sp2.stop() == 0  # SIGTERM: a clean stop
            assert not sp2.connection_file.exists()


def test_shutdown_stops_the_server_cleanly_and_checkpoints_training(server, root, tiny_model):
    """`shutdown` (the same path as SIGTERM): jobs told, the training child checkpointed, workers and
    sockets closed, connection file removed, exit code 0."""
    c = AsyncClient(server.connection_file, timeout=15)
    c.start()
    try:
        assert wait_for(lambda: (c.pump(), c.state == "ready")[1], 30)
        p = c.submit("info")
        assert wait_for(lambda: (c.pump(), p.done())[1], 15)
        workers = [w["pid"] for w in p.value()["workers"]]
        out = root / "train_shutdown"
        p = c.submit("train", {"scans": str(tiny_model.samples), "preset": "tiny", "out": str(out),
                               "steps": 100_000, "checkpoint_every": 100_000})
        assert wait_for(lambda: (c.pump(), p.done())[1], 15)
        jid = p.value()["job"]
        assert wait_for(lambda: (c.pump(), c.jobs.get(jid, {}).get("metrics", {}).get("step", -1) >= 2)[1], 120)
        trainer = c.jobs[jid]["metrics"]["pid"]
        p = c.submit("shutdown")
        assert wait_for(lambda: (c.pump(), p.done())[1], 15)
        assert p.value()["ok"] is True
        assert server.proc.wait(60) == 0
        c.pump()
        assert c.jobs[jid]["state"] == "cancelled"            # the client was told
    finally:
        c.close()
    assert not server.connection_file.exists()
    assert (out / "train" / "checkpoints" / "last.safetensors").is_file()   # written on SIGTERM
    for pid in workers + [trainer]:
        assert wait_for(lambda: _proc_state(pid) in ("gone", "Z"), 10), pid


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def test_a_backend_stops_when_the_process_that_launched_it_is_gone(tmp_path):
    """--parent-pid (the add-on passes Blender's pid): the backend outlives nothing it was launched for."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sp = start_server(tmp_path / "orphan", extra=["--parent-pid", str(parent.pid)])
    try:
        time.sleep(1.0)
        assert sp.alive(), sp.output()          # its parent still runs: it keeps serving
        parent.kill()
        parent.wait(5)
        t0 = time.monotonic()
        assert wait_for(lambda: not sp.alive(), 10.0), sp.output()
        assert time.monotonic() - t0 < 3.0
        assert sp.proc.returncode == 0
        assert not sp.connection_file.exists()  # the clean shutdown path ran
    finally:
        parent.kill()
        sp.stop()
