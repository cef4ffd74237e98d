"""Exponential map of se(3) (ImFace++ eq. 10-11), numerically stable as ||ω|| -> 0.

x' = e^{ω^} x + t,  e^{ω^} = I + A ω^ + B ω^²,  t = (I + B ω^ + C ω^²) v
A = sin θ / θ,  B = (1 - cos θ) / θ²,  C = (θ - sin θ) / θ³,  θ = ||ω||.

The coefficients are written as functions of t = θ² = ω·ω, which is smooth in ω. Below a threshold
they use their Taylor series (even in θ, so polynomials in t: no square root, no division, finite
first and second derivatives at ω = 0); above it the closed forms are evaluated on a "safe" copy of
t so that the unused branch of `torch.where` never produces inf/NaN gradients (double backward
included). B uses the half-angle form 2 sin²(θ/2) / θ², free of cancellation.
"""
from __future__ import annotations

import functools
import math

import torch

# θ² below which the series are used. With terms up to t^8 the truncation error at t = 1 is < 1e-16
# for A, B and C, and the closed form of C (the only one with cancellation) loses < 1e-6 relative
# accuracy in float32 at θ = 1.
_TAYLOR_T = 1.0
_N_TERMS = 9


@functools.lru_cache(maxsize=None)
def _series_coefficients(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_terms, 3) Taylor coefficients of A, B, C in t = θ²: (-1)^k / (2k + 1 + j)!, j = 0, 1, 2."""
    return torch.tensor([[(-1.0) ** k / math.factorial(2 * k + 1 + j) for j in range(3)]
                         for k in range(_N_TERMS)], dtype=dtype, device=device)


def so3_coefficients(theta_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A(θ), B(θ), C(θ) of the SO(3)/SE(3) exponential as functions of θ² (any shape)."""
    small = theta_sq < _TAYLOR_T
    t = theta_sq.unsqueeze(-1)
    # The three series in one Horner recursion on a (..., 3) tensor: 9 ops instead of 27.
    coeffs = _series_coefficients(theta_sq.dtype, theta_sq.device)
    series = coeffs[-1].expand(t.shape[:-1] + (3,))
    for k in range(_N_TERMS - 2, -1, -1):
        series = torch.addcmul(coeffs[k], series, t)
    t_safe = torch.where(small, torch.full_like(theta_sq, 4.0), theta_sq)  # θ = 2 in unused slots
    theta = torch.sqrt(t_safe)
    sin = torch.sin(theta)
    half = 0.5 * theta
    sinc_half = torch.sin(half) / half
    exact = torch.stack((sin / theta, 0.5 * sinc_half * sinc_half, (theta - sin) / (t_safe * theta)), dim=-1)
    a, b, c = torch.where(small.unsqueeze(-1), series, exact).unbind(-1)
    return a, b, c


def hat(w: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric matrix ω^ (…, 3, 3) of ω (…, 3)."""
    zero = torch.zeros_like(w[..., 0])
    wx, wy, wz = w.unbind(-1)
    return torch.stack(
        [torch.stack([zero, -wz, wy], -1),
         torch.stack([wz, zero, -wx], -1),
         torch.stack([-wy, wx, zero], -1)], -2)


def so3_exp_matrix(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrix e^{ω^} (…, 3, 3) (eq. 10)."""
    a, b, _ = so3_coefficients((w * w).sum(-1))
    k = hat(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def se3_exp_matrix(twist: torch.Tensor) -> torch.Tensor:
    """Homogeneous transform (…, 4, 4) of the twist (ω, v) (…, 6) (eq. 10-11)."""
    w, v = twist[..., :3], twist[..., 3:]
    a, b, c = so3_coefficients((w * w).sum(-1))
    k = hat(w)
    k2 = k @ k
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(k.shape)
    rot = eye + a[..., None, None] * k + b[..., None, None] * k2
    jac = eye + b[..., None, None] * k + c[..., None, None] * k2  # left Jacobian of SO(3)
    trans = (jac @ v[..., None])[..., 0]
    out = torch.zeros(*twist.shape[:-1], 4, 4, dtype=twist.dtype, device=twist.device)
    out[..., :3, :3] = rot
    out[..., :3, 3] = trans
    out[..., 3, 3] = 1.0
    return out


def se3_apply(twist: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x' = e^{ω^} x + t for a per-point twist (…, 6) and points (…, 3).

    Written with cross products instead of 3x3 matrices (ω^ y = ω × y): fewer, cheaper ops for the
    (B, N) point sets of the deformation fields.
    """
    w, v = twist[..., :3], twist[..., 3:]
    a, b, c = so3_coefficients((w * w).sum(-1, keepdim=True))
    wx = torch.linalg.cross(w, x, dim=-1)
    wv = torch.linalg.cross(w, v, dim=-1)
    return (x + v + a * wx + b * (torch.linalg.cross(w, wx, dim=-1) + wv)
            + c * torch.linalg.cross(w, wv, dim=-1))
