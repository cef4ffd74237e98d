"""Expression capture: how much of a person's expression motion a reconstructed surface reproduces.

Mean surface errors (Chamfer, EDE) hide a washed-out expression, because most of a face does not move
between neutral and any expression. Capture looks only where the ground truth moves:

    M = ground-truth expression vertices that lie more than `move_mm` from their own neutral position,
        face the viewer (vertex normal · view direction > 0) and are seen by the viewer (nothing of
        the expression mesh lies in front of them along the view direction),
    capture = 1 - mean_{v in M} d(v, reconstructed surface) / mean_{v in M} d(v, ground-truth neutral surface).

A reconstruction that reproduces the expression scores 1; one that stays neutral scores 0; one that
moves half way scores about 0.5; overshooting or moving the wrong way moves the vertices away from the
reconstruction again and scores lower (below 0 for a surface further off than the neutral one).
Distances are exact point-to-triangle distances (libigl's AABB tree), so there is no sampling floor.
The errors in the moving region and in the static rest of the face are reported beside it, so an
expression that leaks into regions that should stay still (the forehead, say) shows too.

Hidden vertices are left out because no face model is trained on them: training's ground truth and
both sides of the Chamfer are what a viewer at the front sees (`backend.scans.samples.front_surface`).
A scan's nostrils and the inside of its lips face the viewer in places but lie behind the face; they
move with a sneer or a sideways mouth, and counting them made those expressions look missed (on
ict-faces they were about a quarter of the moving vertices, each several millimetres off).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from backend.geometry.heightfield import visible_vertices
from backend.geometry.signed_distance import closest_points


@dataclass(frozen=True)
class ExpressionCapture:
    capture: float           # 1 = the full motion, 0 = none (nan when nothing moves)
    moving_error: float      # mean distance of the moving ground-truth vertices to the reconstruction
    static_error: float      # the same over the viewer-facing vertices that do not move
    neutral_distance: float  # mean distance of the moving vertices to the neutral surface (the motion; nan
                             # when nothing moves: no scale, not 0 mm)
    n_moving: int
    n_static: int

    def to_json(self) -> dict[str, float | int]:
        return {"capture": self.capture, "moving_error": self.moving_error, "static_error": self.static_error,
                "neutral_distance": self.neutral_distance, "n_moving": self.n_moving, "n_static": self.n_static}


def seen_vertices(vertices: np.ndarray, faces: np.ndarray, view: tuple[float, float, float] = (0.0, 0.0, 1.0),
                  tolerance: float = 1.0) -> np.ndarray:
    """(V,) bool: vertices a viewer far along `view` sees. A vertex covered only by surface within
    `tolerance` (mesh units; 1 mm, as training's `visible_mask`) in front of it counts as seen."""
    d = np.asarray(view, dtype=np.float64)
    d = d / np.linalg.norm(d)
    # An orthonormal frame whose third axis is the view direction: there the viewer is at z = +inf.
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    a = np.cross(helper, d)
    a /= np.linalg.norm(a)
    frame = np.stack([a, np.cross(d, a), d])
    v = np.asarray(vertices, np.float64) @ frame.T
    return visible_vertices(v, np.asarray(faces, np.int64), eps=tolerance)


def moving_region(neutral_vertices: np.ndarray, expression_vertices: np.ndarray, faces: np.ndarray,
                  move_mm: float = 3.0, view: tuple[float, float, float] = (0.0, 0.0, 1.0),
                  region: np.ndarray | None = None, hidden_tolerance_mm: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(moving, static) boolean masks over the vertices of a shared-topology expression mesh: the
    vertices that face and are seen by the viewer, split by how far they move.

    `region` optionally restricts both (e.g. a ball around the nose tip)."""
    ev = np.asarray(expression_vertices, np.float64)
    f = np.asarray(faces, np.int64)
    motion = np.linalg.norm(ev - np.asarray(neutral_vertices, np.float64), axis=1)
    normals = trimesh.Trimesh(ev, f, process=False).vertex_normals
    facing = normals @ np.asarray(view, dtype=np.float64) > 0.0
    if region is not None:
        facing &= np.asarray(region, dtype=bool)
    if facing.any():
        facing &= seen_vertices(ev, f, view, hidden_tolerance_mm)
    return facing & (motion > move_mm), facing & (motion <= move_mm)


def expression_capture(neutral: tuple[np.ndarray, np.ndarray], expression: tuple[np.ndarray, np.ndarray],
                       reconstruction: tuple[np.ndarray, np.ndarray], move_mm: float = 3.0,
                       view: tuple[float, float, float] = (0.0, 0.0, 1.0),
                       region: np.ndarray | None = None, hidden_tolerance_mm: float = 1.0) -> ExpressionCapture:
    """Capture of one expression. `neutral` and `expression` are the person's ground-truth meshes
    (vertices, faces) with one shared topology; `reconstruction` is any mesh in the same frame and units."""
    moving, static = moving_region(neutral[0], expression[0], expression[1], move_mm, view, region,
                                   hidden_tolerance_mm)
    ev = np.asarray(expression[0], np.float64)
    to_recon = closest_points(ev[moving | static], *reconstruction)[0]
    in_moving = moving[moving | static]
    moving_err = float(to_recon[in_moving].mean()) if moving.any() else float("nan")
    static_err = float(to_recon[~in_moving].mean()) if static.any() else float("nan")
    if not moving.any():
        return ExpressionCapture(float("nan"), moving_err, static_err, float("nan"), 0, int(static.sum()))
    to_neutral = float(closest_points(ev[moving], *neutral)[0].mean())
    capture = 1.0 - moving_err / to_neutral if to_neutral > 0 else float("nan")
    return ExpressionCapture(capture, moving_err, static_err, to_neutral, int(moving.sum()), int(static.sum()))
