"""Stage two on a frozen base, linearised at the surface: a much cheaper step than the trainer's stage two.

With E, I and T frozen, the refined field at a base-surface sample x of scan s is (eq. 7-8)
f(x) = f̂(x + χ(f̂) d n) ≈ f̂(x) + χ(f̂(x)) d(p''(x); z_s) |∇f̂(x)|, and χ ≈ 1 there. So f = 0 at the
scan's surface samples asks d(p''; z_s) = −f̂(x) / |∇f̂(x)|. The template point p'' and that target do not
change while only DetailNet trains: they are computed once per sample, and each step runs DetailNet
alone (no base network, no second-order gradients). docs/training-quality.md has the measured speed and
what it learns; the trainer's stage two remains the paper's objective.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from backend.fitting.loop import frozen_networks, training_warp_off
from backend.model import ImFacePlusPlus
from backend.model import losses as L
from training.dataset import ProcessedScans, derive_seed


@dataclass
class DetailTargets:
    template: torch.Tensor   # (S, N, 3) p'' of N surface samples of each of the S scans
    target: torch.Tensor     # (S, N) the displacement that puts the refined surface on them (model units)


def detail_targets(model: ImFacePlusPlus, data: ProcessedScans, points_per_scan: int, seed: int = 0,
                   neutral_policy: str | None = None, chunk: int = 8192) -> DetailTargets:
    """p'' and −f̂/|∇f̂| at `points_per_scan` surface samples of every training scan (trained codes)."""
    if len(data.scans) != model.detail_codes.num_embeddings:
        raise ValueError(f"the model has {model.detail_codes.num_embeddings} scans, the data "
                         f"{len(data.scans)}: refit on the samples the model was trained on")
    bound = 0.95 * model.cfg.detail_max_displacement   # d = max · tanh(·) cannot reach the bound itself
    device = next(model.parameters()).device
    tmpl, tgt = [], []
    for i, meta in enumerate(data.scans):
        x_all = data.surface_sample(i, points_per_scan, seed).to(device)
        codes = model.codes(torch.tensor([i], device=device),
                            torch.tensor([meta.identity_index], device=device)).detach()
        face = model.field(codes, neutral=training_warp_off(meta.neutral, neutral_policy), frozen=True,
                           detail=False)
        parts_t, parts_r = [], []
        for k in range(0, len(x_all), chunk):
            x = x_all[k:k + chunk].requires_grad_(True)
            with torch.enable_grad():
                f = face.sdf(x, with_detail=False, chunk=None)
                g, = torch.autograd.grad(f.sum(), x)
            with torch.no_grad():
                parts_t.append(face.to_template(x))
            parts_r.append((-f.detach() / g.norm(dim=-1).clamp_min(1e-6)).clamp(-bound, bound))
        tmpl.append(torch.cat(parts_t))
        tgt.append(torch.cat(parts_r))
    n = min(len(t) for t in tgt)   # a scan with fewer samples than asked bounds them all (subsets are random)
    return DetailTargets(torch.stack([t[:n] for t in tmpl]), torch.stack([t[:n] for t in tgt]))


def refit_details(model: ImFacePlusPlus, data: ProcessedScans, steps: int, *, lr: float = 1e-3,
                  points_per_scan: int = 5000, scans_per_batch: int = 16, batch_points: int = 256,
                  seed: int = 0, neutral_policy: str | None = None, targets: DetailTargets | None = None,
                  log: Callable[[str], None] | None = None) -> list[float]:
    """Train DetailNet and the detail codes of `model` in place on its training samples (E, I, T, the
    Landmark-Nets and the identity/expression codes untouched): L1 between d and the target, weighted
    as the surface term (λ1), plus the detail-code prior (λ5). Returns the loss of every step.
    targets: `detail_targets` of this model and data, when already computed (they depend only on the
    frozen base)."""
    if targets is None:
        targets = detail_targets(model, data, points_per_scan, seed, neutral_policy)
    trainable = list(model.detail_net.parameters()) + list(model.detail_codes.parameters())
    S, N = targets.target.shape
    W = model.cfg.loss
    device = targets.target.device
    g = torch.Generator().manual_seed(derive_seed(seed, "detail_refit"))
    history = []
    with frozen_networks(model):   # every other parameter frozen; the flags come back afterwards
        for p in trainable:
            p.requires_grad_(True)
        opt = torch.optim.Adam(trainable, lr=lr)
        for step in range(steps):
            scans = torch.randperm(S, generator=g)[:min(scans_per_batch, S)]
            pts = torch.randint(0, N, (len(scans), batch_points), generator=g)
            tmpl = targets.template[scans[:, None], pts]
            tgt = targets.target[scans[:, None], pts]
            z = model.detail_codes(scans.to(device))
            d = model.detail_displacement(tmpl, z)
            fit = W.sdf * L.sdf_loss(d, tgt)
            prior = W.embedding_detail * L.embedding_loss(z)
            loss = fit + prior
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            if log is not None and (step + 1) % max(1, steps // 10) == 0:
                log(f"detail refit {step + 1}/{steps}: loss {history[-1]:.4f} (surface {float(fit.detach()):.4f}, "
                    f"code prior {float(prior.detach()):.4f})")
    return history


def main(argv: list[str] | None = None) -> int:
    """`python -m training.detail_refit MODEL --steps N --out OUT`: a refitted copy of a trained model."""
    import argparse
    from pathlib import Path

    from backend.model.io import CheckpointError, load_model, save_checkpoint
    from training.dataset import DatasetError

    p = argparse.ArgumentParser(prog="python -m training.detail_refit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a trained model.safetensors")
    p.add_argument("--out", type=Path, required=True, help="where to write the refitted model")
    p.add_argument("--data", help="its preprocessed samples (default: the folder in its training config)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--points", type=int, default=5000, help="surface samples per scan")
    p.add_argument("--scans-per-batch", type=int, default=16)
    p.add_argument("--batch-points", type=int, default=256, help="samples per scan in a step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.out.resolve() == a.model.resolve():
        print("error: --out must differ from the model (the original is kept)", file=sys.stderr)
        return 2
    try:
        model, ck = load_model(a.model)
        data = ProcessedScans.load(a.data or ck.config["data"]["processed"])
        refit_details(model, data, a.steps, lr=a.lr, points_per_scan=a.points, scans_per_batch=a.scans_per_batch,
                      batch_points=a.batch_points, seed=a.seed,
                      neutral_policy=ck.config.get("neutral_policy"), log=print)
    except (CheckpointError, DatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = {**ck.state, "detail_refit": {"steps": a.steps, "lr": a.lr, "points": a.points, "seed": a.seed,
                                          "scans_per_batch": a.scans_per_batch, "batch_points": a.batch_points}}
    save_checkpoint(a.out, model_state=model.state_dict(), config=ck.config, state=state, dataset=ck.dataset,
                    extra_tensors=ck.tensors, rng=False)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
