"""ImFacePlusPlus end to end on tiny random batches: both stages, freezing, neutral suppression."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from backend.model import FaceCodes, ImFacePlusPlus, ModelConfig
from backend.scans.frame import MM_PER_UNIT, NOSE_TIP_DEPTH_MM
from backend.scans.landmarks import CANONICAL_LANDMARKS_MM
from looped_blend_field import use_looped

N_ID, N_SCANS, V = 2, 4, 40
STAGE1_KEYS = {"sdf", "normal", "eikonal", "embedding", "landmark_generation", "landmark_consistency",
               "residual", "expression", "total"}
STAGE2_KEYS = {"sdf", "normal", "eikonal", "embedding", "base", "total"}


def _template_landmarks() -> torch.Tensor:
    lm = torch.tensor(CANONICAL_LANDMARKS_MM / MM_PER_UNIT, dtype=torch.float32)
    lm[:, 2] += NOSE_TIP_DEPTH_MM / MM_PER_UNIT
    return lm


def _model(dense: bool = True, seed: int = 0) -> ImFacePlusPlus:
    torch.manual_seed(seed)
    cfg = ModelConfig.cpu()
    return ImFacePlusPlus(cfg, N_ID, N_SCANS, _template_landmarks(),
                          torch.rand(V, 3) - 0.5 if dense else None)


def _batch(dense: bool = True, B: int = 2, N: int = 48, M: int = 16, D: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    tl = _template_landmarks()
    b = {
        "scan_index": torch.tensor([0, 3])[:B], "identity_index": torch.tensor([0, 1])[:B],
        "neutral": torch.tensor([True, False])[:B],
        "points": (torch.rand(B, N, 3, generator=g) * 2 - 1) * 0.9,
        "sdf": torch.randn(B, N, generator=g) * 0.05,
        "gradients": F.normalize(torch.randn(B, N, 3, generator=g), dim=-1),
        "surface_points": (torch.rand(B, M, 3, generator=g) * 2 - 1) * 0.9,
        "surface_normals": F.normalize(torch.randn(B, M, 3, generator=g), dim=-1),
        "landmarks": tl + 0.01 * torch.randn(B, 5, 3, generator=g),
        "neutral_landmarks": tl + 0.01 * torch.randn(B, 5, 3, generator=g),
    }
    if dense:
        b.update(dense_index=torch.randperm(V, generator=g)[:D],
                 dense_points=torch.rand(B, D, 3, generator=g) - 0.5,
                 neutral_dense_points=torch.rand(B, D, 3, generator=g) - 0.5,
                 dense_valid=torch.rand(B, D, generator=g) > 0.2)
    return b


def _groups(model: ImFacePlusPlus) -> dict[str, set[int]]:
    base = {id(p) for m in (model.exp_net, model.id_net, model.template_net, model.landmark_observed,
                            model.landmark_canonical) for p in m.parameters()}
    base_codes = {id(model.identity_codes.weight), id(model.expression_codes.weight)}
    detail = {id(p) for p in model.detail_net.parameters()}
    return {"base": base, "base_codes": base_codes, "detail": detail,
            "detail_codes": {id(model.detail_codes.weight)}}


def test_stage1_forward_backward() -> None:
    model = _model()
    model.freeze_for_stage(1)
    out = model(_batch(), stage=1)
    assert set(out) == STAGE1_KEYS
    for k, v in out.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    parts = sum(v for k, v in out.items() if k != "total")
    assert torch.allclose(out["total"], parts)
    assert out["expression"] > 0  # raw ExpNet output is penalised on the neutral scan
    out["total"].backward()
    ids = _groups(model)
    for p in model.parameters():
        if id(p) in ids["base"] | ids["base_codes"]:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None
    # codes of scans / identities not in the batch get no gradient
    assert model.expression_codes.weight.grad[1].abs().sum() == 0
    assert model.expression_codes.weight.grad[3].abs().sum() > 0


@pytest.mark.parametrize("freeze", [True, False])
def test_stage2_trains_only_detail(freeze: bool) -> None:
    from backend.model import losses as L

    model = _model()
    if freeze:
        model.freeze_for_stage(2)
    b = _batch()
    out = model(b, stage=2, kappa=0.3)
    assert set(out) == STAGE2_KEYS
    # The blend, from independent evaluations: κ = 1 is L_f alone (its four terms), κ = 0 is L_f̂ alone,
    # and L_f̂ is the stage-one objective of the same batch plus the detail-code prior.
    only_f = model(b, stage=2, kappa=1.0)["total"].detach()     # (autograd on: the losses take ∇f)
    only_base = model(b, stage=2, kappa=0.0)["total"].detach()
    stage1 = model(b, stage=1)["total"].detach()
    codes = model.codes(b["scan_index"], b["identity_index"])
    prior = model.cfg.loss.embedding_detail * L.embedding_loss(codes.detail).detach()
    model.zero_grad(set_to_none=True)
    assert torch.allclose(only_f, out["sdf"] + out["normal"] + out["eikonal"] + out["embedding"], rtol=1e-5)
    assert torch.allclose(only_base, stage1 + prior, rtol=1e-5)
    assert torch.allclose(out["total"], 0.3 * only_f + 0.7 * only_base, rtol=1e-5)
    assert not torch.allclose(only_f, only_base)  # (the two objectives differ, so the blend is seen)
    out["total"].backward()
    ids = _groups(model)
    for p in model.parameters():
        if id(p) in ids["detail"] | ids["detail_codes"]:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            # E, I, T, Landmark-Nets and exp/id codes: untouched even without freeze_for_stage
            assert p.grad is None or p.grad.abs().sum() == 0
    assert model.detail_net.hyper_out_bias[0].grad.abs().sum() > 0


def test_parameter_groups_and_freeze() -> None:
    model = _model()
    ids = _groups(model)
    g1 = model.parameter_groups(1, lr=1e-4)
    g2 = model.parameter_groups(2, lr=1e-3)
    assert {id(p) for p in g1[0]["params"]} == ids["base"]
    assert {id(p) for p in g1[1]["params"]} == ids["base_codes"]
    assert {id(p) for p in g2[0]["params"]} == ids["detail"]
    assert {id(p) for p in g2[1]["params"]} == ids["detail_codes"]
    assert all(g["lr"] == pytest.approx(1e-4) for g in g1)
    model.freeze_for_stage(1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == ids["base"] | ids["base_codes"]
    model.freeze_for_stage(2)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == ids["detail"] | ids["detail_codes"]
    # one Adam step of stage 2 moves only DetailNet and the detail codes
    opt = torch.optim.Adam(g2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(_batch(), stage=2, kappa=1.0)["total"].backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved and all(n.startswith(("detail_net.", "detail_codes.")) for n in moved), moved
    with pytest.raises(ValueError):
        model.parameter_groups(3, lr=1.0)


def test_neutral_suppression_is_exact_identity() -> None:
    model = _model()
    b = _batch()
    codes = model.codes(b["scan_index"], b["identity_index"])
    pts = b["points"]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            can = model.field(codes, neutral=b["neutral"], detail=False).to_canonical(pts)
            free = model.field(codes, detail=False).to_canonical(pts)
        assert torch.equal(can[0], pts[0])            # neutral scan: exactly the identity map
        assert torch.equal(can[1], free[1])           # expressive scan: ExpNet applied
        assert (free[0] - pts[0]).abs().max() > 0     # (the raw ExpNet does deform)
    # the neutral scan's template points do not depend on its expression code
    codes2 = FaceCodes(codes.identity, codes.expression + 1.0, codes.detail)
    with torch.no_grad():
        t1 = model.field(codes, neutral=b["neutral"]).to_template(pts)
        t2 = model.field(codes2, neutral=b["neutral"]).to_template(pts)
    assert torch.equal(t1[0], t2[0]) and not torch.equal(t1[1], t2[1])


def _consistency(model: ImFacePlusPlus, b: dict, obs: torch.Tensor, canonical_target: torch.Tensor,
                 template_target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The eq.-17 term computed from the model's warps directly (E then I), with the training weight."""
    from backend.model import losses as L

    codes = model.codes(b["scan_index"], b["identity_index"])
    face = model.field(codes, neutral=b["neutral"], detail=False)
    can = face.to_canonical(obs)
    tmp, _ = face.canonical_to_template(can)
    return model.cfg.loss.landmark_consistency * (L.l1_loss(can, canonical_target, valid)
                                                  + L.l1_loss(tmp, template_target, valid))


def test_sparse_landmark_fallback_and_dense_without_template() -> None:
    for model_dense, batch_dense in ((False, False), (False, True), (True, False)):
        model = _model(dense=model_dense)
        b = _batch(dense=batch_dense)
        out = model(b, stage=1)
        tl = model.template_landmarks.expand(2, -1, -1)
        with torch.no_grad():
            if not batch_dense:
                # no dense points: the five landmarks, to the neutral landmarks and the template landmarks
                expected = _consistency(model, b, b["landmarks"], b["neutral_landmarks"], tl, None)
            else:
                # dense points but no template vertices: dense for E, the five landmarks for I∘E
                from backend.model import losses as L

                codes = model.codes(b["scan_index"], b["identity_index"])
                face = model.field(codes, neutral=b["neutral"], detail=False)
                can = face.to_canonical(b["dense_points"])
                tmp = face.canonical_to_template(face.to_canonical(b["landmarks"]))[0]
                expected = model.cfg.loss.landmark_consistency * (
                    L.l1_loss(can, b["neutral_dense_points"], b["dense_valid"]) + L.l1_loss(tmp, tl))
        assert torch.allclose(out["landmark_consistency"], expected, rtol=1e-5), (model_dense, batch_dense)
        out["total"].backward()


def test_dense_subsampling_to_m() -> None:
    model = _model()
    model.cfg.dense_per_batch = 5
    b = _batch(D=20)
    torch.manual_seed(7)
    out = model(b, stage=1)
    torch.manual_seed(7)  # the same draw as inside forward: the m points the loss used
    _, (obs, can, tmp, valid) = model._correspondences(b)
    assert obs.shape == can.shape == tmp.shape == (2, 5, 3) and valid.shape == (2, 5)
    # m distinct columns of the batch, each with its own targets (pairs kept together).
    cols = [int((b["dense_points"][0] == obs[0, j]).all(-1).nonzero()[0, 0]) for j in range(5)]
    assert len(set(cols)) == 5
    assert torch.equal(can, b["neutral_dense_points"][:, cols]) and torch.equal(valid, b["dense_valid"][:, cols])
    assert torch.equal(tmp[0], model.template_dense[b["dense_index"][cols]])
    # ... and the loss is the one of these 5 points, not of all 20.
    with torch.no_grad():
        used = _consistency(model, b, obs, can, tmp, valid)
        every = _consistency(model, b, b["dense_points"], b["neutral_dense_points"],
                             model.template_dense[b["dense_index"]].expand(2, -1, -1), b["dense_valid"])
    assert torch.allclose(out["landmark_consistency"], used, rtol=1e-5)
    assert not torch.allclose(used, every, rtol=1e-3)


def test_sdf_inference_and_warps() -> None:
    model = _model()
    b = _batch()
    codes = model.codes(b["scan_index"], b["identity_index"])
    with torch.no_grad():
        face = model.field(codes)
        s = face.sdf(b["points"])
        s_base = face.sdf(b["points"], with_detail=False)
        tmpl = face.to_template(b["points"])
    assert s.shape == s_base.shape == b["points"].shape[:2]
    assert tmpl.shape == b["points"].shape
    assert not s.requires_grad and torch.isfinite(s).all()
    # eq. 7-8: f(p) = f̂(p_b) with p_b = p + χ d n, |d| <= detail_max_displacement (5 mm = 0.05 units):
    # so |f - f̂| is at most 5 mm times the base SDF's gradient norm along the way.
    max_d = model.cfg.detail_max_displacement
    assert max_d == pytest.approx(0.05)
    x = b["points"].clone().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(model.field(codes, detail=False).sdf(x, with_detail=False).sum(), x)
    lipschitz = 1.5 * float(g.norm(dim=-1).max())   # (a margin for the gradient's change over 5 mm)
    diff = (s - s_base).abs()
    assert float(diff.max()) <= max_d * lipschitz, (float(diff.max()), lipschitz)
    assert float(diff.max()) > 0                     # the detail does move the surface
    # with grad: differentiable w.r.t. points and codes (fitting, eq. 21)
    x = b["points"].clone().requires_grad_(True)
    s2 = model.field(codes).sdf(x)
    assert torch.allclose(s2.detach(), s, atol=1e-5)
    gx, gz = torch.autograd.grad(s2.sum(), (x, model.detail_codes.weight))
    assert torch.isfinite(gx).all() and gz.abs().sum() > 0


def test_full_model_batched_equals_looped() -> None:
    model = _model().double()
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in _batch().items()}
    res = {}
    for impl in ("batched", "looped"):
        use_looped(model, impl == "looped")
        model.zero_grad(set_to_none=True)
        out = model(b, stage=2, kappa=0.5)
        out["total"].backward()
        res[impl] = ({k: v.item() for k, v in out.items()},
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (lb, gb), (ll, gl) = res["batched"], res["looped"]
    for k in ll:
        assert math.isclose(lb[k], ll[k], rel_tol=1e-10), k
    assert gb.keys() == gl.keys()
    for n in gl:
        assert torch.allclose(gb[n], gl[n], rtol=1e-8, atol=1e-10), n


def test_variants_undetached_normals_and_translation_warps() -> None:
    """detail_detach_base=False (third-order backward through E, I, T) and translation ExpNet."""
    torch.manual_seed(0)
    cfg = ModelConfig.cpu()
    cfg.detail_detach_base = False
    cfg.exp_warp, cfg.id_warp = "translation", "se3"
    model = ImFacePlusPlus(cfg, N_ID, N_SCANS, _template_landmarks())
    b = _batch(dense=False, N=16, M=8)
    for stage in (1, 2):
        model.freeze_for_stage(stage)
        model.zero_grad(set_to_none=True)
        out = model(b, stage=stage, kappa=0.5)
        out["total"].backward()
        assert all(torch.isfinite(v) for v in out.values())
    assert model.detail_net.hyper_out_bias[0].grad.abs().sum() > 0
