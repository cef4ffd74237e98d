"""`imface fit / extract / decode / evaluate`: outputs, and one-line errors with exit code 2."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixture import one_thread, tiny_model  # noqa: F401  (fixtures)

from backend.cli import main
from backend.scans.folder import load_scan, load_scan_folder

REPO = Path(__file__).resolve().parents[1]
FAST = ["--threads", "1", "--quiet"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line_error(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def fitted(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit")
    rc = main(["fit", str(tiny_model.path), str(tiny_model.scans), "--scan", "id01/smile", "--out", str(out),
               "--steps", "40", "--resolution", "80", "--metric-points", "20000", "--registered",
               "--template-resolution", "80", *FAST])
    assert rc == 0
    return out


def test_fit_writes_codes_mesh_report(fitted, tiny_model):
    codes = json.loads((fitted / "id01__smile.codes.json").read_text())
    assert {"identity", "expression", "detail", "model", "normalized_from_scan"} <= set(codes)
    assert len(codes["identity"]) == 40 and codes["model"]
    report = json.loads((fitted / "id01__smile.report.json").read_text())
    assert report["steps"] == 40 and report["evaluations"] > 0 and len(report["losses"]) == 40
    assert 0 < report["metrics"]["chamfer_mm"] < 3.0
    assert report["metrics"]["registered_unconverged_vertices"] == 0
    import trimesh

    mesh = trimesh.load(fitted / "id01__smile.ply", process=False)
    scan = load_scan(next(e for e in load_scan_folder(tiny_model.scans).entries if e.key == "id01/smile"))
    from backend.geometry.signed_distance import closest_points

    # In the scan's frame and mm: the surfaces pass through the scan's eye corners (the small model's nose
    # tip is blunt at these resolutions, ~2-3 mm inside).
    assert closest_points(scan.landmarks[:2], mesh.vertices, mesh.faces)[0].max() < 1.5
    reg = trimesh.load(fitted / "id01__smile.registered.ply", process=False)
    assert closest_points(scan.landmarks[:2], reg.vertices, reg.faces)[0].max() < 1.5


def _model_frame(codes_json: Path, vertices_mm: np.ndarray) -> np.ndarray:
    """Scan-frame mm -> model units, with the transform the fitted codes carry."""
    t = np.array(json.loads(codes_json.read_text())["normalized_from_scan"], dtype=np.float64)
    return vertices_mm @ t[:3, :3].T + t[:3, 3]


def test_extract_and_decode_commands(fitted, tiny_model, tmp_path):
    codes = fitted / "id01__smile.codes.json"
    r = run_cli("extract", str(tiny_model.path), str(codes), "--out", str(tmp_path / "x.ply"), "--resolution", "64",
                "--template-coords", str(tmp_path / "x_template.npy"), *FAST)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x.ply").is_file() and "vertices" in r.stdout
    import trimesh

    from backend.model.io import load_model

    x = trimesh.load(tmp_path / "x.ply", process=False)
    tc = np.load(tmp_path / "x_template.npy", allow_pickle=False)
    assert tc.shape == x.vertices.shape and np.isfinite(tc).all()
    # The extracted surface is f̂ = T(p'') + δ = 0 (+ detail): on the face, where the model was
    # trained and δ is small, its template coordinates lie on the template surface (model units;
    # 0.01 = 1 mm). Face: within 60 mm of the nose tip, which preprocessing puts at (0, 0, 0.4).
    model, _ = load_model(tiny_model.path)
    with torch.no_grad():
        t_sdf = model.template_sdf(torch.from_numpy(tc)[None])[0].numpy()
    face = np.linalg.norm(_model_frame(fitted / "id01__smile.codes.json", x.vertices) - [0, 0, 0.4], axis=1) < 0.6
    assert face.sum() > 500
    assert np.median(np.abs(t_sdf[face])) < 0.01, np.percentile(np.abs(t_sdf[face]), [50, 90])
    r = run_cli("decode", str(tiny_model.path), str(codes), "--out", str(tmp_path / "d.ply"), "--resolution", "64",
                "--save-template", str(tmp_path / "t.ply"), *FAST)
    assert r.returncode == 0, r.stderr
    assert "template order" in r.stdout and "0 vertices not converged" in r.stdout
    import trimesh

    d, t = (trimesh.load(tmp_path / n, process=False) for n in ("d.ply", "t.ply"))
    assert np.array_equal(d.faces, t.faces)


def test_evaluate_command(tiny_model, tmp_path):
    out = tmp_path / "table.md"
    rc = main(["evaluate", str(tiny_model.path), str(tiny_model.scans), "--out", str(out), "--scan", "id00/neutral",
               "--scan", "id00/mouth_open", "--steps", "30", "--resolution", "72", "--metric-points", "20000", *FAST])
    assert rc == 0
    text = out.read_text()
    for head in ("Chamfer-L1 (mm)", "Chamfer exact (mm)", "EDE (mm)", "capture", "**mean: all** (2)"):
        assert head in text, head
    rows = {r["key"]: r for r in csv.DictReader(open(out.with_suffix(".csv")))}
    assert list(rows) == ["id00/neutral", "id00/mouth_open", "mean", "mean: expression mouth_open",
                          "mean: expression neutral"]
    num = {k: {c: float(v) for c, v in r.items() if c not in ("key", "identity", "expression", "error", "neutral",
                                                                 "neutral_scan", "training_identity", "unseen")}
           for k, r in rows.items()}
    for k in ("id00/neutral", "id00/mouth_open"):
        r = num[k]
        assert 0.1 < r["chamfer_exact_mm"] <= r["chamfer_mm"] < 2.0, r       # a fit of a training face
        assert 50.0 < r["fscore_1mm"] <= 100.0 and 0.9 < r["normal_consistency"] <= 1.0, r
        assert 0 < r["tde_mm"] < 5.0, r
    from backend.fitting.loop import neutral_warp_off

    assert 0 < num["id00/mouth_open"]["ede_mm"] < 5.0 and -1 < num["id00/mouth_open"]["capture"] <= 1
    assert np.isnan(num["id00/neutral"]["capture"])
    if neutral_warp_off(True):   # the neutral scan fitted with the warp off: no EDE, the mean is the other's
        assert rows["id00/neutral"]["neutral"] == "True" and np.isnan(num["id00/neutral"]["ede_mm"])
        assert num["mean"]["ede_mm"] == pytest.approx(num["id00/mouth_open"]["ede_mm"])
    else:                        # fitted with its expression code: E close to the identity map
        assert rows["id00/neutral"]["neutral"] == "False" and 0 < num["id00/neutral"]["ede_mm"] < 2.0
        assert num["mean"]["ede_mm"] == pytest.approx((num["id00/neutral"]["ede_mm"]
                                                       + num["id00/mouth_open"]["ede_mm"]) / 2)
    assert num["mean"]["chamfer_mm"] == pytest.approx((num["id00/neutral"]["chamfer_mm"]
                                                       + num["id00/mouth_open"]["chamfer_mm"]) / 2)
    # one expression per group here: each group's mean is its one scan
    assert num["mean: expression mouth_open"]["capture"] == pytest.approx(num["id00/mouth_open"]["capture"])
    assert num["mean: expression neutral"]["chamfer_mm"] == pytest.approx(num["id00/neutral"]["chamfer_mm"])


def _depth_view(tiny_model, tmp_path):
    from depth_view import simulate_depth_view

    scan = load_scan(next(e for e in load_scan_folder(tiny_model.scans).entries if e.key == "id00/mouth_open"))
    cam = scan.landmarks[2] + np.array([0.0, 20.0, 500.0])
    pts, _ = simulate_depth_view(scan.vertices, scan.faces, cam, look_at=scan.landmarks[2], width=60, height=60,
                                 noise=0.2)
    lm = tmp_path / "landmarks.json"
    from backend.scans.landmarks import LANDMARK_NAMES

    lm.write_text(json.dumps({n: list(map(float, p)) for n, p in zip(LANDMARK_NAMES, scan.landmarks)}))
    return scan, pts, cam, lm


def test_fit_partial_point_cloud(tiny_model, tmp_path):
    import trimesh

    from backend.geometry.signed_distance import closest_points

    scan, pts, cam, lm = _depth_view(tiny_model, tmp_path)
    np.savetxt(tmp_path / "view.xyz", pts)
    rc = main(["fit", str(tiny_model.path), str(tmp_path / "view.xyz"), "--landmarks", str(lm), "--camera",
               ",".join(map(str, cam)), "--out", str(tmp_path / "out"), "--steps", "20", "--resolution", "64", *FAST])
    assert rc == 0
    codes = json.loads((tmp_path / "out" / "view.codes.json").read_text())
    assert len(codes["identity"]) == 40 and np.isfinite(codes["identity"]).all()
    mesh = trimesh.load(tmp_path / "out" / "view.ply", process=False)   # the face, in the cloud's frame (mm)
    face = np.linalg.norm(pts - scan.landmarks[2], axis=1) < 60.0       # the view's points on the face
    d = closest_points(pts[face], mesh.vertices, mesh.faces)[0]
    assert np.median(d) < 0.6 and np.percentile(d, 90) < 1.5, np.percentile(d, [50, 90])
    report = json.loads((tmp_path / "out" / "view.report.json").read_text())
    # exact landmarks: the pose refinement before the fit moves the view by little
    assert report["metrics"]["pose_translation_mm"] < 2.0 and report["metrics"]["pose_rotation_deg"] < 2.0


def test_bad_inputs_exit_2_with_one_line(tiny_model, tmp_path, capsys):
    scan, pts, cam, lm = _depth_view(tiny_model, tmp_path)
    model = str(tiny_model.path)

    def check(args: list[str], *needles: str) -> None:
        capsys.readouterr()
        assert main(args + FAST) == 2
        one_line_error(capsys.readouterr().err, *needles)

    (tmp_path / "empty.xyz").write_text("")
    check(["fit", model, str(tmp_path / "empty.xyz"), "--landmarks", str(lm), "--out", str(tmp_path / "o")], "empty")
    nan = pts.copy()
    nan[3, 1] = np.nan
    np.savetxt(tmp_path / "nan.xyz", nan)
    check(["fit", model, str(tmp_path / "nan.xyz"), "--landmarks", str(lm), "--out", str(tmp_path / "o")], "NaN")
    np.savetxt(tmp_path / "view.xyz", pts)
    check(["fit", model, str(tmp_path / "view.xyz"), "--out", str(tmp_path / "o")], "--landmarks")
    # A mesh in metres, declared as mm (the default): refused with the reason and the fix.
    import trimesh

    trimesh.Trimesh(scan.vertices / 1000.0, scan.faces, process=False).export(tmp_path / "metres.ply")
    lm_m = tmp_path / "landmarks_m.json"
    lm_m.write_text(json.dumps({k: [c / 1000.0 for c in v] for k, v in json.loads(lm.read_text()).items()}))
    check(["fit", model, str(tmp_path / "metres.ply"), "--landmarks", str(lm_m), "--out", str(tmp_path / "o")],
          "metres", "--units")
    # ... and accepted with --units m; the mesh comes back in metres.
    assert main(["fit", model, str(tmp_path / "metres.ply"), "--landmarks", str(lm_m), "--units", "m", "--out",
                 str(tmp_path / "m"), "--steps", "2", "--resolution", "48", *FAST]) == 0
    back = trimesh.load(tmp_path / "m" / "metres.ply", process=False)
    assert np.abs(back.vertices).max() < 1.0
    check(["fit", str(tmp_path), str(tmp_path / "nan.xyz"), "--out", str(tmp_path / "o")], "folder")
    check(["decode", model, str(tmp_path / "nothing.json"), "--out", str(tmp_path / "o.ply")], "does not exist")


def test_not_our_model_and_wrong_codes_in_a_subprocess(tiny_model, tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"this is not a safetensors file at all")
    codes = tmp_path / "c.json"
    codes.write_text(json.dumps({"identity": [0.0] * 40, "expression": [0.0] * 40, "detail": [0.0] * 7}))
    r = run_cli("extract", str(fake), str(codes), "--out", str(tmp_path / "x.ply"), *FAST)
    assert r.returncode == 2
    one_line_error(r.stderr, "damaged")
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    r = run_cli("decode", str(tmp_path / "other.safetensors"), str(codes), "--out", str(tmp_path / "x.ply"), *FAST)
    assert r.returncode == 2
    one_line_error(r.stderr, "not an ImFace++")
    r = run_cli("extract", str(tiny_model.path), str(codes), "--out", str(tmp_path / "x.ply"), *FAST)
    assert r.returncode == 2
    one_line_error(r.stderr, "detail code has 7 values, this model expects 40")
    assert not (tmp_path / "x.ply").exists()
