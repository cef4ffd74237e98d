"""Expression capture: how much of a person's expression motion a reconstructed surface reproduces.

Mean surface errors (Chamfer, EDE) hide a washed-out expression, because most of a face does not move
between neutral and any expression. Capture looks only where the ground truth moves:

    M = ground-truth expression vertices that lie more than `move_mm` from their own neutral position
        and face the viewer (vertex normal · view direction > 0),
    capture = 1 - mean_{v in M} d(v, reconstructed surface) / mean_{v in M} d(v, ground-truth neutral surface).

A reconstruction that reproduces the expression scores 1; one that stays neutral scores 0; one that
moves half way scores about 0.5; overshooting or moving the wrong way moves the vertices away from the
reconstruction again and scores lower (below 0 for a surface further off than the neutral one).
Distances are exact point-to-triangle distances (libigl's AABB tree), so there is no sampling floor.
The errors in the moving region and in the static rest of the face are reported beside it, so an
expression that leaks into regions that should stay still (the forehead, say) shows too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from backend.geometry.signed_distance import closest_points


@dataclass(frozen=True)
class ExpressionCapture:
    capture: float           # 1 = the full motion, 0 = none (nan when nothing moves)
    moving_error: float      # mean distance of the moving ground-truth vertices to the reconstruction
    static_error: float      # the same over the viewer-facing vertices that do not move
    neutral_distance: float  # mean distance of the moving vertices to the neutral surface (the motion)
    n_moving: int
    n_static: int

    def to_json(self) -> dict[str, float | int]:
        return {"capture": self.capture, "moving_error": self.moving_error, "static_error": self.static_error,
                "neutral_distance": self.neutral_distance, "n_moving": self.n_moving, "n_static": self.n_static}


def moving_region(neutral_vertices: np.ndarray, expression_vertices: np.ndarray, faces: np.ndarray,
                  move_mm: float = 3.0, view: tuple[float, float, float] = (0.0, 0.0, 1.0),
                  region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(moving, static) boolean masks over the vertices of a shared-topology expression mesh.

    `region` optionally restricts both (e.g. a ball around the nose tip)."""
    motion = np.linalg.norm(np.asarray(expression_vertices, np.float64) - np.asarray(neutral_vertices, np.float64),
                            axis=1)
    normals = trimesh.Trimesh(np.asarray(expression_vertices, np.float64), np.asarray(faces, np.int64),
                              process=False).vertex_normals
    facing = normals @ np.asarray(view, dtype=np.float64) > 0.0
    if region is not None:
        facing &= np.asarray(region, dtype=bool)
    return facing & (motion > move_mm), facing & (motion <= move_mm)


def expression_capture(neutral: tuple[np.ndarray, np.ndarray], expression: tuple[np.ndarray, np.ndarray],
                       reconstruction: tuple[np.ndarray, np.ndarray], move_mm: float = 3.0,
                       view: tuple[float, float, float] = (0.0, 0.0, 1.0),
                       region: np.ndarray | None = None) -> ExpressionCapture:
    """Capture of one expression. `neutral` and `expression` are the person's ground-truth meshes
    (vertices, faces) with one shared topology; `reconstruction` is any mesh in the same frame and units."""
    moving, static = moving_region(neutral[0], expression[0], expression[1], move_mm, view, region)
    ev = np.asarray(expression[0], np.float64)
    to_recon = closest_points(ev[moving | static], *reconstruction)[0]
    in_moving = moving[moving | static]
    moving_err = float(to_recon[in_moving].mean()) if moving.any() else float("nan")
    static_err = float(to_recon[~in_moving].mean()) if static.any() else float("nan")
    if not moving.any():
        return ExpressionCapture(float("nan"), moving_err, static_err, 0.0, 0, int(static.sum()))
    to_neutral = float(closest_points(ev[moving], *neutral)[0].mean())
    capture = 1.0 - moving_err / to_neutral if to_neutral > 0 else float("nan")
    return ExpressionCapture(capture, moving_err, static_err, to_neutral, int(moving.sum()), int(static.sum()))
