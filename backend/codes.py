"""A face's codes: checks, codes files (JSON) and the codes the model was trained with.

A face is three latent codes (ImFace++ §3): identity, expression and detail (`FaceCodes`, one row per
face). Codes files are JSON (never pickle):

    {"format": "imface-codes/1", "identity": [...], "expression": [...], "detail": [...],
     "model": "<content sha256 of the model file>", "neutral": false,
     "normalized_from_scan": [[4x4]] (optional: the fitted scan's frame), "source": "..." (optional)}

The training codes are the model's embeddings: identity codes one per person, expression and detail
codes one per training scan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.config_loader import read_json_file
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
    data = read_json_file(path, CodesError, f"codes file {path} does not exist")
    return codes_from_json(data, model, where=str(path))


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
