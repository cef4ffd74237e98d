"""Procedural face scans: the embedded default data a fresh machine trains on.

A fresh install has no face data, so the product makes its own, deterministically from a seed, in the
same scan-folder format a user brings (docs/scan-folder.md). Every face is a deformation of one fixed
parametric grid, so all scans share one topology (vertex i is the same facial point everywhere) and the
five landmarks are fixed vertex indices.

How a face is built (all lengths in mm; frame: +y up, +z out of the face, +x toward the subject's left):

* Canonical skin coordinates (p, q): a regular 1.2 mm lattice; p is arc length across the face from the
  midline (+p toward the subject's left), q arc length up the midline from the nose-tip level. The
  mouth and the two eye fissures are slits cut into the lattice (the triangles crossing them are
  removed), so lips and eyelids can part.
* A per-person base head (sagittal profile + flattened elliptic cross-sections, arc-length
  parameterised so the lattice stays evenly sampled) and, along its normal, "bone" relief (brow ridge,
  eye sockets, nose, cheekbones, chin) evaluated where the skin currently lies, plus "soft tissue"
  (lips, eyebrows, cheek fat, folds) attached to the skin.
* Expressions are mixes of action units: skin sliding over the bone (brow raise, smile, lids), soft
  tissue offsets (pucker, cheek puff) and a jaw ROTATION about a hinge axis near the ears.
* Fine detail along the final normals: per-person skin noise and expression-driven wrinkles
  (forehead lines, crow's feet, frown lines, nose lines), 0.1-0.5 mm deep, with wavelengths of at
  least ~3x the vertex spacing so the mesh resolves them.
* Eyeballs: a small patch per eye (with a cornea bulge) lying ~2.6 mm behind the eyelid surface,
  visible through open lids, hidden (and removed by preprocessing's visibility test) when they close.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.ndimage import gaussian_filter

from backend.geometry.normals import vertex_normals
from backend.scans.landmarks import LANDMARK_NAMES

# ----------------------------------------------------------------------------------------------------
# Public tables
# ----------------------------------------------------------------------------------------------------

#: Identity parameters and the (low, high) range each is drawn from. Scales are relative (1 = mean face),
#: `eye_spacing` is a per-eye lateral shift in mm, `skin_age` scales wrinkle depth.
IDENTITY_PARAMETERS: dict[str, tuple[float, float]] = {
    "face_width": (0.93, 1.07),
    "face_length": (0.9, 1.1),
    "forehead_slope": (0.6, 1.4),
    "nose_length": (0.85, 1.15),
    "nose_width": (0.82, 1.22),
    "nose_bridge": (0.6, 1.4),
    "nose_projection": (0.88, 1.12),
    "eye_depth": (0.75, 1.25),
    "eye_spacing": (-2.5, 2.5),
    "eye_size": (0.88, 1.12),
    "brow_ridge": (0.4, 1.6),
    "cheekbones": (0.4, 1.6),
    "lip_fullness": (0.65, 1.4),
    "mouth_width": (0.92, 1.08),
    "chin": (0.6, 1.4),
    "jaw_width": (0.85, 1.15),
    "skin_age": (0.0, 1.0),
}

#: The mean face: every parameter at its neutral value.
MEAN_IDENTITY: dict[str, float] = {k: (0.0 if k == "eye_spacing" else 0.5 if k == "skin_age" else 1.0)
                                   for k in IDENTITY_PARAMETERS}

#: Action units an expression is mixed from (weights are typically 0..1).
ACTION_UNITS: tuple[str, ...] = ("jaw_open", "smile", "squint", "pucker", "brow_raise", "brow_lower",
                                 "eye_close", "eye_wide", "cheek_puff", "mouth_shift", "sneer")

_EXPRESSION_UNITS: dict[str, dict[str, float]] = {
    "neutral": {},
    "mouth_open": {"jaw_open": 1.0},
    "smile": {"smile": 1.0, "squint": 0.5},
    "pucker": {"pucker": 1.0},
    "brow_raise": {"brow_raise": 1.0, "eye_wide": 0.3},
    "frown": {"brow_lower": 1.0, "squint": 0.3},
    "eyes_closed": {"eye_close": 1.0},
    "cheek_puff": {"cheek_puff": 1.0},
    "mouth_left": {"mouth_shift": 1.0},
    "sneer": {"sneer": 1.0, "brow_lower": 0.3},
    "surprise": {"brow_raise": 1.0, "eye_wide": 1.0, "jaw_open": 0.6},
}

#: Expression names, in the order the default folder writes them.
EXPRESSIONS: tuple[str, ...] = tuple(_EXPRESSION_UNITS)

JAW_OPEN_DEGREES = 13.0  # jaw rotation of mouth_open at intensity 1

# ----------------------------------------------------------------------------------------------------
# The canonical lattice and its fixed topology
# ----------------------------------------------------------------------------------------------------

SPACING_MM = 1.2
_P_CELLS = 82                     # columns: p = SPACING * (-82 .. 82)
_Q_ROW0 = -36.9                   # rows at _Q_ROW0 + SPACING * k: the mouth slit lies midway between two rows
_Q_ROWS = (-62, 124)              # k range (inclusive): q from -111.3 to 111.9

_MOUTH_Q = -37.5                  # mouth slit line
_MOUTH_HALF = 25.2                # mouth corners at p = +-25.2 (a lattice column)
_EYE_IN, _EYE_OUT = 18.0, 55.2    # eye fissure from the inner to the outer corner (|p|, lattice columns)
_EYE_Q_IN, _EYE_Q_OUT, _EYE_SAG = 31.6, 34.4, 1.4
_EYEBALL_HALF = (21.9, 11.9)      # eyeball patch half-axes in (p, q)
_EYE_CENTER_P, _EYE_CENTER_Q = 36.6, 34.8


def _eye_slit_q(ap: np.ndarray) -> np.ndarray:
    """q of the eye fissure (where the lids meet when closed) at |p| = ap."""
    t = np.clip((ap - _EYE_IN) / (_EYE_OUT - _EYE_IN), 0.0, 1.0)
    return _EYE_Q_IN + (_EYE_Q_OUT - _EYE_Q_IN) * t - _EYE_SAG * np.sin(np.pi * t)


def _outline_half_width(q: np.ndarray) -> np.ndarray:
    """How far (in p) the scan reaches at each height: a face-mask outline, cut at the sides."""
    qs = [-112, -100, -88, -75, -55, -30, 0, 30, 60, 85, 100, 112]
    hw = [24, 36, 45, 53, 66, 80, 89, 90, 84, 73, 60, 42]
    return np.interp(q, qs, hw)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(p: np.ndarray, q: np.ndarray, p0: float, q0: float, sp: float, sq: float) -> np.ndarray:
    return np.exp(-0.5 * (((p - p0) / sp) ** 2 + ((q - q0) / sq) ** 2))


@dataclass(frozen=True)
class FaceTopology:
    """The fixed mesh every generated face shares.

    faces: (T, 3) int64 triangles, wound so normals point out of the face (+z on the front).
    landmark_indices: landmark name -> vertex index (LANDMARK_NAMES order).
    regions: name -> (V,) bool mask (forehead, brows, eyelids, nose, cheeks, upper/lower lip,
        mouth_corners, chin, lower_jaw, eyeballs, ...), handy for tests and losses.
    p, q: (V,) canonical skin coordinates of every vertex (mm).
    is_eyeball: (V,) bool, the eyeball patches (not skin).
    """

    faces: np.ndarray
    landmark_indices: dict[str, int]
    regions: dict[str, np.ndarray]
    p: np.ndarray
    q: np.ndarray
    is_eyeball: np.ndarray

    @property
    def n_vertices(self) -> int:
        return int(self.p.shape[0])

    @property
    def n_triangles(self) -> int:
        return int(self.faces.shape[0])


@dataclass(frozen=True)
class _Grid:
    """Internal: the full rectangular lattices (skin and the two eyeball patches) and what is kept."""

    P: np.ndarray            # (R, C) skin lattice
    Q: np.ndarray
    skin_keep: np.ndarray    # (R*C,) indices of kept skin vertices (in output order)
    eye_P: np.ndarray        # (Re, Ce) one eyeball patch lattice (right eye: p < 0), mirrored for the left
    eye_Q: np.ndarray
    eye_keep: np.ndarray     # indices into the eye lattice (flattened) that are kept
    topology: FaceTopology


def _grid_triangles(rows: int, cols: int, P: np.ndarray) -> np.ndarray:
    """Two triangles per lattice cell, mirror-symmetric about p = 0, wound counter-clockwise in (p, q)."""
    r, c = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    v00 = (r * cols + c).ravel()
    v01, v10, v11 = v00 + 1, v00 + cols, v00 + cols + 1
    right = (P[r, c] + 0.5 * SPACING_MM < 0).ravel()       # cell center on the subject's right
    t1 = np.where(right[:, None], np.stack([v00, v01, v10], 1), np.stack([v00, v01, v11], 1))
    t2 = np.where(right[:, None], np.stack([v01, v11, v10], 1), np.stack([v00, v11, v10], 1))
    return np.concatenate([t1, t2])


def _slit_side(P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance (in q) to the mouth and eye slits, and whether a vertex lies in each slit's p span."""
    ap = np.abs(P)
    d_mouth = Q - _MOUTH_Q
    in_mouth = ap <= _MOUTH_HALF + 1e-9
    d_eye = Q - _eye_slit_q(ap)
    in_eye = (ap >= _EYE_IN - 1e-9) & (ap <= _EYE_OUT + 1e-9)
    return d_mouth, d_eye, np.stack([in_mouth, in_eye])


@lru_cache(maxsize=1)
def _grid() -> _Grid:
    cols = np.arange(-_P_CELLS, _P_CELLS + 1) * SPACING_MM
    rows = _Q_ROW0 + SPACING_MM * np.arange(_Q_ROWS[0], _Q_ROWS[1] + 1)
    Q, P = np.meshgrid(rows, cols, indexing="ij")
    R, C = P.shape
    tris = _grid_triangles(R, C, P)
    pf, qf = P.ravel(), Q.ravel()

    # Face-mask outline: keep triangles whose vertices are all inside.
    inside = np.abs(pf) <= _outline_half_width(qf) + 1e-9
    keep_tri = inside[tris].all(1)
    # Slits: drop the triangles that straddle a slit line inside its span.
    d_mouth, d_eye, spans = _slit_side(pf, qf)
    for d, span in ((d_mouth, spans[0]), (d_eye, spans[1])):
        side = d[tris] > 0
        straddle = side.any(1) & ~side.all(1)
        keep_tri &= ~(straddle & span[tris].all(1))
    tris = tris[keep_tri]
    used = np.unique(tris)
    remap = np.full(R * C, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    skin_faces = remap[tris]

    # Eyeball patch (right eye, p < 0), an ellipse behind the fissure; the left one is its mirror.
    ep = -_EYE_CENTER_P + SPACING_MM * np.arange(-19, 20)
    eq = _EYE_CENTER_Q + SPACING_MM * np.arange(-10, 11)
    eQ, eP = np.meshgrid(eq, ep, indexing="ij")
    er, ec = eP.shape
    e_tris = _grid_triangles(er, ec, eP + 1e6)  # (shifted so one diagonal direction is used throughout)
    e_in = (((eP.ravel() + _EYE_CENTER_P) / _EYEBALL_HALF[0]) ** 2
            + ((eQ.ravel() - _EYE_CENTER_Q) / _EYEBALL_HALF[1]) ** 2) <= 1.0
    e_tris = e_tris[e_in[e_tris].all(1)]
    e_used = np.unique(e_tris)
    e_remap = np.full(er * ec, -1, dtype=np.int64)
    e_remap[e_used] = np.arange(len(e_used))
    e_faces = e_remap[e_tris]
    n_skin, n_eye = len(used), len(e_used)
    # Left eye: mirrored lattice; flip the winding so its normals still face out.
    faces = np.concatenate([skin_faces, e_faces + n_skin, e_faces[:, [0, 2, 1]] + n_skin + n_eye])

    p_all = np.concatenate([pf[used], eP.ravel()[e_used], -eP.ravel()[e_used]])
    q_all = np.concatenate([qf[used], eQ.ravel()[e_used], eQ.ravel()[e_used]])
    is_eye = np.zeros(len(p_all), dtype=bool)
    is_eye[n_skin:] = True

    # Landmarks: nose tip at (0, _NOSE_TIP_Q); eye corners at the outer fissure ends; mouth corners at the slit ends
    # (upper side of the slit).
    def nearest(p0: float, q0: float) -> int:
        dist = (p_all - p0) ** 2 + (q_all - q0) ** 2
        dist[is_eye] = np.inf
        return int(np.argmin(dist))

    q_out = float(_eye_slit_q(np.array(_EYE_OUT)))
    lm = {
        "right_eye_outer_corner": nearest(-_EYE_OUT, q_out),
        "left_eye_outer_corner": nearest(_EYE_OUT, q_out),
        "nose_tip": nearest(0.0, _NOSE_TIP_Q),
        "right_mouth_corner": nearest(-_MOUTH_HALF, _MOUTH_Q + 0.5 * SPACING_MM),
        "left_mouth_corner": nearest(_MOUTH_HALF, _MOUTH_Q + 0.5 * SPACING_MM),
    }
    assert tuple(lm) == LANDMARK_NAMES

    regions = _regions(p_all, q_all, is_eye)
    for arr in (faces, p_all, q_all, is_eye, *regions.values()):
        arr.setflags(write=False)
    topo = FaceTopology(faces=faces, landmark_indices=lm, regions=regions, p=p_all, q=q_all, is_eyeball=is_eye)
    return _Grid(P=P, Q=Q, skin_keep=used, eye_P=eP, eye_Q=eQ, eye_keep=e_used, topology=topo)


def _regions(p: np.ndarray, q: np.ndarray, is_eye: np.ndarray) -> dict[str, np.ndarray]:
    skin = ~is_eye
    ap = np.abs(p)
    d_eye = q - _eye_slit_q(ap)
    in_eye = (ap > _EYE_IN + 3) & (ap < _EYE_OUT - 3)
    r = {
        "forehead": skin & (ap < 40) & (q > 60) & (q < 95),
        "brows": skin & (ap > 12) & (ap < 50) & (q > 43) & (q < 52),
        "upper_eyelids": skin & in_eye & (d_eye > 0) & (d_eye < 5),
        "lower_eyelids": skin & in_eye & (d_eye < 0) & (d_eye > -3),
        "nose": skin & (ap < 9) & (q > -6) & (q < 28),
        "cheeks": skin & (ap > 32) & (ap < 58) & (q > -32) & (q < 2),
        "upper_lip": skin & (ap < 16) & (q > _MOUTH_Q) & (q < -30),
        "lower_lip": skin & (ap < 16) & (q < _MOUTH_Q) & (q > -46),
        "mouth_corners": skin & ((ap - _MOUTH_HALF) ** 2 + (q - _MOUTH_Q) ** 2 < 4.0 ** 2),
        "chin": skin & (ap < 16) & (q > -80) & (q < -58),
        "lower_jaw": skin & (ap < 26) & (q > -95) & (q < -58),     # follows the jaw rigidly
        "eyeballs": is_eye.copy(),
    }
    r["eyelids"] = r["upper_eyelids"] | r["lower_eyelids"]
    r["skin"] = skin.copy()
    return r


def face_topology() -> FaceTopology:
    """The shared topology of every generated face: triangles, landmark indices, named regions."""
    return _grid().topology


# ----------------------------------------------------------------------------------------------------
# Identity: parameters and the per-person base head
# ----------------------------------------------------------------------------------------------------

def sample_identity(rng: np.random.Generator) -> dict[str, float]:
    """Draw one person's parameters (Beta(2,2) within each range, so extremes are rarer)."""
    out = {}
    for name, (lo, hi) in IDENTITY_PARAMETERS.items():
        out[name] = float(round(lo + (hi - lo) * rng.beta(2.0, 2.0), 6))
    return out


def _check_identity(identity: Mapping[str, float]) -> dict[str, float]:
    full = dict(MEAN_IDENTITY)
    unknown = set(identity) - set(IDENTITY_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown identity parameters: {sorted(unknown)}")
    full.update({k: float(v) for k, v in identity.items()})
    return full


_TY_STEP, _TX_STEP = 0.5, 0.5
_TY = np.arange(-140.0, 140.0 + 1e-9, _TY_STEP)   # arc length up the midline
_TX = np.arange(0.0, 130.0 + 1e-9, _TX_STEP)      # arc length across, one side


@dataclass(frozen=True)
class _Base:
    table: np.ndarray        # (6, len(_TY), len(_TX)): position xyz and unit normal xyz for X >= 0
    z_front0: float          # base midline z at the nose-tip level
    length: float            # face_length


@lru_cache(maxsize=32)
def _base_cached(key: tuple[tuple[str, float], ...]) -> _Base:
    idp = dict(key)
    L = idp["face_length"]
    # Sagittal base profile (no nose, lips or brows), top of the forehead to under the chin: (y, z).
    prof = np.array([
        [128, 48], [118, 68], [105, 84], [90, 94], [72, 100.5], [55, 103], [42, 103.5], [30, 103],
        [15, 103.5], [0, 105], [-15, 108], [-28, 111], [-40, 110.5], [-52, 107], [-64, 106.5],
        [-74, 103.5], [-82, 97], [-87, 86], [-90, 74], [-92, 60], [-94, 46], [-96, 30],
    ], dtype=np.float64)
    prof[:, 0] *= L
    top = prof[:, 0] > 60 * L
    prof[top, 1] -= (idp["forehead_slope"] - 1.0) * (prof[top, 0] - 60 * L) * 0.45
    chin = (prof[:, 0] < -58 * L) & (prof[:, 0] > -90 * L)
    prof[chin, 1] += (idp["chin"] - 1.0) * 4.0
    t = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(prof, axis=0).T))])
    tt = np.linspace(0.0, t[-1], 4000)
    ys, zs = PchipInterpolator(t, prof[:, 0])(tt), PchipInterpolator(t, prof[:, 1])(tt)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(ys), np.diff(zs)))])
    s0 = np.interp(0.0, ys[::-1], arc[::-1])
    s = s0 - arc                                       # arc length, positive upward, 0 at y = 0
    # Extend linearly past both ends along the end tangents (rows outside the profile are cut anyway).
    y_row = np.interp(_TY, s[::-1], ys[::-1])
    z_row = np.interp(_TY, s[::-1], zs[::-1])
    for end, sign in ((0, 1), (-1, -1)):
        k = 1 if end == 0 else -2
        ty, tz = ys[end] - ys[k], zs[end] - zs[k]
        norm = np.hypot(ty, tz)
        beyond = (_TY - s[end]) * sign > 0
        extra = np.abs(_TY[beyond] - s[end])
        y_row[beyond] = ys[end] + ty / norm * extra
        z_row[beyond] = zs[end] + tz / norm * extra

    # Cross-sections: half-width a, depth b, front flatness w, as functions of height.
    yc = np.array([130, 105, 75, 45, 20, 0, -25, -45, -65, -85, -100]) * L
    a = np.array([54, 63, 68, 71, 73, 71, 65, 57, 48, 40, 36], dtype=np.float64)
    b = np.array([52, 70, 82, 88, 90, 88, 82, 76, 68, 58, 50], dtype=np.float64)
    def smooth(values: np.ndarray) -> np.ndarray:   # C1 in y, so the surface has no creases between rows
        return PchipInterpolator(yc[::-1], values[::-1], extrapolate=False)(np.clip(y_row, yc[-1], yc[0]))

    a_row = smooth(a) * idp["face_width"]
    jaw = _smoothstep(-10.0 * L, -55.0 * L, y_row)
    a_row *= 1.0 + (idp["jaw_width"] - 1.0) * jaw
    b_row = smooth(b)
    wc = np.array([0.45, 0.45, 0.5, 0.75, 0.85, 0.85, 0.85, 0.85, 0.85, 0.9, 0.9])
    w = smooth(wc)[:, None]
    th = np.linspace(0.0, 2.6, 520)
    xs = a_row[:, None] * np.sin(th)[None]
    c1 = 1.0 - np.cos(th)
    dz = b_row[:, None] * (c1 * (w + (1 - w) * c1))
    seg = np.hypot(np.diff(xs, axis=1), np.diff(dz, axis=1))
    sc = np.concatenate([np.zeros((len(_TY), 1)), np.cumsum(seg, axis=1)], axis=1)
    X = np.empty((len(_TY), len(_TX)))
    D = np.empty_like(X)
    for j in range(len(_TY)):
        X[j] = np.interp(_TX, sc[j], xs[j])
        D[j] = np.interp(_TX, sc[j], dz[j])
    pos = np.stack([X, np.broadcast_to(y_row[:, None], X.shape), z_row[:, None] - D])
    d_dx = np.gradient(pos, _TX_STEP, axis=2)
    d_dy = np.gradient(pos, _TY_STEP, axis=1)
    n = np.cross(d_dx, d_dy, axis=0)
    n /= np.maximum(np.linalg.norm(n, axis=0, keepdims=True), 1e-12)
    table = np.concatenate([pos, n]).astype(np.float64)
    z0 = float(np.interp(0.0, _TY, z_row))
    return _Base(table=table, z_front0=z0, length=L)


def _base(idp: Mapping[str, float]) -> _Base:
    return _base_cached(tuple(sorted(idp.items())))


def _lookup(base: _Base, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear look-up of base position and normal at arc-length coordinates (X, Y); mirrored for X < 0."""
    fj = np.clip((Y - _TY[0]) / _TY_STEP, 0, len(_TY) - 1.000001)
    fi = np.clip(np.abs(X) / _TX_STEP, 0, len(_TX) - 1.000001)
    j0, i0 = fj.astype(np.int64), fi.astype(np.int64)
    tj, ti = fj - j0, fi - i0
    T = base.table
    v = (T[:, j0, i0] * ((1 - tj) * (1 - ti)) + T[:, j0 + 1, i0] * (tj * (1 - ti))
         + T[:, j0, i0 + 1] * ((1 - tj) * ti) + T[:, j0 + 1, i0 + 1] * (tj * ti))
    sgn = np.where(X < 0, -1.0, 1.0)
    pos = np.stack([v[0] * sgn, v[1], v[2]], axis=-1)
    nrm = np.stack([v[3] * sgn, v[4], v[5]], axis=-1)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
    return pos, nrm


# ----------------------------------------------------------------------------------------------------
# Relief: bone (fixed under the skin) and soft tissue (moves with the skin)
# ----------------------------------------------------------------------------------------------------

_NOSE_TIP_Q = 0.3      # the nose-tip landmark's lattice row
# Midline nose height over the base (mm) and half-width, by distance above the tip; smooth (PCHIP) so
# the bridge and the rounded tip have no facets.
_NOSE_PROFILE = PchipInterpolator(
    [-17, -13.5, -11, -8, -5.5, -3.5, -1.8, 0, 1.8, 4, 10, 20, 30, 37, 44],
    [0, 2, 7, 15, 20.6, 23.2, 24.5, 25, 24.5, 22.6, 17.0, 11.0, 6.2, 3.0, 0])
_NOSE_WIDTH = PchipInterpolator([-14, -6, 0, 6, 15, 30, 44], [7.0, 9.5, 9.0, 7.5, 6.0, 6.5, 8.0])


def _nose(p: np.ndarray, q: np.ndarray, idp: Mapping[str, float]) -> np.ndarray:
    nl, nw = idp["nose_length"], idp["nose_width"]
    qn = (q - _NOSE_TIP_Q) / nl
    h = _NOSE_PROFILE(np.clip(qn, -17.0, 44.0))
    tip = _smoothstep(13.0, 3.0, qn)
    h *= idp["nose_bridge"] * (1 - tip) + idp["nose_projection"] * tip
    width = _NOSE_WIDTH(np.clip(qn, -14.0, 44.0)) * (1.0 + (nw - 1.0) * _smoothstep(14.0, 4.0, qn))
    out = h * np.exp(-0.5 * (p / width) ** 2 - 0.5 * (p / (1.6 * width)) ** 4)
    ap = np.abs(p)
    # Alae (nostril wings), the alar crease around them and the nostril openings underneath.
    ala_p = 12.0 * nw
    out += 6.5 * _gauss(ap, qn, ala_p, -5.5, 4.2 * nw, 4.0)
    r = np.hypot((ap - ala_p) / (5.6 * nw), (qn + 4.5) / 5.5)
    out -= 1.4 * np.exp(-0.5 * ((r - 1.0) / 0.16) ** 2) * _smoothstep(-10.0, -7.0, qn)
    out -= 3.0 * _gauss(ap, qn, 5.0 * nw, -10.0, 2.6, 1.8)
    return out


def _bone(p: np.ndarray, q: np.ndarray, idp: Mapping[str, float]) -> np.ndarray:
    """Relief fixed to the skull, evaluated where the skin currently lies (mm along the base normal)."""
    ap = np.abs(p)
    out = _nose(p, q, idp)
    br = idp["brow_ridge"]
    out += br * 2.6 * np.exp(-0.5 * ((ap - 27) / 17) ** 2 - 0.5 * ((q - 48.5) / 6.5) ** 2)
    out += br * 1.6 * _gauss(ap, q, 0, 44, 9, 6)
    out += 1.5 * _gauss(ap, q, 27, 78, 18, 14)                               # frontal bossing
    out -= 3.0 * _gauss(ap, q, 64, 52, 10, 16)                               # temples
    ed = idp["eye_depth"]
    out -= ed * 10.0 * _gauss(ap, q, 35.5, 33.5, 14.5, 9.5)                 # orbit
    # The eyeball under the lids: a rounded bulge.
    r2 = ((ap - 36.0) / 17.5) ** 2 + ((q - 33.5) / 12.0) ** 2
    out += 6.5 * np.exp(-0.5 * r2 * 6.0)
    out -= 1.2 * _gauss(ap, q, 26, 21.5, 8, 3.5)                            # tear trough
    out += idp["cheekbones"] * 4.0 * _gauss(ap, q, 52, 14, 13, 9)
    out += 3.5 * _gauss(ap, q, 0, -22, 22, 13)                               # maxilla / muzzle
    out += idp["chin"] * 5.0 * _gauss(ap, q, 0, -68, 13, 8.5)
    out += 2.0 * _gauss(ap, q, 62, -58, 12, 14)                              # jaw angle region
    return out


def _nasolabial_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Signed distance from the nasolabial fold line (positive on the cheek side)."""
    ap = np.abs(p)
    a = np.array([16.5, -3.0])
    b = np.array([31.0, -42.0])
    ab = b - a
    t = np.clip(((ap - a[0]) * ab[0] + (q - a[1]) * ab[1]) / (ab @ ab), 0.0, 1.0)
    dx, dy = ap - (a[0] + t * ab[0]), q - (a[1] + t * ab[1])
    dist = np.hypot(dx, dy)
    side = np.sign(dx * ab[1] - dy * ab[0]) * -1.0
    return dist * np.where(side == 0, 1.0, side)


def _soft(p: np.ndarray, q: np.ndarray, idp: Mapping[str, float], au: Mapping[str, float]) -> np.ndarray:
    """Soft tissue attached to the skin (mm along the base normal), including expression offsets."""
    ap = np.abs(p)
    lf = idp["lip_fullness"]
    d = q - _MOUTH_Q
    lat_u = np.clip(1.0 - (p / 27.0) ** 2, 0.0, None) ** 1.2
    lat_l = np.clip(1.0 - (p / 25.0) ** 2, 0.0, None) ** 1.2
    bow = np.exp(-0.5 * ((ap - 5.5) / 4.0) ** 2)                          # Cupid's bow
    out = lf * 5.2 * lat_u * np.exp(-0.5 * ((q + 33.3 - 0.6 * bow) / (3.0 + 0.4 * bow)) ** 2)
    out += lf * 6.2 * lat_l * np.exp(-0.5 * ((q + 42.0) / 3.7) ** 2)
    border = -29.2 + 1.2 * bow - 1.5 * (p / 27.0) ** 2                    # vermilion border ("white roll")
    out += 0.45 * lat_u * np.exp(-0.5 * ((q - border) / 0.9) ** 2)
    lat_m = _smoothstep(_MOUTH_HALF + 3.0, _MOUTH_HALF - 2.0, ap)
    out -= 1.1 * lat_m * np.exp(-0.5 * (d / 0.9) ** 2)                     # lips roll in at the line
    out -= 1.8 * _gauss(ap, q, _MOUTH_HALF + 1.0, _MOUTH_Q, 3.5, 3.5)       # commissures
    phil = _smoothstep(-31.0, -28.0, q) * _smoothstep(-12.0, -16.0, q)
    out += phil * (0.3 * np.exp(-0.5 * ((ap - 5.0) / 2.0) ** 2) - 0.45 * np.exp(-0.5 * (ap / 2.6) ** 2))
    out -= 2.3 * _gauss(ap, q, 0, -52.5, 17, 3.6)                           # mentolabial sulcus
    # Eyebrows: an arched pad.
    brow_q = 46.5 + 3.0 * np.sin(np.pi * np.clip((ap - 10) / 46, 0, 1))
    taper = _smoothstep(8, 14, ap) * _smoothstep(56, 46, ap)
    out += 1.6 * taper * np.exp(-0.5 * ((q - brow_q) / 2.8) ** 2)
    # Cheek fat and the nasolabial fold (deeper with age and with a smile).
    out += 3.0 * _gauss(ap, q, 38, -8, 13, 12)
    nd = _nasolabial_distance(p, q)
    along = _smoothstep(-48.0, -40.0, q) * _smoothstep(0.0, -6.0, q)
    depth = 0.4 + 0.5 * idp["skin_age"] + 0.9 * au.get("smile", 0.0) + 0.5 * au.get("sneer", 0.0)
    out -= depth * along * np.exp(-0.5 * (nd / 2.4) ** 2)
    out += (0.3 + 0.9 * au.get("smile", 0.0)) * along * np.exp(-0.5 * ((nd - 5.5) / 3.5) ** 2)
    # Eyelids: thick lid margins (a lash line when closed) and the upper-lid crease of an open eye.
    d_eye = q - _eye_slit_q(ap)
    te = np.clip((ap - _EYE_IN) / (_EYE_OUT - _EYE_IN), 0.0, 1.0)
    span = np.sin(np.pi * te) ** 0.5
    opening, _ = _eye_opening(au)
    out += np.where(d_eye > 0, 1.3 * span * np.exp(-0.5 * ((d_eye - 0.8) / 1.4) ** 2),
                    0.7 * span * np.exp(-0.5 * ((d_eye + 0.6) / 1.0) ** 2))
    out -= 1.3 * opening * span * np.exp(-0.5 * ((d_eye - 6.5) / 1.3) ** 2)

    # Expressions: soft-tissue offsets.
    lips = _gauss(ap, q, 0, _MOUTH_Q - 1.0, 15, 7)
    out += au.get("pucker", 0.0) * (8.0 * lips + 2.0 * _gauss(ap, q, 0, -38, 22, 12))
    out -= au.get("pucker", 0.0) * 1.5 * _gauss(ap, q, 40, -25, 12, 12)
    puff = _gauss(ap, q, 42, -26, 16, 15)
    out += au.get("cheek_puff", 0.0) * (8.0 * puff + 1.5 * lips)
    out += au.get("smile", 0.0) * (2.2 * _gauss(ap, q, 40, -8, 12, 10) - 1.2 * _gauss(ap, q, 25, -37.5, 6, 6))
    out += au.get("brow_lower", 0.0) * 1.3 * _gauss(ap, q, 0, 44, 7, 6)
    out += au.get("sneer", 0.0) * 1.5 * _gauss(ap, q, 12, -5, 5, 5)
    return out


# ----------------------------------------------------------------------------------------------------
# Expressions
# ----------------------------------------------------------------------------------------------------

def action_units(expression: str, intensity: float = 1.0) -> dict[str, float]:
    """The action-unit weights of a named expression, scaled by intensity."""
    if expression not in _EXPRESSION_UNITS:
        raise ValueError(f"unknown expression {expression!r}; known: {', '.join(EXPRESSIONS)}")
    return {k: v * float(intensity) for k, v in _EXPRESSION_UNITS[expression].items()}


def _squeeze(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """Rest state of the slits: pull the rows next to each slit onto its line, so lips and lids touch."""
    ap = np.abs(P)
    out = Q.copy()
    for d, lo, hi, w in ((Q - _MOUTH_Q, 0.0, _MOUTH_HALF, 3.0),
                         (Q - _eye_slit_q(ap), _EYE_IN, _EYE_OUT, 2.5)):
        lat = _smoothstep(lo - 3.0, lo, ap) * _smoothstep(hi + 3.0, hi, ap) if lo > 0 else \
            _smoothstep(hi + 3.0, hi, ap)
        out -= lat * d * np.exp(-(d / w) ** 2)
    return out


def _eye_opening(au: Mapping[str, float]) -> tuple[float, float]:
    """How open the upper and lower lids are (1 = neutral, 0 = closed; lower < 0 pushes the lower lid up)."""
    opening = float(np.clip(1.0 + 0.35 * au.get("eye_wide", 0.0) - au.get("eye_close", 0.0)
                            - 0.2 * au.get("squint", 0.0), 0.0, 1.5))
    lower = float(np.clip(1.0 - au.get("eye_close", 0.0) - 0.9 * au.get("squint", 0.0), -0.6, 1.0))
    return opening, lower


def _slide(P: np.ndarray, Q: np.ndarray, idp: Mapping[str, float], au: Mapping[str, float]
           ) -> tuple[np.ndarray, np.ndarray]:
    """How far the skin at canonical (P, Q) slides over the bone, in (p, q)."""
    ap, sg = np.abs(P), np.where(P < 0, -1.0, 1.0)
    dp = np.zeros_like(P)
    dq = np.zeros_like(Q)
    # Eyelids: the fissure opens (upper lid up, lower lid down) by the almond-shaped opening.
    d_eye = Q - _eye_slit_q(ap)
    t = np.clip((ap - _EYE_IN) / (_EYE_OUT - _EYE_IN), 0.0, 1.0)
    almond_u = np.sin(np.pi * t ** 0.85) ** 0.9
    almond_l = np.sin(np.pi * t) ** 1.2
    size = idp["eye_size"]
    opening, lower = _eye_opening(au)
    up = d_eye > 0
    dq += np.where(up, 8.0 * size * opening * almond_u * (1.0 - _smoothstep(2.5, 21.0, d_eye)), 0.0)
    dq -= np.where(~up, 1.8 * size * lower * almond_l * (1.0 - _smoothstep(2.5, 11.0, -d_eye)), 0.0)
    # Brow raise: forehead skin and brows up, strongest at the brows, fading toward the hairline.
    b = au.get("brow_raise", 0.0)
    if b:
        prof = np.where(Q > 47, np.exp(-0.5 * ((Q - 47) / 32) ** 2), np.exp(-0.5 * ((Q - 47) / 6.0) ** 2))
        dq += b * 6.0 * prof * np.exp(-0.5 * (ap / 40) ** 2)
    # Brow lowerer: inner brows down and toward the midline.
    bl = au.get("brow_lower", 0.0)
    if bl:
        w = _gauss(ap, Q, 17, 47, 13, 8)
        dq -= bl * 4.0 * w
        dp -= bl * 3.0 * sg * w * _smoothstep(0.0, 6.0, ap)
    # Smile: mouth corners up and out, cheeks up.
    s = au.get("smile", 0.0)
    if s:
        wc = _gauss(ap, Q, _MOUTH_HALF, _MOUTH_Q, 11, 9)
        dp += s * 5.5 * sg * wc
        dq += s * 6.5 * wc + s * 3.5 * _gauss(ap, Q, 38, -10, 16, 13)
    # Pucker: corners toward the midline.
    pk = au.get("pucker", 0.0)
    if pk:
        dp -= pk * 7.0 * sg * _gauss(ap, Q, _MOUTH_HALF, _MOUTH_Q, 9, 9) * _smoothstep(0, 12, ap)
    # Mouth toward the subject's left (+x).
    ms = au.get("mouth_shift", 0.0)
    if ms:
        dp += ms * 8.0 * _gauss(P, Q, 0, _MOUTH_Q - 2.0, 21, 12)
    # Sneer: upper lip and nostril wings pulled up beside the nose.
    sn = au.get("sneer", 0.0)
    if sn:
        dq += sn * (4.0 * _gauss(ap, Q, 12, -24, 8, 9) + 2.5 * _gauss(ap, Q, 12, -5, 6, 5))
    return dp, dq


def _jaw_weight(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """How much of the jaw rotation each skin point follows: 1 on the mandible, 0 above the mouth."""
    ap = np.abs(P)
    split = _MOUTH_Q + np.clip(ap - _MOUTH_HALF, 0.0, None) * 0.42
    sigma = 0.35 + np.clip(ap - 20.0, 0.0, None) * 0.3
    w = 0.5 * (1.0 + np.tanh((split - Q) / sigma))
    soften = 1.0 - 0.45 * _smoothstep(11.0, 2.0, np.hypot(ap - _MOUTH_HALF, Q - _MOUTH_Q))
    return w * soften


def _rotate_x(pts: np.ndarray, center: np.ndarray, angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    y, z = pts[:, 1] - center[1], pts[:, 2] - center[2]
    out = pts.copy()
    out[:, 1] = center[1] + c * y - s * z
    out[:, 2] = center[2] + s * y + c * z
    return out


# ----------------------------------------------------------------------------------------------------
# Fine detail
# ----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def _skin_noise(detail_seed: int) -> np.ndarray:
    """Per-person skin texture on the full lattice (mm): fine pores plus slightly larger bumps."""
    g = _grid()
    rng = np.random.default_rng([int(detail_seed), 0x5EED])
    shape = g.P.shape
    fine = gaussian_filter(rng.standard_normal(shape), 1.0)
    coarse = gaussian_filter(rng.standard_normal(shape), 2.5)
    noise = 0.028 * fine / fine.std() + 0.012 * coarse / coarse.std()
    noise = np.clip(noise, -0.1, 0.1)
    noise.setflags(write=False)
    return noise


def _wrinkles(P: np.ndarray, Q: np.ndarray, idp: Mapping[str, float], au: Mapping[str, float],
              detail_seed: int) -> np.ndarray:
    """Expression wrinkles (negative = groove, mm), attached to the skin."""
    ap = np.abs(P)
    depth = 0.18 + 0.17 * idp["skin_age"]         # 0.18 .. 0.35 mm at full activation
    rng = np.random.default_rng([int(detail_seed), 0x3C1])
    phase = rng.uniform(0, 2 * np.pi, 4)
    out = np.zeros_like(P)
    static = 0.1 * idp["skin_age"]
    # Horizontal forehead lines (brow raise), gently arched and wavy; wavelength 9.5 mm.
    act = au.get("brow_raise", 0.0) + static
    if act:
        lam = 9.5
        line = Q - 0.0035 * P ** 2 - 0.9 * np.sin(P / 17.0 + phase[0])
        groove = (0.5 + 0.5 * np.cos(2 * np.pi * (line - 60.0) / lam)) ** 2
        mask = _smoothstep(52, 60, line) * _smoothstep(98, 86, line) * _smoothstep(50, 36, ap)
        out -= depth * act * groove * mask
    # Crow's feet: rays from the outer eye corner (smile / squint), angular period 0.42 rad.
    act = au.get("smile", 0.0) + 0.5 * au.get("squint", 0.0) + static
    if act:
        cq = float(_eye_slit_q(np.array(_EYE_OUT)))
        dx, dy = ap - (_EYE_OUT + 1.5), Q - cq
        r = np.hypot(dx, dy)
        ang = np.arctan2(dy, dx)
        groove = (0.5 + 0.5 * np.cos(2 * np.pi * (ang + phase[1] * 0.05) / 0.5)) ** 2
        mask = _smoothstep(6, 10, r) * _smoothstep(24, 15, r) * _smoothstep(1.2, 0.8, np.abs(ang))
        out -= depth * act * groove * mask
    # Vertical frown lines between the brows (brow lower).
    act = au.get("brow_lower", 0.0) + 0.5 * au.get("sneer", 0.0) + static
    if act:
        groove = np.exp(-0.5 * ((ap - 5.0) / 1.5) ** 2)
        mask = _smoothstep(36, 41, Q) * _smoothstep(58, 51, Q)
        out -= depth * act * groove * mask
    # Nose lines across the upper nose (sneer), wavelength 5 mm.
    act = au.get("sneer", 0.0)
    if act:
        groove = (0.5 + 0.5 * np.cos(2 * np.pi * (Q - 0.3 * ap - 24.0) / 5.5)) ** 2
        mask = _smoothstep(16, 20, Q) * _smoothstep(34, 28, Q) * _smoothstep(13, 8, ap)
        out -= depth * act * groove * mask
    return out


# ----------------------------------------------------------------------------------------------------
# The face
# ----------------------------------------------------------------------------------------------------

def _surface(P: np.ndarray, Q: np.ndarray, idp: Mapping[str, float], au: Mapping[str, float],
             base: _Base, skin: bool) -> tuple[np.ndarray, np.ndarray]:
    """Canonical points → 3D (before the jaw rotation and detail). Eyeball points get no skin sliding."""
    if skin:
        Q1 = _squeeze(P, Q)
        dp, dq = _slide(P, Q, idp, au)
        Ps, Qs = P + dp, Q1 + dq
    else:
        Q1, Ps, Qs = Q, P, Q
    # Identity warp of the bone coordinates: eye spacing and mouth width.
    aps, sg = np.abs(Ps), np.where(Ps < 0, -1.0, 1.0)
    X = Ps + sg * idp["eye_spacing"] * _gauss(aps, Qs, 36, 33, 22, 18)
    X = X * (1.0 + (idp["mouth_width"] - 1.0) * np.exp(-0.5 * ((Qs - _MOUTH_Q) / 16) ** 2))
    Y = Qs * base.length
    offset = _bone(Ps, Qs, idp)
    if skin:
        offset = offset + _soft(P, Q1, idp, au)
    else:
        offset = offset - 2.6 + 2.0 * _gauss(np.abs(P), Q, 36.0, 35.6, 3.6, 3.6)   # cornea
    pos, nrm = _lookup(base, X, Y)
    return pos + nrm * offset[..., None], nrm


def _detail_parts(P: np.ndarray, Q: np.ndarray, idp: Mapping[str, float], au: Mapping[str, float],
                  detail_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Skin texture and wrinkles (mm along the normal) of the skin vertices, faded out at slit margins
    (whose normals straddle the cut)."""
    g = _grid()
    ap = np.abs(P)
    near = np.maximum(
        np.exp(-0.5 * ((Q - _MOUTH_Q) / 1.2) ** 2) * _smoothstep(_MOUTH_HALF + 4.0, _MOUTH_HALF + 1.0, ap),
        np.exp(-0.5 * ((Q - _eye_slit_q(ap)) / 1.2) ** 2)
        * _smoothstep(_EYE_IN - 4.0, _EYE_IN - 1.0, ap) * _smoothstep(_EYE_OUT + 4.0, _EYE_OUT + 1.0, ap))
    keep = 1.0 - near
    skin = _skin_noise(int(detail_seed)).ravel()[g.skin_keep] * keep
    wrinkles = _wrinkles(P, Q, idp, au, detail_seed) * keep
    return skin, wrinkles


def jaw_hinge(identity: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A point on the jaw's hinge axis (mm, near the ears, far behind the face) and the axis direction.
    mouth_open rotates the lower face about it by JAW_OPEN_DEGREES x intensity."""
    base = _base(_check_identity(identity or {}))
    return np.array([0.0, 8.0 * base.length, base.z_front0 - 70.0]), np.array([1.0, 0.0, 0.0])


def make_face(identity: Mapping[str, float], expression: str = "neutral", intensity: float = 1.0,
              detail_seed: int = 0, detail: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One face scan: vertices (V, 3) float64 in mm and triangles (T, 3) int64 of the shared topology.

    `identity` comes from `sample_identity` (missing parameters take the mean); `expression` is one of
    EXPRESSIONS; `detail_seed` fixes the person's skin texture; `detail=False` leaves out skin texture
    and wrinkles (the smooth face, useful to measure the detail)."""
    verts, _ = _make(identity, expression, intensity, detail_seed, detail)
    return verts, np.array(face_topology().faces, dtype=np.int64)


def detail_offsets(identity: Mapping[str, float], expression: str = "neutral", intensity: float = 1.0,
                   detail_seed: int = 0) -> dict[str, np.ndarray]:
    """The fine detail make_face adds, per vertex in mm along the normal (negative = into the skin):
    {"skin": per-person texture, "wrinkles": expression wrinkles}; zero on the eyeballs."""
    _, parts = _make(identity, expression, intensity, detail_seed, True)
    return parts


def _make(identity: Mapping[str, float], expression: str, intensity: float, detail_seed: int,
          detail: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    idp = _check_identity(identity)
    au = action_units(expression, intensity)
    g = _grid()
    topo = g.topology
    base = _base(idp)

    P = g.P.ravel()[g.skin_keep]
    Q = g.Q.ravel()[g.skin_keep]
    skin_pos, _ = _surface(P, Q, idp, au, base, skin=True)
    eP = g.eye_P.ravel()[g.eye_keep]
    eQ = g.eye_Q.ravel()[g.eye_keep]
    right_eye, _ = _surface(eP, eQ, idp, au, base, skin=False)
    left_eye, _ = _surface(-eP, eQ, idp, au, base, skin=False)

    # Jaw: rotation about a hinge axis (x) near the ears; the lower face follows with a weight.
    angle = np.deg2rad(JAW_OPEN_DEGREES) * au.get("jaw_open", 0.0)
    if angle:
        hinge, _ = jaw_hinge(idp)
        skin_pos = _rotate_x(skin_pos, hinge, angle * _jaw_weight(P, Q))

    verts = np.concatenate([skin_pos, right_eye, left_eye])
    n_skin = len(P)
    parts = {"skin": np.zeros(len(verts)), "wrinkles": np.zeros(len(verts))}
    if detail:
        skin, wrinkles = _detail_parts(P, Q, idp, au, detail_seed)
        parts["skin"][:n_skin] = skin
        parts["wrinkles"][:n_skin] = wrinkles
        normals = vertex_normals(verts, topo.faces)[:n_skin]
        verts[:n_skin] += normals * (skin + wrinkles)[:, None]
    return verts, parts


def landmarks_from_vertices(vertices: np.ndarray) -> dict[str, list[float]]:
    """The five landmarks (mm) of a generated face: its vertices at the fixed landmark indices."""
    idx = face_topology().landmark_indices
    return {name: [float(x) for x in vertices[idx[name]]] for name in LANDMARK_NAMES}


# ----------------------------------------------------------------------------------------------------
# The scan folder
# ----------------------------------------------------------------------------------------------------

def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray, comment: str = "") -> None:
    """Binary little-endian PLY (float32 xyz, uchar-count int32 triangles), written with numpy."""
    v = np.ascontiguousarray(vertices, dtype="<f4")
    rec = np.empty(len(faces), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    rec["n"] = 3
    rec["i"] = faces
    header = ["ply", "format binary_little_endian 1.0"]
    if comment:
        header.append(f"comment {comment}")
    header += [f"element vertex {len(v)}", "property float x", "property float y", "property float z",
               f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(v.tobytes())
        fh.write(rec.tobytes())


def person_detail_seed(seed: int, person: int) -> int:
    """The skin-texture / wrinkle seed of person `person` of a folder generated with `seed`."""
    return int(np.random.default_rng([int(seed), int(person), 1]).integers(0, 2 ** 31 - 1))


def scan_detail_offsets(manifest: Mapping, entry: Mapping) -> dict[str, np.ndarray]:
    """The ground-truth fine detail of one scan of a generated folder, per vertex in mm along the normal
    ({"skin": texture, nonzero on every skin vertex; "wrinkles": negative in the grooves}), from its
    manifest (`generator.seed`, the entry's identity parameters, expression and intensity): where the
    detail a refinement field should reproduce lies."""
    seed = int(manifest["generator"]["seed"])
    person = int(str(entry["identity"]).lstrip("id"))
    return detail_offsets(entry["identity_parameters"], entry["expression"],
                          float(entry.get("expression_intensity", 1.0)), person_detail_seed(seed, person))


def generate_scan_folder(out_dir: str | Path, n_identities: int = 8, seed: int = 0,
                         expressions: Sequence[str] | None = None,
                         intensity_range: tuple[float, float] = (0.8, 1.0)) -> Path:
    """Write a scan folder (PLY meshes + manifest.json, docs/scan-folder.md) of procedural faces.

    Person i depends only on (seed, i), so a larger folder extends a smaller one. Each non-neutral
    scan gets a seeded intensity within `intensity_range`, like real people emoting by different amounts."""
    out = Path(out_dir)
    exprs = list(EXPRESSIONS if expressions is None else expressions)
    for e in exprs:
        action_units(e)   # validates the name
    out.mkdir(parents=True, exist_ok=True)
    topo = face_topology()
    scans = []
    for i in range(n_identities):
        name = f"id{i:02d}"
        identity = sample_identity(np.random.default_rng([int(seed), i, 0]))
        detail_seed = person_detail_seed(seed, i)
        (out / name).mkdir(exist_ok=True)
        for e in exprs:
            # Seeded by (seed, person, expression name): independent of which expressions are asked for.
            draw = np.random.default_rng([int(seed), i, 2, zlib.crc32(e.encode())]).uniform(*intensity_range)
            intensity = 1.0 if e == "neutral" else float(round(draw, 4))
            verts, faces = make_face(identity, e, intensity, detail_seed=detail_seed)
            rel = f"{name}/{e}.ply"
            write_ply(out / rel, verts, faces, comment=f"imface procedural face, seed {seed}; millimetres")
            scans.append({"path": rel, "identity": name, "expression": e, "neutral": e == "neutral",
                          "expression_intensity": intensity, "action_units": action_units(e, intensity),
                          "identity_parameters": identity,
                          "landmarks_mm": {k: [round(x, 4) for x in v]
                                           for k, v in landmarks_from_vertices(verts).items()}})
    manifest = {
        "source": f"imface procedural generator, seed {seed}",
        "nature": "procedural faces (training.data.synthetic_faces): seeded identity parameters, "
                  "action-unit expressions with a rotating jaw, skin texture and expression wrinkles",
        "units": "mm",
        "frame": "+y up, +z out of the face, +x toward the subject's left",
        "shared_topology": True,
        "landmark_vertex_indices": dict(topo.landmark_indices),
        "n_vertices": topo.n_vertices,
        "n_triangles": topo.n_triangles,
        "generator": {"seed": int(seed), "n_identities": int(n_identities), "expressions": exprs,
                      "intensity_range": list(intensity_range)},
        "scans": scans,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


__all__ = [
    "ACTION_UNITS", "EXPRESSIONS", "IDENTITY_PARAMETERS", "MEAN_IDENTITY", "SPACING_MM", "FaceTopology",
    "action_units", "detail_offsets", "face_topology", "generate_scan_folder", "jaw_hinge",
    "landmarks_from_vertices", "make_face", "person_detail_seed",
    "sample_identity", "scan_detail_offsets", "write_ply",
]
