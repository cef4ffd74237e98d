"""Real scans: the raw-scanner tool (training/data/raw_scans.py) meets its stated minimum corruption,
preprocessing removes what a scanner adds around a face and refuses what is not a face, and fitting the
raw version of a held-out person lands within 0.3 mm Chamfer of fitting the clean one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_fixture import one_thread, tiny_model  # noqa: F401  (fixtures)

from backend.geometry.alignment import apply_transform
from backend.geometry.face_region import boundary_edges, piece_labels
from backend.geometry.signed_distance import closest_points
from backend.scans.folder import ScanError, load_scan, load_scan_folder
from backend.scans.frame import MM_PER_UNIT, normalization_transform
from backend.scans.samples import PreprocessConfig, preprocess_scan
from training.data.raw_scans import RawLevels, make_raw_folder

KEY = "id00/mouth_open"
SMALL = PreprocessConfig(n_near=2000, n_uniform=2000, n_surface=1000, check_self_intersections=False)


@pytest.fixture(scope="module")
def raw(default_scans, tmp_path_factory) -> Path:
    return make_raw_folder(default_scans, tmp_path_factory.mktemp("raw"), seed=5, keys=[KEY])


def _pair(default_scans: Path, raw: Path):
    clean = load_scan(next(e for e in load_scan_folder(default_scans).entries if e.key == KEY))
    folder = load_scan_folder(raw)
    entry = next(e for e in folder.entries if e.key == KEY)
    meta = next(s for s in json.loads((raw / "manifest.json").read_text())["scans"] if s["expression"] == "mouth_open")
    back = np.linalg.inv(np.array(meta["raw"]["clean_to_raw"]))
    return clean, load_scan(entry, folder.units), back, folder


def test_raw_tool_meets_the_minimum_levels(default_scans, raw, tmp_path):
    clean, scan, back, folder = _pair(default_scans, raw)
    assert not folder.shared_topology
    v = apply_transform(back, scan.vertices)            # the raw scan in the clean scan's frame
    # Rotated frame: a proper rotation, far from the identity.
    r = np.linalg.inv(back)[:3, :3]
    assert np.isclose(np.linalg.det(r), 1.0) and np.degrees(np.arccos((np.trace(r) - 1) / 2)) > 10
    # Landmarks moved 1-3 mm, given as coordinates.
    moved = np.linalg.norm(apply_transform(back, scan.landmarks) - clean.landmarks, axis=1)
    assert np.all(moved >= 1.0 - 1e-6) and np.all(moved <= 3.0 + 1e-6), moved
    # Noise: the face vertices lie ~0.3 mm (rms) off the clean surface.
    d, _, _ = closest_points(v, clean.vertices, clean.faces)
    on = d < 2.0
    assert 0.25 < np.sqrt(np.mean(d[on] ** 2)) < 0.45, np.sqrt(np.mean(d[on] ** 2))
    # Pieces: the face, the two eyeballs, >= 6 hair fragments, a neck and the back of the head.
    to_model = normalization_transform(clean.landmarks) * np.array([[MM_PER_UNIT]] * 3 + [[1.0]])
    vm = apply_transform(to_model, v)
    labels = piece_labels(scan.faces, len(v))
    pieces = [np.unique(scan.faces[labels == lab]) for lab in np.unique(labels)]
    centroids = np.array([vm[p].mean(0) for p in pieces])
    sizes = np.array([len(p) for p in pieces])
    assert len(pieces) >= 1 + 2 + 6 + 2, len(pieces)
    assert ((centroids[:, 1] < -100) & (sizes > 500)).any()   # a neck below the chin
    assert ((centroids[:, 2] < -40) & (sizes > 500)).any()    # the back of the head behind the face
    # Holes: clean face points the raw scan no longer covers, in >= 3 separate patches of 5-15 mm.
    face = (np.linalg.norm(apply_transform(to_model, clean.vertices) - [0, 0, 40], axis=1) < 75)
    gap = closest_points(clean.vertices[face], v, scan.faces)[0] > 1.5
    uncovered = clean.vertices[face][gap]
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n, lab = connected_components(cKDTree(uncovered).sparse_distance_matrix(cKDTree(uncovered), 2.0), directed=False)
    extents = sorted(np.ptp(uncovered[lab == i], axis=0).max() + 3.0 for i in range(n))  # + the 1.5 mm rims
    assert len(extents) >= 3 and all(4.0 <= e <= 16.0 for e in extents), extents
    stated = json.loads((raw / "manifest.json").read_text())["scans"][0]["raw"]["stats"]["hole_diameters_mm"]
    assert len(stated) >= 3 and all(5.0 <= d <= 15.0 for d in stated), stated
    # Uneven density: edge lengths differ by 3x or more between the densest and sparsest parts.
    be = np.linalg.norm(v[scan.faces[:, 0]] - v[scan.faces[:, 1]], axis=1)[sizes.argmax() == labels[scan.faces[:, 0]]]
    assert np.percentile(be, 90) > 3 * np.percentile(be, 10), np.percentile(be, [10, 90])
    # No shared topology, and deterministic by seed.
    assert len(v) != len(clean.vertices)
    again = make_raw_folder(default_scans, tmp_path / "again", seed=5, keys=[KEY])
    other = make_raw_folder(default_scans, tmp_path / "other", seed=6, keys=[KEY])
    same = (raw / f"{KEY}.ply").read_bytes()
    assert (again / f"{KEY}.ply").read_bytes() == same and (other / f"{KEY}.ply").read_bytes() != same
    with pytest.raises(ValueError, match="minimum"):
        RawLevels(noise_mm=0.1).check()
    assert len(boundary_edges(scan.faces)) > len(boundary_edges(clean.faces))


def test_preprocessing_removes_what_the_scanner_added(default_scans, raw):
    clean, scan, back, _ = _pair(default_scans, raw)
    ref = preprocess_scan(clean, SMALL).pseudo_watertight
    out = preprocess_scan(scan, SMALL)
    assert any("stray piece" in w for w in out.warnings), out.warnings

    def off_clean(samples) -> np.ndarray:
        """Distances (mm) of a pseudo-watertight surface's vertices to the clean one, in the clean model frame."""
        sv = samples.pseudo_watertight[0]
        t = samples.tensors["normalized_from_scan"]
        clean_frame = apply_transform(back, apply_transform(np.linalg.inv(t), sv))   # raw model -> clean scan
        cm = apply_transform(normalization_transform(clean.landmarks, "eyes_nose"), clean_frame)
        return closest_points(cm, *ref)[0] * MM_PER_UNIT

    d = off_clean(out)
    assert np.percentile(d, 99) < 2.0 and d.max() < 6.0, np.percentile(d, [50, 99, 100])
    # A spike (a vertex 8 mm off the cheek) goes too.
    spiky = load_scan(next(e for e in load_scan_folder(default_scans).entries if e.key == KEY))
    cheek = int(np.argmin(np.linalg.norm(spiky.vertices - (spiky.landmarks[2] + [40.0, -5.0, -25.0]), axis=1)))
    spiky.vertices = spiky.vertices.copy()
    spiky.vertices[cheek] += [0.0, 0.0, 8.0]
    assert any("1 spike vertices removed" in w for w in preprocess_scan(spiky, SMALL).warnings)
    # Without the clean-up, hair and neck make it into the height field.
    dirty = off_clean(preprocess_scan(scan, PreprocessConfig(n_near=2000, n_uniform=2000, n_surface=1000,
                                                             remove_strays=False)))
    assert dirty.max() > 10.0, dirty.max()


def test_what_is_not_a_face_is_refused_with_the_reason(default_scans):
    import re

    entry = next(e for e in load_scan_folder(default_scans).entries if e.key == KEY)
    # Only small patches around the landmarks (a scan that lost its face): the nose patch is the face,
    # the other patches are strays, and the eye and mouth corners are left off the surface.
    scan = load_scan(entry)
    near = np.linalg.norm(scan.vertices[:, None] - scan.landmarks[None], axis=2).min(1) < 8.0
    scan.faces = scan.faces[near[scan.faces].all(1)]
    with pytest.raises(ScanError, match="not a face .*right_eye_outer_corner .* off the remaining surface"):
        preprocess_scan(scan, SMALL)
    # Too little surface seen from the front: the footprint is measured and named.
    cfg = PreprocessConfig(n_near=2000, n_uniform=2000, n_surface=1000, min_face_area_cm2=1000.0)
    with pytest.raises(ScanError, match="not a face: it covers") as info:
        preprocess_scan(load_scan(entry), cfg)
    covers = float(re.search(r"covers (\d+) cm", str(info.value)).group(1))
    assert 150 < covers < 400, covers        # a procedural face seen from the front, inside the sphere


def test_fitting_a_raw_scan_lands_near_fitting_the_clean_one(tiny_model, tmp_path):
    """The small test model on a procedural person it was not trained on (id02 of the same seed)."""
    from backend.fitting import FitSchedule
    from backend.model.io import load_model
    from training.data.raw_scans import clean_vs_raw, clean_vs_raw_markdown
    from training.data.synthetic_faces import generate_scan_folder

    model, ck = load_model(tiny_model.path)
    assert "id02" not in ck.dataset["identities"]
    clean = generate_scan_folder(tmp_path / "clean", n_identities=3, seed=3, expressions=["neutral"])
    raw = make_raw_folder(clean, tmp_path / "raw", seed=0, keys=["id02/neutral"])
    rows = clean_vs_raw(model, clean, raw, keys=["id02/neutral"], schedule=FitSchedule.scaled(FitSchedule.fast(), 0.5),
                        resolution=96, n_points=40_000)
    print("\n" + clean_vs_raw_markdown(rows))
    r = rows[0]
    assert float(r["clean_chamfer_exact_mm"]) < 1.5, r          # the clean fit is a fit
    assert abs(float(r["delta_chamfer_mm"])) <= 0.3, r
    assert abs(float(r["delta_chamfer_exact_mm"])) <= 0.3, r
