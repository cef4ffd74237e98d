"""Output meshes are faces, not balls: the face-region rule (backend.geometry.face_region) on a synthetic
surface, on a fitted neutral face of the small test model, and through `imface extract`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixture import one_thread, tiny_model  # noqa: F401  (fixtures)

from backend.geometry.face_region import FaceRegion, boundary_edges, piece_labels, triangle_areas
from backend.scans.frame import MM_PER_UNIT

RES = 112


def _outer_boundary(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """Vertices of the longest boundary loop (a scan's outline; its slits and eye holes are other loops)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    be = boundary_edges(faces)
    adj = coo_matrix((np.ones(len(be)), (be[:, 0], be[:, 1])), shape=(n_vertices, n_vertices))
    _, lab = connected_components(adj, directed=False)
    bv = np.unique(be)
    return bv[lab[bv] == np.bincount(lab[bv]).argmax()]


# ------------------------------------------------------------------------------------------ the rule


def _plane_shell(res: int = 72):
    """The closed shell marching cubes gives for the half-space z < 0.3 cut by the unit sphere: a disc
    (the "face") plus the spherical cap behind it."""
    from backend.geometry.extraction import extract_mesh_dense

    return extract_mesh_dense(lambda p: p[:, 2] - 0.3, resolution=res)


def test_rule_keeps_the_covered_disc_and_drops_the_cap():
    v, f = _plane_shell()
    # Coverage: template vertices on the plane within 50 mm of the axis; template coordinates = the points.
    g = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 61), np.linspace(-0.5, 0.5, 61)), -1).reshape(-1, 2)
    g = g[np.linalg.norm(g, axis=1) <= 0.5]
    cover = np.column_stack([g, np.full(len(g), 0.3)])
    rule = FaceRegion()
    tv, tf = rule.trim(v, f, v, cover)
    r = np.linalg.norm(tv[:, :2], axis=1) * MM_PER_UNIT
    assert np.all(np.abs(tv[:, 2] - 0.3) < 1e-6)                 # only the disc: no cap vertex
    assert r.max() <= 50.0 + rule.crop_mm + 1e-6                  # ends within crop_mm of the coverage
    area = triangle_areas(tv, tf).sum() * MM_PER_UNIT ** 2
    # all of the covered disc, and no more than crop_mm around it (whole triangles of a 2.8 mm grid)
    assert np.pi * 50.0 ** 2 < area < np.pi * (50.0 + rule.crop_mm) ** 2, area
    assert len(np.unique(piece_labels(tf, len(tv)))) == 1

    # A hole in the coverage (an imperfect warp) inside the face is filled back; a separate covered
    # island is dropped (one piece).
    hole = np.linalg.norm(cover[:, :2] - [0.2, 0.0], axis=1) < 0.1
    island = np.column_stack([g * 0.1 + [0.0, -0.8], np.full(len(g), 0.3)])
    tv2, tf2 = rule.trim(v, f, v, np.concatenate([cover[~hole], island]))
    assert np.isclose(triangle_areas(tv2, tf2).sum(), triangle_areas(tv, tf).sum())
    # Without template vertices (no shared topology): |t| <= 0.95, and never within the sphere margin.
    tv3, _ = rule.trim(v, f, v, None)
    assert np.linalg.norm(tv3, axis=1).max() <= 1.0 - rule.sphere_margin_mm / MM_PER_UNIT


# ------------------------------------------------------------------------------------------ a fitted face


@pytest.fixture(scope="module")
def fitted_neutral(tiny_model):
    from backend.fitting import FitSchedule, extract_face_mesh, target_from_scan
    from backend.fitting.meshes import face_only
    from backend.fitting.pose import fit_posed
    from backend.model.io import load_model
    from backend.scans.folder import load_scan, load_scan_folder

    model, _ = load_model(tiny_model.path)
    folder = load_scan_folder(tiny_model.scans)
    scan = load_scan(next(e for e in folder.entries if e.key == "id01/neutral"))
    target = target_from_scan(scan, n_near=8000, n_uniform=2000, n_surface=4000)
    result = fit_posed(model, target, FitSchedule.scaled(FitSchedule.fast(), 0.5), neutral=True)
    nfs = result.target.normalized_from_scan
    shell = extract_face_mesh(model, result.codes, RES, neutral=True, watertight=True)  # model frame, mm
    with torch.no_grad():
        face = face_only(model.field(result.codes, neutral=True, frozen=True, detail=False), shell[0] / MM_PER_UNIT,
                         shell[1])
    # The scan in the same (pose-refined) model frame, mm.
    from backend.geometry.alignment import apply_transform

    scan_v = apply_transform(nfs, scan.vertices) * MM_PER_UNIT
    return (face[0] * MM_PER_UNIT, face[1]), shell, (scan_v, scan.faces)


def test_fitted_face_is_one_face_shaped_piece(fitted_neutral):
    (v, f), (sv, sf), (scan_v, scan_f) = fitted_neutral
    radius = np.linalg.norm(v, axis=1)
    assert radius.max() < MM_PER_UNIT - 1.0                     # no vertex within 1 mm of the sampling sphere
    assert (np.linalg.norm(sv, axis=1) > MM_PER_UNIT - 1.0).sum() > 1000  # (the shell has its cap there)
    assert len(np.unique(piece_labels(f, len(v)))) == 1         # one connected piece
    assert len(boundary_edges(sf)) == 0 and len(boundary_edges(f)) > 0  # shell closed, face open

    # Area within 10 % of the scan's own area inside the sphere.
    inside = np.linalg.norm(scan_v, axis=1) <= MM_PER_UNIT
    scan_area = triangle_areas(scan_v, scan_f[inside[scan_f].all(1)]).sum()
    area = triangle_areas(v, f).sum()
    assert abs(area / scan_area - 1) < 0.10, (area, scan_area)

    # The outline follows the scan's outline where the scan is inside the sphere (not within 3 mm of it).
    from scipy.spatial import cKDTree

    outline = _outer_boundary(scan_f, len(scan_v))
    outline = outline[np.linalg.norm(scan_v[outline], axis=1) < MM_PER_UNIT - 3.0]
    ours = np.unique(boundary_edges(f))
    d_scan, _ = cKDTree(v[ours]).query(scan_v[outline])         # scan outline -> our outline
    assert np.median(d_scan) < 3.0 and np.percentile(d_scan, 95) < 6.0, np.percentile(d_scan, [50, 95])
    inner = ours[np.linalg.norm(v[ours], axis=1) < MM_PER_UNIT - 3.0]
    d_ours, _ = cKDTree(scan_v[outline]).query(v[inner])        # our outline -> the scan's
    assert np.median(d_ours) < 3.0, np.percentile(d_ours, [50, 90])


def test_extract_command_writes_the_face_and_the_shell_on_request(tiny_model, tmp_path):
    import trimesh

    from backend.cli import main
    from backend.codes import FaceCodesFile, mean_codes, save_codes
    from backend.model.io import load_model, model_fingerprint

    model, _ = load_model(tiny_model.path)
    codes = save_codes(tmp_path / "mean.codes.json",
                       FaceCodesFile(mean_codes(model), model=model_fingerprint(tiny_model.path)))
    args = ["extract", str(tiny_model.path), str(codes), "--resolution", "56", "--threads", "1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "face.ply")]) == 0
    assert main(args + ["--out", str(tmp_path / "shell.ply"), "--watertight"]) == 0
    face, shell = (trimesh.load(tmp_path / n, process=False) for n in ("face.ply", "shell.ply"))
    assert np.linalg.norm(face.vertices, axis=1).max() < MM_PER_UNIT - 1.0
    assert shell.is_watertight and not face.is_watertight
    assert np.linalg.norm(shell.vertices, axis=1).max() > MM_PER_UNIT - 1.0
    assert 0.3 < len(face.vertices) / len(shell.vertices) < 0.8
