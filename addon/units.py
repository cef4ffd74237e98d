"""Units and axes: the ONE place where the model's frame meets Blender's (bpy-free, numpy only).

Model frame: millimetres, +y up, the face looking along +z (x to the face's left when seen from the front
is the viewer's right). Blender: metres, Z up, and the front view (numpad 1) looks along +Y, so a face
that should look at the front-view camera looks along -Y.

The map is a proper rotation of +90 degrees about X followed by a scale of 1/1000:
    (x, y, z)_model_mm  ->  (x, -z, y) / 1000  in Blender metres.
Everything else (matrices for a scan's frame, landmarks picked in the viewport, the inverse) is built
from `MODEL_TO_BLENDER` below, so there is nothing to keep in sync.
"""
from __future__ import annotations

import numpy as np

MM_PER_METRE = 1000.0
# 3x3 rotation taking model axes to Blender axes (columns: where model x, y, z go).
ROTATION = np.array([[1.0, 0.0, 0.0],
                     [0.0, 0.0, -1.0],
                     [0.0, 1.0, 0.0]])
# 4x4 homogeneous map from model millimetres to Blender metres.
MODEL_TO_BLENDER = np.eye(4)
MODEL_TO_BLENDER[:3, :3] = ROTATION / MM_PER_METRE
BLENDER_TO_MODEL = np.linalg.inv(MODEL_TO_BLENDER)


def model_to_blender(vertices_mm: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(V, 3) model-frame millimetres -> (V, 3) float32 C-contiguous Blender metres (Z up).

    This is the function every vertex array from the backend passes through before it reaches a mesh.
    `out` (float32, (V, 3)) is reused when given, so playback allocates nothing per frame."""
    v = np.asarray(vertices_mm)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected (V, 3) vertices, got {v.shape}")
    if out is None:
        out = np.empty(v.shape, dtype=np.float32)
    # Axis permutation + sign and scale written as three column copies: no matrix product, no float64.
    s = np.float32(1.0 / MM_PER_METRE)
    np.multiply(v[:, 0], s, out=out[:, 0], casting="unsafe")
    np.multiply(v[:, 2], -s, out=out[:, 1], casting="unsafe")
    np.multiply(v[:, 1], s, out=out[:, 2], casting="unsafe")
    return out


def blender_to_model(points_m: np.ndarray) -> np.ndarray:
    """(N, 3) Blender metres -> (N, 3) float64 model-frame millimetres (inverse of `model_to_blender`)."""
    p = np.asarray(points_m, dtype=np.float64).reshape(-1, 3)
    return p @ BLENDER_TO_MODEL[:3, :3].T


def matrix_to_blender(transform_mm: np.ndarray) -> np.ndarray:
    """A 4x4 transform acting on model millimetres, expressed on Blender metres: C @ T @ C^-1.

    Used for the object matrix that places a face fitted to a scan on that scan: the mesh data stays in
    the model frame (converted), and the object carries scan_from_model (converted)."""
    t = np.asarray(transform_mm, dtype=np.float64).reshape(4, 4)
    return MODEL_TO_BLENDER @ t @ BLENDER_TO_MODEL


def scan_points_to_blender(points: np.ndarray, units_to_mm: float = 1.0) -> np.ndarray:
    """Points of a scan in its own units (same axes convention as the model: +y up) -> Blender metres."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3) * float(units_to_mm)
    return model_to_blender(p)


MM_PER_MODEL_UNIT = 100.0   # the model's normalised frame: 1 unit = 100 mm (nose tip at (0, 0, 0.4))


def scan_from_model_mm(normalized_from_scan, units_to_mm: float = 1.0) -> np.ndarray:
    """4x4 taking model-frame mm to a fitted scan's own frame, in mm. `normalized_from_scan` is the fit's
    transform from the scan (in its units) to the normalised model frame (100 mm units)."""
    n = np.asarray(normalized_from_scan, dtype=np.float64).reshape(4, 4)
    return (np.diag([units_to_mm] * 3 + [1.0]) @ np.linalg.inv(n)
            @ np.diag([1.0 / MM_PER_MODEL_UNIT] * 3 + [1.0]))
