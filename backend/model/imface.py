"""ImFace++: ExpNet -> IDNet -> TempNet (+ DetailNet) with Landmark-Nets and auto-decoded codes.

Chain (§3.1-3.2), all spaces in the normalised frame of docs/samples-format.md:

    p' = E(p; z_exp, l)            observation -> canonical (SE(3) field, eq. 10-11);
                                   exactly p for neutral scans (eq. 12)
    (p'', δ) = I(p'; z_id, l')     canonical -> template (translation field) and SDF residual
    f̂(p) = T(p''; l'') + δ         base SDF (eq. 5)
    p_b' = p + χ(f̂(p)) D(p''; z_detail, l'') ∇f̂/||∇f̂||     (eq. 7)
    f(p) = T(I(E(p_b'))) + δ(E(p_b'))                       (eq. 8)

Training (forward): stage 1 trains E, I, T, the Landmark-Nets and the identity/expression codes with
L_f̂ (eq. 19); stage 2 keeps them fixed and trains D and the detail codes with κ L_f + (1 - κ) L_f̂
(eq. 20). See losses.py for the normalisation of each term.

Reading of the paper where it leaves room (official ImFace code used as tie-breaker):
* Neutral suppression (eq. 12) is a hard switch: p' = p exactly for neutral scans, so I and T learn
  the neutral shapes alone. The eq.-12 loss term then penalises the *raw* ExpNet output on neutral
  scans, so that E also maps a neutral code to (almost) the identity where no neutral label exists
  (fitting unseen scans).
* Landmark consistency (eq. 17) warps the scan's own landmark / dense points with E (target: the same
  points on the identity's neutral scan) and with I∘E (target: template points); with shared topology
  `dense_per_batch` (m) vertices per batch, otherwise the 5 sparse landmarks.
* Detail codes: one per scan, like the expression codes (official ImFace++ code).
* χ(s) = 1 / (1 + (s/ν)^4) (IDF), applied to a tanh-bounded displacement, with the base SDF value
  and normal detached by default (`detail_detach_base`), as in IDF and the official code.
* Landmark-Nets predict offsets from the template landmarks l''.
* κ: the weight of L_f, rising from 0 to 1 (see losses.kappa_schedule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as L
from .blend_field import BlendField, LayerWeights
from .config import ModelConfig
from .landmark_net import LandmarkNet
from .se3 import se3_apply


@dataclass
class FaceCodes:
    identity: torch.Tensor    # (B, C_id)
    expression: torch.Tensor  # (B, C_exp)
    detail: torch.Tensor      # (B, C_det)

    def detach(self) -> "FaceCodes":
        return FaceCodes(self.identity.detach(), self.expression.detach(), self.detail.detach())


@dataclass
class FaceContext:
    """Per-codes quantities (Landmark-Net outputs, hyper-net weights): computed once when a
    `FaceField` is made (`ImFacePlusPlus.field(codes)`) and reused by every evaluation with those codes.

    Generating the hyper-net weights is the fixed cost of an evaluation (independent of the number of
    points); reusing one context over many point chunks (mesh extraction, decoding, fitting steps
    that evaluate several point sets) pays it once.
    """
    codes: FaceCodes
    landmarks: torch.Tensor           # l   (B, K, 3) observed space
    canonical_landmarks: torch.Tensor  # l'  (B, K, 3)
    exp_w: list[LayerWeights] | None
    id_w: list[LayerWeights] | None
    tmp_w: list[LayerWeights] | None
    frozen: bool                      # no gradients to E, I, T, Landmark-Nets
    det_w: list[LayerWeights] | None = None  # DetailNet weights (prepare fills them; None: per call)


@dataclass
class _Base:
    exp_raw: torch.Tensor    # E(p) before neutral suppression (B, N, 3)
    canonical: torch.Tensor  # p'  (B, N, 3)
    template: torch.Tensor   # p'' (B, N, 3)
    delta: torch.Tensor      # δ   (B, N)
    sdf: torch.Tensor | None  # f̂  (B, N) (None when only warping)


class ImFacePlusPlus(nn.Module):
    def __init__(self, cfg: ModelConfig, n_identities: int, n_scans: int,
                 template_landmarks: torch.Tensor,
                 template_dense: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        K = cfg.n_landmarks
        if tuple(template_landmarks.shape) != (K, 3):
            raise ValueError(f"template_landmarks must be ({K}, 3)")
        common = dict(n_regions=K, pe_freqs=cfg.pe_freqs, pe_include_input=cfg.pe_include_input,
                      hyper_hidden=cfg.hyper_hidden, hyper_out_scale=cfg.hyper_out_scale,
                      split_code=cfg.split_code, fusion_width=cfg.fusion_width,
                      fusion_layers=cfg.fusion_layers, fusion_layernorm=cfg.fusion_layernorm)
        # Without detached base normals, stage 2 differentiates E, I, T three times: plain torch.sin.
        base = dict(common, fused_sine=cfg.detail_detach_base)
        exp_out = 6 if cfg.exp_warp == "se3" else 3
        id_out = (6 if cfg.id_warp == "se3" else 3) + 1  # + SDF residual δ
        self.exp_net = BlendField(out_dim=exp_out, hidden=cfg.mini_hidden, n_hidden_layers=cfg.mini_layers,
                                  omega=cfg.omega, code_dim=cfg.exp_dim, **base)
        self.id_net = BlendField(out_dim=id_out, hidden=cfg.mini_hidden, n_hidden_layers=cfg.mini_layers,
                                 omega=cfg.omega, code_dim=cfg.id_dim, **base)
        self.template_net = BlendField(out_dim=1, hidden=cfg.mini_hidden, n_hidden_layers=cfg.mini_layers,
                                       omega=cfg.omega, code_dim=None, **base)
        self.detail_net = BlendField(out_dim=1, hidden=cfg.detail_hidden, n_hidden_layers=cfg.detail_layers,
                                     omega=cfg.detail_omega, code_dim=cfg.detail_dim, **common)
        self.landmark_observed = LandmarkNet(cfg.exp_dim + cfg.id_dim, K, cfg.landmark_width, cfg.landmark_layers)
        self.landmark_canonical = LandmarkNet(cfg.id_dim, K, cfg.landmark_width, cfg.landmark_layers)

        self.identity_codes = nn.Embedding(n_identities, cfg.id_dim)
        self.expression_codes = nn.Embedding(n_scans, cfg.exp_dim)   # one per scan (§3.4)
        self.detail_codes = nn.Embedding(n_scans, cfg.detail_dim)    # one per scan
        for emb in (self.identity_codes, self.expression_codes, self.detail_codes):
            nn.init.normal_(emb.weight, mean=0.0, std=cfg.code_init_std)

        self.register_buffer("template_landmarks", template_landmarks.detach().clone().float())
        self.register_buffer("template_dense",
                             None if template_dense is None else template_dense.detach().clone().float())

    # ------------------------------------------------------------------ bookkeeping
    def _stage_modules(self, stage: int) -> tuple[list[nn.Module], list[nn.Module]]:
        if stage == 1:
            return ([self.exp_net, self.id_net, self.template_net, self.landmark_observed,
                     self.landmark_canonical], [self.identity_codes, self.expression_codes])
        if stage == 2:
            return [self.detail_net], [self.detail_codes]
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    def parameter_groups(self, stage: int, lr: float) -> list[dict]:
        """Adam parameter groups of a stage (stage 2: only DetailNet + detail codes)."""
        nets, codes = self._stage_modules(stage)
        return [
            {"name": "networks" if stage == 1 else "detail_network", "lr": lr,
             "params": [p for m in nets for p in m.parameters()]},
            {"name": "codes" if stage == 1 else "detail_codes", "lr": lr * self.cfg.code_lr_scale,
             "params": [p for m in codes for p in m.parameters()]},
        ]

    def freeze_for_stage(self, stage: int) -> None:
        """requires_grad only on what the stage trains (call before wrapping in DDP)."""
        nets, codes = self._stage_modules(stage)
        self.requires_grad_(False)
        for m in nets + codes:
            m.requires_grad_(True)

    def codes(self, scan_index: torch.Tensor, identity_index: torch.Tensor) -> FaceCodes:
        return FaceCodes(identity=self.identity_codes(identity_index),
                         expression=self.expression_codes(scan_index),
                         detail=self.detail_codes(scan_index))

    # ------------------------------------------------------------------ chain
    def _context(self, codes: FaceCodes, frozen: bool) -> FaceContext:
        """Landmarks and hyper-net weights of E, I, T: once per code batch (no grad when frozen)."""
        if frozen:
            codes = FaceCodes(codes.identity.detach(), codes.expression.detach(), codes.detail)
        tmpl = self.template_landmarks
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            lm = self.landmark_observed(torch.cat((codes.expression, codes.identity), dim=-1), tmpl)
            lm_c = self.landmark_canonical(codes.identity, tmpl)
            exp_w = self.exp_net.batched_weights(codes.expression)
            id_w = self.id_net.batched_weights(codes.identity)
            tmp_w = self.template_net.batched_weights()
        return FaceContext(codes, lm, lm_c, exp_w, id_w, tmp_w, frozen)

    @staticmethod
    def _apply_warp(kind: str, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "se3":
            return se3_apply(out[..., :6], x), out[..., 6:]
        return x + out[..., :3], out[..., 3:]

    def _expression(self, x: torch.Tensor, ctx: FaceContext) -> torch.Tensor:
        """E alone, before the neutral switch: observation -> canonical (B, N, 3)."""
        e = self.exp_net(x, ctx.landmarks, ctx.codes.expression, weights=ctx.exp_w, frozen=ctx.frozen)
        return self._apply_warp(self.cfg.exp_warp, e, x)[0]

    @staticmethod
    def _neutral_switch(x: torch.Tensor, exp_raw: torch.Tensor, neutral: torch.Tensor | None) -> torch.Tensor:
        # eq. 12: the expression deformation is exactly the identity map for neutral scans.
        return exp_raw if neutral is None else torch.where(neutral.view(-1, 1, 1), x, exp_raw)

    def _identity(self, canonical: torch.Tensor, ctx: FaceContext) -> tuple[torch.Tensor, torch.Tensor]:
        """I alone: canonical -> (template (B, N, 3), SDF residual δ (B, N))."""
        i = self.id_net(canonical, ctx.canonical_landmarks, ctx.codes.identity, weights=ctx.id_w,
                        frozen=ctx.frozen)
        template, extra = self._apply_warp(self.cfg.id_warp, i, canonical)
        return template, extra[..., 0]

    def _warp(self, x: torch.Tensor, ctx: FaceContext, neutral: torch.Tensor | None) -> _Base:
        """E then I: (raw E output, p', p'', δ) for points x (B, N, 3)."""
        exp_raw = self._expression(x, ctx)
        canonical = self._neutral_switch(x, exp_raw, neutral)
        template, delta = self._identity(canonical, ctx)
        return _Base(exp_raw, canonical, template, delta, None)

    def _base(self, x: torch.Tensor, ctx: FaceContext, neutral: torch.Tensor | None) -> _Base:
        """Base SDF f̂ (eq. 5) with the intermediate spaces."""
        b = self._warp(x, ctx, neutral)
        s0 = self.template_net(b.template, self.template_landmarks, weights=ctx.tmp_w, frozen=ctx.frozen)
        b.sdf = s0[..., 0] + b.delta
        return b

    def _detail_value(self, template: torch.Tensor, detail_code: torch.Tensor,
                      weights: list[LayerWeights] | None = None) -> torch.Tensor:
        """Bounded displacement d = max · tanh(D(p''; z_detail)) (B, N) at template points."""
        d = self.detail_net(template, self.template_landmarks, detail_code, weights=weights)[..., 0]
        return self.cfg.detail_max_displacement * torch.tanh(d)

    def detail_displacement(self, template: torch.Tensor, detail_code: torch.Tensor) -> torch.Tensor:
        """d(p''; z) (B, N) at template points (B, N, 3) for detail codes (B, detail_dim), differentiable
        in both and in DetailNet (no base network involved)."""
        return self._detail_value(template, detail_code, self.detail_net.batched_weights(detail_code))

    def _displaced(self, x: torch.Tensor, base: _Base, base_grad: torch.Tensor,
                   detail_code: torch.Tensor, det_w: list[LayerWeights] | None = None) -> torch.Tensor:
        """p_b' = p + χ(f̂) D(p'') ∇f̂/||∇f̂|| (eq. 7), D bounded by tanh as in IDF / official code."""
        cfg = self.cfg
        d = self._detail_value(base.template, detail_code, det_w)
        s = base.sdf.detach() if cfg.detail_detach_base else base.sdf
        chi = 1.0 / (1.0 + (s / cfg.detail_attenuation) ** 4)   # IDF attenuation
        n = F.normalize(base_grad, dim=-1)
        if cfg.detail_detach_base:
            n = n.detach()
        return x + (chi * d).unsqueeze(-1) * n

    # ------------------------------------------------------------------ evaluation
    def _prepare(self, codes: FaceCodes, frozen: bool | None = None, detail: bool = True) -> FaceContext:
        """The per-codes context (Landmark-Nets, hyper-net weights of E, I, T and D), computed once."""
        frozen = (not torch.is_grad_enabled()) if frozen is None else frozen
        ctx = self._context(codes, frozen=frozen)
        if detail:
            # (the detail code is never detached by `frozen`: stage two and fitting train it)
            ctx.det_w = self.detail_net.batched_weights(codes.detail)
        return ctx

    def field(self, codes: FaceCodes, neutral: bool | torch.Tensor | None = None,
              frozen: bool | None = None, detail: bool = True) -> "FaceField":
        """The one way to ask the model about a face: prepare it from its codes once, then query it
        (`sdf`, `to_canonical`, `to_template`, `canonical_to_template`, `template_sdf`,
        `detail_displacement`; see FaceField).

        neutral: switch the expression warp off (eq. 12): a bool, or (B,) bools, one per code row.
        frozen: no gradients to the networks nor to the identity/expression codes (default: whether
        autograd is off). For fitting, pass frozen=False with the network parameters' requires_grad
        off: gradients then reach the codes only. detail: also generate DetailNet's weights (False for
        warps or the base SDF only).
        """
        return FaceField(self, self._prepare(codes, frozen=frozen, detail=detail), neutral)

    def template_sdf(self, template: torch.Tensor, context: FaceContext | None = None) -> torch.Tensor:
        """T(p''; l'') (B, N): the template face's SDF (it has no code, so no face is needed)."""
        w = None if context is None else context.tmp_w
        return self.template_net(template, self.template_landmarks, weights=w,
                                 frozen=True if context is None else context.frozen)[..., 0]

    def _sdf(self, points: torch.Tensor, ctx: FaceContext, with_detail: bool = True,
             neutral: torch.Tensor | None = None) -> torch.Tensor:
        """Signed distance (B, N) at points (B, N, 3): f (eq. 8) or the base f̂ (eq. 5).

        Under torch.no_grad() only the base normal needs a (local) first-order gradient; with grad
        enabled the result is differentiable w.r.t. points and codes (for fitting, eq. 21).
        """
        grad_enabled = torch.is_grad_enabled()
        if not with_detail:
            return self._base(points, ctx, neutral).sdf
        with torch.enable_grad():
            x = points if points.requires_grad else points.detach().requires_grad_(True)
            base = self._base(x, ctx, neutral)
            create = grad_enabled and not self.cfg.detail_detach_base
            g, = torch.autograd.grad(base.sdf.sum(), x, create_graph=create, retain_graph=grad_enabled)
        if not grad_enabled:
            base = _Base(base.exp_raw.detach(), base.canonical.detach(), base.template.detach(),
                         base.delta.detach(), base.sdf.detach())
            x = x.detach()
        with torch.set_grad_enabled(grad_enabled):
            xb = self._displaced(x, base, g, ctx.codes.detail, ctx.det_w)
            return self._base(xb, ctx, neutral).sdf

    # ------------------------------------------------------------------ training losses
    def forward(self, batch: dict[str, torch.Tensor], stage: int = 1, kappa: float = 1.0,
                neutral_switch: bool = True) -> dict[str, torch.Tensor]:
        """Training losses of a batch (see compute_losses); codes from the embeddings."""
        codes = self.codes(batch["scan_index"], batch["identity_index"])
        return self.compute_losses(batch, codes, stage=stage, kappa=kappa, neutral_switch=neutral_switch)

    def _correspondences(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, tuple | None]:
        """Observed points and their canonical / template targets for eq. 17.

        Returns (sparse_obs, sparse_can, sparse_tmp, dense) where dense is None or
        (obs (B,D,3), can (B,D,3), tmp (B,D,3) | None, valid (B,D) | None).
        """
        lm = batch["landmarks"]
        B = lm.shape[0]
        sparse = (lm, batch["neutral_landmarks"], self.template_landmarks.expand(B, -1, -1))
        if "dense_points" not in batch:
            return sparse, None
        obs, can = batch["dense_points"], batch["neutral_dense_points"]
        valid = batch.get("dense_valid")
        idx = batch.get("dense_index")
        m = self.cfg.dense_per_batch
        if obs.shape[1] > m:  # the paper samples m points per batch
            sel = torch.randperm(obs.shape[1], device=obs.device)[:m]
            obs, can = obs[:, sel], can[:, sel]
            valid = None if valid is None else valid[:, sel]
            idx = None if idx is None else idx[sel]
        tmp = None
        if self.template_dense is not None and idx is not None:
            tmp = self.template_dense[idx].expand(B, -1, -1)
        return sparse, (obs, can, tmp, None if valid is None else valid.bool())

    def _base_terms(self, batch: dict[str, torch.Tensor], ctx: FaceContext, neutral: torch.Tensor, base: _Base,
                    g_obs: torch.Tensor, g_can: torch.Tensor, tgt_sdf: torch.Tensor,
                    tgt_normals: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The eq. 19 terms of L_f̂ (weighted) from a base pass; correspondences get their own pass.
        neutral: the scans whose warp is switched off; the eq.-12 term uses the neutral labels."""
        labelled = batch["neutral"].bool()
        W = self.cfg.loss
        t: dict[str, torch.Tensor] = {}
        t["sdf"] = W.sdf * L.sdf_loss(base.sdf, tgt_sdf)
        t["normal"] = W.normal * L.normal_loss(g_obs, tgt_normals)
        t["eikonal"] = W.eikonal * (L.eikonal_loss(g_obs) + L.eikonal_loss(g_can))
        t["embedding"] = W.embedding * (L.embedding_loss(ctx.codes.expression) + L.embedding_loss(ctx.codes.identity))
        t["landmark_generation"] = W.landmark_generation * (
            L.l1_loss(ctx.landmarks, batch["landmarks"])
            + L.l1_loss(ctx.canonical_landmarks, batch["neutral_landmarks"]))
        # eq. 17: E(l) -> neutral-scan positions, I(E(l)) -> template positions. Separate pass on the
        # correspondence points (first-order only), reusing the hyper-net weights of this batch.
        sparse, dense = self._correspondences(batch)
        obs = sparse[0] if dense is None else torch.cat((sparse[0], dense[0]), dim=1)
        warped = self._warp(obs, ctx, neutral)
        k = sparse[0].shape[1]
        if dense is None:
            can_term = L.l1_loss(warped.canonical, sparse[1])
            tmp_term = L.l1_loss(warped.template, sparse[2])
        else:
            can_term = L.l1_loss(warped.canonical[:, k:], dense[1], dense[3])
            tmp_term = (L.l1_loss(warped.template[:, k:], dense[2], dense[3]) if dense[2] is not None
                        else L.l1_loss(warped.template[:, :k], sparse[2]))
        t["landmark_consistency"] = W.landmark_consistency * (can_term + tmp_term)
        t["residual"] = W.residual * L.residual_loss(base.delta)
        t["expression"] = W.expression * L.expression_loss(base.exp_raw - x, labelled)
        return t

    def compute_losses(self, batch: dict[str, torch.Tensor], codes: FaceCodes, stage: int = 1,
                       kappa: float = 1.0, neutral_switch: bool = True) -> dict[str, torch.Tensor]:
        """Weighted loss terms and their "total" for explicitly given codes (training or fitting).

        Stage 1: L_f̂ (eq. 19): keys sdf, normal, eikonal, embedding, landmark_generation,
        landmark_consistency, residual, expression; total = their sum.
        Stage 2: L_f (eq. 20) keys sdf, normal, eikonal, embedding (with the detail code prior) and
        base = L_f̂ (its value: E, I, T are fixed); total = κ L_f + (1 - κ) L_f̂.
        neutral_switch: neutral scans skip the expression warp (eq. 12 as a hard switch: the
        "train_switch" and "switch" neutral policies); False sends them through E with their own code
        ("code"), the eq.-12 term still pulling E toward the identity map for them.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        labelled = batch["neutral"].bool()
        neutral = labelled if neutral_switch else torch.zeros_like(labelled)
        pts = torch.cat((batch["points"], batch["surface_points"]), dim=1)
        tgt_sdf = torch.cat((batch["sdf"], batch["points"].new_zeros(batch["surface_points"].shape[:2])), dim=1)
        tgt_n = torch.cat((batch["gradients"], batch["surface_normals"]), dim=1)
        x = pts.detach().requires_grad_(True)
        W = self.cfg.loss

        if stage == 1:
            ctx = self._context(codes, frozen=False)
            base = self._base(x, ctx, neutral)
            g_obs, g_can = torch.autograd.grad(base.sdf.sum(), (x, base.canonical), create_graph=True)
            out = self._base_terms(batch, ctx, neutral, base, g_obs, g_can, tgt_sdf, tgt_n, x)
            out["total"] = sum(out.values())
            return out

        # ---- stage 2: E, I, T, Landmark-Nets and exp/id codes fixed; D and detail codes train.
        ctx = self._context(codes, frozen=True)
        base = self._base(x, ctx, neutral)
        g_obs_b, g_can_b = torch.autograd.grad(base.sdf.sum(), (x, base.canonical), retain_graph=True,
                                               create_graph=not self.cfg.detail_detach_base)
        xb = self._displaced(x, base, g_obs_b, codes.detail)
        fine = self._base(xb, ctx, neutral)
        g_obs, g_can = torch.autograd.grad(fine.sdf.sum(), (x, fine.canonical), create_graph=True)
        det_prior = W.embedding_detail * L.embedding_loss(codes.detail)
        out = {
            "sdf": W.sdf * L.sdf_loss(fine.sdf, tgt_sdf),
            "normal": W.normal * L.normal_loss(g_obs, tgt_n),
            "eikonal": W.eikonal * (L.eikonal_loss(g_obs) + L.eikonal_loss(g_can)),
            "embedding": W.embedding * (L.embedding_loss(ctx.codes.expression)
                                        + L.embedding_loss(ctx.codes.identity)) + det_prior,
        }
        with torch.no_grad():  # L_f̂ has no trainable input except the detail-code prior below
            base_d = _Base(base.exp_raw.detach(), base.canonical.detach(), base.template.detach(),
                           base.delta.detach(), base.sdf.detach())
            terms = self._base_terms(batch, ctx, neutral, base_d, g_obs_b.detach(),
                                     g_can_b.detach(), tgt_sdf, tgt_n, x.detach())
        out["base"] = sum(terms.values()) + det_prior
        out["total"] = kappa * sum(v for k, v in out.items() if k != "base") + (1.0 - kappa) * out["base"]
        return out


class FaceField:
    """One face (fixed codes) ready for many evaluations: the per-codes context is computed once.

    Made by `ImFacePlusPlus.field(codes, ...)`. Points may be (N, 3) (results (N,) / (N, 3)) or
    (B, N, 3) for B code rows. Every method follows the caller's autograd mode.
    """

    def __init__(self, model: ImFacePlusPlus, context: FaceContext,
                 neutral: bool | torch.Tensor | None = None) -> None:
        self.model = model
        self.context = context
        if isinstance(neutral, bool):
            neutral = torch.full((context.codes.identity.shape[0],), neutral, dtype=torch.bool,
                                 device=context.codes.identity.device)
        self.neutral = neutral

    @property
    def codes(self) -> FaceCodes:
        return self.context.codes

    @staticmethod
    def _batched(points: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return (points.unsqueeze(0), True) if points.dim() == 2 else (points, False)

    def sdf(self, points: torch.Tensor, with_detail: bool = True, chunk: int | None = 65536) -> torch.Tensor:
        """f (eq. 8), or the base f̂ (eq. 5) without detail; in chunks of `chunk` points (None: one call)."""
        x, single = self._batched(points)
        if chunk is None:
            out = self.model._sdf(x, self.context, with_detail, self.neutral)
        else:
            out = torch.cat([self.model._sdf(x[:, i:i + chunk], self.context, with_detail, self.neutral)
                             for i in range(0, max(1, x.shape[1]), chunk)], dim=1)
        return out[0] if single else out

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        """Observation -> canonical p' = E(p) (the identity map where neutral)."""
        x, single = self._batched(points)
        out = self.model._neutral_switch(x, self.model._expression(x, self.context), self.neutral)
        return out[0] if single else out

    def canonical_to_template(self, canonical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical -> (template p'' = I(p'), SDF residual δ)."""
        x, single = self._batched(canonical)
        t, d = self.model._identity(x, self.context)
        return (t[0], d[0]) if single else (t, d)

    def to_template(self, points: torch.Tensor) -> torch.Tensor:
        """Observation -> template p'' = I(E(p)) (base chain, no detail displacement)."""
        return self.canonical_to_template(self.to_canonical(points))[0]

    def template_sdf(self, template: torch.Tensor) -> torch.Tensor:
        """T(p'') at template points."""
        x, single = self._batched(template)
        out = self.model.template_sdf(x, self.context)
        return out[0] if single else out

    def detail_displacement(self, template: torch.Tensor) -> torch.Tensor:
        """The bounded DetailNet displacement d(p'') along the base normal (eq. 7)."""
        x, single = self._batched(template)
        out = self.model._detail_value(x, self.context.codes.detail, self.context.det_w)
        return out[0] if single else out
