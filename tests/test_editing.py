"""Editing in code space and codes files; a randomly initialised model is enough (no networks run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.codes import codes_from_json, CodesError, FaceCodesFile, load_codes, mean_codes, save_codes, select_row, training_codes
from backend.editing import code_pca, fit_gaussians, interpolate, sample_codes, transfer_detail, transfer_expression
from backend.model import FaceCodes, ImFacePlusPlus, ModelConfig
from backend.scans.frame import MM_PER_UNIT, NOSE_TIP_DEPTH_MM
from backend.scans.landmarks import CANONICAL_LANDMARKS_MM


@pytest.fixture(scope="module")
def model() -> ImFacePlusPlus:
    torch.manual_seed(0)
    lm = torch.tensor(CANONICAL_LANDMARKS_MM / MM_PER_UNIT, dtype=torch.float32)
    lm[:, 2] += NOSE_TIP_DEPTH_MM / MM_PER_UNIT
    cfg = ModelConfig(id_dim=10, exp_dim=15, detail_dim=20, mini_hidden=8, mini_layers=1, detail_hidden=8,
                      detail_layers=1, hyper_hidden=4, fusion_width=8, fusion_layers=2, landmark_width=8,
                      landmark_layers=2, pe_freqs=1)
    m = ImFacePlusPlus(cfg, n_identities=4, n_scans=12, template_landmarks=lm)
    with torch.no_grad():  # spread the codes (a trained model's are not all at init scale)
        for emb, s in ((m.identity_codes, 0.3), (m.expression_codes, 0.2), (m.detail_codes, 0.1)):
            emb.weight.normal_(0.0, s)
    return m


def _face(model, i: int) -> FaceCodes:
    return FaceCodes(model.identity_codes.weight[i % 4:i % 4 + 1].detach(),
                     model.expression_codes.weight[i:i + 1].detach(), model.detail_codes.weight[i:i + 1].detach())


def test_transfer_and_interpolate(model):
    a, b = _face(model, 1), _face(model, 6)
    e = transfer_expression(a, b)
    assert torch.equal(e.identity, a.identity) and torch.equal(e.expression, b.expression)
    assert torch.equal(e.detail, a.detail)
    d = transfer_detail(a, b)
    assert torch.equal(d.identity, a.identity) and torch.equal(d.expression, a.expression)
    assert torch.equal(d.detail, b.detail)
    for t, want in ((0.0, a), (1.0, b)):
        c = interpolate(a, b, t)
        assert all(torch.allclose(getattr(c, p), getattr(want, p)) for p in ("identity", "expression", "detail"))
    half = interpolate(a, b, 0.5)
    assert torch.allclose(half.expression, (a.expression + b.expression) / 2)
    only = interpolate(a, b, {"expression": 1.0})
    assert torch.equal(only.identity, a.identity) and torch.allclose(only.expression, b.expression)
    with pytest.raises(ValueError, match="unknown"):
        interpolate(a, b, {"expresion": 0.5})


def test_pca_of_training_codes(model):
    codes = training_codes(model)["expression"].double()
    pca = code_pca(model, "expression")
    k = pca.components.shape[0]
    assert k <= min(codes.shape[0] - 1, codes.shape[1])
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(k), atol=1e-5)
    proj = (codes - codes.mean(0)) @ pca.components.double().T
    assert torch.allclose(proj.std(0), pca.std.double(), rtol=1e-4)
    assert (pca.std[:-1] >= pca.std[1:]).all() and float(pca.explained.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(pca.code([]), pca.mean.unsqueeze(0))
    two = pca.code([2.0])
    assert torch.allclose(two[0], pca.mean + 2 * pca.std[0] * pca.components[0], atol=1e-6)
    assert code_pca(model, "identity", n_components=2).components.shape[0] == 2
    with pytest.raises(ValueError):
        code_pca(model, "hair")


def test_sampling_follows_the_training_codes(model):
    s1 = sample_codes(model, n=4000, seed=1)
    s2 = sample_codes(model, n=4000, seed=1)
    assert torch.equal(s1.identity, s2.identity) and s1.detail.shape == (4000, 20)
    tc = training_codes(model)
    for part in ("identity", "expression", "detail"):
        x = getattr(s1, part)
        assert torch.allclose(x.mean(0), tc[part].mean(0), atol=0.05)
        g = fit_gaussians(model)[part]
        # the sampled spread matches the fitted (shrunk) covariance's total variance
        assert float(x.var(0).sum()) == pytest.approx(float(torch.trace(g.cov)), rel=0.1)
    keep = sample_codes(model, n=3, seed=0, parts=("expression",))
    assert torch.equal(keep.identity, mean_codes(model).identity.expand(3, -1))
    assert select_row(keep, 2).expression.shape == (1, 15)


def test_codes_json_round_trip_and_errors(model, tmp_path):
    face = _face(model, 3)
    nfs = np.eye(4)
    nfs[:3, 3] = [1, 2, 3]
    path = save_codes(tmp_path / "a.codes.json", FaceCodesFile(face, model="abc123", neutral=True,
                                                               normalized_from_scan=nfs, source="x"))
    back = load_codes(path, model)
    assert back.model == "abc123" and back.neutral and back.source == "x"
    assert np.allclose(back.normalized_from_scan, nfs)
    assert torch.allclose(back.codes.identity, face.identity)
    data = json.loads(path.read_text())
    assert set(data) >= {"identity", "expression", "detail", "model"} and len(data["detail"]) == 20

    bad = dict(data, expression=data["expression"][:-1])
    with pytest.raises(CodesError, match="expression code has 14 values, this model expects 15"):
        codes_from_json(bad, model)
    with pytest.raises(CodesError, match="NaN"):
        codes_from_json(dict(data, identity=[float("nan")] * 10), model)
    with pytest.raises(CodesError, match="missing"):
        codes_from_json({k: v for k, v in data.items() if k != "detail"}, model)
    with pytest.raises(CodesError, match="not a number"):
        codes_from_json(dict(data, identity=["a"] * 10), model)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CodesError, match="not valid JSON"):
        load_codes(tmp_path / "broken.json", model)
    with pytest.raises(CodesError, match="does not exist"):
        load_codes(tmp_path / "missing.json", model)
    with pytest.raises(CodesError, match="one face"):
        save_codes(tmp_path / "two.json", FaceCodesFile(sample_codes(model, n=2)))
