"""Loss terms of ImFace++ (eq. 13-20) and the stage-two κ schedule (§3.5).

Normalisation: every term is a mean (over points, landmark coordinates or code entries) instead of
the paper's sums, so that the weights λ (config.LossWeights) do not depend on the batch size or the
number of samples; the paper's relative weights are kept. This is also how the official ImFace code
normalises (`.mean()` / `F.l1_loss`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sdf_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |f(p) - s̄| (first term of eq. 13)."""
    return (pred - target).abs().mean()


def normal_loss(grad: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos(∇f(p), n̄) (second term of eq. 13).

    The paper writes 1 - <∇f, n̄>; the cosine (as in the official code and IDF) keeps the direction
    term independent of the gradient norm, which the Eikonal term controls.
    """
    return (1.0 - F.cosine_similarity(grad, normals, dim=-1, eps=1e-8)).mean()


def eikonal_loss(grad: torch.Tensor) -> torch.Tensor:
    """Mean | ||∇f|| - 1 | (one space of eq. 14)."""
    return (torch.linalg.vector_norm(grad, dim=-1) - 1.0).abs().mean()


def embedding_loss(code: torch.Tensor) -> torch.Tensor:
    """Mean z² over batch and code entries (one code of eq. 15)."""
    return code.pow(2).mean()


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute coordinate error (eq. 16, 17); mask (B, P) selects valid points."""
    err = (pred - target).abs()
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).unsqueeze(-1)
    return (err * m).sum() / (m.sum() * err.shape[-1]).clamp_min(1.0)


def residual_loss(delta: torch.Tensor) -> torch.Tensor:
    """Mean |δ| (eq. 18)."""
    return delta.abs().mean()


def expression_loss(displacement: torch.Tensor, neutral: torch.Tensor) -> torch.Tensor:
    """Σ_{neutral scans} Σ_p ||E(p) - p||² / (B N) (the eq. 12 constraint term).

    displacement: (B, N, 3) raw ExpNet output minus input; neutral: (B,) bool. Divided by all B N
    points (non-neutral scans count as zeros, as in the paper's case split and the official code).
    """
    sq = displacement.pow(2).sum(-1)                                   # (B, N)
    return (sq * neutral.to(sq.dtype).unsqueeze(-1)).mean()


def kappa_schedule(progress: float, t_m: float) -> float:
    """Weight κ of the detail loss L_f in κ L_f + (1 - κ) L_f̂ (§3.5), progress t in [0, 1].

    The paper's expression ½(1 + cos(π (t - T_m) / (1 - T_m))) falls from 1 at t = T_m to 0 at
    t = 1; read literally with κ on L_f it would switch DetailNet's loss *off* by the end of
    training. Following the progressive scheme the paper cites (IDF: base-surface losses annealed
    out, displacement losses annealed in with the same cosine), this returns the rising weight of
    L_f: κ = ½(1 - cos(π (t - T_m) / (1 - T_m))) on [T_m, 1], 0 before T_m, 1 after 1.
    """
    if not 0.0 <= t_m < 1.0:
        raise ValueError("t_m must be in [0, 1)")
    if progress <= t_m:
        return 0.0
    if progress >= 1.0:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * (progress - t_m) / (1.0 - t_m)))
