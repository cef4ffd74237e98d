"""What a fit optimises against (`FitTarget`), made from a full scan or a partial point cloud.

Full scans go through the training preprocessing of one scan (`backend.scans.samples.preprocess_scan`:
landmark alignment, crop, hidden-surface removal, pseudo-watertight surface, exact SDF samples), so a
fit sees the same kind of samples the codes were trained on.

Partial single-view point clouds (NPHM thesis §4.4): only surface points, possibly noisy, and where
the camera was. The camera tells the model which side is outside: normals estimated from the points
(PCA of the nearest neighbours, scipy cKDTree) are turned toward it, short offsets along them give
near-surface SDF samples, and points on the rays between the camera and the surface are free space
(0 <= f <= distance to the surface), points just behind the surface are inside (f <= 0). Those
interval constraints enter as hinge losses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from backend.scans.folder import EYE_DISTANCE_MM, LoadedScan
from backend.scans.frame import MM_PER_UNIT, normalization_transform
from backend.scans.inputs import FitInput
from backend.scans.samples import PreprocessConfig, preprocess_scan


class FitInputError(ValueError):
    """Input that cannot be fitted (empty or NaN points, wrong units, no landmarks, ...), in words."""


@dataclass
class FitTarget:
    """What a fit optimises against, in the model's normalised frame (1 unit = 100 mm)."""

    name: str
    points: torch.Tensor                   # (N, 3) SDF samples: first n_near near the surface, then uniform
    sdf: torch.Tensor                      # (N,) their signed distances
    n_near: int
    surface_points: torch.Tensor           # (S, 3) on the surface (SDF 0)
    surface_normals: torch.Tensor | None   # (S, 3) unit, outward; None: no normal term
    normalized_from_scan: np.ndarray       # 4x4: scan frame (its own units) -> model frame
    landmarks: np.ndarray                  # (5, 3) model units
    free_points: torch.Tensor | None = None  # (F, 3) interval-constrained samples (point clouds)
    free_lower: torch.Tensor | None = None   # (F,) lower bound of f there
    free_upper: torch.Tensor | None = None   # (F,) upper bound of f there
    reference: tuple[np.ndarray, np.ndarray] | None = None  # surface to measure against (model units)
    dense_points: np.ndarray | None = None  # (V, 3) every scan vertex (shared topology), model units
    dense_valid: np.ndarray | None = None   # (V,) bool
    units_to_mm: float = 1.0               # the input's units times this = mm
    warnings: list[str] = field(default_factory=list)

    @property
    def scan_from_normalized(self) -> np.ndarray:
        return np.linalg.inv(self.normalized_from_scan)


def target_from_scan(scan: LoadedScan, n_near: int = 40_000, n_uniform: int = 10_000, n_surface: int = 20_000,
                     seed: int = 0, dense: bool = False) -> FitTarget:
    """Preprocess a `LoadedScan` exactly as for training (fewer samples: a fit draws a few thousand
    per step). dense: keep every vertex in the model frame (for EDE/TDE with shared topology)."""
    cfg = PreprocessConfig(n_near=n_near, n_uniform=n_uniform, n_surface=n_surface, seed=seed)
    samples = preprocess_scan(scan, cfg, dense=dense)
    t = samples.tensors
    return FitTarget(
        name=scan.entry.key,
        points=torch.from_numpy(t["points"]), sdf=torch.from_numpy(t["sdf"]), n_near=n_near,
        surface_points=torch.from_numpy(t["surface_points"]),
        surface_normals=torch.from_numpy(t["surface_normals"]),
        normalized_from_scan=np.asarray(t["normalized_from_scan"], dtype=np.float64),
        landmarks=np.asarray(t["landmarks"], dtype=np.float64),
        reference=samples.pseudo_watertight,
        dense_points=t.get("dense_points"),
        dense_valid=None if "dense_valid" not in t else t["dense_valid"].astype(bool),
        warnings=list(samples.warnings))


def check_landmark_units(landmarks_mm: np.ndarray, what: str = "the input") -> None:
    """FitInputError unless the outer eye corners are a plausible adult distance apart in mm."""
    d = float(np.linalg.norm(landmarks_mm[0] - landmarks_mm[1]))
    if not EYE_DISTANCE_MM[0] <= d <= EYE_DISTANCE_MM[1]:
        hint = ""
        for unit, factor in (("m", 1000.0), ("cm", 10.0)):
            if EYE_DISTANCE_MM[0] <= d * factor <= EYE_DISTANCE_MM[1]:
                name = "metres" if unit == "m" else "centimetres"
                hint = f": it looks like {what} is in {name}; give its units ({unit})"
        raise FitInputError(f"the outer eye corners are {d:.4g} apart where {EYE_DISTANCE_MM[0]:.0f}-"
                            f"{EYE_DISTANCE_MM[1]:.0f} mm is expected{hint or ' (wrong landmarks or units)'}")


def estimate_normals(points: np.ndarray, k: int = 16) -> np.ndarray:
    """Unit normals from the smallest principal axis of each point's k nearest neighbours (unoriented)."""
    from scipy.spatial import cKDTree

    k = int(min(k, len(points)))
    _, idx = cKDTree(points).query(points, k=k, workers=-1)
    nb = points[idx]                                      # (N, k, 3)
    nb = nb - nb.mean(1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", nb, nb)
    _, vecs = np.linalg.eigh(cov)                         # ascending eigenvalues
    return vecs[:, :, 0]


def target_from_point_cloud(points: np.ndarray, landmarks: np.ndarray, *, camera: np.ndarray | None = None,
                            view_direction: np.ndarray | None = None, units_to_mm: float = 1.0,
                            normals: np.ndarray | None = None, noise_mm: float = 0.5,
                            near_sigma_mm: float = 2.5, free_depth_mm: float = 50.0,
                            behind_depth_mm: float = 8.0, n_samples: int = 30_000, seed: int = 0,
                            name: str = "point cloud") -> FitTarget:
    """A fit target from a partial, single-view point cloud (surface points only).

    points, landmarks (5, 3: LANDMARK_NAMES order), camera: in the cloud's frame and units
    (`units_to_mm` converts them to mm). camera: the viewpoint (perspective rays); view_direction:
    the direction the camera looks along (parallel rays); neither: a frontal view (rays along -z of
    the model frame). normals: oriented normals if known (else estimated and turned to the camera).
    noise_mm: expected depth noise (widens the free-space bounds so noisy points do not contradict them).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise FitInputError(f"{name}: the point cloud is empty (expected (N, 3) points, got shape {pts.shape})")
    bad = ~np.isfinite(pts).all(1)
    if bad.any():
        raise FitInputError(f"{name}: {int(bad.sum())} of {len(pts)} points have NaN or infinite coordinates")
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 3) or not np.isfinite(lm).all():
        raise FitInputError(f"{name}: five finite landmarks (5, 3) are needed to place the face in the model frame")
    lm_mm = lm * units_to_mm
    check_landmark_units(lm_mm, name)
    T = normalization_transform(lm_mm)
    rot = T[:3, :3]
    x = (pts * units_to_mm) @ rot.T + T[:3, 3]
    keep = np.linalg.norm(x, axis=1) <= 1.0
    if keep.sum() < 100:
        raise FitInputError(f"{name}: only {int(keep.sum())} points lie within 10 cm of the point 4 cm behind "
                            "the nose tip: wrong landmarks, units or frame?")
    x = x[keep]
    # Ray directions (from the camera toward each point) in the model frame.
    if camera is not None:
        cam = np.asarray(camera, dtype=np.float64).reshape(3) * units_to_mm @ rot.T + T[:3, 3]
        if not np.isfinite(cam).all():
            raise FitInputError(f"{name}: the camera position is not finite")
        rays = x - cam
    elif view_direction is not None:
        d = np.asarray(view_direction, dtype=np.float64).reshape(3) @ rot.T
        rays = np.broadcast_to(d, x.shape).copy()
    else:
        rays = np.broadcast_to(np.array([0.0, 0.0, -1.0]), x.shape).copy()
    rays /= np.maximum(np.linalg.norm(rays, axis=1, keepdims=True), 1e-12)
    if normals is None:
        n = estimate_normals(x)
    else:
        n = np.asarray(normals, dtype=np.float64)[keep] @ rot.T
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    n *= np.where((n * rays).sum(1, keepdims=True) > 0, -1.0, 1.0)  # outward = toward the camera

    rng = np.random.default_rng(seed)
    mm = 1.0 / MM_PER_UNIT
    margin = 3.0 * noise_mm * mm
    # Near-surface samples: offsets along the normal, signed distance ≈ the offset (small offsets).
    i = rng.integers(0, len(x), n_samples)
    eps = np.clip(rng.normal(0.0, near_sigma_mm * mm, n_samples), -2 * near_sigma_mm * mm, 2 * near_sigma_mm * mm)
    near = x[i] + eps[:, None] * n[i]
    # Free space in front (on the ray, before the surface) and a thin inside layer behind it.
    j = rng.integers(0, len(x), n_samples)
    t_front = rng.uniform(3.0 * noise_mm * mm + 1e-3, free_depth_mm * mm, n_samples)
    front = x[j] - t_front[:, None] * rays[j]
    k = rng.integers(0, len(x), n_samples // 2)
    t_back = rng.uniform(3.0 * noise_mm * mm + 1e-3, behind_depth_mm * mm, n_samples // 2)
    back = x[k] + t_back[:, None] * rays[k]
    free = np.concatenate([front, back])
    lower = np.concatenate([np.full(len(front), -margin), -t_back - margin])
    upper = np.concatenate([t_front + margin, np.full(len(back), margin)])
    inside = np.linalg.norm(free, axis=1) <= 1.0
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return FitTarget(
        name=name, points=f32(near), sdf=f32(eps), n_near=len(near),
        surface_points=f32(x), surface_normals=f32(n),
        normalized_from_scan=T @ np.diag([units_to_mm] * 3 + [1.0]),
        landmarks=lm_mm @ rot.T + T[:3, 3],
        free_points=f32(free[inside]), free_lower=f32(lower[inside]), free_upper=f32(upper[inside]),
        units_to_mm=units_to_mm)


def target_from_input(inp: FitInput, *, partial: bool = False, camera: np.ndarray | None = None,
                      view_direction: np.ndarray | None = None, noise_mm: float = 0.5, seed: int = 0) -> FitTarget:
    """The target of a single mesh or point cloud (`backend.scans.inputs.read_fit_input`).

    A point cloud, or a mesh with `partial` (or a camera / view direction), is a partial view; a mesh
    otherwise goes through the scan preprocessing. Either way the stored transform maps the input's
    own units to the model frame, so meshes come back in those units."""
    if partial or inp.faces is None or camera is not None or view_direction is not None:
        return target_from_point_cloud(inp.vertices, inp.landmarks, camera=camera, view_direction=view_direction,
                                       units_to_mm=inp.units_to_mm, noise_mm=noise_mm, seed=seed, name=inp.name)
    target = target_from_scan(inp.load_mesh(), seed=seed)
    # Outputs in the scan's own units: fold the mm conversion into the stored transform.
    target.normalized_from_scan = target.normalized_from_scan @ np.diag([inp.units_to_mm] * 3 + [1.0])
    target.units_to_mm = inp.units_to_mm
    return target
