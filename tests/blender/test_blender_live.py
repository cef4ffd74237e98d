"""The extension with a real backend and the small test model, in ONE Blender process (bl_scripts/live.py):
the add-on launches the backend from its preferences, creates a face, edits sliders, keyframes, plays,
renders, bakes shape keys and a rig, saves and reopens the .blend, fits a scan, transfers an expression,
survives a killed backend and picks up a restarted one. Each test below asserts on one part of it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from blender_runner import REPO, run_blender
from model_fixture import loaded_model, one_thread, tiny_model  # noqa: F401  (fixtures)

TOL_MM = 0.01


@pytest.fixture(scope="module")
def live(built_zip, tiny_model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("blender_live")
    r = run_blender("live.py", {"python": sys.executable, "model": str(tiny_model.path),
                                "scan": str(tiny_model.scans / "id00" / "smile.ply"), "out": str(out),
                                "template_resolution": 100, "samples": str(tiny_model.samples),
                                "roots": [str(tiny_model.samples.parent), str(out)]},
                    zip_path=built_zip["zips"][0], timeout=1500)
    r["out"] = out
    # keep one Workbench render for people to look at (build/ is ignored by git)
    keep = REPO / "build" / "blender-test"
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("anim_0011.png", "anim_0001.png", "main_job/contact_sheet.png"):
        if (out / name).is_file():
            shutil.copy(out / name, keep / Path(name).name)
    return r


def test_connect_and_create(live):
    c = live["connect"]
    assert c["ret"] == ["FINISHED"] and c["status"][0] == "Backend: ready"
    assert c["sizes"] == {"identity": 40, "expression": 40, "detail": 40}
    cr = live["create"]
    assert cr["n_vertices"] > 1000 and cr["uv_layers"] == 1
    assert cr["mean_vs_reference_mm"] < TOL_MM
    assert live["torch_loaded"] is False and live["handlers_left"] == []


def test_slider_edit_matches_backend_decode(live, loaded_model):  # noqa: F811
    s = live["slider"]
    assert s["max_err_mm"] < TOL_MM
    assert s["moved_mm"] > 0.5                      # the slider did change the face
    # the add-on's composition (base + c * std * component) is the model's own PCA
    from backend.editing import code_pca

    model, _ = loaded_model
    for part in ("identity", "expression"):
        pca = code_pca(model, part)
        c = s["coeffs"][part]
        want = np.asarray(s["base"][part]) + (np.asarray(c) * pca.std[:len(c)].numpy()) @ pca.components[:len(c)].numpy()
        np.testing.assert_allclose(s["codes"][part], want, atol=1e-5)


def test_undo_redo_bring_back_the_matching_mesh(live):
    u = live["undo"]
    assert u["edit_moved_mm"] > 0.1
    assert u["undo_codes"] and u["undo_err_mm"] < TOL_MM
    assert u["redo_codes"] and u["redo_err_mm"] < TOL_MM


def test_inbetween_frame_is_decode_of_interpolated_codes(live):
    k = live["keyframes"]
    assert -2.0 < k["coeff7"][0] < 2.0 and 0.0 < k["coeff7"][1] < 1.0   # a true in-between
    assert k["max_err_mm"] < TOL_MM
    # ... and not a straight blend of the two keyframe meshes
    assert k["blend_diff_mm"] > 0.1 and k["blend_diff_mm"] > 50 * k["max_err_mm"]


def test_playback_streams_ahead(live):
    first, second = live["playback"]["passes"][:2]
    assert first["frames"] == second["frames"] == 21
    assert second["stale"] == 0 and second["shown_own"] == 21


def test_render_frames_are_exact_and_differ(live):
    from PIL import Image

    out = live["out"]
    assert live["render"]["lock_interface"] is True
    load = lambda n: np.asarray(Image.open(out / n).convert("RGB")).astype(np.int16)  # noqa: E731
    a1, a11, d11 = load("anim_0001.png"), load("anim_0011.png"), load("direct_0011.png")
    assert np.array_equal(a11, d11)                  # frame 11 == a render of the directly decoded frame 11
    assert np.abs(a11 - a1).max() > 30               # and differs from another frame
    # non-empty: the face covers a good part of the image with real shading
    bg = a11[0, 0]
    face = np.abs(a11 - bg).sum(-1) > 10
    assert 0.05 < face.mean() < 0.9 and a11[face].std() > 5


def test_baked_shape_keys_reproduce_frames(live):
    b = live["bake"]
    assert b["ret"] == ["FINISHED"] and b["keys"] == 22 and b["source_hidden"]
    assert b["max_err_mm"] < TOL_MM
    # Blender's own Alembic and FBX exporters take the baked copy (no backend needed any more)
    assert isinstance(b["exports"]["abc"], int) and b["exports"]["abc"] > 10_000, b["exports"]
    assert isinstance(b["exports"]["fbx"], int) and b["exports"]["fbx"] > 10_000, b["exports"]


def test_rig_bake_reports_error(live):
    r = live["rig"]
    assert r["ret"] == ["FINISHED"] and r["keys"] == r["report"]["n_keys"] + 1 and r["drivers"] == r["report"]["n_keys"]
    rep = r["report"]
    assert rep["n_expressions"] == 6 and np.isfinite(rep["mean_mm"]) and rep["max_mm"] >= rep["mean_mm"] > 0
    assert r["at_step_err_mm"] < TOL_MM             # a slider at the sampled step reproduces the decode


def test_blend_reopen_redecodes_same(live):
    assert live["blend"]["base_same"] and live["blend"]["max_err_mm"] < TOL_MM


def test_scan_fit_matches_cli_and_lies_on_scan(live, tiny_model, tmp_path):  # noqa: F811
    f = live["fit"]
    assert f["ret"] == ["FINISHED"]
    assert f["to_scan_median_mm"] < 1.0, f       # the fitted face lies on the imported scan (Blender units)
    assert max(f["scan_extent_m"]) < 1.0           # the scan came in as metres, not millimetres
    # `imface fit` on the same file with the landmarks the add-on took from the scan folder's manifest
    scan = tiny_model.scans / "id00" / "smile.ply"
    manifest = json.loads((tiny_model.scans / "manifest.json").read_text())
    entry = next(e for e in manifest["scans"] if e["path"].endswith("id00/smile.ply"))
    lm = tmp_path / "landmarks.json"
    lm.write_text(json.dumps(entry["landmarks_mm"]))
    out = tmp_path / "cli_fit"
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "fit", str(tiny_model.path), str(scan),
                           "--landmarks", str(lm), "--out", str(out), "--seed", "0", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads(next(out.glob("*.codes.json")).read_text())
    # The same face: the add-on's fitted face (template topology, placed by its object matrix) lies on
    # the surface `imface fit` extracted for the same scan and seed, in the scan's own frame.
    import trimesh
    from scipy.spatial import cKDTree

    surf = trimesh.load(next(out.glob("*.ply")), process=False)
    pts = np.asarray(surf.sample(50000, seed=0) if hasattr(surf, "sample") else surf.vertices)
    d, _ = cKDTree(pts).query(np.asarray(live["fit_vertices_scan_mm"]))
    assert np.median(d) < 0.5 and np.percentile(d, 90) < 1.5, (np.median(d), np.percentile(d, 90))
    # the same codes as `imface fit` with the same seed
    for part in ("identity", "expression", "detail"):
        np.testing.assert_allclose(f["codes"][part], cli[part], atol=2e-5, rtol=1e-3, err_msg=part)


def test_expression_transfer(live):
    t = live["transfer"]
    assert t["ret"] == ["FINISHED"] and t["expression_equal"] and t["identity_kept"]


def test_main_job_contact_sheet(live):
    from PIL import Image

    m = live["main_job"]
    assert m["played"]["stale"] == 0 and m["keys"] == 12
    sheet = np.asarray(Image.open(m["contact_sheet"]).convert("RGB"))
    assert sheet.shape[0] > 200 and sheet.std() > 10
    # the mouth region changes across the frames (the expression animation is visible)
    x0, y0, x1, y1 = m["mouth_box"]
    assert x1 - x0 > 10 and y1 - y0 > 5
    assert max(m["mouth_diff_vs_first"][1:]) > 0.01, m["mouth_diff_vs_first"]


def test_killed_backend_is_reported_and_restart_picked_up(live):
    r = live["restart"]
    assert r["gone_after_s"] < 5
    assert r["status_gone"][0].startswith("Backend: gone")
    assert r["edit_while_gone_s"] < 0.5               # edits while it is away do not block Blender
    assert r["ready_again"] and r["status_back"][0] == "Backend: ready"
    assert r["max_err_mm"] < TOL_MM


def test_training_job_from_the_panel(live):
    t = live["train"]
    assert t["ret"] == ["FINISHED"] and t["done"] and t["state"] == "done", t
    assert t["busy_seen"]                              # the panel said "busy with train ..." meanwhile
    assert len(t["history"]) >= 1 and t["image"] == [256, 128]
    names = dict(t["models"])
    assert names.get("train") is False                 # the trained model is listed, selectable
    assert t["load"] == ["FINISHED"] and t["fingerprint_changed"]
    assert "made with model" in t["face_warning"]      # faces of the old model say so


def test_launched_backend_stops_when_blender_quits(built_zip, tiny_model):  # noqa: F811
    import os
    import time

    r = run_blender("quit.py", {"python": sys.executable, "model": str(tiny_model.path),
                                "quit_without_disable": True}, zip_path=built_zip["zips"][0], timeout=600)
    assert r["ready"] and r["pid"]
    deadline = time.monotonic() + 20
    alive = True
    while alive and time.monotonic() < deadline:
        try:
            os.kill(r["pid"], 0)
            time.sleep(0.2)
        except ProcessLookupError:
            alive = False
    if alive:
        os.kill(r["pid"], 9)
    assert not alive, "the backend Blender launched outlived Blender"
