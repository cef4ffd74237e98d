"""Batched inversion of a pointwise 3-D warp: solve warp(x) = target for many points at once.

Broyden's ("good") quasi-Newton method: the 3x3 Jacobian at every point from autograd once (three
backward passes, all points at a time), then rank-one updates of its inverse that need only forward
evaluations; only the points not converged yet are evaluated again. The animation decode
(`backend.animation_decode`) inverts ImFace++'s identity and expression warps with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WarpFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Inversion:
    """Solution of warp(x) = target for a batch of points."""

    x: torch.Tensor          # (N, 3)
    jinv: torch.Tensor       # (N, 3, 3) inverse Jacobian estimate at x (for warm starts)
    residual: torch.Tensor   # (N,) |warp(x) - target|
    extra: torch.Tensor | None  # (N, k) the warp's extra outputs at x (e.g. δ), when it has any
    iterations: int
    evaluations: int         # points passed to the warp (forward evaluations)
    jacobians: int           # points whose Jacobian was taken with autograd


def warp_jacobian(fn: WarpFn, x: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) Jacobians d warp / d x of a pointwise warp, three batched backward passes."""
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        y = fn(xr)[:, :3]
        rows = [torch.autograd.grad(y[:, k].sum(), xr, retain_graph=k < 2)[0] for k in range(3)]
    return torch.stack(rows, dim=1)


def _inverse3(j: torch.Tensor) -> torch.Tensor:
    """Batched 3x3 inverse; singular Jacobians (a folded warp) fall back to the identity."""
    det = torch.linalg.det(j)
    ok = det.abs() > 1e-8
    eye = torch.eye(3, dtype=j.dtype, device=j.device).expand_as(j)
    safe = torch.where(ok[:, None, None], j, eye)
    return torch.where(ok[:, None, None], torch.linalg.inv(safe), eye)


def invert_warp(fn: WarpFn, target: torch.Tensor, x0: torch.Tensor, jinv0: torch.Tensor | None = None,
                tol: float = 1e-5, max_iters: int = 40, max_step: float = 0.05, halvings: int = 4,
                patience: int = 6) -> Inversion:
    """Solve fn(x)[:, :3] = target for every row by Broyden's ("good") method, batched over points.

    fn: pointwise warp (N, 3) -> (N, 3 + k) (extra columns, e.g. an SDF residual, are returned for the
    final x). jinv0: inverse Jacobians to start from (warm start); None: from autograd at x0.
    Only points whose residual is above `tol` are evaluated again. Safeguards, so that a warp that is
    hard to invert somewhere (a badly trained or folded region) cannot throw points away: steps are
    at most `max_step` long; a step that increases a point's residual is halved (up to `halvings`
    times), and if that still does not help it is rejected and the point's Jacobian is recomputed with
    autograd. A point's residual therefore never increases: the result is the best point found. A
    point whose residual has not halved in `patience` iterations is given up (it keeps its best x and
    shows up as not converged): where the warp has no inverse, iterating longer only costs time.
    """
    x = x0.detach().clone()
    n = x.shape[0]
    with torch.no_grad():
        jacobians = 0
        if jinv0 is None:
            jinv = _inverse3(warp_jacobian(fn, x))
            jacobians = n
        else:
            jinv = jinv0.detach().clone()
        y = fn(x)
        evaluations = n
        extra = y[:, 3:].clone() if y.shape[1] > 3 else None
        r = y[:, :3] - target
        res = torch.linalg.vector_norm(r, dim=1)
        active = torch.nonzero(res > tol).squeeze(1)
        mark = res.clone()                       # residual at each point's last real progress
        since = torch.zeros(n, dtype=torch.long, device=x.device)  # iterations since then
        iters = 0
        while active.numel() and iters < max_iters:
            iters += 1
            ja, ra, xa = jinv[active], r[active], x[active]
            res_a = torch.linalg.vector_norm(ra, dim=1)
            dx = -(ja @ ra.unsqueeze(-1)).squeeze(-1)
            length = torch.linalg.vector_norm(dx, dim=1, keepdim=True)
            dx = dx * torch.clamp(max_step / length.clamp_min(1e-30), max=1.0)
            yn = fn(xa + dx)
            evaluations += active.numel()
            rn = yn[:, :3] - target[active]
            worse = torch.linalg.vector_norm(rn, dim=1) > res_a
            for _ in range(halvings):  # backtrack: halve the steps that made things worse
                if not worse.any():
                    break
                wi = torch.nonzero(worse).squeeze(1)
                dx[wi] *= 0.5
                yw = fn(xa[wi] + dx[wi])
                evaluations += wi.numel()
                yn[wi] = yw
                rn[wi] = yw[:, :3] - target[active[wi]]
                worse[wi] = torch.linalg.vector_norm(rn[wi], dim=1) > res_a[wi]
            rejected = worse
            ok = ~rejected
            dr = rn - ra
            jdr = (ja @ dr.unsqueeze(-1)).squeeze(-1)
            denom = (dx * jdr).sum(1, keepdim=True)
            good = (denom.abs() > 1e-20) & ok.unsqueeze(-1)
            upd = ((dx - jdr) / torch.where(good, denom, torch.ones_like(denom))).unsqueeze(-1) \
                * (dx.unsqueeze(1) @ ja)
            ja = ja + upd * good.unsqueeze(-1)
            if rejected.any():  # stay put and take the true Jacobian there
                ri = torch.nonzero(rejected).squeeze(1)
                ja[ri] = _inverse3(warp_jacobian(fn, xa[ri]))
                jacobians += ri.numel()
            jinv[active] = ja
            acc = active[ok]
            x[acc] = xa[ok] + dx[ok]
            r[acc] = rn[ok]
            if extra is not None:
                extra[acc] = yn[ok][:, 3:]
            now = torch.linalg.vector_norm(r[active], dim=1)
            progressed = now <= 0.5 * mark[active]
            mark[active] = torch.where(progressed, now, mark[active])
            since[active] = torch.where(progressed, torch.zeros_like(since[active]), since[active] + 1)
            active = active[(now > tol) & (since[active] < patience)]
        res = torch.linalg.vector_norm(r, dim=1)
    return Inversion(x, jinv, res, extra, iters, evaluations, jacobians)
