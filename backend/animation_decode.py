"""The animation decode: codes -> a mesh with one fixed vertex order (the template's) for every face.

One template mesh is extracted once (marching cubes of the template SDF T), and for any codes each
template vertex v'' is placed in observation space by solving I(E(x)) = v'' for x. The two warps are
inverted one after the other (I: v'' -> x', then E: x' -> x) with batched quasi-Newton iterations
(`backend.warp_inversion`). Solutions and inverse Jacobians are kept: the next codes start from them
(warm start), moved along the last step in proportion to how far the codes move in the same direction
(a secant predictor: along a timeline the start is then off by O(Δc²), not O(Δc)); an unchanged
identity code reuses the whole first inversion, an unchanged detail code its displacements.

The base surface is f̂ = T(p'') + δ(p'), so a placed vertex is moved along the normal by the base SDF
value T(v'') + δ, then by the detail displacement d(v'') of eq. 7 (f(p) ≈ f̂(p) + d near the
surface): x_final = x - (T(v'') + δ + d) n.

Residuals (|I(E(x)) - v''| per vertex) are reported; vertices above `flag_tolerance` are flagged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backend.codes import check_codes
from backend.correspondence import to_template
from backend.geometry.extraction import extract_mesh
from backend.geometry.mesh_cleanup import clean_mesh
from backend.geometry.normals import vertex_normals
from backend.model import FaceCodes, ImFacePlusPlus
from backend.scans.frame import MM_PER_UNIT, model_to_frame
from backend.warp_inversion import Inversion, invert_warp

# Template edges shorter than this fraction of a marching-cubes cell are collapsed (mesh_cleanup).
TEMPLATE_MIN_EDGE_CELLS = 0.1


@dataclass
class TemplateMesh:
    """The one mesh every decoded face shares: vertices in template space (model units), faces."""

    vertices: np.ndarray   # (V, 3) float32
    faces: np.ndarray      # (F, 3) int64
    template_sdf: np.ndarray  # (V,) T at the vertices (≈ 0: marching cubes interpolates linearly)
    resolution: int

    def save(self, path: str | Path) -> None:
        import trimesh

        trimesh.Trimesh(self.vertices, self.faces, process=False).export(path)

    @classmethod
    def load(cls, model: ImFacePlusPlus, path: str | Path) -> "TemplateMesh":
        """A template mesh saved with `save` (vertices in template space, model units)."""
        import trimesh

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"template mesh {path} does not exist")
        tm = trimesh.load(path, process=False, force="mesh")
        v = np.asarray(tm.vertices, dtype=np.float32)
        f = np.asarray(tm.faces, dtype=np.int64)
        if len(v) == 0 or len(f) == 0 or not np.isfinite(v).all():
            raise ValueError(f"{path}: not a usable template mesh (empty or NaN)")
        device = next(model.parameters()).device
        with torch.no_grad():
            t = model.template_sdf(torch.from_numpy(v).to(device).unsqueeze(0))[0].cpu().numpy()
        return cls(v, f, t.astype(np.float32), 0)


def extract_template_mesh(model: ImFacePlusPlus, resolution: int = 160, crop_mm: float = 4.0,
                          radius: float = 0.95) -> TemplateMesh:
    """Marching cubes of the template SDF T (no codes), cropped to the face region.

    The template SDF is defined in the whole sphere but trained only near faces: with the model's
    template vertices (shared-topology training) the mesh keeps the triangles within `crop_mm` of them,
    otherwise those within `radius` of the origin. Only the largest connected piece is kept.
    """
    from scipy.spatial import cKDTree

    device = next(model.parameters()).device
    with torch.no_grad():

        def tsdf(p: torch.Tensor) -> torch.Tensor:
            return model.template_sdf(p.unsqueeze(0))[0]

        vertices, faces = extract_mesh(tsdf, resolution=resolution, device=device)
    if len(faces) == 0:
        raise RuntimeError("the template SDF has no surface: is this a trained model?")
    keep_v = np.linalg.norm(vertices, axis=1) <= radius
    if model.template_dense is not None:
        dense = model.template_dense.detach().cpu().numpy()
        d, _ = cKDTree(dense).query(vertices, k=1, workers=-1)
        keep_v &= d <= crop_mm / MM_PER_UNIT
    faces = faces[keep_v[faces].all(1)]
    if len(faces) == 0:
        raise RuntimeError("the template SDF has no surface in the face region: is this a trained model?")
    # Slivers and hanging triangles collapsed, largest piece kept: with them, warm and cold decodes of
    # the same codes drift apart at the boundary (see mesh_cleanup).
    vertices, faces = clean_mesh(vertices, faces, TEMPLATE_MIN_EDGE_CELLS * 2.0 / resolution)
    with torch.no_grad():
        t = model.template_sdf(torch.from_numpy(vertices).to(device).unsqueeze(0))[0].cpu().numpy()
    return TemplateMesh(vertices, faces, t.astype(np.float32), resolution)


@dataclass
class DecodedMesh:
    """A face in the template's topology."""

    vertices: np.ndarray      # (V, 3) model units (observation space of the codes)
    faces: np.ndarray         # (F, 3) the template's faces (the same for every decode)
    residual: np.ndarray      # (V,) inversion residual |I(E(x)) - v''| in model units
    converged: np.ndarray     # (V,) bool: residual <= flag_tolerance
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def n_unconverged(self) -> int:
        return int((~self.converged).sum())

    def to_frame(self, normalized_from_scan: np.ndarray | None = None) -> np.ndarray:
        """Vertices in a scan's own frame and units (its stored transform), else the model frame in mm."""
        return model_to_frame(self.vertices, normalized_from_scan)


def _key(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def _remember(history: list[tuple[torch.Tensor, torch.Tensor]], code: torch.Tensor,
              x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The last two (code, solution) pairs."""
    return (history + [(code.detach().clone(), x)])[-2:]


def _secant_guess(history: list[tuple[torch.Tensor, torch.Tensor]], code: torch.Tensor,
                  x_prev: torch.Tensor) -> torch.Tensor:
    """Starting point for the inversion at `code`, from the last two solutions (a secant predictor).

    To first order x(c) moves by (dx/dc)·Δc. The last step tells dx/dc along one direction only, the
    last code change, so the new change is projected on it: x0 = x_prev + a (x_prev - x_before),
    a = <Δc_new, Δc_last> / |Δc_last|². Along a timeline or an interpolation (codes moving on a line
    or a smooth curve) a ≈ 1 and the guess is off by O(Δc²) instead of O(Δc); for an unrelated
    jump a ≈ 0 and it falls back to the previous solution."""
    if len(history) < 2:
        return x_prev
    (c_before, x_before), (c_last, _) = history
    last = c_last - c_before
    denom = float((last * last).sum())
    if denom == 0.0:
        return x_prev
    a = float(((code - c_last) * last).sum()) / denom
    a = min(max(a, -1.0), 2.0)  # beyond that the linear picture means little; keep the step modest
    return x_prev + a * (x_prev - x_before)


class TopologyDecoder:
    """Codes -> mesh with the template's vertex order, by inverting the backward warps per vertex.

    Keep one decoder per model and call `decode` for every new set of codes (a timeline, an
    interpolation, a fit): each call warm-starts from the previous one, from a secant prediction
    along the last code change when there is one (`_secant_guess`). Thread-unsafe by design.
    """

    def __init__(self, model: ImFacePlusPlus, template: TemplateMesh | None = None, resolution: int = 160,
                 tolerance: float = 1e-6, flag_tolerance: float = 1e-4, max_iters: int = 40,
                 secant_predictor: bool = True) -> None:
        self.model = model
        self.template = template if template is not None else extract_template_mesh(model, resolution)
        self.tolerance = tolerance
        self.flag_tolerance = flag_tolerance
        self.max_iters = max_iters
        self.secant_predictor = secant_predictor  # off: start from the previous solution (benchmarks)
        dev = next(model.parameters()).device
        self.device = dev
        self._v = torch.from_numpy(self.template.vertices).to(dev)
        self._f = torch.from_numpy(self.template.faces).to(dev)
        self._tsdf = torch.from_numpy(self.template.template_sdf).to(dev)
        self._id: tuple[bytes, Inversion] | None = None       # last identity stage
        self._exp: Inversion | None = None                     # last expression stage (warm start)
        self._exp_target: torch.Tensor | None = None           # the canonical positions it solved for
        self._detail: tuple[bytes, torch.Tensor] | None = None
        # The last two solutions of each stage with their codes: the secant predictor's history.
        self._id_hist: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._exp_hist: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def faces(self) -> np.ndarray:
        return self.template.faces

    def reset(self) -> None:
        """Forget the warm-start state (the next decode starts cold)."""
        self._id = self._exp = self._exp_target = self._detail = None
        self._id_hist, self._exp_hist = [], []

    def decode(self, codes: FaceCodes, neutral: bool = False, warm_start: bool = True) -> DecodedMesh:
        check_codes(self.model, codes)
        if codes.identity.shape[0] != 1:
            raise ValueError("decode one face at a time (codes with one row)")
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        m = self.model
        codes = FaceCodes(*(c.detach().to(self.device) for c in (codes.identity, codes.expression, codes.detail)))
        with torch.no_grad():
            face = m.field(codes, frozen=True)

        # Stage 1: I(x') = v''  (depends on the identity code only).
        id_key = _key(codes.identity)
        if self._id is not None and self._id[0] == id_key and warm_start:
            inv_i = self._id[1]
            stats["identity_cached"] = 1.0
        else:
            def warp_i(p: torch.Tensor) -> torch.Tensor:
                t, d = face.canonical_to_template(p)
                return torch.cat((t, d.unsqueeze(-1)), dim=1)

            prev = self._id[1] if (self._id is not None and warm_start) else None
            x0 = self._v if prev is None else _secant_guess(self._id_hist, codes.identity[0], prev.x)
            inv_i = invert_warp(warp_i, self._v, x0, None if prev is None else prev.jinv,
                                self.tolerance, self.max_iters)
            self._id = (id_key, inv_i)
            if self.secant_predictor:
                self._id_hist = _remember(self._id_hist if warm_start else [], codes.identity[0], inv_i.x)
            stats.update(identity_iterations=inv_i.iterations, identity_evaluations=inv_i.evaluations,
                         identity_jacobians=inv_i.jacobians)
        t1 = time.perf_counter()

        # Stage 2: E(x) = x'  (the expression warp; the identity map for a neutral face).
        if neutral:
            x = inv_i.x
            res_e = torch.zeros_like(inv_i.residual)
        else:
            def warp_e(p: torch.Tensor) -> torch.Tensor:
                return face.to_canonical(p)

            prev = self._exp if warm_start else None
            both = torch.cat((codes.identity[0], codes.expression[0]))  # x depends on both codes
            if prev is None:
                x0 = inv_i.x
            elif len(self._exp_hist) == 2:
                x0 = _secant_guess(self._exp_hist, both, prev.x)
            else:
                # E is close to a rigid motion locally: when the canonical target moved (a new
                # identity), move the previous solution with it.
                x0 = prev.x + (inv_i.x - self._exp_target) if self._exp_target is not None else prev.x
            inv_e = invert_warp(warp_e, inv_i.x, x0, None if prev is None else prev.jinv,
                                self.tolerance, self.max_iters)
            self._exp, self._exp_target = inv_e, inv_i.x
            if self.secant_predictor:
                self._exp_hist = _remember(self._exp_hist if warm_start else [], both, inv_e.x)
            x = inv_e.x
            res_e = inv_e.residual
            stats.update(expression_iterations=inv_e.iterations, expression_evaluations=inv_e.evaluations,
                         expression_jacobians=inv_e.jacobians)
        t2 = time.perf_counter()

        # Detail displacement at the template vertices (depends on the detail code only).
        det_key = _key(codes.detail)
        if self._detail is not None and self._detail[0] == det_key:
            d = self._detail[1]
        else:
            with torch.no_grad():
                d = face.detail_displacement(self._v)
            self._detail = (det_key, d)
        with torch.no_grad():
            delta = inv_i.extra[:, 0]
            n = vertex_normals(x, self._f)
            out = x - (self._tsdf + delta + d).unsqueeze(-1) * n
        t3 = time.perf_counter()

        # |I(E(x)) - v''| <= |I(x') - v''| + |J_I| |E(x) - x'|; J_I ≈ identity, so the sum bounds it.
        residual = (inv_i.residual + res_e).cpu().numpy()
        converged = residual <= self.flag_tolerance
        stats.update(seconds=t3 - t0, seconds_identity=t1 - t0, seconds_expression=t2 - t1,
                     seconds_surface=t3 - t2, max_residual=float(residual.max(initial=0.0)),
                     mean_residual=float(residual.mean()) if len(residual) else 0.0,
                     unconverged=float((~converged).sum()), vertices=float(len(residual)))
        return DecodedMesh(out.cpu().numpy(), self.template.faces, residual, converged, stats)

    def check_residuals(self, decoded: DecodedMesh, codes: FaceCodes, neutral: bool = False) -> np.ndarray:
        """|I(E(x_base)) - v''| recomputed from scratch for the base placement (diagnostics, tests).

        Uses the last decode's base positions (before the normal offset)."""
        x = self._exp.x if (self._exp is not None and not neutral) else self._id[1].x  # type: ignore[index]
        tmp = to_template(self.model, x, codes, neutral)
        return np.linalg.norm(tmp - self.template.vertices, axis=1)
