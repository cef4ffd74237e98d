"""Turning an open scan into the pseudo-watertight surface of ImFace++ §4.1.

Seen along the viewing axis (+z), a frontal face is a height field once the surfaces that the
viewer cannot see (nostrils, mouth interior, folds) are removed. Re-triangulating the visible
vertices by a Delaunay triangulation of their x-y coordinates gives one oriented sheet with every
hole closed, which has a well-defined inside (behind, -z) and outside (in front, +z).
"""
from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import Delaunay


def visible_vertices(vertices: np.ndarray, faces: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Boolean mask of vertices that a viewer at z = +inf sees: a ray cast from each vertex
    toward +z hits no triangle. `eps` lifts the ray origin off the vertex's own triangles."""
    mesh = trimesh.Trimesh(vertices, faces, process=False, validate=False)
    origins = vertices + np.array([0.0, 0.0, eps])
    directions = np.broadcast_to(np.array([0.0, 0.0, 1.0]), origins.shape)
    occluded = mesh.ray.intersects_any(origins, np.ascontiguousarray(directions))
    return ~np.asarray(occluded, dtype=bool)


def delaunay_heightfield(points: np.ndarray) -> np.ndarray:
    """Triangles (T, 3) of the Delaunay triangulation of the x-y coordinates of `points`, each wound
    so that its normal has a positive z component (outside = toward the viewer)."""
    if len(points) < 3:
        raise ValueError("fewer than 3 visible points: nothing to triangulate")
    triangles = Delaunay(points[:, :2]).simplices.astype(np.int64)
    a, b, c = (points[triangles[:, i], :2] for i in range(3))
    cross_z = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    flip = cross_z < 0
    triangles[flip] = triangles[flip][:, [0, 2, 1]]
    return triangles[cross_z != 0]


def self_intersecting_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Indices of faces crossed by an edge of a face they share no vertex with.

    Two triangles in general position intersect exactly when an edge of one pierces the other, so
    casting every edge as a ray segment and keeping hits closer than the edge length finds them."""
    mesh = trimesh.Trimesh(vertices, faces, process=False, validate=False)
    edges = mesh.edges_unique
    starts = vertices[edges[:, 0]]
    vectors = vertices[edges[:, 1]] - starts
    lengths = np.linalg.norm(vectors, axis=1)
    keep = lengths > 0
    edges, starts, vectors, lengths = edges[keep], starts[keep], vectors[keep], lengths[keep]
    directions = vectors / lengths[:, None]
    locations, ray_idx, tri_idx = mesh.ray.intersects_location(starts, directions, multiple_hits=True)
    if len(ray_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    along = np.einsum("ij,ij->i", locations - starts[ray_idx], directions[ray_idx])
    inside = (along > 1e-9 * lengths[ray_idx]) & (along < lengths[ray_idx] * (1 - 1e-9))
    edge_vertices = edges[ray_idx]
    tri_vertices = faces[tri_idx]
    shares = (tri_vertices[:, :, None] == edge_vertices[:, None, :]).any(axis=(1, 2))
    hit = inside & ~shares
    return np.unique(tri_idx[hit])


def non_manifold_edge_count(faces: np.ndarray) -> int:
    """Number of edges used by more than two triangles."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int((counts > 2).sum())
