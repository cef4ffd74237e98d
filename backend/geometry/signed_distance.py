"""Exact signed distance to the pseudo-watertight height-field surface, with its gradient."""
from __future__ import annotations

import igl
import numpy as np


def closest_points(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact closest points on a triangle mesh (libigl's AABB tree, float64).

    Returns (distance (N,), closest point (N, 3), triangle index (N,))."""
    sq, tri, closest = igl.point_mesh_squared_distance(
        np.ascontiguousarray(points, dtype=np.float64),
        np.ascontiguousarray(vertices, dtype=np.float64),
        np.ascontiguousarray(faces, dtype=np.int64),
    )
    return np.sqrt(np.maximum(sq, 0.0)), closest, np.asarray(tri, dtype=np.int64)


def heightfield_signed_distance(
    points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, face_normals: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance and unit gradient to a height-field surface seen from +z (ImFace++ §4.1).

    The sign follows the angle between the offset to the nearest surface point and +z: in front of the
    face is positive, behind negative. The gradient is the unit offset times that sign; for points on
    the surface itself (offset ~ 0) it is the normal of the closest triangle."""
    distance, closest, tri = closest_points(points, vertices, faces)
    offset = points - closest
    normal_of_closest = face_normals[tri]
    # Sign from the offset's z; where the offset is numerically zero or horizontal, from the closest
    # triangle's normal, which always points toward +z on this surface.
    dz = offset[:, 2]
    side = np.where(np.abs(dz) > 1e-12, dz, np.einsum("ij,ij->i", offset, normal_of_closest))
    sign = np.where(side >= 0, 1.0, -1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        gradient = offset / distance[:, None] * sign[:, None]
    tiny = distance < 1e-9
    gradient[tiny] = normal_of_closest[tiny]
    return sign * distance, gradient
