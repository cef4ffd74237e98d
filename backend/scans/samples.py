"""One scan -> SDF samples in the model frame (ImFace++ §4.1), CPU only, no OpenGL/EGL.

Rigid alignment to the canonical frontal frame from the landmarks and normalisation (`frame.py`);
crop to the unit sphere; stray pieces and spikes removed (`remove_strays`: what a raw scanner adds
around a face: hair fragments, a separate neck or shoulders, floating specks); a clear error when what
is left is not a face; hidden-surface removal by ray casting along +z and a pseudo-watertight surface
from a Delaunay triangulation of the visible x-y coordinates (`front_surface`); then SDF samples
(near-surface N(0, 1 cm) offsets and uniform in the sphere) with exact signed distances and unit
gradients, surface points with normals, and the transformed landmarks.

Training's preprocessing (`training.data.preprocess`: a whole folder, cached, in parallel) and fitting
(`backend.fitting.targets.target_from_scan`) both call `preprocess_scan`, so a fit sees the same kind
of samples the codes were trained on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from backend.config_loader import config_from_dict
from backend.geometry.alignment import apply_transform
from backend.geometry.heightfield import (
    delaunay_heightfield,
    non_manifold_edge_count,
    self_intersecting_faces,
    visible_vertices,
)
from backend.geometry.face_region import piece_labels, triangle_areas
from backend.geometry.signed_distance import closest_points, heightfield_signed_distance

from .folder import DEFAULT_MAX_TRIANGLES, LoadedScan, ScanError
from .frame import MM_PER_UNIT, normalization_transform
from .landmarks import LANDMARK_NAMES, NOSE_TIP

SAMPLES_FORMAT = "imface-samples/1"  # the tag of every sample file and index.json (docs/samples-format.md)


@dataclass
class PreprocessConfig:
    n_near: int = 125_000
    n_uniform: int = 125_000
    near_sigma_mm: float = 10.0        # N(0, 1 cm) offsets around the surface
    n_surface: int = 50_000            # on-surface points with normals
    landmark_tolerance_mm: float = 5.0  # a landmark farther than this from the mesh is "off the surface"
    max_triangles: int = DEFAULT_MAX_TRIANGLES
    check_self_intersections: bool = True
    alignment: Literal["eyes_nose", "all_five"] = "eyes_nose"  # landmarks the rotation comes from (frame.py)
    remove_strays: bool = True          # drop stray pieces and spikes before the height field (remove_strays)
    spike_mm: float = 4.0               # a vertex this far off its neighbours' surface is a spike ...
    spike_edges: float = 4.0            # ... and more than this many times its neighbours' spread
    min_face_area_cm2: float = 60.0     # less visible surface than this left in the sphere: not a face
    occlusion_tolerance_mm: float = 1.0  # a vertex covered by surface less than this above it is visible
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        """Settings from JSON/YAML data (the one config loader: typed, bad fields named)."""
        return config_from_dict(cls, d, "preprocess")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ScanSamples:
    """What preprocessing produces for one scan (see docs/samples-format.md)."""

    tensors: dict[str, np.ndarray]
    warnings: list[str]
    pseudo_watertight: tuple[np.ndarray, np.ndarray]  # (vertices, faces) in model units


def _sample_in_unit_sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return direction * rng.random(n)[:, None] ** (1 / 3)


def _sample_on_surface(rng: np.random.Generator, vertices: np.ndarray, faces: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform points on a triangle mesh, and the index of their triangle."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    tri = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    outside = u + v > 1
    u[outside], v[outside] = 1 - u[outside], 1 - v[outside]
    points = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    return points, tri


def preprocess_scan(scan: LoadedScan, cfg: PreprocessConfig, dense: bool = False) -> ScanSamples:
    """Run the §4.1 pipeline on one loaded scan. Raises ScanError for scans it cannot use."""
    key = scan.entry.key
    notes = list(scan.warnings)
    rng = np.random.default_rng([cfg.seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")])

    # Landmarks must lie on the scan: one far from the surface means a wrong file or wrong indices.
    lm_distance, _, _ = closest_points(scan.landmarks, scan.vertices, scan.faces)
    off = lm_distance > cfg.landmark_tolerance_mm
    if off.any():
        names = ", ".join(f"{LANDMARK_NAMES[i]} ({lm_distance[i]:.1f} mm)" for i in np.flatnonzero(off))
        raise ScanError(key, f"landmark(s) off the surface by more than {cfg.landmark_tolerance_mm} mm: {names}")

    n_nonmanifold = non_manifold_edge_count(scan.faces)
    if n_nonmanifold:
        notes.append(f"non-manifold mesh: {n_nonmanifold} edges shared by more than two triangles "
                     "(harmless here: the surface is rebuilt from the visible vertices)")

    to_model = normalization_transform(scan.landmarks, cfg.alignment)
    vertices = apply_transform(to_model, scan.vertices)
    landmarks = apply_transform(to_model, scan.landmarks)

    # Crop: keep triangles whose three vertices lie in the unit sphere.
    inside = np.linalg.norm(vertices, axis=1) <= 1.0
    faces = scan.faces[inside[scan.faces].all(axis=1)]
    if len(faces) == 0:
        raise ScanError(key, "no triangle lies within 10 cm of the point 4 cm behind the nose tip: "
                             "is this a face scan with correct landmarks?")
    if cfg.check_self_intersections:
        crossing = self_intersecting_faces(vertices, faces)
        if len(crossing):
            notes.append(f"self-intersecting mesh: {len(crossing)} triangles cross others "
                         "(hidden parts are removed and the surface rebuilt from what the viewer sees)")
    if cfg.remove_strays:
        faces, removed = remove_strays(vertices, faces, landmarks, cfg.spike_mm, cfg.spike_edges)
        if removed:
            notes.append(removed)
        _check_face(key, vertices, faces, landmarks, cfg, removed)

    visible = visible_mask(vertices, faces, cfg.occlusion_tolerance_mm / MM_PER_UNIT)
    if visible.sum() < 100:
        raise ScanError(key, f"only {int(visible.sum())} visible vertices in the face region: "
                             "the scan does not face +z or is too sparse")
    try:
        surface_vertices, surface_faces = front_surface(vertices, faces, visible)
    except Exception as exc:  # qhull errors on degenerate input
        raise ScanError(key, f"cannot triangulate the visible surface: {exc}") from None
    if cfg.remove_strays:
        footprint_cm2 = triangle_areas(surface_vertices[:, :2] @ np.eye(2, 3), surface_faces).sum() * MM_PER_UNIT ** 2 / 100
        if footprint_cm2 < cfg.min_face_area_cm2:
            raise ScanError(key, f"what is left is not a face: it covers {footprint_cm2:.0f} cm² seen from the front "
                                 f"within 10 cm of the face centre, where a face covers {cfg.min_face_area_cm2:.0f} "
                                 "cm² or more (a partial view? fit it as a point cloud)")
    e1 = surface_vertices[surface_faces[:, 1]] - surface_vertices[surface_faces[:, 0]]
    e2 = surface_vertices[surface_faces[:, 2]] - surface_vertices[surface_faces[:, 0]]
    normals = np.cross(e1, e2)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-300)

    # Near-surface samples: surface points plus N(0, sigma) offsets, kept inside the sphere.
    sigma = cfg.near_sigma_mm / MM_PER_UNIT
    near_chunks, have = [], 0
    while have < cfg.n_near:
        base, _ = _sample_on_surface(rng, surface_vertices, surface_faces, int((cfg.n_near - have) * 1.1) + 16)
        cand = base + rng.standard_normal(base.shape) * sigma
        cand = cand[np.linalg.norm(cand, axis=1) <= 1.0]
        near_chunks.append(cand)
        have += len(cand)
    near = np.concatenate(near_chunks)[: cfg.n_near]
    uniform = _sample_in_unit_sphere(rng, cfg.n_uniform)
    points = np.concatenate([near, uniform])
    sdf, gradients = heightfield_signed_distance(points, surface_vertices, surface_faces, normals)

    surface_points, surface_tri = _sample_on_surface(rng, surface_vertices, surface_faces, cfg.n_surface)
    tensors = {
        "points": points.astype(np.float32),
        "sdf": sdf.astype(np.float32),
        "gradients": gradients.astype(np.float32),
        "surface_points": surface_points.astype(np.float32),
        "surface_normals": normals[surface_tri].astype(np.float32),
        "landmarks": landmarks.astype(np.float32),
        "normalized_from_scan": to_model,
    }
    if dense:
        tensors["dense_points"] = vertices.astype(np.float32)
        tensors["dense_valid"] = (visible & inside).astype(np.uint8)
    return ScanSamples(tensors, notes, (surface_vertices, surface_faces))


# ------------------------------------------------------------------------------ the visible surface


def visible_mask(vertices: np.ndarray, faces: np.ndarray, tolerance: float = 0.01) -> np.ndarray:
    """(V,) bool: vertices used by `faces` that a viewer at z = +inf sees (model frame). A vertex covered
    only by surface within `tolerance` above it (the folds of a noisy scan, 1 mm by default) counts as
    seen; eyelids over eyeballs and lips over the mouth's inside are several millimetres thick."""
    used = np.zeros(len(vertices), dtype=bool)
    used[faces] = True
    visible = np.zeros(len(vertices), dtype=bool)
    if used.any():
        visible[used] = visible_vertices(vertices, faces, eps=tolerance)[used]
    return visible


def front_surface(vertices: np.ndarray, faces: np.ndarray, visible: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The §4.1 pseudo-watertight surface of a mesh in the model frame: what a viewer at z = +inf sees,
    re-triangulated as one height-field sheet (Delaunay of the visible vertices' x-y), every hole closed.
    Training's ground truth and both sides of the evaluation are made by this one function."""
    visible = visible_mask(vertices, faces) if visible is None else visible
    surface_vertices = np.asarray(vertices)[visible]
    return surface_vertices, delaunay_heightfield(surface_vertices)


# ------------------------------------------------------------------------------ raw-scan cleaning


def remove_strays(vertices: np.ndarray, faces: np.ndarray, landmarks: np.ndarray, spike_mm: float = 4.0,
                  spike_edges: float = 4.0, opening_depth_mm: float = 30.0) -> tuple[np.ndarray, str]:
    """What a scanner adds around a face, removed before the height field (model frame, cropped faces).

    * Pieces: the face is the connected piece nearest to the nose-tip landmark. Another piece is kept
      only when what a viewer at the front sees of it is seen through an opening of the face (eyeballs
      through the lids, teeth through the lips): at least 90 % of its unhidden vertices inside the
      face's outline with its openings filled (not in a gap the outline leaves open, such as under the
      jaw), not in front of the face and at most `opening_depth_mm` behind the face around it (eyeballs
      and teeth are, the back of a head seen through an open mouth is not). Anything else (hair fragments, a separate neck or
      shoulders, the sides of a head, floating specks) would become part of the height field, and goes.
    * Spikes: a vertex farther than `spike_mm`, and than `spike_edges` times its neighbours' spread, from
      the plane of its neighbours takes its triangles with it.
    Returns the faces kept and a note ("" when nothing was removed)."""
    import trimesh

    v = np.asarray(vertices, dtype=np.float64)
    labels = piece_labels(faces, len(v))
    _, _, tri = closest_points(landmarks[NOSE_TIP:NOSE_TIP + 1], v, faces)
    face_piece = labels[tri[0]]
    keep = labels == face_piece
    dropped_pieces, dropped_area = 0, 0.0
    others = np.unique(labels[~keep])
    if len(others):
        main = trimesh.Trimesh(v, faces[keep], process=False, validate=False)
        inside_outline = _enclosed_footprint(v, faces[keep])
        from scipy.spatial import cKDTree

        face_v = v[np.unique(faces[keep])]
        rim = cKDTree(face_v[:, :2])
        opening_depth = opening_depth_mm / MM_PER_UNIT

        def rim_depth(points: np.ndarray) -> np.ndarray:
            """How far behind the face around it (its highest vertex within 10 mm in x-y) each point lies."""
            near = rim.query_ball_point(points[:, :2], 0.1)
            return np.array([face_v[i, 2].max() - p[2] if i else np.inf for i, p in zip(near, points)])

        area = triangle_areas(v, faces)
        up = np.array([0.0, 0.0, 1.0])
        for lab in others:
            sel = labels == lab
            pv = v[np.unique(faces[sel])]
            hidden = main.ray.intersects_any(pv + 1e-6 * up, np.broadcast_to(up, pv.shape).copy())
            seen = pv[~hidden]
            if len(seen):
                over = main.ray.intersects_any(seen - 1e-6 * up, np.broadcast_to(-up, seen.shape).copy())
                through_opening = inside_outline(seen) & ~over & (rim_depth(seen) <= opening_depth)
            if len(seen) == 0 or np.mean(through_opening) >= 0.9:
                keep |= sel
            else:
                dropped_pieces += 1
                dropped_area += float(area[sel].sum())
    faces = faces[keep]
    spikes = _spikes(v, faces, spike_mm / MM_PER_UNIT, spike_edges)
    if spikes.any():
        faces = faces[~spikes[faces].any(axis=1)]
    notes = []
    if dropped_pieces:
        notes.append(f"{dropped_pieces} stray piece(s) removed (hair, neck, specks: not seen through an opening of the face; "
                     f"{dropped_area * MM_PER_UNIT ** 2 / 100:.1f} cm²)")
    if spikes.any():
        notes.append(f"{int(spikes.sum())} spike vertices removed")
    return faces, "; ".join(notes)


def _enclosed_footprint(vertices: np.ndarray, faces: np.ndarray, cell: float = 0.01):
    """A test `inside(points) -> bool` for the face's footprint seen from the front (x-y) with its enclosed
    openings (eyes, mouth) filled: a 1 mm raster of dense samples of the face's triangles, closed by one
    cell, holes filled."""
    from scipy import ndimage

    n = int(np.ceil(triangle_areas(vertices, faces).sum() / (0.3 * cell) ** 2))
    pts, _ = _sample_on_surface(np.random.default_rng(0), vertices, faces, min(n, 2_000_000))
    pts = np.concatenate([pts, vertices[np.unique(faces)]])[:, :2]
    lo = pts.min(0) - 2 * cell
    shape = tuple(np.ceil((pts.max(0) + 2 * cell - lo) / cell).astype(int) + 1)
    grid = np.zeros(shape, dtype=bool)
    ij = np.floor((pts - lo) / cell).astype(int)
    grid[ij[:, 0], ij[:, 1]] = True
    grid = ndimage.binary_fill_holes(ndimage.binary_closing(grid, iterations=1))

    def inside(points: np.ndarray) -> np.ndarray:
        k = np.floor((np.asarray(points)[:, :2] - lo) / cell).astype(int)
        ok = (k >= 0).all(1) & (k[:, 0] < shape[0]) & (k[:, 1] < shape[1])
        out = np.zeros(len(k), dtype=bool)
        out[ok] = grid[k[ok, 0], k[ok, 1]]
        return out

    return inside


def _spikes(vertices: np.ndarray, faces: np.ndarray, spike: float, spike_edges: float) -> np.ndarray:
    """(V,) bool: vertices far off the plane of their neighbours (its normal: the neighbours' smallest
    principal axis, so the spike's own steep triangles do not tilt it), farther than `spike` and than
    `spike_edges` times the neighbours' spread."""
    if len(faces) == 0:
        return np.zeros(len(vertices), dtype=bool)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.unique(np.sort(e, axis=1), axis=0)
    e = np.concatenate([e, e[:, ::-1]])                     # both directions: (vertex, neighbour)
    n = len(vertices)
    deg = np.bincount(e[:, 0], minlength=n).astype(np.float64)
    nb = vertices[e[:, 1]]
    mean = np.zeros((n, 3))
    second = np.zeros((n, 3, 3))
    np.add.at(mean, e[:, 0], nb)
    np.add.at(second, e[:, 0], nb[:, :, None] * nb[:, None, :])
    ok = deg >= 3
    mean[ok] /= deg[ok, None]
    cov = np.zeros((n, 3, 3))
    cov[ok] = second[ok] / deg[ok, None, None] - mean[ok, :, None] * mean[ok, None, :]
    w, vec = np.linalg.eigh(cov)                            # ascending eigenvalues
    normal = vec[:, :, 0]
    off = np.abs(np.einsum("ij,ij->i", vertices - mean, normal))
    spread = np.sqrt(np.maximum(w[:, 2], 0.0))
    return ok & (off > spike) & (off > spike_edges * spread)


def _check_face(key: str, vertices: np.ndarray, faces: np.ndarray, landmarks: np.ndarray, cfg: PreprocessConfig,
                removed: str) -> None:
    """ScanError unless what is left can be a face: something, with the five landmarks on it (the
    footprint is checked once the height field is made)."""
    after = f" (after {removed})" if removed else ""
    if len(faces) == 0:
        raise ScanError(key, f"nothing is left of the scan in the face region{after}: not a face scan, or "
                             "wrong landmarks")
    d, _, _ = closest_points(landmarks, vertices, faces)
    off = d * MM_PER_UNIT > cfg.landmark_tolerance_mm
    if off.any():
        names = ", ".join(f"{LANDMARK_NAMES[i]} ({d[i] * MM_PER_UNIT:.1f} mm)" for i in np.flatnonzero(off))
        raise ScanError(key, f"what is left is not a face{after}: landmark(s) {names} are off the remaining "
                             "surface")
