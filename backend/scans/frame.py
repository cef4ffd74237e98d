"""The model frame, and the way from a scan's own frame into it and back.

ImFace++ §4.1: one model unit is 10 cm and the origin lies 4 cm behind the nose tip; a scan is placed
there by a rigid alignment of its landmarks to the canonical ones (face size is kept: it is identity
information). The rotation comes from the landmarks that do not move with the expression, the outer eye
corners and the nose tip (`ALIGNMENT_LANDMARKS`): the mouth corners move with every smile and open
mouth, and aligning on them tilted the whole head by a few degrees per expression (on ict-faces the
forehead and nose bridge moved 5.8 mm on average between a person's neutral and expression scans with
all five landmarks, 1.8 mm with these three: `python tests/test_alignment_jitter.py`). Every transform
stored with samples, fits and codes files is this `normalized_from_scan` 4x4 (scan frame, mm -> model
frame); `to_scan_frame` is its way back.
"""
from __future__ import annotations

import numpy as np

from backend.geometry.alignment import apply_transform, rigid_transform
from backend.units import MM_PER_UNIT  # noqa: F401  (the model frame's unit; re-exported for its users)

from .landmarks import CANONICAL_LANDMARKS_MM, LANDMARK_NAMES, NOSE_TIP

NOSE_TIP_DEPTH_MM = 40.0   # the nose tip sits at z = +40 mm in the model frame

#: Landmarks the rotation is computed from, by alignment name: "eyes_nose" (default: the outer eye
#: corners and the nose tip, which do not move with the expression) or "all_five" (the former rule).
ALIGNMENTS: dict[str, tuple[int, ...]] = {
    "eyes_nose": tuple(LANDMARK_NAMES.index(n) for n in ("right_eye_outer_corner", "left_eye_outer_corner",
                                                         "nose_tip")),
    "all_five": tuple(range(len(LANDMARK_NAMES))),
}
ALIGNMENT_LANDMARKS = ALIGNMENTS["eyes_nose"]


def normalization_transform(landmarks_mm: np.ndarray, alignment: str = "eyes_nose") -> np.ndarray:
    """4x4 transform from the scan's frame (mm) to the normalised model frame: rotation from the
    `alignment` landmarks (see ALIGNMENTS), then the nose tip placed at (0, 0, 40 mm), then mm -> units."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment {alignment!r} is not one of {', '.join(ALIGNMENTS)}")
    idx = list(ALIGNMENTS[alignment])
    target_nose = np.array([0.0, 0.0, NOSE_TIP_DEPTH_MM])
    lm = np.asarray(landmarks_mm, dtype=np.float64)
    aligned = rigid_transform(lm[idx], CANONICAL_LANDMARKS_MM[idx], idx.index(NOSE_TIP), target_nose)
    scale = np.diag([1 / MM_PER_UNIT] * 3 + [1.0])
    return scale @ aligned


def to_scan_frame(vertices: np.ndarray, scan_from_normalized: np.ndarray | None = None, *,
                  normalized_from_scan: np.ndarray | None = None) -> np.ndarray:
    """Vertices in model units (normalised frame) -> the scan's own frame and units.

    Give either `scan_from_normalized` or the stored `normalized_from_scan` (its inverse is taken).
    (The transform is a similarity; if it ever had a reflection, face winding would flip.)"""
    if (scan_from_normalized is None) == (normalized_from_scan is None):
        raise ValueError("give exactly one of scan_from_normalized / normalized_from_scan")
    if scan_from_normalized is None:
        scan_from_normalized = np.linalg.inv(np.asarray(normalized_from_scan, dtype=np.float64))
    matrix = np.asarray(scan_from_normalized, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError("expected a 4x4 homogeneous transform")
    return apply_transform(matrix, np.asarray(vertices, dtype=np.float64))


def model_to_frame(vertices: np.ndarray, normalized_from_scan: np.ndarray | None = None) -> np.ndarray:
    """Model-unit vertices -> a scan's own frame and units when its transform is given, else the model
    frame in mm (the convention of every mesh the backend writes)."""
    if normalized_from_scan is not None:
        return to_scan_frame(vertices, normalized_from_scan=normalized_from_scan)
    return np.asarray(vertices).astype(np.float64) * MM_PER_UNIT
