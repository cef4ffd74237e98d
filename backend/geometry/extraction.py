"""Mesh extraction from a signed distance function: marching cubes on a dense grid, evaluated only
in a narrow band around the surface.

`extract_mesh` gives the same mesh as `extract_mesh_dense` (marching cubes over every grid point,
as in ImFace++ §4 and the NPHM thesis §5.2: 256³ points over [-1, 1]³, level 0) while querying the
function at a small fraction of the points. How:

* The grid is the dense one: `resolution` points per axis on [-radius, radius], with the same float32
  coordinates in both paths, so every point that is evaluated gets exactly the number the dense grid
  would give it.
* Coarse to fine (strides coarse, coarse/2, ..., 1 in grid cells), every grid point of a kept cell's
  child grid gets either its exact value or a *certified signed bound* from already known points of
  that cell (its corners, then edge midpoints, then face centres): for an L-Lipschitz SDF g,
  |g(q)| >= |g(c)| - L·|q - c| with the sign of g(c) wherever that is positive (L = `band`, the
  safety margin; SDFs are ~1-Lipschitz). Points that cannot be certified are evaluated.
* A cell at a coarse level is dropped when all its corners have the same sign and bounds above
  L·half its diagonal: every point of the cell lies within half a diagonal of a corner, so the whole
  cell then has that sign and no surface. Kept cells are refined.
* At the finest level every grid point has an exact value, a certified sign, or the sign of the
  dropped cell it lies in. Marching cubes' volume is assembled from these (level ± h for the signs),
  and every cell of it whose corners are not all on one side gets its corners evaluated exactly
  (`_close_crossings`). For a `band`-Lipschitz function those are exactly the dense grid's
  sign-change cells; every other cell sees no crossing, as in the dense grid. skimage's Lewiner
  marching cubes places vertices from the 8 values of their own cell only, so vertices and faces
  are identical to the dense result.
* A learned SDF is not Lipschitz everywhere (ImFace++'s Eikonal loss only pulls |∇f| towards 1), so
  some certified signs are wrong. An exact value that contradicts one makes the cells around it
  cross, and `_close_crossings` keeps evaluating the corners of crossing cells until none is left
  unevaluated: it follows the dense grid's surface across every cell face that really crosses the
  level. Every connected piece of the dense surface that the narrow band touched therefore comes out
  whole and identical; only a piece that no kept cell reached could be missed
  (`benchmarks/bench_extraction.py --checkpoint ...` compares the two on a trained model).

Outside the sampling sphere the model is undefined (ImFace++ crops everything to the unit sphere);
with `outside_positive=True` (default) points with |p| > radius are not queried and get the value
level + (|p| - radius), the distance to the ball: positive, and it can never certify a wrong sign for
a point inside (|c| - r <= |q - c| for q in the ball), so the argument above still holds (L >= 1).

`band` defaults to 1.25: with the surface-following step above a larger band costs more queries
than it saves. Certificates found wrong are counted in `stats.sign_violations`, and the queries spent
following surface that they had hidden in `stats.closure_queries`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

SDFFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ExtractionStats:
    """What an extraction cost: `queries` is the number of points passed to the SDF function."""

    resolution: int
    queries: int = 0
    seconds: float = 0.0
    seconds_sdf: float = 0.0
    seconds_marching: float = 0.0
    kept_cells: int = 0          # finest-level cells handed to marching cubes with a sign change
    dense_points: int = 0        # resolution³, for ratios
    sign_violations: int = 0     # certified signs contradicted by an evaluation (band too small)
    closure_queries: int = 0     # queries spent following surface that the certificates had missed
    levels: list[dict] = field(default_factory=list)  # per refinement level: stride, kept cells, queries


class _Grid:
    """The dense grid's coordinates and the chunked, counted evaluation of the SDF on its points."""

    def __init__(self, sdf_fn: SDFFunction, resolution: int, radius: float, level: float, chunk: int,
                 outside_positive: bool, device: torch.device | str | None, stats: ExtractionStats,
                 inference_mode: bool = True) -> None:
        if resolution < 2:
            raise ValueError("resolution must be at least 2")
        self.fn, self.n, self.radius, self.level = sdf_fn, resolution, float(radius), float(level)
        self.chunk, self.outside_positive, self.stats = max(1, int(chunk)), outside_positive, stats
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.inference_mode = inference_mode
        # One float32 axis shared by both paths: the same index always gives the same coordinates.
        self.axis = np.linspace(-self.radius, self.radius, resolution, dtype=np.float64).astype(np.float32)
        self.h = 2.0 * self.radius / (resolution - 1)
        self._inside: np.ndarray | None = None

    def points(self, lin: np.ndarray) -> np.ndarray:
        return self.axis[_unlin(lin, self.n)]

    def evaluate(self, lin: np.ndarray) -> np.ndarray:
        """Values (float32) at the grid points given by linear index: one chunk (use `_evaluate`)."""
        pts = self.points(lin)
        vals = np.empty(len(lin), dtype=np.float32)
        inside = self.inside(lin)
        if not inside.all():
            out = ~inside
            vals[out] = (self.level + (self._norm(pts[out]) - self.radius)).astype(np.float32)
            pts = pts[inside]
        if len(pts):
            t0 = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(pts)).to(self.device)
            # No autograd graph, even for a network. inference_mode is the cheapest; no_grad lets a
            # function take a local gradient itself (ImFace++'s DetailNet needs ∇f̂ to displace p).
            try:
                with torch.inference_mode() if self.inference_mode else torch.no_grad():
                    res = self.fn(x)
            except RuntimeError as exc:
                if self.inference_mode and "grad" in str(exc):
                    raise RuntimeError(f"{exc}\n(the SDF seems to need autograd internally: pass "
                                       "inference_mode=False to the extraction)") from exc
                raise
            vals[inside] = res.reshape(-1).float().cpu().numpy()
            self.stats.seconds_sdf += time.perf_counter() - t0
            self.stats.queries += len(pts)
        return vals

    @staticmethod
    def _norm(pts: np.ndarray) -> np.ndarray:
        # Plain elementwise ops in a fixed order (x² + y²) + z², also used by `inside_volume`, so the
        # inside/outside test is bit-identical wherever the same point is tested.
        p64 = pts.astype(np.float64)
        return np.sqrt(p64[:, 0] * p64[:, 0] + p64[:, 1] * p64[:, 1] + p64[:, 2] * p64[:, 2])

    def inside(self, lin: np.ndarray) -> np.ndarray:
        """Where the function is queried (|p| <= radius, or everywhere without outside_positive)."""
        if not self.outside_positive:
            return np.ones(len(lin), dtype=bool)
        if self._inside is not None:
            return self._inside[lin]
        return self._norm(self.points(lin)) <= self.radius

    def build_inside_volume(self) -> None:
        """Precompute `inside` for every grid point (n³ bools), slab by slab, with `_norm`'s formula."""
        if not self.outside_positive or self._inside is not None:
            return
        a64 = self.axis.astype(np.float64)
        sq = a64 * a64
        vol = np.empty((self.n, self.n, self.n), dtype=bool)
        for i in range(self.n):
            vol[i] = np.sqrt((sq[i] + sq[:, None]) + sq[None, :]) <= self.radius
        self._inside = vol.reshape(-1)


def _evaluate(grid: _Grid, lin: np.ndarray) -> np.ndarray:
    """Chunked evaluation (bounded memory: one chunk of points and values alive at a time)."""
    out = np.empty(len(lin), dtype=np.float32)
    for start in range(0, len(lin), grid.chunk):
        out[start:start + grid.chunk] = grid.evaluate(lin[start:start + grid.chunk])
    return out


def _march(volume: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Lewiner marching cubes on the filled volume; vertices in the SDF's own units."""
    from skimage.measure import marching_cubes

    level = grid.level
    if not (volume.min() <= level <= volume.max()):
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    try:
        # With the volume indexed [x, y, z], skimage's default winding ('descent') makes the faces'
        # normals point toward larger values, i.e. outward for an SDF (checked by the tests).
        verts, faces, _, _ = marching_cubes(volume, level=level, gradient_direction="descent",
                                            allow_degenerate=False, method="lewiner")
    except RuntimeError:  # "No surface found at the given iso value."
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    vertices = (verts.astype(np.float64) * grid.h - grid.radius).astype(np.float32)
    return vertices, faces.astype(np.int64)


def extract_mesh_dense(
    sdf_fn: SDFFunction,
    resolution: int = 256,
    radius: float = 1.0,
    level: float = 0.0,
    chunk: int = 2 ** 18,
    outside_positive: bool = True,
    device: torch.device | str | None = None,
    inference_mode: bool = True,
    return_stats: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, ExtractionStats]:
    """Marching cubes after evaluating `sdf_fn` at every point of the resolution³ grid over
    [-radius, radius]³ (the reference for `extract_mesh`; same arguments and outputs; with
    outside_positive, points outside the sphere are not queried here either)."""
    t0 = time.perf_counter()
    stats = ExtractionStats(resolution=resolution, dense_points=resolution ** 3)
    grid = _Grid(sdf_fn, resolution, radius, level, chunk, outside_positive, device, stats, inference_mode)
    n = resolution
    volume = np.empty(n ** 3, dtype=np.float32)
    for start in range(0, n ** 3, grid.chunk):
        lin = np.arange(start, min(start + grid.chunk, n ** 3), dtype=np.int64)
        volume[lin] = grid.evaluate(lin)
    volume = volume.reshape(n, n, n)
    t1 = time.perf_counter()
    vertices, faces = _march(volume, grid)
    stats.seconds_marching = time.perf_counter() - t1
    stats.kept_cells = (n - 1) ** 3  # every cell is looked at
    stats.seconds = time.perf_counter() - t0
    return (vertices, faces, stats) if return_stats else (vertices, faces)


# A parent cell (stride 2s) holds 27 child-grid points (offsets 0..2 in child strides), 8 of them its
# corners, and 8 child cells whose corners are among the 27.
_CUBE3 = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
_CUBE2 = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
_IN27 = lambda off: (off[..., 0] * 3 + off[..., 1]) * 3 + off[..., 2]  # noqa: E731
_CHILD_CORNERS = _IN27(_CUBE2[:, None, :] + _CUBE2[None, :, :])       # (8 children, 8 corners)
# Child points are certified in rounds by type (number of odd offsets): edge midpoints from the
# corners, then face centres from corners and edge midpoints, then the centre from all the others, so
# each is bounded from its nearest known neighbours (one child stride away), not only the corners.
_TYPE27 = (_CUBE3 == 1).sum(1)
_ROUNDS = []
for _t in (1, 2, 3):
    _targets = np.flatnonzero(_TYPE27 == _t)
    _sources = np.flatnonzero(_TYPE27 < _t)
    _dist = np.linalg.norm(_CUBE3[_targets][:, None, :] - _CUBE3[_sources][None, :, :], axis=-1)
    _ROUNDS.append((_targets, _sources, _dist))  # distances in child strides, (targets, sources)
_BLOCK = 16384  # parent cells per block: bounds the (block, targets, sources) temporaries to ~13 MB


def _lin(idx: np.ndarray, n: int) -> np.ndarray:
    return (idx[..., 0] * n + idx[..., 1]) * n + idx[..., 2]


def _unlin(lin: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `_lin`: linear indices -> (K, 3) grid indices."""
    return np.stack([lin // (n * n), (lin // n) % n, lin % n], axis=1)


def _points27(origins: np.ndarray, s: int, n: int) -> np.ndarray:
    """Linear indices (K, 27) of the child-grid points (stride s) of parent cells at `origins`,
    clipped to the grid (the last cells along an axis may be shorter when strides don't divide)."""
    lin = _lin(origins, n)[:, None] + _lin(s * _CUBE3, n)[None, :]
    clip = (origins + 2 * s > n - 1).any(1)
    if clip.any():
        lin[clip] = _lin(np.minimum(origins[clip, None, :] + s * _CUBE3[None], n - 1), n)
    return lin


def extract_mesh(
    sdf_fn: SDFFunction,
    resolution: int = 256,
    radius: float = 1.0,
    level: float = 0.0,
    chunk: int = 2 ** 18,
    coarse: int = 16,
    band: float = 1.25,
    outside_positive: bool = True,
    device: torch.device | str | None = None,
    inference_mode: bool = True,
    return_stats: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, ExtractionStats]:
    """Marching cubes of {sdf_fn = level} on the resolution³ grid over [-radius, radius]³, evaluating
    the function only near the surface (coarse-to-fine narrow band; see the module docstring).

    sdf_fn: (N, 3) float32 tensor -> (N,) tensor; called in chunks of at most `chunk` points (on
        `device`) under torch.inference_mode, or torch.no_grad with inference_mode=False (for an SDF
        that takes a gradient internally, like ImFace++ with DetailNet).
    coarse: stride of the first, fully evaluated grid in grid cells (a power of two).
    band: assumed Lipschitz bound of the SDF (>= 1): the safety margin of every certificate.
    outside_positive: points outside the sphere of `radius` are outside (not queried).
    Returns (vertices (V, 3) float32 in the SDF's units, faces (F, 3) int64[, ExtractionStats]),
    identical to `extract_mesh_dense` for a `band`-Lipschitz function, and for any other function on
    every connected piece of surface that the narrow band reaches.
    Memory: about 11 bytes per grid point (~180 MB at 256³) for the bookkeeping grids and marching
    cubes' volume, plus one chunk of points in the SDF."""
    if coarse < 1 or coarse & (coarse - 1):
        raise ValueError("coarse must be a power of two")
    if band < 1.0:
        raise ValueError("band (the assumed Lipschitz bound) must be at least 1")
    t0 = time.perf_counter()
    n = int(resolution)
    stats = ExtractionStats(resolution=n, dense_points=n ** 3)
    grid = _Grid(sdf_fn, n, radius, level, chunk, outside_positive, device, stats, inference_mode)
    h, lvl = grid.h, float(level)
    lip = band * (1 + 1e-5)  # the 1e-5 absorbs float32 rounding of values and bounds
    coarse = max(2, min(coarse, 1 << max(1, (n - 1).bit_length() - 2)))  # >= ~4 coarse cells per axis

    # sb: signed bound on g - level for every grid point (exact where evaluated, certified elsewhere,
    # NaN = unknown); exact: where it was evaluated. The evaluated values and the certificates are
    # also kept as lists, to assemble marching cubes' volume at the end.
    grid.build_inside_volume()
    sb = np.full(n ** 3, np.nan, dtype=np.float32)
    exact = np.zeros(n ** 3, dtype=bool)
    mark = np.zeros(n ** 3, dtype=bool)  # scratch for de-duplicating index lists
    evaluated: list[tuple[np.ndarray, np.ndarray]] = []
    certified: list[tuple[np.ndarray, np.ndarray]] = []

    def unique(lin: np.ndarray) -> np.ndarray:
        mark[lin] = True  # a boolean scatter and scan beat sorting millions of indices
        out = np.flatnonzero(mark)
        mark[out] = False
        return out

    def evaluate_into(lin: np.ndarray) -> None:
        if len(lin):
            vals = _evaluate(grid, lin)
            sb[lin] = (vals.astype(np.float64) - lvl).astype(np.float32)
            exact[lin] = True
            evaluated.append((lin, vals))

    # Level 0: every point of the coarse grid (plus the last grid index, when strides don't divide),
    # then its cells are classified like any child cells below.
    s = coarse
    ax = np.unique(np.append(np.arange(0, n, s), n - 1))
    evaluate_into(_lin(np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3), n))
    cax = np.arange(0, n - 1, s)
    cells = np.stack(np.meshgrid(cax, cax, cax, indexing="ij"), -1).reshape(-1, 3)
    csb = sb[_lin(np.minimum(cells[:, None, :] + s * _CUBE2[None], n - 1), n)]
    keep = _keep_cells(csb, lip * h * s * math.sqrt(3) / 2)
    dropped = [(s, cells[~keep], np.sign(csb[~keep, 0]).astype(np.int8))]  # (stride, origins, sign)
    cells = cells[keep]
    stats.levels.append({"stride": s, "queries": stats.queries, "kept_cells": int(len(cells))})

    while s > 1 and len(cells):
        # Refine the kept cells (stride 2s) into their child grid (stride s). Pass 1, in three rounds
        # (see _ROUNDS): certify each new child point from the known points of its parent's child grid,
        # or evaluate it.
        s //= 2
        q_before = stats.queries
        for targets, sources, dist_units in _ROUNDS:
            dist = (lip * h * s * dist_units).astype(np.float32)  # >= the clipped distances
            todo = []
            for a in range(0, len(cells), _BLOCK):
                lin27 = _points27(cells[a:a + _BLOCK], s, n)
                src = sb[lin27[:, sources]]                             # (b, sources), all known
                pos = np.where(src > 0, src, -np.inf)
                neg = np.where(src < 0, -src, -np.inf)
                lb_pos = (pos[:, None, :] - dist[None]).max(2)         # (b, targets)
                lb_neg = (neg[:, None, :] - dist[None]).max(2)
                bound = np.where(lb_pos > 0, lb_pos, np.where(lb_neg > 0, -lb_neg, 0.0)).astype(np.float32)
                lin, bound = lin27[:, targets].reshape(-1), bound.reshape(-1)
                new = np.isnan(sb[lin])
                lin, bound, both = lin[new], bound[new], ((lb_pos > 0) & (lb_neg > 0)).reshape(-1)[new]
                cert = bound != 0
                # Outside the sphere values are free and exact: never certify there (module docstring).
                cert[cert] = grid.inside(lin[cert])
                # Opposite certificates for one point: the Lipschitz assumption is broken here.
                stats.sign_violations += int(np.count_nonzero(both & cert))
                sb[lin[cert]] = bound[cert]  # a point shared by parents keeps one (valid) certificate
                certified.append((lin[cert], bound[cert]))
                todo.append(lin[~cert])
            todo = unique(np.concatenate(todo))
            evaluate_into(todo[np.isnan(sb[todo])])
        record = {"stride": s, "parent_cells": int(len(cells)), "queries": stats.queries - q_before}
        stats.levels.append(record)
        if s == 1:
            break  # every finest cell's corners are known now: _close_crossings takes it from here
        # Pass 2: classify the child cells from their (now known) corners.
        thr = lip * h * s * math.sqrt(3) / 2
        children, gone_cells, gone_signs = [], [], []
        for a in range(0, len(cells), _BLOCK):
            origins = cells[a:a + _BLOCK]
            csb = sb[_points27(origins, s, n)][:, _CHILD_CORNERS]      # (b, 8 children, 8 corners)
            child = origins[:, None, :] + s * _CUBE2[None]             # (b, 8, 3)
            exists = (child < n - 1).all(2)
            keep = _keep_cells(csb.reshape(-1, 8), thr).reshape(exists.shape)
            gone = exists & ~keep
            gone_cells.append(child[gone])
            gone_signs.append(np.sign(csb[gone][:, 0]).astype(np.int8))
            children.append(child[exists & keep])
        dropped.append((s, np.concatenate(gone_cells), np.concatenate(gone_signs)))
        cells = np.concatenate(children)
        record["kept_cells"] = int(len(cells))

    # Marching cubes' volume: level ± h with the sign of each point's dropped ancestor cell, then the
    # certified signs, then the exact values (which win where a point has several).
    fill = _dropped_sign_volume(dropped, n)
    unset = fill == 0
    vol = np.array([lvl - h, lvl, lvl + h], dtype=np.float32)[fill + 1]  # one gather, no float temporaries
    del fill
    for lin, bound in certified:
        vol[lin] = (lvl + h * np.sign(bound)).astype(np.float32)
        unset[lin] = False
    for lin, vals in evaluated:
        vol[lin] = vals
        unset[lin] = False
    if unset.any():  # cannot happen by construction; a loud failure beats a silently wrong mesh
        raise RuntimeError(f"extract_mesh: {int(unset.sum())} grid points got no value")
    del unset
    sb = mark = certified = evaluated = None  # noqa: F841 (frees ~80 MB at 256³; closures still name them)
    _close_crossings(vol, exact, grid, stats)
    exact = None  # noqa: F841
    t1 = time.perf_counter()
    vertices, faces = _march(vol.reshape(n, n, n), grid)
    stats.seconds_marching = time.perf_counter() - t1
    stats.seconds = time.perf_counter() - t0
    return (vertices, faces, stats) if return_stats else (vertices, faces)


def _close_crossings(vol: np.ndarray, exact: np.ndarray, grid: _Grid, stats: ExtractionStats) -> None:
    """Make every cell that marching cubes will see crossing the level have 8 exact corners.

    Start from all crossing cells of the assembled volume (exact values, certified and dropped signs);
    evaluate their corners that are not exact, then re-check the cells around each newly evaluated
    point, until no crossing cell has a corner left to evaluate. When a certified sign was wrong, the
    new exact value makes the cells beside it cross, so the loop follows the dense grid's surface
    across every face it really crosses (the 4 corners of such a face are exact, so the cell behind it
    crosses in both grids): each connected piece of the dense surface that the narrow band reached
    comes out whole and identical. Updates `vol`, `exact` and `stats` in place."""
    n, lvl = grid.n, np.float32(grid.level)
    m = n - 1
    off8 = _lin(_CUBE2, n)
    crossing = _crossing(vol, n, lvl)                                  # flags of the m³ cells, kept current
    cells = _lin(_unlin(np.flatnonzero(crossing), m), n)               # their corner-0 grid points
    record = {"stride": 1, "crossing_cells": int(len(cells)), "queries": 0, "rounds": 0}
    stats.levels.append(record)
    q_start = stats.queries
    while len(cells):
        corners = cells[:, None] + off8[None]
        need = np.unique(corners[~exact[corners]])
        if not len(need):
            break
        q_before = stats.queries
        vals = _evaluate(grid, need)
        stats.sign_violations += int(np.count_nonzero((vol[need] > lvl) != (vals > lvl)))
        vol[need], exact[need] = vals, True
        if record["rounds"]:  # rounds after the first follow surface that the certificates missed
            stats.closure_queries += stats.queries - q_before
        record["rounds"] += 1
        # The cells that have a newly evaluated corner: the only ones whose crossing can have changed.
        around = _unlin(need, n)[:, None, :] - _CUBE2[None]
        around = np.unique(_lin(around[((around >= 0) & (around < m)).all(2)], m))
        points = _lin(_unlin(around, m), n)
        above = vol[points[:, None] + off8[None]] > lvl
        crossing[around] = now = above.any(1) & ~above.all(1)
        cells = points[now]
    record["queries"] = stats.queries - q_start
    stats.kept_cells = int(np.count_nonzero(crossing))


def _crossing(vol: np.ndarray, n: int, lvl: np.float32) -> np.ndarray:
    """Flags (m³, m = n - 1) of the cells whose corners are not all on one side of the level."""
    m = n - 1
    a = vol.reshape(n, n, n) > lvl
    any_above, all_above = a[:-1, :-1, :-1].copy(), a[:-1, :-1, :-1].copy()
    for dx, dy, dz in _CUBE2[1:]:
        part = a[dx:dx + m, dy:dy + m, dz:dz + m]
        any_above |= part
        all_above &= part
    return (any_above & ~all_above).reshape(-1)


def _keep_cells(corner_sb: np.ndarray, threshold: float) -> np.ndarray:
    """Cells (rows of 8 corner bounds) that may hold surface: signs differ, or a corner's bound is
    within `threshold` (the Lipschitz bound times half the cell diagonal) of the level."""
    same = (corner_sb > 0).all(1) | (corner_sb < 0).all(1)
    return ~same | (np.abs(corner_sb).min(1) <= threshold)


def _dropped_sign_volume(dropped: list[tuple[int, np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Sign (int8, flattened n³; 0 = none) of the dropped cell containing each grid point.

    `dropped` lists the dropped cells level by level, strides halving. A point on a cell boundary is
    assigned the cell starting at floor(i / stride) (clipped to the last cell), at every level; the
    cell grids are upsampled by repetition, so a level-l cell's children inherit its sign. Along these
    assignments every point that was neither evaluated nor certified meets a dropped cell (the
    children of the finest kept cells are all known), and any dropped cell containing a point has
    that point's sign."""
    signs_grid = None
    stride = 0
    for stride, origins, signs in dropped:
        cells = -(-(n - 1) // stride)  # cells per axis at this stride
        if signs_grid is None:
            signs_grid = np.zeros((cells,) * 3, dtype=np.int8)
        else:
            signs_grid = signs_grid.repeat(2, 0).repeat(2, 1).repeat(2, 2)[:cells, :cells, :cells]
        o = origins // stride
        signs_grid[o[:, 0], o[:, 1], o[:, 2]] = signs
    full = signs_grid.repeat(stride, 0).repeat(stride, 1).repeat(stride, 2)
    if full.shape[0] < n:  # index n - 1 when the stride divides n - 1: the last cell's
        full = np.pad(full, [(0, n - full.shape[0])] * 3, mode="edge")
    return np.ascontiguousarray(full[:n, :n, :n]).reshape(-1)
