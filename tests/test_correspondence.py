"""Backward warps, EDE/TDE, warp inversion and the topology-consistent decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixture import loaded_model, one_thread, tiny_model, trained_codes  # noqa: F401  (fixtures)
from safetensors.numpy import load_file

from backend.animation_decode import extract_template_mesh, TemplateMesh, TopologyDecoder
from backend.correspondence import correspondence_errors, to_canonical, to_template
from backend.warp_inversion import invert_warp
from backend.editing import interpolate


@pytest.fixture(scope="module")
def decoder(loaded_model):
    model, _ = loaded_model
    return TopologyDecoder(model, extract_template_mesh(model, resolution=96))


def test_invert_warp_on_an_analytic_field():
    def warp(x: torch.Tensor) -> torch.Tensor:  # a smooth, invertible, non-linear warp (+ an extra column)
        y = x + 0.08 * torch.sin(3.0 * x.roll(1, dims=1)) + 0.05 * x ** 2
        return torch.cat((y, x.sum(1, keepdim=True)), dim=1)

    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(500, 3, generator=g) - 0.5
    target = warp(x_true)[:, :3]
    inv = invert_warp(warp, target, target.clone(), tol=1e-6)
    assert inv.residual.max() <= 1e-6 and inv.jacobians == 500
    assert torch.allclose(inv.x, x_true, atol=1e-5)
    assert torch.allclose(inv.extra[:, 0], x_true.sum(1), atol=1e-5)  # extras belong to the final x
    # Warm start from the solution: nothing to do but one evaluation.
    again = invert_warp(warp, target, inv.x, inv.jinv, tol=1e-6)
    assert again.iterations == 0 and again.jacobians == 0 and again.evaluations == 500
    # No iterations allowed: the residual says so.
    stuck = invert_warp(warp, target, target.clone(), tol=1e-6, max_iters=0)
    assert stuck.residual.max() > 1e-4


def test_decoded_vertices_map_back_to_the_template(loaded_model, decoder):
    model, ck = loaded_model
    tm = decoder.template
    assert len(tm.vertices) > 5000 and np.abs(tm.template_sdf).max() < 1e-2
    a, _ = trained_codes(model, ck, "id00/mouth_open")
    b, _ = trained_codes(model, ck, "id01/smile")
    cold = decoder.decode(a)
    assert cold.faces is tm.faces and cold.vertices.shape == tm.vertices.shape
    assert cold.converged.all() and cold.residual.max() <= 1e-4
    assert decoder.check_residuals(cold, a).max() <= 1e-4  # I(E(x)) recomputed from scratch
    assert cold.stats["identity_jacobians"] > 0 and cold.stats["expression_jacobians"] > 0

    # Warm: an expression change reuses the identity inversion and starts from the last solution.
    mid = interpolate(a, b, {"expression": 0.5})
    warm = decoder.decode(mid)
    assert warm.stats.get("identity_cached") == 1.0 and warm.stats["expression_jacobians"] == 0
    assert warm.stats["expression_evaluations"] < cold.stats["expression_evaluations"] + \
        cold.stats["identity_evaluations"]
    assert decoder.check_residuals(warm, mid).max() <= 1e-4
    other = decoder.decode(b)  # another person: both inversions run, warm-started
    assert other.stats["identity_jacobians"] == 0
    assert decoder.check_residuals(other, b).max() <= 1e-4
    assert other.faces is cold.faces  # one topology for every face
    assert not np.allclose(other.vertices, cold.vertices)


def test_secant_predictor_starts_a_timeline_closer(loaded_model, decoder):
    # Along an interpolation the predicted start is off by O(Δc²): fewer warp evaluations per frame
    # than starting from the previous solution, and the same converged result.
    model, ck = loaded_model
    a, _ = trained_codes(model, ck, "id00/mouth_open")
    b, _ = trained_codes(model, ck, "id01/smile")
    frames = [interpolate(a, b, t) for t in np.linspace(0.0, 1.0, 7)]
    plain = TopologyDecoder(model, decoder.template, secant_predictor=False)
    evals = {}
    for name, dec in (("secant", TopologyDecoder(model, decoder.template)), ("plain", plain)):
        out = [dec.decode(c) for c in frames]
        assert all(o.residual.max() <= 1e-4 for o in out)
        evals[name] = sum(o.stats["identity_evaluations"] + o.stats["expression_evaluations"] for o in out[3:])
        last = out[-1].vertices
        if name == "secant":
            secant_last = last
    assert evals["secant"] < evals["plain"], evals
    assert np.abs(secant_last - last).max() < 5e-4  # both within tolerance of the same solution


def test_decoded_mesh_lies_on_the_face_surface(loaded_model, decoder):
    model, ck = loaded_model
    codes, neutral = trained_codes(model, ck, "id01/smile")
    d = decoder.decode(codes, neutral=neutral)
    with torch.no_grad():
        f = model.field(codes, neutral=neutral).sdf(torch.from_numpy(d.vertices), chunk=16384).numpy()
    # model units: 0.003 = 0.3 mm; the normal offset uses |∇f̂| ≈ 1 (the Eikonal term's doing).
    assert np.median(np.abs(f)) < 0.003, np.percentile(np.abs(f), [50, 90, 99])
    # And it is the same face the marching cubes sees: decoded vertices are near the extracted mesh.
    from scipy.spatial import cKDTree

    from backend.fitting import extract_face_mesh

    v, _ = extract_face_mesh(model, codes, 96, neutral=neutral)
    dist, _ = cKDTree(v / 100.0).query(d.vertices)
    assert np.median(dist) < 0.01


def test_template_mesh_round_trip(loaded_model, decoder, tmp_path):
    model, _ = loaded_model
    path = tmp_path / "template.ply"
    decoder.template.save(path)
    back = TemplateMesh.load(model, path)
    assert np.array_equal(back.faces, decoder.template.faces)
    assert np.allclose(back.vertices, decoder.template.vertices, atol=1e-6)


def test_ede_and_tde_on_training_scans(loaded_model, tiny_model):
    model, ck = loaded_model
    tmpl = model.template_dense.numpy()
    results, still = {}, {}
    for key in ("id00/mouth_open", "id01/smile", "id01/neutral"):
        identity = key.split("/")[0]
        s = load_file(str(tiny_model.samples / f"{key}.safetensors"))
        n = load_file(str(tiny_model.samples / f"{identity}/neutral.safetensors"))
        codes, neutral = trained_codes(model, ck, key)
        valid = s["dense_valid"].astype(bool) & n["dense_valid"].astype(bool)
        # EDE with the expression warp on for every scan (a neutral scan with it off scores 0 by eq. 12).
        results[key] = correspondence_errors(model, codes, s["dense_points"], n["dense_points"], tmpl, valid,
                                             neutral=False)
        # What the errors would be with no warp at all: the scan's own motion, its distance to the template.
        still[key] = {"ede_mm": 100 * np.linalg.norm(s["dense_points"][valid] - n["dense_points"][valid], axis=1).mean(),
                      "tde_mm": 100 * np.linalg.norm(s["dense_points"][valid] - tmpl[valid], axis=1).mean()}
    for key, r in results.items():
        assert r["tde_mm"] < 5.0 and r["tde_mm"] < 1.2 * still[key]["tde_mm"], (key, r, still[key])
    # The jaw opens by ~4 mm on average over the face: the expression warp takes a good part of it back.
    assert still["id00/mouth_open"]["ede_mm"] > 3.0
    assert results["id00/mouth_open"]["ede_mm"] < 0.85 * still["id00/mouth_open"]["ede_mm"], results
    # A neutral scan through its own (trained) expression code: E stays close to the identity map.
    assert results["id01/neutral"]["ede_mm"] < 1.0, results


def test_backward_warps(loaded_model):
    model, ck = loaded_model
    codes, _ = trained_codes(model, ck, "id01/smile")
    x = np.random.default_rng(0).uniform(-0.4, 0.4, (200, 3)).astype(np.float32)
    assert np.array_equal(to_canonical(model, x, codes, neutral=True), x)
    can = to_canonical(model, x, codes)
    tmp = to_template(model, x, codes)
    assert can.shape == tmp.shape == (200, 3) and np.isfinite(tmp).all()
    assert not np.allclose(can, x)
    with torch.no_grad():
        ref = model.field(codes, detail=False).to_template(torch.from_numpy(x)).numpy()
    assert np.allclose(tmp, ref, atol=1e-6)


def test_face_field_is_one_consistent_surface(loaded_model):
    """ImFacePlusPlus.field: the per-codes work once; chunked, batched and unbatched queries agree, the
    warps compose, and gradients reach the codes only."""
    model, ck = loaded_model
    codes, _ = trained_codes(model, ck, "id01/smile")
    x = torch.rand(1, 300, 3) - 0.5
    with torch.no_grad():
        fld = model.field(codes)
        for detail in (True, False):
            assert torch.allclose(fld.sdf(x, with_detail=detail, chunk=None),
                                  fld.sdf(x[0], with_detail=detail, chunk=64), atol=1e-6)
        tmpl, delta = fld.canonical_to_template(fld.to_canonical(x[0]))
        assert torch.equal(fld.to_template(x[0]), tmpl) and delta.shape == (300,)
        base = fld.template_sdf(tmpl) + delta
        assert torch.allclose(base, fld.sdf(x[0], with_detail=False), atol=1e-5)
    from backend.fitting import frozen_networks
    from backend.model import FaceCodes

    z = FaceCodes(*(c.clone().requires_grad_(True) for c in (codes.identity, codes.expression, codes.detail)))
    with frozen_networks(model):
        model.field(z, frozen=False).sdf(x).abs().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in (z.identity, z.expression, z.detail))
    assert all(p.grad is None for p in model.parameters())
