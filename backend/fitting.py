"""Fitting a trained ImFace++ model to new data: codes for a full scan (eq. 21) or a partial depth view.

Full scans go through the training preprocessing (`load_scan` → `preprocess_scan`: landmark alignment,
crop, hidden-surface removal, pseudo-watertight surface, exact SDF samples), so a fit sees the same
kind of samples the codes were trained on. The objective is eq. 21,

    argmin_{z_exp, z_id, z_detail}  L_sdf + L_eik + L_emb        (+ the normal term of eq. 13),

with the networks frozen and the training loss weights (`ModelConfig.loss`), starting from the mean
training codes.

Partial single-view point clouds (NPHM thesis §4.4): only surface points, possibly noisy, and where
the camera was. The camera tells the model which side is outside: normals estimated from the points
(PCA of the nearest neighbours, scipy cKDTree) are turned toward it, short offsets along them give
near-surface SDF samples, and points on the rays between the camera and the surface are free space
(0 <= f <= distance to the surface), points just behind the surface are inside (f <= 0). Those
interval constraints enter as hinge losses.

Schedules (`FitSchedule`): the default `fast()` is coarse to fine (few points per step while the codes
are far off, more once they are close), identity and expression first on the base SDF f̂ without the
second-order terms, then every code on the full f with the normal / Eikonal terms, Adam with cosine
decay. `plain()` is the straightforward reference: one stage, every code, the full objective, a
constant learning rate, a fixed number of points (1,500 steps by default). Both count their network
evaluations (`FitReport.evaluations`: SDF point queries, f and f̂ alike).

Results stay in the model's normalised frame; `extract_face_mesh` brings a mesh back to the scan's own
frame and millimetres with the stored `normalized_from_scan` transform.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from backend.editing import PARTS, check_codes, mean_codes
from backend.model import FaceCodes, ImFacePlusPlus
from backend.model import losses as L

ProgressCallback = Callable[[int, int, dict[str, float]], Any]
MM_PER_UNIT = 100.0


class FitInputError(ValueError):
    """Input that cannot be fitted (empty or NaN points, wrong units, no landmarks, ...), in words."""


# ================================================================================ targets


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


def target_from_scan(scan: Any, n_near: int = 40_000, n_uniform: int = 10_000, n_surface: int = 20_000,
                     seed: int = 0, dense: bool = False) -> FitTarget:
    """Preprocess a `LoadedScan` exactly as for training (fewer samples: a fit draws a few thousand
    per step). dense: keep every vertex in the model frame (for EDE/TDE with shared topology)."""
    from training.data.preprocess import PreprocessConfig, preprocess_scan

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
    from training.data.scan_folder import EYE_DISTANCE_MM

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
    from training.data.preprocess import normalization_transform

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


def simulate_depth_view(vertices: np.ndarray, faces: np.ndarray, camera: np.ndarray,
                        look_at: np.ndarray | None = None, up: tuple[float, float, float] = (0.0, 1.0, 0.0),
                        fov_degrees: float = 35.0, width: int = 160, height: int = 160, noise: float = 0.0,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Back-project one depth image of a mesh: a pinhole camera at `camera` looking at `look_at`
    (default: the mesh centre), one ray per pixel cast with trimesh (Embree when installed), the first
    hit per pixel, Gaussian noise of std `noise` (mesh units) along the ray. Returns (points (N, 3),
    index of the triangle each point lies on)."""
    import trimesh

    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                           process=False)
    cam = np.asarray(camera, dtype=np.float64).reshape(3)
    at = mesh.vertices.mean(0) if look_at is None else np.asarray(look_at, dtype=np.float64).reshape(3)
    fwd = at - cam
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, dtype=np.float64))
    right /= np.linalg.norm(right)
    true_up = np.cross(right, fwd)
    half = np.tan(np.radians(fov_degrees) / 2)
    u = np.linspace(-half, half, width)
    v = np.linspace(half, -half, height) * height / width
    uu, vv = np.meshgrid(u, v)
    dirs = fwd + uu.reshape(-1, 1) * right + vv.reshape(-1, 1) * true_up
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(cam, dirs.shape).copy()
    locations, ray_index, tri_index = mesh.ray.intersects_location(origins, dirs, multiple_hits=False)
    if noise > 0:
        rng = np.random.default_rng(seed)
        locations = locations + rng.normal(0.0, noise, len(locations))[:, None] * dirs[ray_index]
    return np.asarray(locations), np.asarray(tri_index)


# ================================================================================ schedules


@dataclass
class FitStage:
    """A run of optimiser steps with one setting."""

    steps: int
    points: int = 2048              # SDF samples per step (near and uniform, 3:1)
    surface: int = 1024             # surface points per step
    free: int = 1024                # free-space samples per step (point-cloud targets)
    lr: float = 3e-3                # Adam learning rate at the start of the stage
    lr_end: float | None = None     # cosine decay to this at the end of the stage (None: constant)
    codes: tuple[str, ...] = PARTS  # the codes this stage moves (the others stay where they are)
    detail: bool = True             # the full f (with DetailNet) or the base f̂
    gradient_terms: bool = True     # normal + Eikonal terms on the surface points (a double backward)


@dataclass
class FitSchedule:
    name: str
    stages: list[FitStage]
    near_fraction: float = 0.75     # share of the SDF samples drawn near the surface

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def evaluations(self, free: bool = False) -> int:
        """SDF point queries the schedule makes (f and f̂ alike)."""
        return sum(s.steps * (s.points + s.surface + (s.free if free else 0)) for s in self.stages)

    @classmethod
    def fast(cls) -> "FitSchedule":
        """Coarse to fine: identity + expression on f̂ with few points, then everything on f."""
        return cls("fast", [
            FitStage(steps=40, points=512, surface=256, free=512, lr=1e-2, lr_end=3e-3,
                     codes=("identity", "expression"), detail=False, gradient_terms=False),
            FitStage(steps=40, points=2048, surface=1024, free=1024, lr=3e-3, lr_end=3e-4,
                     codes=PARTS, detail=True, gradient_terms=True),
        ])

    @classmethod
    def plain(cls, steps: int = 1500, points: int = 2048, surface: int = 1024, lr: float = 1e-3) -> "FitSchedule":
        """The straightforward reference: every code, the full objective, constant lr, fixed points."""
        return cls("plain", [FitStage(steps=steps, points=points, surface=surface, free=points // 2, lr=lr,
                                      lr_end=None, codes=PARTS, detail=True, gradient_terms=True)])

    @classmethod
    def scaled(cls, base: "FitSchedule", factor: float) -> "FitSchedule":
        """`base` with every stage's step count multiplied by factor (at least one step each)."""
        stages = [FitStage(**{**asdict(s), "steps": max(1, int(round(s.steps * factor)))}) for s in base.stages]
        return cls(f"{base.name}x{factor:g}", stages, base.near_fraction)


# ================================================================================ the fit


@dataclass
class FitReport:
    schedule: str
    total_steps: int
    steps: int = 0
    evaluations: int = 0           # SDF point queries
    seconds: float = 0.0
    cancelled: bool = False
    losses: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    metrics: dict[str, float] = field(default_factory=dict)       # filled by callers (Chamfer, ...)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    codes: FaceCodes
    report: FitReport
    target: FitTarget
    neutral: bool = False
    snapshots: dict[int, tuple[FaceCodes, float, int]] = field(default_factory=dict)  # step -> (codes, s, queries)


@contextlib.contextmanager
def frozen_networks(model: ImFacePlusPlus) -> Iterator[None]:
    """No parameter of the model requires grad inside (gradients reach only the codes); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _draw(gen: torch.Generator, n_total: int, k: int, start: int = 0) -> torch.Tensor:
    return start + torch.randint(0, n_total, (k,), generator=gen)


def _batch(target: FitTarget, stage: FitStage, near_fraction: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    n_uni = target.points.shape[0] - target.n_near
    k_near = stage.points if n_uni == 0 else int(round(stage.points * near_fraction))
    idx = [_draw(gen, target.n_near, k_near)]
    if stage.points - k_near > 0 and n_uni > 0:
        idx.append(_draw(gen, n_uni, stage.points - k_near, target.n_near))
    pi = torch.cat(idx)
    si = _draw(gen, target.surface_points.shape[0], stage.surface)
    out = {"points": target.points[pi], "sdf": target.sdf[pi], "surface": target.surface_points[si]}
    if target.surface_normals is not None:
        out["normals"] = target.surface_normals[si]
    if target.free_points is not None and stage.free > 0 and len(target.free_points):
        fi = _draw(gen, target.free_points.shape[0], stage.free)
        out.update(free=target.free_points[fi], lower=target.free_lower[fi], upper=target.free_upper[fi])
    return out


def fit_loss(model: ImFacePlusPlus, codes: FaceCodes, batch: dict[str, torch.Tensor], stage: FitStage,
             neutral: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted terms of the fitting objective (eq. 21 + normal term + free-space hinges) and 'total'.

    Weights are the training ones (`model.cfg.loss`), every term a mean, as in training."""
    W = model.cfg.loss
    ctx = model.prepare(codes, frozen=False, detail=stage.detail)
    terms: dict[str, torch.Tensor] = {}
    # Values only (first order) for the SDF samples and the free-space samples: one pass.
    value_pts = [batch["points"]]
    if "free" in batch:
        value_pts.append(batch["free"])
    if not stage.gradient_terms:
        value_pts.append(batch["surface"])
    x = torch.cat(value_pts).unsqueeze(0)
    f = model.sdf(x, with_detail=stage.detail, neutral=neutral, context=ctx)[0]
    n_pts = batch["points"].shape[0]
    sdf_pred = [f[:n_pts]]
    sdf_tgt = [batch["sdf"]]
    off = n_pts
    if "free" in batch:
        nf = batch["free"].shape[0]
        ff = f[off:off + nf]
        off += nf
        terms["free_space"] = W.sdf * (torch.relu(batch["lower"] - ff) + torch.relu(ff - batch["upper"])).mean()
    if stage.gradient_terms:
        s = batch["surface"].unsqueeze(0).clone().requires_grad_(True)
        fs = model.sdf(s, with_detail=stage.detail, neutral=neutral, context=ctx)
        g, = torch.autograd.grad(fs.sum(), s, create_graph=True)
        sdf_pred.append(fs[0])
        terms["eikonal"] = W.eikonal * L.eikonal_loss(g)
        if "normals" in batch:
            terms["normal"] = W.normal * L.normal_loss(g[0], batch["normals"])
    else:
        sdf_pred.append(f[off:])
    sdf_tgt.append(batch["surface"].new_zeros(batch["surface"].shape[0]))
    terms["sdf"] = W.sdf * L.sdf_loss(torch.cat(sdf_pred), torch.cat(sdf_tgt))
    terms["embedding"] = (W.embedding * (L.embedding_loss(codes.identity) + L.embedding_loss(codes.expression))
                          + W.embedding_detail * L.embedding_loss(codes.detail))
    terms["total"] = sum(terms.values())
    return terms


def _lr(stage: FitStage, local_step: int) -> float:
    if stage.lr_end is None or stage.steps <= 1:
        return stage.lr
    t = local_step / (stage.steps - 1)
    return stage.lr_end + (stage.lr - stage.lr_end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _cancelled(cancel: threading.Event | Callable[[], bool] | None) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def fit(model: ImFacePlusPlus, target: FitTarget, schedule: FitSchedule | None = None, *,
        init: FaceCodes | None = None, neutral: bool = False, progress: ProgressCallback | None = None,
        cancel: threading.Event | Callable[[], bool] | None = None, seed: int = 0,
        snapshots: tuple[int, ...] = ()) -> FitResult:
    """Optimise identity, expression and detail codes so the model's SDF matches `target`.

    init: starting codes (default: the mean training codes). neutral: switch the expression warp off
    (eq. 12), i.e. fit a neutral face (the expression code then does not matter).
    progress(step, total, losses): called after every step; returning False cancels.
    cancel: a threading.Event (set it to cancel) or a function returning True to cancel.
    A cancelled fit returns the codes reached so far with report.cancelled = True.
    snapshots: steps after which to keep a copy of the codes (with seconds and SDF queries so far),
    for curves of accuracy against iterations.
    """
    schedule = schedule or FitSchedule.fast()
    start = init if init is not None else mean_codes(model)
    check_codes(model, start, "initial codes")
    device = next(model.parameters()).device
    params = {p: getattr(start, p).detach().clone().to(device).requires_grad_(True) for p in PARTS}
    groups = [{"params": [params[p]], "lr": 0.0, "name": p} for p in PARTS]
    opt = torch.optim.Adam(groups, lr=1e-3)
    gen = torch.Generator().manual_seed(int(seed))
    neutral_t = torch.tensor([True], device=device) if neutral else None  # eq. 12 switch
    report = FitReport(schedule=schedule.name, total_steps=schedule.total_steps, warnings=list(target.warnings))
    t0 = time.perf_counter()
    step = 0
    keep = set(int(k) for k in snapshots)
    shots: dict[int, tuple[FaceCodes, float, int]] = {}
    with frozen_networks(model):
        for stage in schedule.stages:
            unknown = set(stage.codes) - set(PARTS)
            if unknown:
                raise ValueError(f"unknown code parts {sorted(unknown)} in the schedule")
            for local in range(stage.steps):
                if _cancelled(cancel):
                    report.cancelled = True
                    break
                lr = _lr(stage, local)
                for g in opt.param_groups:
                    g["lr"] = lr if g["name"] in stage.codes else 0.0
                batch = {k: v.to(device) for k, v in _batch(target, stage, schedule.near_fraction, gen).items()}
                codes = FaceCodes(params["identity"], params["expression"], params["detail"])
                opt.zero_grad(set_to_none=True)
                terms = fit_loss(model, codes, batch, stage, neutral_t)
                terms["total"].backward()
                for p in PARTS:  # a code the stage does not move gets no update (Adam's momentum too)
                    if p not in stage.codes:
                        params[p].grad = None
                opt.step()
                step += 1
                report.evaluations += sum(int(batch[k].shape[0]) for k in ("points", "surface", "free") if k in batch)
                losses = {k: float(v.detach()) for k, v in terms.items()}
                losses["lr"] = lr
                report.losses.append(losses)
                report.steps = step
                if step in keep:
                    shots[step] = (FaceCodes(*(params[p].detach().clone() for p in PARTS)),
                                   time.perf_counter() - t0, report.evaluations)
                if not math.isfinite(losses["total"]):
                    raise FitInputError(f"{target.name}: the fitting loss became non-finite at step {step}")
                if progress is not None and progress(step, schedule.total_steps, losses) is False:
                    report.cancelled = True
                    break
            if report.cancelled:
                break
    report.seconds = time.perf_counter() - t0
    codes = FaceCodes(*(params[p].detach().clone() for p in PARTS))
    return FitResult(codes=codes, report=report, target=target, neutral=neutral, snapshots=shots)


# ================================================================================ meshes


def extract_face_mesh(model: ImFacePlusPlus, codes: FaceCodes, resolution: int = 256, *,
                      neutral: bool = False, normalized_from_scan: np.ndarray | None = None,
                      with_detail: bool = True, chunk: int = 65536, return_stats: bool = False):
    """Marching cubes of the face (narrow band, `backend.geometry.extraction.extract_mesh`).

    Vertices come back in the scan's own frame and units when `normalized_from_scan` is given (the
    inverse of the stored transform), else in the model frame in mm. Returns (vertices, faces[, stats]).
    The mesh is the dense grid's (the extraction follows the surface wherever the learned SDF breaks
    the narrow band's Lipschitz assumption; see the stats' sign_violations and closure_queries)."""
    from backend.geometry.extraction import extract_mesh, to_scan_frame

    check_codes(model, codes)
    with torch.no_grad():
        fld = model.field(codes.detach(), neutral=neutral, frozen=True)
        out = extract_mesh(lambda p: fld.sdf(p, with_detail=with_detail, chunk=chunk), resolution=resolution,
                           chunk=chunk, inference_mode=False, return_stats=True,
                           device=next(model.parameters()).device)
    vertices, faces, stats = out
    if normalized_from_scan is not None:
        vertices = to_scan_frame(vertices, normalized_from_scan=normalized_from_scan)
    else:
        vertices = vertices.astype(np.float64) * MM_PER_UNIT
    return (vertices, faces, stats) if return_stats else (vertices, faces)


def reference_mesh_mm(target: FitTarget) -> tuple[np.ndarray, np.ndarray] | None:
    """The target's reference surface (pseudo-watertight, visible part) in the scan frame, in mm."""
    if target.reference is None:
        return None
    v, f = target.reference
    return scan_frame_mm(target, v), f


def scan_frame_mm(target: FitTarget, points: np.ndarray) -> np.ndarray:
    """Model-frame points -> the target's scan frame, in mm (whatever the scan's own units)."""
    from backend.geometry.extraction import to_scan_frame

    return to_scan_frame(points, normalized_from_scan=target.normalized_from_scan) * target.units_to_mm
