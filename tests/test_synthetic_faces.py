"""The embedded default data: procedural face scans and their preview images."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from training.data import synthetic_faces as sf
from backend.scans.landmarks import LANDMARK_NAMES
from training.data.preview import preview_scan_folder, render_grid, render_mesh


@pytest.fixture(scope="module")
def topo() -> sf.FaceTopology:
    return sf.face_topology()


@pytest.fixture(scope="module")
def person() -> dict[str, float]:
    return sf.sample_identity(np.random.default_rng(7))


def _smooth(identity, expression, intensity=1.0):
    return sf.make_face(identity, expression, intensity, detail=False)[0]


def _region_shift(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm(b[mask] - a[mask], axis=1).mean())


# ---------------------------------------------------------------------------------------------------- API

def test_public_tables():
    assert len(sf.IDENTITY_PARAMETERS) >= 10
    for name in ("face_width", "face_length", "nose_length", "nose_width", "nose_bridge", "eye_depth",
                 "eye_spacing", "brow_ridge", "cheekbones", "lip_fullness", "chin", "jaw_width"):
        assert name in sf.IDENTITY_PARAMETERS
    assert len(sf.EXPRESSIONS) >= 10 and sf.EXPRESSIONS[0] == "neutral"
    for name in ("neutral", "mouth_open", "smile", "pucker", "brow_raise", "frown", "eyes_closed",
                 "cheek_puff", "mouth_left", "sneer"):
        assert name in sf.EXPRESSIONS
    rng = np.random.default_rng(0)
    ident = sf.sample_identity(rng)
    assert set(ident) == set(sf.IDENTITY_PARAMETERS)
    for k, (lo, hi) in sf.IDENTITY_PARAMETERS.items():
        assert lo <= ident[k] <= hi
    with pytest.raises(ValueError):
        sf.make_face(ident, "not_an_expression")
    with pytest.raises(ValueError):
        sf.make_face({"not_a_parameter": 1.0}, "neutral")


# ---------------------------------------------------------------------------------------------------- topology

def test_shared_topology_and_resolution(topo, person):
    assert 15_000 <= topo.n_vertices <= 40_000
    shapes = set()
    for ident in (person, sf.MEAN_IDENTITY):
        for expr in ("neutral", "mouth_open", "smile", "eyes_closed"):
            v, f = sf.make_face(ident, expr)
            assert v.shape == (topo.n_vertices, 3) and v.dtype == np.float64 and np.isfinite(v).all()
            np.testing.assert_array_equal(f, topo.faces)
            shapes.add(v.shape)
    assert len(shapes) == 1
    f = topo.faces
    assert f.min() == 0 and f.max() == topo.n_vertices - 1 and len(np.unique(f)) == topo.n_vertices
    # Every edge is used by at most two triangles (an open, manifold sheet).
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert counts.max() <= 2


def test_front_facing_height_field(topo, person):
    """Seen from +z the face is (mostly) a height field with outward normals."""
    v, f = sf.make_face(person, "neutral")
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    area = np.linalg.norm(n, axis=1)
    skin = ~topo.is_eyeball[f[:, 0]]
    front = n[:, 2] > 0
    assert (area[skin & front].sum() / area[skin].sum()) > 0.9
    normals = sf.vertex_normals(v, f)
    assert normals[topo.landmark_indices["nose_tip"], 2] > 0.8
    center = (np.abs(topo.p) < 45) & (topo.q > -60) & (topo.q < 90) & ~topo.is_eyeball
    assert (normals[center, 2] > 0).mean() > 0.97
    # The nose tip is the front-most point of the face, near z = 130 like the ICT faces.
    nose = v[topo.landmark_indices["nose_tip"]]
    assert 115 < nose[2] < 145 and abs(nose[0]) < 1.0 and abs(nose[1]) < 10
    assert v[~topo.is_eyeball, 2].max() - nose[2] < 1.0


def test_landmarks_human_scale_for_many_people(topo):
    lm = topo.landmark_indices
    assert tuple(lm) == LANDMARK_NAMES
    dists = []
    for seed in range(40):
        ident = sf.sample_identity(np.random.default_rng(seed))
        v = _smooth(ident, "neutral")
        r_eye, l_eye, nose, r_mouth, l_mouth = (v[lm[n]] for n in LANDMARK_NAMES)
        dists.append(np.linalg.norm(r_eye - l_eye))
        assert r_eye[0] < 0 < l_eye[0] and r_mouth[0] < 0 < l_mouth[0]      # subject's right has -x
        assert 40 < nose[2] - r_eye[2] < 60 and 40 < nose[2] - l_eye[2] < 60   # eyes ~49 mm behind the tip
        assert 20 < nose[2] - r_mouth[2] < 40                                   # mouth corners ~30 mm behind
        assert 30 < nose[1] - r_mouth[1] < 50 and 20 < r_eye[1] - nose[1] < 40
        assert 38 < np.linalg.norm(r_mouth - l_mouth) < 60
    dists = np.array(dists)
    assert dists.min() >= 85 and dists.max() <= 105
    assert dists.std() > 1.0     # people differ


def test_regions_are_where_they_should_be(topo, person):
    v = _smooth(person, "neutral")
    r = topo.regions
    y = {k: v[m, 1].mean() for k, m in r.items() if m.any()}
    assert y["forehead"] > y["brows"] > y["upper_eyelids"] > y["nose"] > y["upper_lip"] > y["lower_lip"] > y["chin"]
    assert abs(v[r["cheeks"], 0]).mean() > 30


# ---------------------------------------------------------------------------------------------------- expressions

def test_expressions_move_their_regions(topo, person):
    r = topo.regions
    neutral = _smooth(person, "neutral")
    shifts = {}
    for expr in sf.EXPRESSIONS[1:]:
        face = _smooth(person, expr)
        shifts[expr] = {k: _region_shift(neutral, face, m) for k, m in r.items() if m.any()}
        assert max(shifts[expr].values()) > 1.0, expr          # every expression does something

    s = shifts["mouth_open"]
    assert s["chin"] > 5 * max(s["forehead"], 0.05) and s["lower_lip"] > 5 * max(s["forehead"], 0.05)
    assert s["chin"] > 8 and s["upper_lip"] < 0.5 * s["lower_lip"]
    s = shifts["brow_raise"]
    assert s["brows"] > 3 * max(s["chin"], 0.05) and s["forehead"] > 3 * max(s["chin"], 0.05)
    assert (_smooth(person, "brow_raise")[r["brows"], 1] - neutral[r["brows"], 1]).mean() > 2.0
    s = shifts["eyes_closed"]
    assert s["upper_eyelids"] == max(v for k, v in s.items() if k not in ("eyelids",))
    assert s["upper_eyelids"] > 4.0 and s["chin"] < 0.05 and s["forehead"] < 0.05
    s = shifts["smile"]
    assert s["mouth_corners"] > 3 * s["forehead"] and s["mouth_corners"] > 3.0
    smile = _smooth(person, "smile")
    corners = [topo.landmark_indices["right_mouth_corner"], topo.landmark_indices["left_mouth_corner"]]
    d = smile[corners] - neutral[corners]
    assert (d[:, 1] > 2.0).all()                                   # corners up
    assert d[0, 0] < 0 < d[1, 0]                                   # and outward
    s = shifts["cheek_puff"]
    assert s["cheeks"] > 3 * s["forehead"] and s["cheeks"] > 2 * s["nose"] and s["cheeks"] > 3.0
    s = shifts["pucker"]
    pucker = _smooth(person, "pucker")
    lips = r["upper_lip"] | r["lower_lip"]
    assert (pucker[lips, 2] - neutral[lips, 2]).mean() > 4.0       # lips forward
    assert s["upper_lip"] > 3 * s["forehead"]
    d = pucker[corners] - neutral[corners]
    assert d[0, 0] > 0 > d[1, 0]                                   # corners inward
    frown = _smooth(person, "frown")
    assert (frown[r["brows"], 1] - neutral[r["brows"], 1]).mean() < -1.0
    assert shifts["frown"]["brows"] > 3 * shifts["frown"]["chin"]
    left = _smooth(person, "mouth_left")
    mouth = lips | r["mouth_corners"]
    assert (left[mouth, 0] - neutral[mouth, 0]).mean() > 3.0       # toward the subject's left (+x)
    sneer = _smooth(person, "sneer")
    assert (sneer[r["upper_lip"], 1] - neutral[r["upper_lip"], 1]).mean() > 1.0
    assert shifts["sneer"]["upper_lip"] > 3 * shifts["sneer"]["chin"]


def test_mouth_open_is_a_jaw_rotation_about_a_hinge(topo, person):
    jaw = topo.regions["lower_jaw"]
    a = _smooth(person, "neutral")[jaw]
    intensity = 0.9
    b = _smooth(person, "mouth_open", intensity)[jaw]
    # Rigid: pairwise distances between lower-jaw points are preserved.
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(a), (2, 2000))
    np.testing.assert_allclose(np.linalg.norm(a[i] - a[j], axis=1), np.linalg.norm(b[i] - b[j], axis=1), atol=1e-3)
    # Kabsch: a rotation about the x axis by the expected angle, not a translation.
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    rot = (u @ np.diag([1, 1, np.sign(np.linalg.det(u @ vt))]) @ vt).T
    np.testing.assert_allclose(a @ rot.T + (cb - rot @ ca), b, atol=1e-3)
    angle = np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))
    assert angle == pytest.approx(np.deg2rad(sf.JAW_OPEN_DEGREES) * intensity, rel=1e-3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    assert abs(axis[0]) / np.linalg.norm(axis) > 0.999
    # The fixed axis passes through the hinge near the ears: (I - R) c = t in the y-z plane.
    t = cb - rot @ ca
    c_yz = np.linalg.solve(np.eye(2) - rot[1:, 1:], t[1:])
    hinge, direction = sf.jaw_hinge(person)
    np.testing.assert_allclose(c_yz, hinge[1:], atol=0.05)
    nose = _smooth(person, "neutral")[topo.landmark_indices["nose_tip"]]
    assert nose[2] - hinge[2] > 70 and -20 < hinge[1] < 30
    # Points farther from the hinge move more (a translation would move all equally).
    r = np.linalg.norm(a[:, 1:] - hinge[1:], axis=1)
    move = np.linalg.norm(b - a, axis=1)
    np.testing.assert_allclose(move, 2 * r * np.sin(angle / 2), rtol=1e-4)
    assert move.max() - move.min() > 3.0
    # The lips part: an open mouth slit.
    full = _smooth(person, "mouth_open", intensity)
    up, lo = topo.regions["upper_lip"], topo.regions["lower_lip"]
    assert full[up, 1].min() - full[lo, 1].max() > 5.0


def test_intensity_scales_expressions(person, topo):
    n = _smooth(person, "neutral")
    half = _smooth(person, "smile", 0.5)
    full = _smooth(person, "smile", 1.0)
    m = topo.regions["mouth_corners"]
    assert 0.3 < _region_shift(n, half, m) / _region_shift(n, full, m) < 0.7
    np.testing.assert_allclose(_smooth(person, "smile", 0.0), n, atol=1e-9)


# ---------------------------------------------------------------------------------------------------- detail

def test_wrinkles_depth_and_resolution(topo, person):
    fh = topo.regions["forehead"]
    detailed = sf.make_face(person, "brow_raise", detail_seed=3)[0]
    smooth = _smooth(person, "brow_raise")
    depth = np.linalg.norm(detailed - smooth, axis=1)[fh]
    assert 0.1 <= depth.max() <= 0.5
    parts = sf.detail_offsets(person, "brow_raise", detail_seed=3)
    wr = parts["wrinkles"]
    assert 0.1 <= -wr[fh].min() <= 0.5 and wr.max() <= 1e-12          # grooves, 0.1-0.5 mm deep
    neutral_wr = sf.detail_offsets(person, "neutral", detail_seed=3)["wrinkles"]
    assert -neutral_wr[fh].min() < 0.5 * -wr[fh].min()                 # expression-driven
    assert np.abs(parts["skin"]).max() <= 0.1 and parts["skin"][fh].std() > 0.01
    assert np.all(parts["skin"][topo.is_eyeball] == 0)
    # Crow's feet with a smile, frown lines with a frown.
    smile_wr = sf.detail_offsets(person, "smile", detail_seed=3)["wrinkles"]
    corner = np.hypot(np.abs(topo.p) - 70.0, topo.q - 34.0) < 14
    assert 0.1 <= -smile_wr[corner].min() <= 0.5 and -neutral_wr[corner].min() < 0.1
    frown_wr = sf.detail_offsets(person, "frown", detail_seed=3)["wrinkles"]
    glabella = (np.abs(topo.p) < 10) & (topo.q > 40) & (topo.q < 55)
    assert 0.1 <= -frown_wr[glabella].min() <= 0.5
    # Wavelength >= 3x the vertex spacing: grooves along the forehead midline are far apart.
    mid = fh & (np.abs(topo.p) < 0.7)
    order = np.argsort(detailed[mid, 1])
    yy, ww = detailed[mid, 1][order], wr[mid][order]
    minima = np.nonzero((ww[1:-1] < ww[:-2]) & (ww[1:-1] < ww[2:]) & (ww[1:-1] < -0.05))[0] + 1
    assert len(minima) >= 3
    spacing = np.median(np.diff(yy))
    assert np.diff(yy[minima]).min() >= 3 * spacing
    v = smooth
    f = topo.faces
    in_fh = fh[f].all(1)
    edges = np.linalg.norm(v[f[in_fh]] - v[f[in_fh][:, [1, 2, 0]]], axis=2)
    assert np.median(edges) <= 9.5 / 3


def test_people_differ_and_detail_is_per_person(person):
    other = sf.sample_identity(np.random.default_rng(8))
    a, b = _smooth(person, "neutral"), _smooth(other, "neutral")
    assert np.abs(a - b).max() > 2.0
    s1 = sf.detail_offsets(person, "neutral", detail_seed=1)["skin"]
    s2 = sf.detail_offsets(person, "neutral", detail_seed=2)["skin"]
    assert np.abs(s1 - s2).max() > 0.05


# ---------------------------------------------------------------------------------------------------- folder

def test_scan_folder_manifest_and_meshes(default_scans, topo):
    import trimesh

    manifest = json.loads((default_scans / "manifest.json").read_text())
    assert manifest["source"] == "imface procedural generator, seed 3"
    assert manifest["units"] == "mm" and manifest["shared_topology"] is True
    assert manifest["frame"].startswith("+y up")
    assert manifest["n_vertices"] == topo.n_vertices and manifest["n_triangles"] == topo.n_triangles
    assert manifest["landmark_vertex_indices"] == topo.landmark_indices
    assert manifest["generator"] == {"seed": 3, "n_identities": 2, "expressions": ["neutral", "mouth_open", "smile"],
                                     "intensity_range": [0.8, 1.0]}
    scans = manifest["scans"]
    assert [(s["identity"], s["expression"]) for s in scans] == [
        (i, e) for i in ("id00", "id01") for e in ("neutral", "mouth_open", "smile")]
    faces0 = None
    for s in scans:
        assert s["neutral"] == (s["expression"] == "neutral")
        assert set(s["identity_parameters"]) == set(sf.IDENTITY_PARAMETERS)
        mesh = trimesh.load(default_scans / s["path"], process=False)
        v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
        assert v.shape == (topo.n_vertices, 3) and f.shape == (topo.n_triangles, 3)
        faces0 = f if faces0 is None else faces0
        np.testing.assert_array_equal(f, faces0)
        assert list(s["landmarks_mm"]) == list(LANDMARK_NAMES)
        for name, idx in manifest["landmark_vertex_indices"].items():
            np.testing.assert_allclose(s["landmarks_mm"][name], v[idx], atol=1e-3)
        eye = np.linalg.norm(np.subtract(s["landmarks_mm"]["right_eye_outer_corner"],
                                         s["landmarks_mm"]["left_eye_outer_corner"]))
        assert 85 <= eye <= 105
        if not s["neutral"]:
            assert 0.8 <= s["expression_intensity"] <= 1.0
    # The meshes are the generator's faces (float32 on disk).
    first = scans[0]
    v = np.asarray(trimesh.load(default_scans / first["path"], process=False).vertices)
    ref = sf.make_face(first["identity_parameters"], "neutral", 1.0,
                       detail_seed=int(np.random.default_rng([3, 0, 1]).integers(0, 2 ** 31 - 1)))[0]
    np.testing.assert_allclose(v, ref, atol=1e-4)


def test_generation_is_deterministic_by_seed(tmp_path):
    kw = dict(n_identities=2, expressions=["neutral", "smile"])
    a = sf.generate_scan_folder(tmp_path / "a", seed=5, **kw)
    b = sf.generate_scan_folder(tmp_path / "b", seed=5, **kw)
    c = sf.generate_scan_folder(tmp_path / "c", seed=6, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 5
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel in ("id00/neutral.ply", "id01/smile.ply"):
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
    # The two people of one folder differ, and person i does not depend on the folder size.
    assert (a / "id00/neutral.ply").read_bytes() != (a / "id01/neutral.ply").read_bytes()
    d = sf.generate_scan_folder(tmp_path / "d", seed=5, n_identities=1, expressions=["smile"])
    assert (d / "id00/smile.ply").read_bytes() == (a / "id00/smile.ply").read_bytes()


def test_generation_is_fast(person):
    start = time.perf_counter()
    for expr in sf.EXPRESSIONS:
        sf.make_face(person, expr, detail_seed=1)
    per_scan = (time.perf_counter() - start) / len(sf.EXPRESSIONS)
    assert per_scan < 0.2     # 8 x 11 scans well under 20 s


# ---------------------------------------------------------------------------------------------------- preview

def test_render_mesh_shades_a_face(person):
    v, f = sf.make_face(person, "smile")
    img = render_mesh(v, f, size=(120, 150))
    assert img.shape == (150, 120, 3) and img.dtype == np.uint8
    bg = img[0, 0].astype(int)
    center = img[50:100, 35:85].astype(int)
    face_px = np.abs(center - bg).sum(-1) > 30
    assert face_px.mean() > 0.9                          # the middle is covered by the face
    assert center.std() > 8                              # shaded, not a flat silhouette
    gray = center.mean(-1)
    assert gray.max() - gray.min() > 60
    # Views other than the front work and differ.
    side = render_mesh(v, f, size=(120, 150), view="left")
    assert np.abs(side.astype(int) - img.astype(int)).mean() > 5


def test_render_mesh_face_colours():
    # Two front-facing triangles side by side, coloured per face: each half of the image takes its
    # face's hue (shading scales all three channels alike, so the dominant channel is the colour's).
    v = np.array([[-1.0, -1, 0], [0, -1, 0], [0, 1, 0], [-1, 1, 0], [1, -1, 0], [1, 1, 0]])
    f = np.array([[0, 1, 2], [0, 2, 3], [1, 4, 5], [1, 5, 2]])
    colours = np.array([[0.9, 0.1, 0.1], [0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.1, 0.9]])
    img = render_mesh(v, f, size=(100, 100), bounds=(-1.0, 1.0, -1.0, 1.0), face_colors=colours).astype(int)
    left, right = img[30:70, 10:40].reshape(-1, 3), img[30:70, 60:90].reshape(-1, 3)
    assert (left[:, 0] > left[:, 2] + 60).all() and (right[:, 2] > right[:, 0] + 60).all()
    plain = render_mesh(v, f, size=(100, 100), bounds=(-1.0, 1.0, -1.0, 1.0)).astype(int)
    skin = plain[30:70, 10:90].reshape(-1, 3)
    assert (skin[:, 0] > skin[:, 1]).all() and (skin[:, 1] > skin[:, 2]).all()   # skin: R > G > B


def test_render_grid_and_folder_preview(default_scans, tmp_path, person):
    from PIL import Image

    rows = [[sf.make_face(person, e) for e in ("neutral", "mouth_open")], [None, sf.make_face(person, "smile")]]
    out = render_grid(rows, ["a", "b"], ["neutral", "mouth_open"], tmp_path / "grid.png", cell=(80, 100))
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] >= 200 and img.shape[1] >= 160
    png = preview_scan_folder(default_scans, tmp_path / "preview.png")
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[0] > 2 * 200 and img.shape[1] > 3 * 160       # 2 identities x 3 expressions
    assert img.std() > 20
    # Each cell has a shaded face in its middle.
    left, top, cw, ch = img.shape[1] - 3 * 160, img.shape[0] - 2 * 200, 160, 200
    for i in range(2):
        for j in range(3):
            cell = img[top + i * ch: top + (i + 1) * ch, left + j * cw: left + (j + 1) * cw]
            mid = cell[ch // 4: 3 * ch // 4, cw // 4: 3 * cw // 4]
            assert (np.abs(mid - cell[2, 2]).sum(-1) > 30).mean() > 0.8
            assert mid.std() > 8
