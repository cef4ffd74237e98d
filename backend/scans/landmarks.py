"""The five facial landmarks every scan carries, and where they sit in the canonical frame.

Frame convention (shared by scans, the generator and the model): +y up, +z out of the face (the face
looks toward +z), +x toward the subject's left, so the subject's right eye has negative x.
"""
from __future__ import annotations

import numpy as np

LANDMARK_NAMES: tuple[str, ...] = (
    "right_eye_outer_corner",
    "left_eye_outer_corner",
    "nose_tip",
    "right_mouth_corner",
    "left_mouth_corner",
)
NOSE_TIP = LANDMARK_NAMES.index("nose_tip")

# Typical adult landmark positions in mm, relative to the nose tip (close to the ICT-FaceKit mean face).
# Only directions matter for the rigid alignment; scale is kept from the scan itself.
CANONICAL_LANDMARKS_MM: np.ndarray = np.array(
    [
        [-44.0, 32.0, -49.0],
        [44.0, 32.0, -49.0],
        [0.0, 0.0, 0.0],
        [-25.0, -39.0, -30.0],
        [25.0, -39.0, -30.0],
    ],
    dtype=np.float64,
)
