"""Every bad input gives a clear error that names the scan and the problem, and the rest of the
batch is still processed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh

from backend.scans.samples import PreprocessConfig
from training.data.preprocess import preprocess_folder
from backend.scans.folder import load_scan_folder, ManifestError

TINY = PreprocessConfig(n_near=1_000, n_uniform=1_000, n_surface=500)


def _copy(default_scans: Path, tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "scans"
    shutil.copytree(default_scans, folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def _save_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _mesh(folder: Path, entry: dict) -> trimesh.Trimesh:
    return trimesh.load(folder / entry["path"], process=False, maintain_order=True)


def _write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    trimesh.Trimesh(vertices, faces, process=False, validate=False).export(path)


def _run(folder: Path, tmp_path: Path):
    report = preprocess_folder(folder, tmp_path / "out", TINY, workers=1, progress=False)
    failed = dict(report.failed)
    return report, failed


def _assert_only_bad_failed(report, failed: dict, bad_key: str, *words: str) -> None:
    assert bad_key in failed, report.summary()
    reason = failed[bad_key].lower()
    for word in words:
        assert word.lower() in reason, f"{reason!r} should mention {word!r}"
    assert "traceback" not in reason
    assert len(report.processed) == 5 and len(failed) == 1, report.summary()


def _key(entry: dict) -> str:
    return f"{entry['identity']}/{entry['expression']}"


def test_empty_mesh(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][1]
    (folder / bad["path"]).write_text("ply\nformat ascii 1.0\nelement vertex 0\nelement face 0\n"
                                      "property list uchar int vertex_indices\nend_header\n")
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, _key(bad), "empty")


def test_nan_and_infinite_coordinates(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][2]
    mesh = _mesh(folder, bad)
    vertices = np.array(mesh.vertices)
    vertices[10] = np.nan
    vertices[20, 1] = np.inf
    _write_ply(folder / bad["path"], vertices, mesh.faces)
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, _key(bad), "2 vertices", "nan")


def test_missing_landmark(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][0]
    bad["landmarks_mm"].pop("nose_tip")
    manifest.pop("landmark_vertex_indices", None)
    _save_manifest(folder, manifest)
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, bad["path"], "missing landmark", "nose_tip")


def test_off_surface_landmark(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][3]
    bad["landmarks_mm"]["nose_tip"][2] += 30.0  # 3 cm in front of the nose
    _save_manifest(folder, manifest)
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, _key(bad), "off the surface", "nose_tip")


def _rescaled_scan(default_scans: Path, tmp_path: Path, factor: float) -> tuple[Path, dict]:
    """A copy of the folder whose scan 4 (mesh and landmarks) is multiplied by `factor`."""
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][4]
    mesh = _mesh(folder, bad)
    _write_ply(folder / bad["path"], np.asarray(mesh.vertices) * factor, mesh.faces)
    bad["landmarks_mm"] = {k: [c * factor for c in v] for k, v in bad["landmarks_mm"].items()}
    _save_manifest(folder, manifest)
    return folder, bad


def test_scan_in_metres_is_detected_and_scaled(default_scans, tmp_path):
    folder, bad = _rescaled_scan(default_scans, tmp_path, 1 / 1000.0)
    report, failed = _run(folder, tmp_path)
    assert not failed and len(report.processed) == 6, report.summary()
    assert any("metres" in w for w in report.warnings[_key(bad)])
    # The scaled scan gives the same samples' landmarks as a scan in mm would.
    from safetensors.numpy import load_file

    lm = load_file(str(tmp_path / "out" / f"{_key(bad)}.safetensors"))["landmarks"]
    assert 0.8 < np.linalg.norm(lm[0] - lm[1]) < 1.1


def test_scan_in_wrong_scale_is_refused(default_scans, tmp_path):
    folder, bad = _rescaled_scan(default_scans, tmp_path, 3.0)  # a giant: no unit explains it
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, _key(bad), "outer eye corners", "units")


def _with_extra_geometry(default_scans: Path, tmp_path: Path, extra) -> tuple[Path, dict]:
    """A copy of the folder where scan 5 gets `extra(vertices, faces, entry) -> (vertices, faces)`.
    The added vertices break the shared vertex count, so the folder no longer claims shared topology."""
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][5]
    mesh = _mesh(folder, bad)
    vertices, faces = extra(np.array(mesh.vertices), np.array(mesh.faces), bad)
    _write_ply(folder / bad["path"], vertices, faces)
    manifest["shared_topology"] = False
    _save_manifest(folder, manifest)
    return folder, bad


def test_non_manifold_mesh_is_processed_with_a_warning(default_scans, tmp_path):
    def fin(vertices, faces, _):
        # A third triangle on an existing edge, with a new vertex just behind it.
        a, b = faces[len(faces) // 2, :2]
        fin_vertex = (vertices[a] + vertices[b]) / 2 - [0, 0, 2.0]
        return np.vstack([vertices, fin_vertex]), np.vstack([faces, [a, b, len(vertices)]])

    folder, bad = _with_extra_geometry(default_scans, tmp_path, fin)
    report, failed = _run(folder, tmp_path)
    assert not failed, report.summary()
    assert any("non-manifold" in w for w in report.warnings[_key(bad)])


def test_self_intersecting_mesh_is_processed_with_a_warning(default_scans, tmp_path):
    def flap(vertices, faces, entry):
        # A quad that pierces the cheek, standing across the surface 10 mm in front and behind.
        eye = np.array(entry["landmarks_mm"]["right_eye_outer_corner"])
        mouth = np.array(entry["landmarks_mm"]["right_mouth_corner"])
        cheek = vertices[np.argmin(np.linalg.norm(vertices - (eye + mouth) / 2, axis=1))]
        quad = cheek + np.array([[-5, 0, -10], [5, 0, -10], [5, 0, 10], [-5, 0, 10]], dtype=float)
        n = len(vertices)
        return np.vstack([vertices, quad]), np.vstack([faces, [[n, n + 1, n + 2], [n, n + 2, n + 3]]])

    folder, bad = _with_extra_geometry(default_scans, tmp_path, flap)
    report, failed = _run(folder, tmp_path)
    assert not failed, report.summary()
    assert any("self-intersecting" in w for w in report.warnings[_key(bad)])
    # Rebuilt from the visible vertices, the surface stays a height field and its samples are finite.
    from safetensors.numpy import load_file

    samples = load_file(str(tmp_path / "out" / f"{_key(bad)}.safetensors"))
    assert np.isfinite(samples["sdf"]).all()


def test_five_million_triangles_is_refused_before_reading(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][0]
    n = 2300  # a 2300 x 2300 vertex grid has 2 * 2299^2 = 10.6M triangles; take the first 5M
    xs = np.linspace(-80, 80, n)
    gx, gy = np.meshgrid(xs, xs)
    vertices = np.stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)], axis=1).astype(np.float32)
    i = (np.arange(n - 1)[:, None] * n + np.arange(n - 1)[None, :]).ravel()
    faces = np.concatenate([np.stack([i, i + 1, i + n], 1), np.stack([i + 1, i + n + 1, i + n], 1)])[:5_000_000]
    path = folder / bad["path"]
    with open(path, "wb") as f:  # binary PLY written directly: exporting 5M triangles via trimesh is slow
        f.write((f"ply\nformat binary_little_endian 1.0\nelement vertex {len(vertices)}\n"
                 "property float x\nproperty float y\nproperty float z\n"
                 f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode())
        f.write(vertices.tobytes())
        rec = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
        rec["n"], rec["v"] = 3, faces
        f.write(rec.tobytes())
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, _key(bad),
                            "5,000,000 triangles", "decimate")


def test_missing_mesh_file(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    bad = manifest["scans"][1]
    (folder / bad["path"]).unlink()
    report, failed = _run(folder, tmp_path)
    _assert_only_bad_failed(report, failed, _key(bad), "not found")


def test_malformed_manifest_json(default_scans, tmp_path):
    folder, _ = _copy(default_scans, tmp_path)
    (folder / "manifest.json").write_text('{"scans": [ {"path": "id00/neutral.ply", ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_scan_folder(folder)
    with pytest.raises(ManifestError, match="manifest.json"):
        preprocess_folder(folder, tmp_path / "out", TINY, progress=False)


def test_malformed_manifest_entries_are_listed_and_the_rest_processed(default_scans, tmp_path):
    folder, manifest = _copy(default_scans, tmp_path)
    manifest["scans"][0].pop("identity")
    manifest["scans"][1]["neutral"] = "yes"
    manifest["scans"].append(["not", "an", "object"])
    _save_manifest(folder, manifest)
    report = preprocess_folder(folder, tmp_path / "out", TINY, workers=1, progress=False)
    reasons = " | ".join(r for _, r in report.failed)
    assert "missing or empty 'identity'" in reasons and "'neutral' must be true or false" in reasons
    assert "not an object" in reasons
    assert len(report.processed) == 4
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["failed"]) == 3 and len(index["scans"]) == 4


def test_cli_reports_a_malformed_manifest_without_a_traceback(default_scans, tmp_path):
    import subprocess
    import sys

    folder, _ = _copy(default_scans, tmp_path)
    (folder / "manifest.json").write_text("[1, 2")
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "preprocess", str(folder), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
