"""Rigid alignment of a scan to the canonical frontal frame from its landmarks."""
from __future__ import annotations

import numpy as np


def kabsch_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotation R (3x3, det +1) minimising sum ||R @ (s - mean s) - (t - mean t)||^2."""
    s = source - source.mean(axis=0)
    t = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(s.T @ t)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    # The diagonal fix keeps a proper rotation when the best orthogonal map would be a reflection.
    return vt.T @ np.diag([1.0, 1.0, d]) @ u.T


def rigid_transform(
    landmarks: np.ndarray, canonical: np.ndarray, anchor: int, anchor_target: np.ndarray
) -> np.ndarray:
    """4x4 rigid transform that rotates `landmarks` onto the directions of `canonical` and then puts
    landmark `anchor` exactly on `anchor_target`. Scale is never changed: face size is information."""
    rotation = kabsch_rotation(landmarks, canonical)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = anchor_target - rotation @ landmarks[anchor]
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine transform to (N, 3) points."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]
