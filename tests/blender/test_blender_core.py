"""The add-on's bpy-free core, in the pytest process (no Blender needed): units, codes, the session's
process handling (a launched backend stops with Blender unless it is training; remote needs online access)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from addon import codes as C
from addon import session as S
from addon import units as U


def test_units_single_conversion():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(100, 3)) * 80
    bl = U.model_to_blender(p)
    assert bl.dtype == np.float32 and bl.flags.c_contiguous
    # up (+y) -> +Z, the face's viewing direction (+z) -> -Y, mm -> m
    np.testing.assert_allclose(bl, np.stack([p[:, 0], -p[:, 2], p[:, 1]], 1) / 1000, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(U.blender_to_model(bl), p, atol=1e-4)
    # the matrix form is the same map: C T C^-1 applied to converted points == converting T applied
    t = np.eye(4)
    t[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * 1.3
    t[:3, 3] = [5, -7, 11]
    tp = (p @ t[:3, :3].T) + t[:3, 3]
    mb = U.matrix_to_blender(t)
    np.testing.assert_allclose(bl.astype(np.float64) @ mb[:3, :3].T + mb[:3, 3], U.model_to_blender(tp), atol=1e-6)


def test_scan_from_model_inverts_the_fit_normalisation():
    # a scan in metres, normalised frame = 100 mm units, nose moved: N maps scan(m) -> normalised
    scale = 1000.0
    n = np.diag([scale / 100.0] * 3 + [1.0])
    n[:3, 3] = [0.1, -0.2, 0.4]
    model_mm = np.array([[10.0, 20.0, 30.0], [0.0, 0.0, 40.0]])
    scan_m = (np.linalg.inv(n) @ np.c_[model_mm / 100.0, np.ones(2)].T).T[:, :3]
    m = U.scan_from_model_mm(n, units_to_mm=scale)
    got_mm = (m @ np.c_[model_mm, np.ones(2)].T).T[:, :3]
    np.testing.assert_allclose(got_mm, scan_m * scale, atol=1e-9)


def _pca(c=6, k=3):
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.normal(size=(c, c)))[0][:k]
    parts = {p: C.PartPCA(rng.normal(size=c).astype(np.float32), q.astype(np.float32),
                          np.array([3.0, 2.0, 1.0][:k], np.float32), np.array([0.5, 0.3, 0.2][:k], np.float32))
             for p in C.PARTS}
    return C.ModelPCA("fp", parts, {p: c for p in C.PARTS})


def test_codes_compose_and_storage(tmp_path):
    pca = _pca()
    base = {p: np.arange(6, dtype=np.float32) * (i + 1) for i, p in enumerate(C.PARTS)}
    out = pca.compose(base, {"expression": [1.0, -0.5], "identity": [], "detail": [0, 0, 0, 7]})
    e = pca.parts["expression"]
    np.testing.assert_allclose(out["expression"], base["expression"] + 3.0 * e.components[0] - 1.0 * e.components[1],
                               rtol=1e-6)
    # coefficients beyond the model's components are ignored
    np.testing.assert_allclose(out["detail"], base["detail"])
    text = C.codes_to_json(base, model="fp", neutral=True, normalized_from_scan=np.eye(4), source="s")
    back = C.codes_from_json(text, sizes={p: 6 for p in C.PARTS})
    assert all(np.array_equal(back[p], base[p]) for p in C.PARTS) and back["neutral"] and back["model"] == "fp"
    with pytest.raises(C.CodesError, match="expects 7"):
        C.codes_from_json(text, sizes={"identity": 7})
    with pytest.raises(C.CodesError):
        C.codes_to_json({**base, "detail": np.array([np.nan])})
    # the PCA cache survives a restart of Blender (disk), keyed by model fingerprint
    cache = C.PCACache(tmp_path)
    cache.put(pca)
    again = C.PCACache(tmp_path).get("fp")
    assert again is not None and np.array_equal(again.parts["identity"].components, pca.parts["identity"].components)
    assert C.PCACache(tmp_path).get("other") is None


def test_loopback_rule():
    assert S.is_loopback("127.0.0.1") and S.is_loopback("::1") and S.is_loopback("localhost")
    assert not S.is_loopback("10.0.0.5") and not S.is_loopback("gpu-box.example.org")


def test_remote_backend_needs_online_access(tmp_path):
    from addon.link import protocol as P

    keys = P.ensure_keys(tmp_path / "keys")
    sp, _ = P.load_keypair(keys.server_public)
    cp, cs = P.load_keypair(keys.client_secret)
    cf = tmp_path / "connection.json"
    P.write_connection_file(cf, P.ConnectionInfo("10.1.2.3", 5555, 5556, sp.decode(), cp.decode(), cs.decode(), pid=1))
    s = S.Session()
    with pytest.raises(S.SessionError, match="Allow Online Access"):
        s.attach(cf, allow_remote=False)
    with pytest.raises(S.SessionError, match="no connection file"):
        s.attach(tmp_path / "missing.json", allow_remote=True)


def test_launch_refuses_missing_python_and_model(tmp_path):
    s = S.Session()
    with pytest.raises(S.SessionError, match="Python"):
        s.launch(str(tmp_path / "nope" / "python"), str(tmp_path / "m.safetensors"), tmp_path / "c.json")
    with pytest.raises(S.SessionError, match="model"):
        s.launch(sys.executable, str(tmp_path / "m.safetensors"), tmp_path / "c.json")


def test_launch_failure_is_reported_not_stuck(tmp_path):
    """A backend that dies at start-up: the status says so with its output, never "connecting" forever."""
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"not a model")
    s = S.Session()
    s.launch(sys.executable, str(model), tmp_path / "backend" / "c.json", start_timeout=120)
    deadline = time.monotonic() + 120
    while s.state == S.CONNECTING and time.monotonic() < deadline:
        s.pump()
        time.sleep(0.05)
    assert s.state == S.GONE
    assert s.status().startswith("gone: the backend exited with code")
    assert "damaged or truncated" in s.reason          # the backend's own message, from its log


class _FakeClient:
    def __init__(self, jobs):
        self.jobs = jobs
        self.state = "closed"
        self.closed = False

    def close(self):
        self.closed = True


def test_launched_backend_stops_with_blender_unless_training(tmp_path):
    for training, expect_alive in ((False, False), (True, True)):
        s = S.Session()
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        try:
            s.process = proc
            jobs = {"j": {"job": "j", "kind": "train", "state": "running", "progress": 0.1}} if training else {}
            s.client = _FakeClient(jobs)
            s.shutdown()
            time.sleep(0.2)
            assert (proc.poll() is None) == expect_alive
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_status_lines_name_the_job():
    s = S.Session()
    s.client = _FakeClient({"abc": {"job": "abcdef123", "kind": "fit", "state": "running", "progress": 0.42}})
    s.client.state = "ready"
    assert s.state == S.BUSY and s.status() == "busy with fit abcdef12 42%"
    s.client.state = "gone"
    s.client.reason = "no heartbeat from the backend for 1.6 s"
    assert s.status() == "gone: no heartbeat from the backend for 1.6 s"
    _ = json


def test_loss_curve_image():
    from addon.plot import loss_curve_rgba

    img = loss_curve_rgba([0, 1, 2, 3, 10], [100.0, 50.0, 20.0, float("nan"), 5.0], width=64, height=32)
    assert img.shape == (32, 64, 4)
    curve = (img[..., 0] == 1.0) & (img[..., 2] < 0.2)
    assert curve.sum() > 60
    # the first point (highest loss) is at the top-left, the last at the bottom-right
    assert curve[0, 0] and curve[-1, -1]
