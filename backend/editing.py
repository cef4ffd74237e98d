"""Editing faces in code space: transfer, interpolation, principal components, sampling.

Everything here works on `FaceCodes` with one row per face and never touches the networks, so it is
instant; turn codes into a mesh with `backend.fitting.extract_face_mesh` (marching cubes) or
`backend.animation_decode.TopologyDecoder` (fixed vertex order). Codes files and the training codes
are in `backend.codes`.

Statistics of the training codes (PCA, Gaussian sampling) use the embeddings stored in the model:
identity codes one per person, expression and detail codes one per training scan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.codes import PARTS, mean_codes, training_codes
from backend.model import FaceCodes, ImFacePlusPlus


# ------------------------------------------------------------------------------------------ edits


def transfer_expression(target: FaceCodes, source: FaceCodes) -> FaceCodes:
    """`target`'s person (identity) and skin detail with `source`'s expression."""
    return FaceCodes(target.identity.clone(), source.expression.clone(), target.detail.clone())


def transfer_detail(target: FaceCodes, source: FaceCodes) -> FaceCodes:
    """`target`'s identity and expression with `source`'s fine detail (wrinkles, pores)."""
    return FaceCodes(target.identity.clone(), target.expression.clone(), source.detail.clone())


def interpolate(a: FaceCodes, b: FaceCodes, t: float | dict[str, float]) -> FaceCodes:
    """(1 - t) a + t b, per part when t is a dict (e.g. {"expression": 0.5}; missing parts: 0)."""
    ts = t if isinstance(t, dict) else {p: float(t) for p in PARTS}
    unknown = set(ts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown code parts {sorted(unknown)}; use {PARTS}")
    out = []
    for p in PARTS:
        w = float(ts.get(p, 0.0))
        out.append(torch.lerp(getattr(a, p), getattr(b, p), w))
    return FaceCodes(*out)


@dataclass
class CodePCA:
    """Principal components of one part of the training codes."""

    part: str
    mean: torch.Tensor        # (C,)
    components: torch.Tensor  # (K, C), orthonormal rows, by decreasing variance
    std: torch.Tensor         # (K,) standard deviation of the codes along each component
    explained: torch.Tensor   # (K,) share of the total variance

    def code(self, coefficients: torch.Tensor | list[float]) -> torch.Tensor:
        """mean + Σ_k c_k std_k component_k (coefficients in standard deviations), (1, C)."""
        c = torch.as_tensor(coefficients, dtype=self.mean.dtype).reshape(-1)
        if c.numel() > self.components.shape[0]:
            raise ValueError(f"{c.numel()} coefficients for {self.components.shape[0]} components")
        k = c.numel()
        return (self.mean + (c * self.std[:k]) @ self.components[:k]).unsqueeze(0)


def code_pca(model: ImFacePlusPlus, part: str, n_components: int | None = None) -> CodePCA:
    """PCA (SVD of the centred codes) of the identity, expression or detail codes of the training set."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    x = training_codes(model)[part].double()
    mean = x.mean(0)
    xc = x - mean
    n = x.shape[0]
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    var = s ** 2 / max(1, n - 1)
    keep = var > var.max().clamp_min(1e-30) * 1e-10  # drop null directions (fewer codes than dims)
    if n_components is not None:
        keep &= torch.arange(len(var)) < n_components
    total = var.sum().clamp_min(1e-30)
    return CodePCA(part, mean.float(), vt[keep].float(), var[keep].sqrt().float(), (var[keep] / total).float())


@dataclass
class CodeGaussian:
    """A Gaussian N(mean, cov) fitted to one part of the training codes."""

    part: str
    mean: torch.Tensor  # (C,)
    cov: torch.Tensor   # (C, C)


def fit_gaussians(model: ImFacePlusPlus, shrinkage: float = 0.1) -> dict[str, CodeGaussian]:
    """Per part: sample mean and covariance, shrunk toward its mean variance (few codes, many dims:
    the sample covariance alone is singular)."""
    out = {}
    for part, x in training_codes(model).items():
        x = x.double()
        mean = x.mean(0)
        n, c = x.shape
        cov = (x - mean).T @ (x - mean) / max(1, n - 1)
        iso = torch.trace(cov) / c
        if n < 2:  # one code: only the embedding's init spread is known
            iso = torch.tensor(model.cfg.code_init_std ** 2, dtype=torch.float64)
        cov = (1 - shrinkage) * cov + shrinkage * iso * torch.eye(c, dtype=torch.float64)
        out[part] = CodeGaussian(part, mean, cov)
    return out


def sample_codes(model: ImFacePlusPlus, n: int = 1, seed: int = 0, scale: float = 1.0,
                 parts: tuple[str, ...] = PARTS, base: FaceCodes | None = None) -> FaceCodes:
    """n random faces from the Gaussians fitted to the training codes (scale multiplies the spread).

    Only `parts` are sampled; the others come from `base` (default: the mean codes)."""
    g = torch.Generator().manual_seed(int(seed))
    gauss = fit_gaussians(model)
    base = base if base is not None else mean_codes(model)
    out = {}
    for p in PARTS:
        b = getattr(base, p)
        if p not in parts:
            out[p] = b.expand(n, -1).clone()
            continue
        ga = gauss[p]
        evals, evecs = torch.linalg.eigh(ga.cov)
        root = evecs * evals.clamp_min(0).sqrt()
        eps = torch.randn(n, ga.mean.numel(), generator=g, dtype=torch.float64)
        out[p] = (ga.mean + scale * eps @ root.T).float()
    return FaceCodes(out["identity"], out["expression"], out["detail"])


def code_distance(a: FaceCodes, b: FaceCodes) -> dict[str, float]:
    """Euclidean distance per part (row 0), e.g. to see how far a fit moved from its start."""
    return {p: float(torch.linalg.vector_norm(getattr(a, p)[0] - getattr(b, p)[0])) for p in PARTS}
