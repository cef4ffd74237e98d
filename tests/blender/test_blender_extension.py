"""The extension builds, validates, installs offline from its zip and enables; Blender-side pieces that
need no backend (units, template mesh, stored codes, keyframes, .blend round trip)."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from blender_runner import run_blender


def test_build_and_package(built_zip):
    assert len(built_zip["zips"]) == 1
    z = zipfile.ZipFile(built_zip["zips"][0])
    names = z.namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names and "link/client.py" in names
    wheels = [n for n in names if n.startswith("wheels/")]
    assert any("pyzmq" in n for n in wheels) and any("msgpack" in n for n in wheels)
    manifest = z.read("blender_manifest.toml").decode()
    assert 'license = ["SPDX:GPL-3.0-or-later"]' in manifest
    assert not any(n.endswith(".pyc") or "__pycache__" in n for n in names)
    assert not any(n.startswith(("tests/", "backend/", "training/")) for n in names)


@pytest.fixture(scope="module")
def offline(built_zip):
    return run_blender("offline.py", zip_path=built_zip["zips"][0], timeout=300)


def test_installs_and_enables(offline):
    r = offline
    assert r["install"] == ["FINISHED"] and r["enabled"]
    assert "/extensions/user_default/imface/" in r["module_file"]
    # the bundled wheels are importable inside Blender (unpacked under the user folder's .local)
    assert "/extensions/.local/" in r["zmq_file"]
    assert (r["zmq_version"], r["msgpack_version"]) == ("27.3.0", "1.2.4")   # the pinned wheels
    for op in ("connect", "create_face", "bake_shape_keys", "bake_rig", "fit_scan", "train", "transfer"):
        assert op in r["operators"]
    assert {"on_frame_change", "on_render_pre", "on_load_post"} <= set(r["handlers"])
    # caches/keys live under the user folder, never inside the add-on's own folder
    assert not r["user_path"].startswith(r["addon_dir"])
    assert r["handlers_left"] == []          # disabling removed every handler
    assert r["torch_loaded"] is False


def test_units_one_function(offline):
    axes = np.array(offline["units_axes"])
    # model x -> Blender X, model +y (up) -> Blender +Z, model +z (face looks along) -> Blender -Y; mm -> m
    np.testing.assert_allclose(axes, [[0.01, 0, 0], [0, 0, 0.01], [0, -0.01, 0]], atol=1e-9)
    assert offline["units_roundtrip_err"] < 1e-6


def test_face_mesh_and_storage(offline):
    r = offline
    assert r["mesh_counts"] == [2000, 1998, 1]
    assert r["mesh_write_err_m"] == 0.0
    assert r["codes_roundtrip_exact"] and r["is_face"]
    assert r["coeff_at_6"] == pytest.approx(1.0, abs=0.05)      # Bezier midpoint of 0 -> 2
    assert r["animated_paths"] == [["expression", 0]]
    assert r["status_lines"] == ["not connected"]
    assert r["reopen_codes_exact"] and r["reopen_model"] == "fp-test"
    assert r["reopen_uv_layers"] == 1 and r["reopen_fcurves"] == 1
