"""Correspondences through the backward warps, and EDE / TDE (ImFace++ §4.3.2).

ImFace++ maps an observed point p to the canonical (neutral) space with ExpNet, p' = E(p), and on to
the shared template space with IDNet, p'' = I(p') (§3.1). Both are backward warps, so
`to_canonical` / `to_template` map observed points (a scan's vertices) directly; EDE and TDE compare
them with the same vertices on the person's neutral scan (canonical space) and on the template
(template space), which is exact ground truth when scans share one topology. The forward direction
(a mesh with the template's vertex order for any codes) is `backend.animation_decode`.
"""
from __future__ import annotations

import numpy as np
import torch

from backend.codes import check_codes
from backend.geometry.metrics import correspondence_error
from backend.model import FaceCodes, ImFacePlusPlus
from backend.scans.frame import MM_PER_UNIT


def _as_tensor(points: np.ndarray | torch.Tensor, model: ImFacePlusPlus) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.as_tensor(np.asarray(points, dtype=np.float32) if not torch.is_tensor(points) else points,
                           dtype=torch.float32, device=device).reshape(-1, 3)


def _warp(model: ImFacePlusPlus, points: np.ndarray | torch.Tensor, codes: FaceCodes, neutral: bool,
          chunk: int, space: str) -> np.ndarray:
    """Chunked backward warp of observed points into `space` ("canonical" or "template")."""
    check_codes(model, codes)
    x = _as_tensor(points, model)
    with torch.no_grad():
        fld = model.field(codes, neutral=neutral, frozen=True)
        warp = fld.to_canonical if space == "canonical" else fld.to_template
        out = [warp(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 3), np.float32)


def to_canonical(model: ImFacePlusPlus, points: np.ndarray | torch.Tensor, codes: FaceCodes,
                 neutral: bool = False, chunk: int = 65536) -> np.ndarray:
    """Observed points (N, 3, model units) -> canonical space p' = E(p) (the identity's neutral face)."""
    return _warp(model, points, codes, neutral, chunk, "canonical")


def to_template(model: ImFacePlusPlus, points: np.ndarray | torch.Tensor, codes: FaceCodes,
                neutral: bool = False, chunk: int = 65536) -> np.ndarray:
    """Observed points (N, 3, model units) -> template space p'' = I(E(p))."""
    return _warp(model, points, codes, neutral, chunk, "template")


def correspondence_errors(model: ImFacePlusPlus, codes: FaceCodes, points: np.ndarray,
                          neutral_points: np.ndarray | None = None,
                          template_points: np.ndarray | None = None, valid: np.ndarray | None = None,
                          neutral: bool = False) -> dict[str, float]:
    """EDE and TDE of ImFace++ §4.3.2 in mm for one scan with known correspondences.

    points: the scan's vertices in its normalised frame (model units); neutral_points: the same
    vertices on the person's neutral scan (its normalised frame): EDE = mean |E(p) - p_neutral|;
    template_points: the same vertices on the template (the model's `template_dense`):
    TDE = mean |I(E(p)) - p_template|. valid: vertices that count (visible, inside the sphere).
    """
    out: dict[str, float] = {}
    pts = np.asarray(points, dtype=np.float64)
    mask = np.ones(len(pts), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if neutral_points is not None:
        can = to_canonical(model, pts[mask], codes, neutral)
        out["ede_mm"] = MM_PER_UNIT * correspondence_error(can, np.asarray(neutral_points)[mask])
    if template_points is not None:
        tmp = to_template(model, pts[mask], codes, neutral)
        out["tde_mm"] = MM_PER_UNIT * correspondence_error(tmp, np.asarray(template_points)[mask])
    return out
