"""Exponential map of se(3) (ImFace++ eq. 10-11) against scipy, and its behaviour at ω -> 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.spatial.transform import Rotation

from backend.model.se3 import hat, se3_apply, se3_exp_matrix, so3_coefficients, so3_exp_matrix

ANGLES = [0.0, 1e-9, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.05, 0.3, 0.999, 1.0, 1.001, 1.7, 2.5, 3.0, 3.14]


def _axes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return a / a.norm(dim=-1, keepdim=True)


def _twists(seed: int = 0) -> torch.Tensor:
    axes = _axes(len(ANGLES), seed)
    w = axes * torch.tensor(ANGLES, dtype=torch.float64)[:, None]
    v = torch.randn(len(ANGLES), 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return torch.cat((w, v), dim=-1)


def _expm_reference(twist: np.ndarray) -> np.ndarray:
    xi = np.zeros((4, 4))
    xi[:3, :3] = hat(torch.from_numpy(twist[:3])).numpy()
    xi[:3, 3] = twist[3:]
    return expm(xi)


def test_rotation_matches_scipy_float64() -> None:
    for seed in range(3):
        w = _twists(seed)[:, :3]
        ours = so3_exp_matrix(w).numpy()
        ref = Rotation.from_rotvec(w.numpy()).as_matrix()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


def test_rotation_matches_scipy_float32() -> None:
    w = _twists(3)[:, :3]
    ours = so3_exp_matrix(w.float()).double().numpy()
    ref = Rotation.from_rotvec(w.numpy()).as_matrix()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_translation_matches_matrix_exponential() -> None:
    tw = _twists(4)
    x = torch.randn(len(ANGLES), 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mats = se3_exp_matrix(tw).numpy()
    moved = se3_apply(tw, x).numpy()
    for i in range(len(ANGLES)):
        ref = _expm_reference(tw[i].numpy())
        np.testing.assert_allclose(mats[i], ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(moved[i], ref[:3, :3] @ x[i].numpy() + ref[:3, 3], rtol=0, atol=1e-12)
    # float32: accurate to float32 resolution of the operands
    moved32 = se3_apply(tw.float(), x.float()).double().numpy()
    np.testing.assert_allclose(moved32, moved, rtol=0, atol=5e-6)


def test_coefficients_continuous_across_taylor_threshold() -> None:
    # a few ulps either side of θ² = 1: series and closed forms agree (slopes are < 0.1)
    t = torch.tensor([1.0 - 4e-16, 1.0, 1.0 + 4e-16], dtype=torch.float64)
    for coef in so3_coefficients(t):
        assert (coef.max() - coef.min()).item() < 2e-15


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-4, 0.57, 1.2])
def test_gradcheck_and_double_backward(scale: float) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=-1, keepdim=True) * scale
    tw = torch.cat((w, torch.randn(4, 3, generator=g, dtype=torch.float64)), -1).requires_grad_(True)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(se3_apply, (tw, x))
    assert torch.autograd.gradgradcheck(se3_apply, (tw, x))


def test_finite_gradients_at_exact_zero_float32() -> None:
    tw = torch.zeros(5, 6, requires_grad=True)
    x = torch.randn(5, 3, requires_grad=True)
    y = se3_apply(tw, x)
    assert torch.equal(y, x)  # zero twist: exactly the identity map
    g_tw, g_x = torch.autograd.grad((y ** 2).sum(), (tw, x), create_graph=True)
    gg = torch.autograd.grad(g_tw.square().sum() + g_x.square().sum(), (tw, x))
    for t in (g_tw, g_x, *gg):
        assert torch.isfinite(t).all()
    # d(x')/dω at ω = 0 is -x^ (ω × x), d(x')/dv = I
    assert torch.allclose(g_tw[:, 3:], 2 * x.detach())
    assert torch.allclose(g_tw[:, :3], torch.linalg.cross(x.detach(), 2 * x.detach()), atol=1e-6)
