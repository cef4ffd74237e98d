"""Loss terms, κ schedule and ModelConfig serialisation."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from backend.model import LossWeights, ModelConfig, kappa_schedule
from backend.model import losses as L


def _sphere_points(n: int = 4096) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return ((torch.rand(n, 3, generator=g) * 2 - 1) * 0.9).requires_grad_(True)


def test_eikonal_zero_on_analytic_sphere_sdf() -> None:
    x = _sphere_points()
    sdf = x.norm(dim=-1) - 0.5
    g, = torch.autograd.grad(sdf.sum(), x, create_graph=True)
    assert L.eikonal_loss(g).item() < 1e-6
    # a scaled field is not a distance field: the loss sees it
    g2, = torch.autograd.grad((2.0 * sdf).sum(), x)
    assert abs(L.eikonal_loss(g2).item() - 1.0) < 1e-5


def test_normal_and_sdf_terms() -> None:
    x = _sphere_points()
    sdf = x.norm(dim=-1) - 0.5
    g, = torch.autograd.grad(sdf.sum(), x)
    normals = x.detach() / x.detach().norm(dim=-1, keepdim=True)
    assert L.normal_loss(g, normals).item() < 1e-6
    assert abs(L.normal_loss(g, -normals).item() - 2.0) < 1e-5
    assert L.sdf_loss(sdf, sdf.detach() + 0.1).item() == pytest.approx(0.1, abs=1e-6)


def test_masked_l1_and_expression_terms() -> None:
    pred = torch.zeros(2, 4, 3)
    tgt = torch.ones(2, 4, 3)
    tgt[:, 2:] = 5.0
    mask = torch.tensor([[True, True, False, False]] * 2)
    assert L.l1_loss(pred, tgt, mask).item() == pytest.approx(1.0)
    assert L.l1_loss(pred, tgt).item() == pytest.approx(3.0)
    disp = torch.ones(2, 10, 3)
    # only the neutral scan counts; normalised by all B*N points
    assert L.expression_loss(disp, torch.tensor([True, False])).item() == pytest.approx(1.5)
    assert L.expression_loss(disp, torch.tensor([False, False])).item() == 0.0
    assert L.embedding_loss(torch.full((3, 8), 0.1)).item() == pytest.approx(0.01)


def test_kappa_schedule() -> None:
    assert kappa_schedule(0.0, 0.0) == 0.0
    assert kappa_schedule(0.3, 0.4) == 0.0
    assert kappa_schedule(0.7, 0.4) == pytest.approx(0.5)
    assert kappa_schedule(1.0, 0.4) == 1.0
    assert kappa_schedule(1.5, 0.4) == 1.0
    ts = [0.4 + 0.6 * i / 50 for i in range(51)]
    ks = [kappa_schedule(t, 0.4) for t in ts]
    assert all(b >= a for a, b in zip(ks, ks[1:]))  # rising weight of the detail loss
    # 1 - κ is the paper's ½(1 + cos(π (t - T_m) / (1 - T_m)))
    t = 0.55
    assert 1.0 - kappa_schedule(t, 0.4) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 0.4) / 0.6)))
    with pytest.raises(ValueError):
        kappa_schedule(0.5, 1.0)


def test_config_roundtrip_and_presets() -> None:
    for cfg in (ModelConfig.paper(), ModelConfig.cpu()):
        d = json.loads(json.dumps(dataclasses.asdict(cfg)))
        back = ModelConfig.from_dict(d)
        assert back == cfg
        assert isinstance(back.loss, LossWeights)
    p = ModelConfig.paper()
    assert (p.id_dim, p.exp_dim, p.detail_dim, p.n_landmarks) == (160, 160, 160, 5)
    assert (p.mini_hidden, p.omega, p.detail_hidden, p.detail_omega) == (32, 30.0, 64, 60.0)
    assert (p.hyper_hidden, p.fusion_width, p.landmark_width, p.dense_per_batch) == (32, 128, 256, 4096)
    w = p.loss
    assert [w.sdf, w.normal, w.eikonal, w.embedding, w.embedding_detail, w.landmark_generation,
            w.landmark_consistency, w.residual, w.expression] == [3e3, 1e2, 5e1, 1e5, 1e3, 1e3, 1e2, 1e2, 1e4]
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"loss": {"sdff": 1.0}})
    with pytest.raises(ValueError):
        ModelConfig(id_dim=64)  # not divisible by the 5 regions with split codes
