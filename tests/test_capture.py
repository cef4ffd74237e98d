"""Expression capture on synthetic surfaces where the answer is known by construction."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import Delaunay

from backend.geometry.capture import expression_capture, moving_region


def _sheet(n: int = 61, size: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    """A flat grid in the xy plane (mm), facing +z, triangulated."""
    xs = np.linspace(-size / 2, size / 2, n)
    x, y = np.meshgrid(xs, xs)
    xy = np.stack([x.ravel(), y.ravel()], axis=1)
    return np.column_stack([xy, np.zeros(len(xy))]), Delaunay(xy).simplices.astype(np.int64)


def _plateau(v: np.ndarray, radius: float = 30.0, ramp: float = 8.0) -> np.ndarray:
    """1 on a disk around the origin, falling linearly to 0 over `ramp` mm: the shape of the motion."""
    r = np.linalg.norm(v[:, :2], axis=1)
    return np.clip((radius + ramp - r) / ramp, 0.0, 1.0)


@pytest.fixture(scope="module")
def faces_and_motion():
    v, f = _sheet()
    shape = _plateau(v)
    lift = np.zeros_like(v)
    lift[:, 2] = 6.0 * shape            # the expression raises the disk by 6 mm
    return v, f, lift


def _capture(v, f, lift, t):
    recon = (v + t * lift, f)
    return expression_capture((v, f), (v + lift, f), recon)


def test_full_none_half_motion(faces_and_motion):
    v, f, lift = faces_and_motion
    full, none, half = (_capture(v, f, lift, t) for t in (1.0, 0.0, 0.5))
    assert full.capture == pytest.approx(1.0, abs=1e-9)
    assert full.moving_error == pytest.approx(0.0, abs=1e-9)
    assert none.capture == pytest.approx(0.0, abs=1e-9)
    # Half way: the plateau's vertices are exactly 3 of 6 mm away; the ramp's few vertices, on a
    # slope, sit slightly closer to either surface, hence the tolerance.
    assert half.capture == pytest.approx(0.5, abs=0.03)
    # The moving region is the plateau plus the part of the ramp above 3 mm, facing the viewer.
    r = np.linalg.norm(v[:, :2], axis=1)
    assert full.n_moving == int((_plateau(v) * 6.0 > 3.0).sum())
    assert full.n_moving == int((r < 34.0).sum())
    assert full.n_moving + full.n_static == len(v)


def test_overshoot_and_wrong_direction_score_lower(faces_and_motion):
    v, f, lift = faces_and_motion
    full = _capture(v, f, lift, 1.0).capture
    over = _capture(v, f, lift, 1.5).capture
    wrong = _capture(v, f, lift, -0.5).capture
    assert over == pytest.approx(0.5, abs=0.05)      # 3 mm past the expression: about as bad as half way (steeper ramp)
    assert over < full
    assert wrong == pytest.approx(-0.5, abs=0.05)     # 9 mm off against 6 mm of motion
    assert wrong < _capture(v, f, lift, 0.0).capture


def test_static_error_shows_leaking_motion(faces_and_motion):
    v, f, lift = faces_and_motion
    leak = lift.copy()
    leak[v[:, 1] > 45.0, 2] += 2.0      # a band near the top edge (the "forehead") moves 2 mm too
    res = expression_capture((v, f), (v + lift, f), (v + leak, f))
    clean = _capture(v, f, lift, 1.0)
    assert res.capture == pytest.approx(1.0, abs=1e-9)
    assert clean.static_error == pytest.approx(0.0, abs=1e-9)
    band = (v[:, 1] > 45.0).sum() / res.n_static
    assert res.static_error == pytest.approx(2.0 * band, rel=0.15)


def test_vertices_facing_away_do_not_count(faces_and_motion):
    v, f, lift = faces_and_motion
    moving, static = moving_region(v, v + lift, f, view=(0.0, 0.0, -1.0))
    assert not moving.any() and not static.any()
    res = expression_capture((v, f), (v + lift, f), (v, f), view=(0.0, 0.0, -1.0))
    assert np.isnan(res.capture)
    assert np.isnan(res.neutral_distance) and res.n_moving == 0   # no motion scale, not 0 mm


def test_hidden_vertices_do_not_count(faces_and_motion):
    """A fold behind the face (like the inside of a nostril) moves with the expression, facing the viewer,
    but nobody sees it and no model is trained on it: it is left out of both regions."""
    v, f, lift = faces_and_motion
    pocket, pf = _sheet(n=9, size=16.0)
    pocket = pocket + [48.0, 0.0, -8.0]          # under the static part of the sheet, 8 mm behind it
    vv = np.concatenate([v, pocket])
    ff = np.concatenate([f, pf + len(v)])
    move = np.concatenate([lift, np.tile([0.0, 4.0, 2.0], (len(pocket), 1))])   # the pocket moves 4.5 mm
    recon = (v + lift, f)                        # the visible face, expression and all; no pocket
    res = expression_capture((vv, ff), (vv + move, ff), recon)
    alone = expression_capture((v, f), (v + lift, f), recon)
    assert res.capture == pytest.approx(1.0, abs=1e-9)
    assert (res.n_moving, res.n_static) == (alone.n_moving, alone.n_static)
    # Counted, the pocket's vertices (each about 6 mm from the reconstruction) would have pulled capture down.
    moving, _ = moving_region(vv, vv + move, ff, hidden_tolerance_mm=20.0)
    assert moving[len(v):].all()
    # Surface within the tolerance in front of a vertex (a fold of a noisy scan) does not hide it.
    shallow = np.concatenate([v, pocket + [0.0, 0.0, 7.5]])
    seen, _ = moving_region(shallow, shallow + move, ff)
    assert seen[len(v):].all()
