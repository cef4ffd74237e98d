"""The face region: which part of a surface in the model frame is "the face".

Marching cubes of a face's SDF gives a closed shell: the face, plus a cap where the field meets the
sampling sphere (outside it the model is undefined and the extraction closes the surface on it), plus
a rim where the learned surface runs on past what any training scan showed. What the product hands out
(`imface fit`, `imface extract`, training previews, the server's meshes) is the face alone, by one rule:

A point p of a surface belongs to the face when
  1. its template-space coordinates t = I(E(p)) lie within `crop_mm` of the region the training scans
     covered in template space: the model's template vertices (`template_dense`, the mean neutral
     training face vertex by vertex, shared-topology training); and
  2. p lies at least `sphere_margin_mm` inside the sampling sphere |p| <= 1 (model frame), so no part of
     the closing cap is kept.
Of the triangles whose three vertices belong, plus every excluded patch they enclose (one that does not
reach the sampling sphere: a spot where an imperfect warp strays off the covered region is a hole, not an
edge), the largest connected piece (by area) is the face.

A model trained without shared topology stores no template vertices; condition 1 is then |t| <= 0.95
(`fallback_radius_mm`), as for the template mesh. The topology-consistent template mesh of the animation
decode (`backend.animation_decode.extract_template_mesh`: 4 mm from the template vertices, else 0.95) is
this rule applied to the template surface itself (t = p there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.units import MM_PER_UNIT


@dataclass(frozen=True)
class FaceRegion:
    """The face-region rule (see the module docstring); lengths in mm."""

    crop_mm: float = 4.0             # how far beyond the covered template region a point may lie
    sphere_margin_mm: float = 1.5    # how far inside the sampling sphere a point must lie
    fallback_radius_mm: float = 95.0  # no template vertices: |t| within this of the origin

    @staticmethod
    def covered(template_dense: np.ndarray | None) -> np.ndarray | None:
        """The covered template region as points (model units): the template vertices. (Where a scan ran
        past the sampling sphere, its template vertex may lie outside it: condition 2 cuts there.)"""
        return None if template_dense is None else np.asarray(template_dense, dtype=np.float64).reshape(-1, 3)

    def vertex_mask(self, points: np.ndarray, template_points: np.ndarray,
                    template_dense: np.ndarray | None) -> np.ndarray:
        """(V,) bool: vertices (model units, observation space) whose template coordinates (model units)
        lie on the covered region and which lie inside the sampling sphere by the margin."""
        from scipy.spatial import cKDTree

        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        t = np.asarray(template_points, dtype=np.float64).reshape(-1, 3)
        keep = np.linalg.norm(p, axis=1) <= 1.0 - self.sphere_margin_mm / MM_PER_UNIT
        cover = self.covered(template_dense)
        if cover is not None and len(cover):
            d, _ = cKDTree(cover).query(t, k=1, distance_upper_bound=self.crop_mm / MM_PER_UNIT * 1.0001,
                                        workers=-1)
            keep &= d <= self.crop_mm / MM_PER_UNIT
        else:
            keep &= np.linalg.norm(t, axis=1) <= self.fallback_radius_mm / MM_PER_UNIT
        return keep

    def trim(self, vertices: np.ndarray, faces: np.ndarray, template_points: np.ndarray,
             template_dense: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The face of a surface (model units): triangles whose vertices all belong, largest piece by area,
        unused vertices dropped (vertex order otherwise kept)."""
        v = np.asarray(vertices, dtype=np.float64)
        keep = self.vertex_mask(v, template_points, template_dense)
        faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
        if len(faces) == 0:
            return compact(vertices, faces)
        kept = keep[faces].all(axis=1)
        # Excluded patches that never come near the sphere are enclosed by the face: fill them back.
        near_sphere = np.linalg.norm(v, axis=1) > 1.0 - self.sphere_margin_mm / MM_PER_UNIT
        out = faces[~kept]
        if len(out):
            labels = piece_labels(out, len(v))
            reaches = np.zeros(labels.max() + 1, dtype=bool)
            np.logical_or.at(reaches, labels, near_sphere[out].any(axis=1))
            enclosed = np.flatnonzero(~kept)[~reaches[labels]]
            kept[enclosed] = True
        return compact(vertices, largest_piece(v, faces[kept]))


def piece_labels(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """Per triangle, a label of its connected piece (triangles sharing a vertex; labels not consecutive)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(faces) == 0:
        return np.zeros(0, dtype=np.int64)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adj = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices))
    _, labels = connected_components(adj, directed=False)
    return labels[faces[:, 0]].astype(np.int64)


def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = (np.asarray(vertices, dtype=np.float64)[faces[:, i]] for i in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def largest_piece(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces of the largest connected piece by area (stray islands dropped)."""
    if len(faces) == 0:
        return faces
    labels = piece_labels(faces, len(vertices))
    area = np.bincount(labels, weights=triangle_areas(vertices, faces))
    return faces[labels == int(np.argmax(area))]


def compact(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the vertices no triangle uses (the others keep their order)."""
    used = np.zeros(len(vertices), dtype=bool)
    used[np.asarray(faces, dtype=np.int64).ravel()] = True
    remap = np.cumsum(used) - 1
    return np.asarray(vertices)[used], remap[faces].astype(np.int64).reshape(-1, 3)


def boundary_edges(faces: np.ndarray) -> np.ndarray:
    """(E, 2) edges used by exactly one triangle (the open border of a surface)."""
    if len(faces) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    uniq, counts = np.unique(e, axis=0, return_counts=True)
    return uniq[counts == 1]
