"""Pose refinement: the rigid placement of a fit target, corrected by the model itself.

A scan is placed in the model frame by its landmarks (`backend.scans.frame`). Landmarks clicked by hand
are off by a few millimetres, and the model cannot move a face: every training face had its nose tip
exactly at (0, 0, 40 mm) and its eye corners on the canonical directions. A scan whose nose-tip
landmark is 2 mm off is therefore fitted 2 mm off everywhere (on the small test model, landmarks moved
by 1-3 mm cost 1 mm of Chamfer distance). `refine_pose` moves the target by a small rigid motion,
optimised together with the identity and expression codes on the base SDF (values only, the first
stage of the fast schedule), so that the model's face fits it; the fit then starts from the codes it
reached. The motion is folded into the target's `normalized_from_scan`, so meshes still go back into
the scan's own frame.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from backend.codes import check_codes, mean_codes
from backend.model import FaceCodes, ImFacePlusPlus

from .loop import fit_loss, frozen_networks
from .schedules import FitStage
from .targets import FitTarget


def _rotation(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation matrix of a rotation vector (differentiable, exact at 0)."""
    theta2 = (omega * omega).sum()
    k = torch.zeros(3, 3, dtype=omega.dtype, device=omega.device)
    k = k.index_put((torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 2, 0, 2, 0, 1])),
                    torch.stack([-omega[2], omega[1], omega[2], -omega[0], -omega[1], omega[0]]))
    # sin(t)/t and (1 - cos t)/t² by their series near 0 (|omega| stays well below 1 here)
    a = 1 - theta2 / 6 + theta2 * theta2 / 120
    b = 0.5 - theta2 / 24 + theta2 * theta2 / 720
    return torch.eye(3, dtype=omega.dtype, device=omega.device) + a * k + b * (k @ k)


def refine_pose(model: ImFacePlusPlus, target: FitTarget, *, steps: int = 60, points: int = 1024,
                surface: int = 512, lr: float = 1e-2, pose_lr: float = 2e-3, neutral: bool = False,
                init: FaceCodes | None = None, seed: int = 0) -> tuple[FitTarget, FaceCodes, dict[str, float]]:
    """(the moved target, the codes reached, {"rotation_deg", "translation_mm", "steps", "queries"}).

    Adam on a rotation vector, a translation (model units) and the identity and expression codes, the
    base SDF's values at the target's SDF samples and surface points (the fit objective's first stage)."""
    device = next(model.parameters()).device
    start = init if init is not None else mean_codes(model)
    check_codes(model, start, "initial codes")
    codes = {p: getattr(start, p).detach().clone().to(device) for p in ("identity", "expression", "detail")}
    for p in ("identity", "expression"):
        codes[p].requires_grad_(True)
    omega = torch.zeros(3, device=device, requires_grad=True)
    tau = torch.zeros(3, device=device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [codes["identity"], codes["expression"]], "lr": lr},
                            {"params": [omega, tau], "lr": pose_lr}])
    stage = FitStage(steps=steps, points=points, surface=surface, lr=lr, codes=("identity", "expression"),
                     detail=False, gradient_terms=False)
    gen = torch.Generator().manual_seed(int(seed))
    neutral_t = torch.tensor([True], device=device) if neutral else None
    n_near = target.n_near
    n_all = target.points.shape[0]
    with frozen_networks(model):
        for _ in range(steps):
            k_near = points if n_all == n_near else int(round(points * 0.75))
            pi = torch.cat([torch.randint(0, n_near, (k_near,), generator=gen),
                            n_near + torch.randint(0, max(1, n_all - n_near), (points - k_near,), generator=gen)
                            if n_all > n_near else torch.zeros(0, dtype=torch.long)])
            si = torch.randint(0, target.surface_points.shape[0], (surface,), generator=gen)
            rot = _rotation(omega)
            move = lambda x: x.to(device) @ rot.T + tau  # noqa: E731
            batch = {"points": move(target.points[pi]), "sdf": target.sdf[pi].to(device),
                     "surface": move(target.surface_points[si])}
            opt.zero_grad(set_to_none=True)
            terms = fit_loss(model, FaceCodes(codes["identity"], codes["expression"], codes["detail"]), batch,
                             stage, neutral_t)
            terms["total"].backward()
            opt.step()
    with torch.no_grad():
        r = _rotation(omega).double().cpu().numpy()
        t = tau.double().cpu().numpy()
    moved = move_target(target, r, t)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
    info = {"rotation_deg": angle, "translation_mm": float(np.linalg.norm(t) * 100.0), "steps": float(steps),
            "queries": float(steps * (points + surface))}
    reached = FaceCodes(*(codes[p].detach() for p in ("identity", "expression", "detail")))
    return moved, reached, info


def move_target(target: FitTarget, rotation: np.ndarray, translation: np.ndarray) -> FitTarget:
    """The target moved by x -> R x + t in the model frame (samples, normals, landmarks, reference, the
    stored transform); signed distances do not change under a rigid motion."""
    r = np.asarray(rotation, dtype=np.float64)
    t = np.asarray(translation, dtype=np.float64)

    def pts(x):
        if x is None:
            return None
        if torch.is_tensor(x):
            return (x.double() @ torch.from_numpy(r).T + torch.from_numpy(t)).to(x.dtype)
        return (np.asarray(x, dtype=np.float64) @ r.T + t).astype(np.asarray(x).dtype)

    def vecs(x):
        if x is None:
            return None
        return (x.double() @ torch.from_numpy(r).T).to(x.dtype)

    m = np.eye(4)
    m[:3, :3], m[:3, 3] = r, t
    ref = None if target.reference is None else (pts(target.reference[0]), target.reference[1])
    return dataclasses.replace(
        target, points=pts(target.points), surface_points=pts(target.surface_points),
        surface_normals=vecs(target.surface_normals), normalized_from_scan=m @ target.normalized_from_scan,
        landmarks=pts(target.landmarks), free_points=pts(target.free_points), reference=ref,
        dense_points=pts(target.dense_points))


def fit_posed(model: ImFacePlusPlus, target: FitTarget, schedule=None, *, neutral: bool = False, seed: int = 0,
              pose: bool = True, **kwargs):
    """`refine_pose`, then `fit` from the codes it reached (kwargs go to `fit`); the result's target is the
    moved one, its report has the pose's "pose_rotation_deg" / "pose_translation_mm" metrics and counts
    the pose's SDF queries. pose=False: `fit` alone."""
    from .loop import fit

    if not pose:
        return fit(model, target, schedule, neutral=neutral, seed=seed, **kwargs)
    moved, init, info = refine_pose(model, target, neutral=neutral, seed=seed)
    result = fit(model, moved, schedule, neutral=neutral, seed=seed, init=kwargs.pop("init", None) or init, **kwargs)
    result.report.evaluations += int(info["queries"])
    result.report.metrics.update(pose_rotation_deg=info["rotation_deg"], pose_translation_mm=info["translation_mm"])
    return result
