"""One scan -> SDF samples in the model frame (ImFace++ §4.1), CPU only, no OpenGL/EGL.

Rigid alignment to the canonical frontal frame from the landmarks and normalisation (`frame.py`);
crop to the unit sphere; hidden-surface removal by ray casting along +z; a pseudo-watertight surface
from a Delaunay triangulation of the visible x-y coordinates; then SDF samples (near-surface
N(0, 1 cm) offsets and uniform in the sphere) with exact signed distances and unit gradients, surface
points with normals, and the transformed landmarks.

Training's preprocessing (`training.data.preprocess`: a whole folder, cached, in parallel) and fitting
(`backend.fitting.targets.target_from_scan`) both call `preprocess_scan`, so a fit sees the same kind
of samples the codes were trained on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from backend.config_loader import config_from_dict
from backend.geometry.alignment import apply_transform
from backend.geometry.heightfield import (
    delaunay_heightfield,
    non_manifold_edge_count,
    self_intersecting_faces,
    visible_vertices,
)
from backend.geometry.signed_distance import closest_points, heightfield_signed_distance

from .folder import DEFAULT_MAX_TRIANGLES, LoadedScan, ScanError
from .frame import MM_PER_UNIT, normalization_transform
from .landmarks import LANDMARK_NAMES

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

    to_model = normalization_transform(scan.landmarks)
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

    used = np.zeros(len(vertices), dtype=bool)
    used[faces] = True
    visible = np.zeros(len(vertices), dtype=bool)
    visible[used] = visible_vertices(vertices, faces)[used]
    surface_vertices = vertices[visible]
    if len(surface_vertices) < 100:
        raise ScanError(key, f"only {len(surface_vertices)} visible vertices in the face region: "
                             "the scan does not face +z or is too sparse")
    try:
        surface_faces = delaunay_heightfield(surface_vertices)
    except Exception as exc:  # qhull errors on degenerate input
        raise ScanError(key, f"cannot triangulate the visible surface: {exc}") from None
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
