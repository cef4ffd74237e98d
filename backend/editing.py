"""Editing faces in code space: transfer, interpolation, principal components, sampling, codes as JSON.

A face is three latent codes (ImFace++ §3): identity, expression and detail. Everything here works on
`FaceCodes` with one row per face and never touches the networks, so it is instant; turn codes into a
mesh with `backend.fitting.extract_face_mesh` (marching cubes) or `backend.correspondence.TopologyDecoder`
(fixed vertex order).

Codes files are JSON (never pickle):

    {"format": "imface-codes/1", "identity": [...], "expression": [...], "detail": [...],
     "model": "<content sha256 of the model file>", "neutral": false,
     "normalized_from_scan": [[4x4]] (optional: the fitted scan's frame), "source": "..." (optional)}

Statistics of the training codes (PCA, Gaussian sampling) use the embeddings stored in the model:
identity codes one per person, expression and detail codes one per training scan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.model import FaceCodes, ImFacePlusPlus

CODES_FORMAT = "imface-codes/1"
PARTS: tuple[str, ...] = ("identity", "expression", "detail")


class CodesError(ValueError):
    """A codes file or codes that do not fit the model, said in words."""


# ------------------------------------------------------------------------------------------ codes I/O


@dataclass
class FaceCodesFile:
    """Codes of one face plus what they came from."""

    codes: FaceCodes                                # one row each
    model: str = ""                                 # model fingerprint (content sha256) or name
    neutral: bool = False                           # evaluate with the expression warp switched off (eq. 12)
    normalized_from_scan: np.ndarray | None = None  # 4x4, scan frame (mm) -> model frame
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept on save


def code_sizes(model: ImFacePlusPlus) -> dict[str, int]:
    return {"identity": model.cfg.id_dim, "expression": model.cfg.exp_dim, "detail": model.cfg.detail_dim}


def check_codes(model: ImFacePlusPlus, codes: FaceCodes, what: str = "codes") -> None:
    """Raise CodesError unless every part has the model's size and finite values."""
    sizes = code_sizes(model)
    for part in PARTS:
        t = getattr(codes, part)
        if t.dim() != 2 or t.shape[1] != sizes[part]:
            raise CodesError(f"{what}: the {part} code has {t.shape[-1] if t.dim() else 0} values, "
                             f"this model expects {sizes[part]}")
        if not torch.isfinite(t).all():
            raise CodesError(f"{what}: the {part} code contains NaN or infinite values")
    rows = {getattr(codes, p).shape[0] for p in PARTS}
    if len(rows) != 1:
        raise CodesError(f"{what}: the three codes have different numbers of rows {sorted(rows)}")


def codes_to_json(entry: FaceCodesFile) -> dict[str, Any]:
    c = entry.codes
    if c.identity.shape[0] != 1:
        raise CodesError("a codes file holds one face; select a row first (e.g. select_row)")
    out: dict[str, Any] = {"format": CODES_FORMAT}
    for part in PARTS:
        out[part] = [float(v) for v in getattr(c, part)[0].detach().cpu().double().tolist()]
    out["model"] = entry.model
    out["neutral"] = bool(entry.neutral)
    if entry.normalized_from_scan is not None:
        out["normalized_from_scan"] = np.asarray(entry.normalized_from_scan, dtype=np.float64).tolist()
    if entry.source:
        out["source"] = entry.source
    for k, v in entry.extra.items():
        out.setdefault(k, v)
    return out


def save_codes(path: str | Path, entry: FaceCodesFile) -> Path:
    """Write a codes JSON file (atomically: a temporary name, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(codes_to_json(entry), indent=1))
    tmp.replace(path)
    return path


def codes_from_json(data: Any, model: ImFacePlusPlus | None = None, where: str = "codes") -> FaceCodesFile:
    """Parse a codes dict; with a model, sizes are checked (CodesError on any problem)."""
    if not isinstance(data, dict):
        raise CodesError(f"{where}: expected a JSON object with identity, expression and detail lists")
    fmt = data.get("format", CODES_FORMAT)
    if fmt != CODES_FORMAT:
        raise CodesError(f"{where}: format {fmt!r}, expected {CODES_FORMAT!r}")
    parts = {}
    for part in PARTS:
        v = data.get(part)
        if not isinstance(v, list) or not v:
            raise CodesError(f"{where}: missing or empty '{part}' list")
        try:
            arr = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise CodesError(f"{where}: '{part}' holds something that is not a number") from None
        if arr.ndim != 1:
            raise CodesError(f"{where}: '{part}' must be a flat list of numbers")
        parts[part] = torch.from_numpy(arr).float().unsqueeze(0)
    codes = FaceCodes(parts["identity"], parts["expression"], parts["detail"])
    if model is not None:
        check_codes(model, codes, where)
    else:
        for part in PARTS:
            if not torch.isfinite(getattr(codes, part)).all():
                raise CodesError(f"{where}: the {part} code contains NaN or infinite values")
    m = data.get("normalized_from_scan")
    matrix = None
    if m is not None:
        matrix = np.asarray(m, dtype=np.float64)
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            raise CodesError(f"{where}: 'normalized_from_scan' must be a finite 4x4 matrix")
    known = {"format", "model", "neutral", "normalized_from_scan", "source", *PARTS}
    return FaceCodesFile(codes=codes, model=str(data.get("model", "")), neutral=bool(data.get("neutral", False)),
                         normalized_from_scan=matrix, source=str(data.get("source", "")),
                         extra={k: v for k, v in data.items() if k not in known})


def load_codes(path: str | Path, model: ImFacePlusPlus | None = None) -> FaceCodesFile:
    path = Path(path)
    if not path.is_file():
        raise CodesError(f"codes file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CodesError(f"{path}: not valid JSON ({exc})") from None
    return codes_from_json(data, model, where=str(path))


def model_fingerprint(path: str | Path) -> str:
    """The model file's content hash (from its header: cheap), used to tie codes to their model."""
    from training.checkpoint import read_metadata

    return read_metadata(path).get("content_sha256", "") or Path(path).name


# ------------------------------------------------------------------------------------------ training codes


def training_codes(model: ImFacePlusPlus) -> dict[str, torch.Tensor]:
    """The model's auto-decoded codes: identity (people, C), expression and detail (scans, C)."""
    return {"identity": model.identity_codes.weight.detach().clone(),
            "expression": model.expression_codes.weight.detach().clone(),
            "detail": model.detail_codes.weight.detach().clone()}


def training_face_codes(model: ImFacePlusPlus, scan_index: int, identity_index: int) -> FaceCodes:
    """The trained codes of training scan `scan_index` (rows of ck.dataset["scans"])."""
    with torch.no_grad():
        return model.codes(torch.tensor([scan_index]), torch.tensor([identity_index])).detach()


def mean_codes(model: ImFacePlusPlus) -> FaceCodes:
    """Mean of the training codes: the starting point of a fit and the centre of code space."""
    tc = training_codes(model)
    return FaceCodes(*(tc[p].mean(0, keepdim=True) for p in PARTS))


def select_row(codes: FaceCodes, i: int) -> FaceCodes:
    return FaceCodes(codes.identity[i:i + 1], codes.expression[i:i + 1], codes.detail[i:i + 1])


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
