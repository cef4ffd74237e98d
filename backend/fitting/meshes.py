"""Meshes of fitted faces, and the way from the model frame back to the scan's frame and units.

Every mesh handed out is the face alone by default (`backend.geometry.face_region`: the part whose
template-space coordinates lie on the region the training scans covered, inside the sampling sphere, one
connected piece); `watertight=True` gives the closed marching-cubes shell (face + the cap where the field
meets the sampling sphere)."""
from __future__ import annotations

import numpy as np
import torch

from backend.codes import check_codes
from backend.geometry.extraction import ExtractionStats, extract_mesh
from backend.geometry.face_region import FaceRegion
from backend.model import FaceCodes, FaceField, ImFacePlusPlus
from backend.scans.frame import model_to_frame, to_scan_frame

from .targets import FitTarget


def face_only(face: FaceField, vertices: np.ndarray, faces: np.ndarray, region: FaceRegion | None = None,
              chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The face part of a surface of `face` (vertices in model units, observation space), by the face-region
    rule: template coordinates I(E(v)) on the training scans' covered region, inside the sampling sphere,
    the largest connected piece. Returns (vertices, faces), vertices in model units."""
    region = region or FaceRegion()
    model = face.model
    v = np.asarray(vertices, dtype=np.float32)
    if len(faces) == 0:
        return v, np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(v).to(device)
        tmpl = torch.cat([face.to_template(x[i:i + chunk]) for i in range(0, len(x), chunk)]).cpu().numpy()
    td = None if model.template_dense is None else model.template_dense.detach().cpu().numpy()
    return region.trim(v, faces, tmpl, td)


def extract_face_mesh(model: ImFacePlusPlus, codes: FaceCodes, resolution: int = 256, *,
                      neutral: bool = False, normalized_from_scan: np.ndarray | None = None,
                      with_detail: bool = True, chunk: int = 65536, return_stats: bool = False,
                      watertight: bool = False, region: FaceRegion | None = None
                      ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, ExtractionStats]:
    """Marching cubes of the face (narrow band, `backend.geometry.extraction.extract_mesh`), trimmed to the
    face (`face_only`) unless `watertight`.

    Vertices come back in the scan's own frame and units when `normalized_from_scan` is given (the
    inverse of the stored transform), else in the model frame in mm. Returns (vertices, faces[, stats]).
    The mesh is the dense grid's (the extraction follows the surface wherever the learned SDF breaks
    the narrow band's Lipschitz assumption; see the stats' sign_violations and closure_queries)."""
    check_codes(model, codes)
    with torch.no_grad():
        fld = model.field(codes.detach(), neutral=neutral, frozen=True)
        out = extract_mesh(lambda p: fld.sdf(p, with_detail=with_detail, chunk=chunk), resolution=resolution,
                           chunk=chunk, inference_mode=False, return_stats=True,
                           device=next(model.parameters()).device)
    vertices, faces, stats = out
    if not watertight:
        vertices, faces = face_only(fld, vertices, faces, region, chunk)
    vertices = model_to_frame(vertices, normalized_from_scan)
    return (vertices, faces, stats) if return_stats else (vertices, faces)


def reference_mesh_mm(target: FitTarget) -> tuple[np.ndarray, np.ndarray] | None:
    """The target's reference surface (pseudo-watertight, visible part) in the scan frame, in mm."""
    if target.reference is None:
        return None
    v, f = target.reference
    return scan_frame_mm(target, v), f


def scan_frame_mm(target: FitTarget, points: np.ndarray) -> np.ndarray:
    """Model-frame points -> the target's scan frame, in mm (whatever the scan's own units)."""
    return to_scan_frame(points, normalized_from_scan=target.normalized_from_scan) * target.units_to_mm
