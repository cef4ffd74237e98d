"""Mini-Nets block: hyper-net shapes, SIREN initialisation statistics, batched == looped."""
from __future__ import annotations

import math

import pytest
import torch

from backend.model.blend_field import BlendField, encoding_dim, siren_uniform_bound
from looped_blend_field import use_looped

K = 5


def _field(code_dim: int | None, out_dim: int = 6, hidden: int = 32, omega: float = 30.0,
           pe: int = 6, seed: int = 0) -> BlendField:
    torch.manual_seed(seed)
    return BlendField(K, out_dim, hidden, 3, omega, pe, code_dim=code_dim)


def _inputs(B: int, N: int, code_dim: int | None, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, N, 3, generator=g, dtype=dtype) * 2 - 1) * 0.9
    lm = torch.randn(B, K, 3, generator=g, dtype=dtype) * 0.3
    z = None if code_dim is None else torch.randn(B, code_dim, generator=g, dtype=dtype) * 0.01
    return x, lm, z


def test_hypernet_output_shapes() -> None:
    f = _field(160)
    B = 3
    z = torch.randn(B, 160) * 0.01
    params = f.generate_params(z)
    din = encoding_dim(6)
    expected = [(32, din), (32, 32), (32, 32), (6, 32)]
    assert len(params) == len(expected)
    for (w, b), (o, i) in zip(params, expected):
        assert w.shape == (K, B, o, i)
        assert b.shape == (K, B, o)
    for (wt, b), (o, i) in zip(f.batched_weights(z), expected):
        assert wt.shape == (K * B, i, o)       # stacked on a leading K*B axis for one bmm
        assert b.shape == (K * B, 1, o)
    # each local hyper-net sees its own 32-d slice of the 160-d code (split_code)
    assert f.hyper_in_weight.shape == (K, 8, 32, 32)
    t = _field(None)
    for (w, b), (o, i) in zip(t.generate_params(), expected):
        assert w.shape == (K, 1, o, i) and b.shape == (K, 1, o)


def _check_uniform(w: torch.Tensor, bound: float, support_tol: float = 1e-6) -> None:
    """w ~ U(-bound, bound): mean 0, std bound/sqrt(3), support within the bound."""
    w = w.double().flatten()
    std = bound / math.sqrt(3.0)
    assert abs(w.mean().item()) < 0.03 * bound
    assert abs(w.std().item() / std - 1.0) < 0.04
    assert w.abs().max().item() <= bound * (1.0 + support_tol)
    # uniform, not normal: kurtosis of U is 1.8 (normal: 3)
    kurt = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert abs(kurt.item() - 1.8) < 0.1


@pytest.mark.parametrize("hidden,omega", [(32, 30.0), (64, 60.0)])
def test_generated_weights_follow_siren_init(hidden: int, omega: float) -> None:
    f = _field(160, hidden=hidden, omega=omega)
    z = torch.randn(8, 160) * 0.01                      # codes at their initial scale
    with torch.no_grad():
        params = f.generate_params(z)
        at_zero = f.generate_params(torch.zeros(1, 160))
    for layer, (w, _) in enumerate(params):
        bound = siren_uniform_bound(w.shape[-1], omega, first=(layer == 0))
        # code-independent part (= hyper output bias): exactly SIREN's U(±bound)
        _check_uniform(at_zero[layer][0], bound)
        # generated weights for initial codes: SIREN statistics; the code-dependent part is a
        # small perturbation (a few % of the bound) that can poke a little past the support.
        _check_uniform(w, bound, support_tol=0.2)
        spread = (w - w.mean(dim=1, keepdim=True)).std().item()
        assert 0 < spread < 0.05 * bound


def test_template_weights_follow_siren_init() -> None:
    f = _field(None, out_dim=1, hidden=64)
    for layer, (w, b) in enumerate(f.generate_params()):
        _check_uniform(w, siren_uniform_bound(w.shape[-1], 30.0, first=(layer == 0)))
        assert b.abs().max().item() <= 1.0 / math.sqrt(w.shape[-1])  # default bias init


@pytest.mark.parametrize("code_dim", [160, None])
def test_batched_equals_looped_float32(code_dim: int | None) -> None:
    f = _field(code_dim)
    x, lm, z = _inputs(2, 256, code_dim)
    results = {}
    for impl in ("batched", "looped"):
        use_looped(f, impl == "looped")
        f.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out = f(xx, lm, z)
        g, = torch.autograd.grad(out.sum(), xx, create_graph=True)
        (out.abs().mean() + (g.norm(dim=-1) - 1).abs().mean()).backward()  # double backward
        results[impl] = (out.detach(), g.detach(), {n: p.grad.clone() for n, p in f.named_parameters()})
    (ob, gb, pb), (ol, gl, pl) = results["batched"], results["looped"]
    assert (ob - ol).abs().max().item() <= 1e-5
    assert (gb - gl).abs().max().item() <= 1e-5
    for n in pl:
        scale = pl[n].abs().max().clamp_min(1e-8)
        assert ((pb[n] - pl[n]).abs().max() / scale).item() < 1e-3, n


def test_batched_equals_looped_float64() -> None:
    f = _field(160).double()
    x, lm, z = _inputs(2, 64, 160, dtype=torch.float64)
    outs = []
    for impl in ("batched", "looped"):
        use_looped(f, impl == "looped")
        f.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out = f(xx, lm, z)
        g, = torch.autograd.grad(out.sum(), xx, create_graph=True)
        g.square().sum().backward()
        outs.append((out.detach(), g.detach(), [p.grad.clone() for p in f.parameters()]))
    (ob, gb, pb), (ol, gl, pl) = outs
    assert (ob - ol).abs().max().item() < 1e-12
    assert (gb - gl).abs().max().item() < 1e-10
    for a, b in zip(pb, pl):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_frozen_field_gives_no_parameter_gradients() -> None:
    f = _field(160)
    x, lm, z = _inputs(2, 32, 160)
    xx = x.clone().requires_grad_(True)
    out = f(xx, lm, z, frozen=True)
    g, = torch.autograd.grad(out.sum(), xx, create_graph=True)
    g.square().sum().backward()
    assert all(p.grad is None for p in f.parameters())
