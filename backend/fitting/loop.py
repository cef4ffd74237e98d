"""The fit: codes for a target by eq. 21 of ImFace++, with the networks frozen.

    argmin_{z_exp, z_id, z_detail}  L_sdf + L_eik + L_emb        (+ the normal term of eq. 13),

with the training loss weights (`ModelConfig.loss`), starting from the mean training codes, following
a `FitSchedule`. Every network evaluation is counted (`FitReport.evaluations`: SDF point queries, f
and f̂ alike). Results stay in the model's normalised frame (`meshes.py` brings them back).
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

from backend.codes import PARTS, check_codes, mean_codes
from backend.model import FaceCodes, ImFacePlusPlus
from backend.model import losses as L

from .schedules import FitSchedule, FitStage
from .targets import FitInputError, FitTarget

ProgressCallback = Callable[[int, int, dict[str, float]], Any]

#: How scans labelled neutral are treated, one policy for training, fitting and evaluation
#: (docs/training-quality.md has the measurements that chose it):
#: "train_switch": in training the expression warp is off for neutral-labelled scans (eq. 12 as a hard
#:     switch: I and T learn the neutral shapes alone, E only expressions); fitting and evaluation never
#:     switch it off: every scan, neutral or not, is fitted with an expression code (E maps a neutral
#:     code to ~the identity, λ9). Held-out neutral fits 1.07 -> 0.86 mm face error, no worse than the
#:     expressive fits (0.94 mm); training-scan capture as with "switch".
#: "switch": the warp is off for neutral-labelled scans in training and in fitting (the former rule:
#:     neutral fits were the worst, 1.07 mm).
#: "code": neutral scans get an expression code and the warp in training too (λ9 pulls E toward the
#:     identity for them); same neutral fits as "train_switch" but lower capture on the small test model.
NEUTRAL_POLICIES = ("train_switch", "switch", "code")
NEUTRAL_POLICY = "train_switch"


def _policy(policy: str | None) -> str:
    policy = NEUTRAL_POLICY if policy is None else policy
    if policy not in NEUTRAL_POLICIES:
        raise ValueError(f"unknown neutral policy {policy!r}; choose from {NEUTRAL_POLICIES}")
    return policy


def neutral_warp_off(labelled_neutral: bool, policy: str | None = None) -> bool:
    """Whether a scan with this neutral label is FITTED (fitting, evaluation) with the expression warp off."""
    return bool(labelled_neutral) and _policy(policy) == "switch"


def training_warp_off(labelled_neutral: bool, policy: str | None = None) -> bool:
    """Whether a TRAINING scan with this label had the warp off in training (and so is reconstructed from
    its trained codes with it off: its expression code never shaped its surface)."""
    return bool(labelled_neutral) and _policy(policy) in ("switch", "train_switch")


@dataclass
class FitReport:
    schedule: str
    total_steps: int
    steps: int = 0
    evaluations: int = 0           # SDF point queries
    seconds: float = 0.0
    cancelled: bool = False
    losses: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    metrics: dict[str, float] = field(default_factory=dict)       # filled by callers (Chamfer, ...)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    codes: FaceCodes
    report: FitReport
    target: FitTarget
    neutral: bool = False
    snapshots: dict[int, tuple[FaceCodes, float, int]] = field(default_factory=dict)  # step -> (codes, s, queries)


@contextlib.contextmanager
def frozen_networks(model: ImFacePlusPlus) -> Iterator[None]:
    """No parameter of the model requires grad inside (gradients reach only the codes); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _draw(gen: torch.Generator, n_total: int, k: int, start: int = 0) -> torch.Tensor:
    return start + torch.randint(0, n_total, (k,), generator=gen)


def _batch(target: FitTarget, stage: FitStage, near_fraction: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    n_uni = target.points.shape[0] - target.n_near
    k_near = stage.points if n_uni == 0 else int(round(stage.points * near_fraction))
    idx = [_draw(gen, target.n_near, k_near)]
    if stage.points - k_near > 0 and n_uni > 0:
        idx.append(_draw(gen, n_uni, stage.points - k_near, target.n_near))
    pi = torch.cat(idx)
    si = _draw(gen, target.surface_points.shape[0], stage.surface)
    out = {"points": target.points[pi], "sdf": target.sdf[pi], "surface": target.surface_points[si]}
    if target.surface_normals is not None:
        out["normals"] = target.surface_normals[si]
    if target.free_points is not None and stage.free > 0 and len(target.free_points):
        fi = _draw(gen, target.free_points.shape[0], stage.free)
        out.update(free=target.free_points[fi], lower=target.free_lower[fi], upper=target.free_upper[fi])
    return out


def fit_loss(model: ImFacePlusPlus, codes: FaceCodes, batch: dict[str, torch.Tensor], stage: FitStage,
             neutral: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted terms of the fitting objective (eq. 21 + normal term + free-space hinges) and 'total'.

    Weights are the training ones (`model.cfg.loss`), every term a mean, as in training."""
    W = model.cfg.loss
    face = model.field(codes, neutral=neutral, frozen=False, detail=stage.detail)
    terms: dict[str, torch.Tensor] = {}
    # Values only (first order) for the SDF samples and the free-space samples: one pass.
    value_pts = [batch["points"]]
    if "free" in batch:
        value_pts.append(batch["free"])
    if not stage.gradient_terms:
        value_pts.append(batch["surface"])
    x = torch.cat(value_pts).unsqueeze(0)
    f = face.sdf(x, with_detail=stage.detail, chunk=None)[0]
    n_pts = batch["points"].shape[0]
    sdf_pred = [f[:n_pts]]
    sdf_tgt = [batch["sdf"]]
    off = n_pts
    if "free" in batch:
        nf = batch["free"].shape[0]
        ff = f[off:off + nf]
        off += nf
        terms["free_space"] = W.sdf * (torch.relu(batch["lower"] - ff) + torch.relu(ff - batch["upper"])).mean()
    if stage.gradient_terms:
        s = batch["surface"].unsqueeze(0).clone().requires_grad_(True)
        fs = face.sdf(s, with_detail=stage.detail, chunk=None)
        g, = torch.autograd.grad(fs.sum(), s, create_graph=True)
        sdf_pred.append(fs[0])
        terms["eikonal"] = W.eikonal * L.eikonal_loss(g)
        if "normals" in batch:
            terms["normal"] = W.normal * L.normal_loss(g[0], batch["normals"])
    else:
        sdf_pred.append(f[off:])
    sdf_tgt.append(batch["surface"].new_zeros(batch["surface"].shape[0]))
    terms["sdf"] = W.sdf * L.sdf_loss(torch.cat(sdf_pred), torch.cat(sdf_tgt))
    terms["embedding"] = (W.embedding * (L.embedding_loss(codes.identity) + L.embedding_loss(codes.expression))
                          + W.embedding_detail * L.embedding_loss(codes.detail))
    terms["total"] = sum(terms.values())
    return terms


def _lr(stage: FitStage, local_step: int) -> float:
    if stage.lr_end is None or stage.steps <= 1:
        return stage.lr
    t = local_step / (stage.steps - 1)
    return stage.lr_end + (stage.lr - stage.lr_end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _cancelled(cancel: threading.Event | Callable[[], bool] | None) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def fit(model: ImFacePlusPlus, target: FitTarget, schedule: FitSchedule | None = None, *,
        init: FaceCodes | None = None, neutral: bool = False, progress: ProgressCallback | None = None,
        cancel: threading.Event | Callable[[], bool] | None = None, seed: int = 0,
        snapshots: tuple[int, ...] = ()) -> FitResult:
    """Optimise identity, expression and detail codes so the model's SDF matches `target`.

    init: starting codes (default: the mean training codes). neutral: switch the expression warp off
    (eq. 12), i.e. fit a neutral face (the expression code then does not matter).
    progress(step, total, losses): called after every step; returning False cancels.
    cancel: a threading.Event (set it to cancel) or a function returning True to cancel.
    A cancelled fit returns the codes reached so far with report.cancelled = True.
    snapshots: steps after which to keep a copy of the codes (with seconds and SDF queries so far),
    for curves of accuracy against iterations.
    """
    schedule = schedule or FitSchedule.fast()
    start = init if init is not None else mean_codes(model)
    check_codes(model, start, "initial codes")
    device = next(model.parameters()).device
    params = {p: getattr(start, p).detach().clone().to(device).requires_grad_(True) for p in PARTS}
    groups = [{"params": [params[p]], "lr": 0.0, "name": p} for p in PARTS]
    opt = torch.optim.Adam(groups, lr=1e-3)
    gen = torch.Generator().manual_seed(int(seed))
    neutral_t = torch.tensor([True], device=device) if neutral else None  # eq. 12 switch
    report = FitReport(schedule=schedule.name, total_steps=schedule.total_steps, warnings=list(target.warnings))
    t0 = time.perf_counter()
    step = 0
    keep = set(int(k) for k in snapshots)
    shots: dict[int, tuple[FaceCodes, float, int]] = {}
    with frozen_networks(model):
        for stage in schedule.stages:
            unknown = set(stage.codes) - set(PARTS)
            if unknown:
                raise ValueError(f"unknown code parts {sorted(unknown)} in the schedule")
            for local in range(stage.steps):
                if _cancelled(cancel):
                    report.cancelled = True
                    break
                lr = _lr(stage, local)
                for g in opt.param_groups:
                    g["lr"] = lr if g["name"] in stage.codes else 0.0
                batch = {k: v.to(device) for k, v in _batch(target, stage, schedule.near_fraction, gen).items()}
                codes = FaceCodes(params["identity"], params["expression"], params["detail"])
                opt.zero_grad(set_to_none=True)
                terms = fit_loss(model, codes, batch, stage, neutral_t)
                terms["total"].backward()
                for p in PARTS:  # a code the stage does not move gets no update (Adam's momentum too)
                    if p not in stage.codes:
                        params[p].grad = None
                opt.step()
                step += 1
                report.evaluations += sum(int(batch[k].shape[0]) for k in ("points", "surface", "free") if k in batch)
                losses = {k: float(v.detach()) for k, v in terms.items()}
                losses["lr"] = lr
                report.losses.append(losses)
                report.steps = step
                if step in keep:
                    shots[step] = (FaceCodes(*(params[p].detach().clone() for p in PARTS)),
                                   time.perf_counter() - t0, report.evaluations)
                if not math.isfinite(losses["total"]):
                    raise FitInputError(f"{target.name}: the fitting loss became non-finite at step {step}")
                if progress is not None and progress(step, schedule.total_steps, losses) is False:
                    report.cancelled = True
                    break
            if report.cancelled:
                break
    report.seconds = time.perf_counter() - t0
    codes = FaceCodes(*(params[p].detach().clone() for p in PARTS))
    return FitResult(codes=codes, report=report, target=target, neutral=neutral, snapshots=shots)
