"""Evaluation of a trained model on a scan folder: fit every scan, measure, write a table (mm).

What each number means is in docs/evaluation.md. In short, per scan:
* the scan is fitted (`backend.fitting.pose.fit_posed`: the landmark placement refined by the model, then
  `backend.fitting.fit`, eq. 21) and its face extracted (marching cubes, 256³ by
  default, trimmed to the face region: `backend.geometry.face_region`);
* like with like: both the fitted face and the scan are turned into what a viewer sees from the front,
  holes closed, by the same function (`backend.scans.samples.front_surface`, §4.1: the scan's side is the
  training target itself), and compared in the model frame in mm **inside the face sphere** (the 100 mm
  sampling sphere of §4.1; `region="ball"` keeps the former ball of 80 mm around the nose tip);
* the paper's point-sampled Chamfer-L1 / F-score@1mm / normal consistency, and beside them the same
  distances measured exactly (each sampled point's distance to the other *surface*, libigl's AABB tree):
  no sampling floor;
* with shared topology: EDE (fitted codes, each vertex warped to canonical space vs the same vertex on
  the person's neutral scan) over the scans fitted with the expression warp on (a neutral scan fitted
  with it off, as the neutral policy of `backend.fitting.loop` may say, scores exactly 0 by eq. 12, which
  says nothing), TDE (to template space vs the model's
  template vertices, when the model was trained on that topology) over all, and the expression capture
  (`backend.geometry.capture`) of every non-neutral scan whose person has a neutral scan;
* group means: all scans, identities the model was trained on vs held out, expressions marked
  `unseen` in the manifest vs seen.

The table is written as Markdown and CSV, one row per scan and the group means.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from backend.fitting import FitResult, FitSchedule, FitTarget, extract_face_mesh, target_from_scan
from backend.fitting.meshes import face_only
from backend.fitting.pose import fit_posed
from backend.geometry.alignment import apply_transform
from backend.geometry.metrics import EVAL_SETTINGS, REGIONS, EvalSettings  # noqa: F401  (re-exported)
from backend.model import ImFacePlusPlus
from backend.scans.frame import MM_PER_UNIT


@dataclass
class ScanEvaluation:
    key: str
    identity: str = ""
    expression: str = ""
    neutral: bool = False                 # fitted with the expression warp off (then no EDE)
    neutral_scan: bool = False            # the manifest's neutral label
    training_identity: bool | None = None  # None: the model's training identities are not known
    unseen: bool = False                  # manifest flag: an expression left out of training
    chamfer_mm: float = math.nan          # point-sampled (paper)
    fscore_1mm: float = math.nan          # percent
    normal_consistency: float = math.nan
    chamfer_exact_mm: float = math.nan    # exact point-to-surface
    accuracy_exact_mm: float = math.nan   # fitted -> scan
    completeness_exact_mm: float = math.nan  # scan -> fitted
    fscore_exact_1mm: float = math.nan    # percent
    ede_mm: float = math.nan
    tde_mm: float = math.nan
    capture: float = math.nan
    capture_moving_mm: float = math.nan
    capture_static_mm: float = math.nan
    capture_motion_mm: float = math.nan   # the moving vertices' distance to the neutral surface (capture's scale)
    fit_seconds: float = math.nan
    evaluations: int = 0
    error: str = ""                       # why this scan has no numbers


NUMBERS = ("chamfer_mm", "fscore_1mm", "normal_consistency", "chamfer_exact_mm", "accuracy_exact_mm",
           "completeness_exact_mm", "fscore_exact_1mm", "ede_mm", "tde_mm", "capture", "capture_moving_mm",
           "capture_static_mm", "capture_motion_mm", "fit_seconds", "evaluations")
# (column, heading, decimals) of the Markdown table
_MD = (("chamfer_mm", "Chamfer-L1 (mm)", 3), ("fscore_1mm", "F-score@1mm (%)", 2), ("normal_consistency", "N.C.", 4),
       ("chamfer_exact_mm", "Chamfer exact (mm)", 3), ("fscore_exact_1mm", "F-score exact (%)", 2),
       ("ede_mm", "EDE (mm)", 3), ("tde_mm", "TDE (mm)", 3), ("capture", "capture", 3),
       ("capture_moving_mm", "moving (mm)", 3), ("capture_static_mm", "static (mm)", 3),
       ("capture_motion_mm", "motion (mm)", 2), ("fit_seconds", "fit (s)", 1), ("evaluations", "SDF queries", 0))


@dataclass
class EvaluationTable:
    rows: list[ScanEvaluation]
    settings: dict[str, object] = field(default_factory=dict)

    COLUMNS = tuple(f.name for f in fields(ScanEvaluation) if f.name != "error")

    @staticmethod
    def _mean(rows: list[ScanEvaluation]) -> dict[str, float]:
        out = {}
        for c in NUMBERS:
            vals = [float(getattr(r, c)) for r in rows if not r.error]
            vals = [v for v in vals if math.isfinite(v)]
            out[c] = float(np.mean(vals)) if vals else math.nan
        out["n"] = float(sum(1 for r in rows if not r.error))
        return out

    def mean(self) -> dict[str, float]:
        """Means over every scan with numbers (EDE: over those that have one)."""
        return self._mean(self.rows)

    def groups(self) -> dict[str, dict[str, float]]:
        """Means per group: "all", and where the folder has both kinds, "training identities" /
        "held-out identities" and "seen expressions" / "unseen expressions", then one group per expression
        ("expression smile", ...) where there are several: the mean EDE hides an expression that is lost."""
        out = {"all": self.mean()}
        ok = [r for r in self.rows if not r.error]
        train = [r for r in ok if r.training_identity is True]
        held = [r for r in ok if r.training_identity is False]
        if train and held:
            out["training identities"] = self._mean(train)
            out["held-out identities"] = self._mean(held)
        unseen = [r for r in ok if r.unseen]
        if unseen:
            out["seen expressions"] = self._mean([r for r in ok if not r.unseen and not r.neutral_scan])
            out["unseen expressions"] = self._mean(unseen)
        expressions = sorted({r.expression for r in ok if r.expression})
        if len(expressions) > 1:
            for e in expressions:
                out[f"expression {e}"] = self._mean([r for r in ok if r.expression == e])
        return out

    def to_markdown(self) -> str:
        heads = ["scan"] + [h for _, h, _ in _MD]
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

        def fmt(v: float, nd: int) -> str:
            return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):.{nd}f}"

        def row(name: str, get: Callable[[str], float]) -> str:
            return f"| {name} | " + " | ".join(fmt(get(c), nd) for c, _, nd in _MD) + " |"

        for r in self.rows:
            if r.error:
                lines.append(f"| {r.key} | failed: {r.error} |" + " |" * (len(heads) - 2))
            else:
                tags = [t for t, on in (("held out", r.training_identity is False), ("unseen", r.unseen),
                                        ("neutral", r.neutral_scan), ("warp off", r.neutral)) if on]
                lines.append(row(r.key + (f" ({', '.join(tags)})" if tags else ""), lambda c: getattr(r, c)))
        for name, m in self.groups().items():
            lines.append(row(f"**mean: {name}** ({int(m['n'])})", m.__getitem__))
        notes = [f"- {k}: {v}" for k, v in self.settings.items()]
        return "\n".join(lines + [""] + notes) + "\n"

    def write(self, markdown: str | Path, csv_path: str | Path | None = None) -> tuple[Path, Path]:
        md = Path(markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(self.to_markdown())
        cp = Path(csv_path) if csv_path is not None else md.with_suffix(".csv")
        with open(cp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(self.COLUMNS) + ["error"])
            for r in self.rows:
                w.writerow([getattr(r, c) for c in self.COLUMNS] + [r.error])
            for name, m in self.groups().items():
                key = "mean" if name == "all" else f"mean: {name}"
                w.writerow([key] + ["" if c not in m else m[c] for c in self.COLUMNS[1:]] + [""])
        return md, cp


# ------------------------------------------------------------------------------------------ measuring


def _model_frame_mm(mesh_mm: tuple[np.ndarray, np.ndarray], target: FitTarget) -> np.ndarray:
    """Scan-frame mm -> model frame mm (the target's stored transform maps its own units)."""
    v = np.asarray(mesh_mm[0], dtype=np.float64) / target.units_to_mm
    return apply_transform(np.asarray(target.normalized_from_scan, dtype=np.float64), v) * MM_PER_UNIT


def front_view_mm(vertices_mm: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A surface in the model frame (mm) prepared the way §4.1 prepares the ground truth: cropped to the
    sampling sphere, what a viewer sees from the front, re-triangulated as one height field."""
    from backend.scans.samples import front_surface

    v = np.asarray(vertices_mm, dtype=np.float64) / MM_PER_UNIT
    f = np.asarray(faces, dtype=np.int64)
    f = f[(np.linalg.norm(v, axis=1) <= 1.0)[f].all(axis=1)]
    if len(f) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    sv, sf = front_surface(v, f)
    return sv * MM_PER_UNIT, sf


def reconstruction_metrics(mesh_mm: tuple[np.ndarray, np.ndarray], target: FitTarget,
                           region_radius_mm: float = EVAL_SETTINGS.region_radius_mm,
                           n_points: int = EVAL_SETTINGS.n_points, seed: int = EVAL_SETTINGS.seed,
                           region: str = EVAL_SETTINGS.region) -> dict[str, float]:
    """A fitted face (scan frame, mm; the face-region mesh) against the target's preprocessed surface, both
    prepared as §4.1 prepares training's ground truth (`front_view_mm`), in the model frame in mm.

    region "sphere": inside the 100 mm sampling sphere; "ball": inside the ball of `region_radius_mm`
    around the nose tip. Returns the point-sampled chamfer_mm, fscore_1mm (%), normal_consistency and the
    exact chamfer_exact_mm, accuracy_exact_mm, completeness_exact_mm, fscore_exact_1mm (%)."""
    from backend.geometry.metrics import BallRegion, compare_meshes

    if target.reference is None:
        raise ValueError(f"{target.name}: no reference surface to measure against")
    if region not in REGIONS:
        raise ValueError(f"region {region!r} is not one of {', '.join(REGIONS)}")
    nan = {"chamfer_mm": math.inf, "fscore_1mm": 0.0, "normal_consistency": 0.0, "chamfer_exact_mm": math.inf,
           "accuracy_exact_mm": math.inf, "completeness_exact_mm": math.inf, "fscore_exact_1mm": 0.0}
    if len(mesh_mm[1]) == 0:
        return nan
    pred = front_view_mm(_model_frame_mm(mesh_mm, target), mesh_mm[1])
    if len(pred[1]) == 0:
        return nan
    ref = (np.asarray(target.reference[0], dtype=np.float64) * MM_PER_UNIT, target.reference[1])
    if region == "ball":
        ball = BallRegion(tuple(float(c) for c in target.landmarks[2] * MM_PER_UNIT), float(region_radius_mm))
    else:
        ball = BallRegion((0.0, 0.0, 0.0), MM_PER_UNIT)
    r = compare_meshes(pred, ref, n_points=n_points, threshold_mm=1.0, region=ball, seed=seed, exact=True)
    return {"chamfer_mm": r["chamfer_l1"], "fscore_1mm": 100.0 * r["fscore"],
            "normal_consistency": r["normal_consistency"], "chamfer_exact_mm": r["exact_chamfer"],
            "accuracy_exact_mm": r["exact_accuracy"], "completeness_exact_mm": r["exact_completeness"],
            "fscore_exact_1mm": 100.0 * r["exact_fscore"]}


def measure_fit(model: ImFacePlusPlus, result: FitResult, resolution: int = EVAL_SETTINGS.resolution,
                region_radius_mm: float = EVAL_SETTINGS.region_radius_mm, n_points: int = EVAL_SETTINGS.n_points,
                seed: int = EVAL_SETTINGS.seed, region: str = EVAL_SETTINGS.region, watertight: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Extract the fitted face (scan frame and units) and put its metrics into `result.report.metrics`
    (`reconstruction_metrics`, when the target has a reference surface; always on the face region).
    Returns the mesh (vertices, faces): the face, or with `watertight` the closed shell."""
    face, shell = _fitted_meshes(model, result, resolution)
    if result.target.reference is not None:
        target = result.target
        result.report.metrics.update(reconstruction_metrics(
            (_to_scan(face[0], target) * target.units_to_mm, face[1]), target, region_radius_mm, n_points, seed,
            region))
    mesh = shell if watertight else face
    return _to_scan(mesh[0], result.target), mesh[1]


def fitted_face(model: ImFacePlusPlus, result: FitResult, resolution: int = EVAL_SETTINGS.resolution) -> tuple[np.ndarray, np.ndarray]:
    """The fitted face (the face region of the extracted surface) in the scan's frame, in mm."""
    face, _ = _fitted_meshes(model, result, resolution)
    return _to_scan(face[0], result.target) * result.target.units_to_mm, face[1]


def _to_scan(vertices_model_mm: np.ndarray, target: FitTarget) -> np.ndarray:
    from backend.scans.frame import to_scan_frame

    return to_scan_frame(np.asarray(vertices_model_mm) / MM_PER_UNIT, normalized_from_scan=target.normalized_from_scan)


def _fitted_meshes(model: ImFacePlusPlus, result: FitResult, resolution: int
                   ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(face, closed shell) of a fit, both in the model frame in mm (one extraction)."""
    import torch

    t0 = time.perf_counter()
    v, f = extract_face_mesh(model, result.codes, resolution, neutral=result.neutral, watertight=True)
    with torch.no_grad():
        fld = model.field(result.codes.detach(), neutral=result.neutral, frozen=True, detail=False)
        fv, ff = face_only(fld, v / MM_PER_UNIT, f)
    result.report.metrics["extraction_seconds"] = time.perf_counter() - t0
    return (np.asarray(fv, dtype=np.float64) * MM_PER_UNIT, ff), (v, f)


# ------------------------------------------------------------------------------------------ a folder


def evaluate_folder(model: ImFacePlusPlus, scan_folder: str | Path, *, schedule: FitSchedule | None = None,
                    resolution: int = EVAL_SETTINGS.resolution,
                    region_radius_mm: float = EVAL_SETTINGS.region_radius_mm, n_points: int = EVAL_SETTINGS.n_points,
                    keys: list[str] | None = None, seed: int = EVAL_SETTINGS.seed, neutral_labels: bool = True,
                    region: str = EVAL_SETTINGS.region, training_identities: Iterable[str] | None = None, pose: bool = True,
                    progress: Callable[[str, int, int], None] | None = None,
                    fit_progress: Callable[[int, int, dict[str, float]], object] | None = None) -> EvaluationTable:
    """Fit and measure every scan of a scan folder (docs/scan-folder.md); docs/evaluation.md says what
    each number means.

    keys: only these scans. progress(key, i, n) before each scan; fit_progress is passed to `fit`.
    neutral_labels: follow the neutral policy (`backend.fitting.loop.neutral_warp_off`) for the scans the
    manifest marks neutral: under a policy that fits them with the expression warp off (eq. 12) they have no
    EDE (it would be 0 by construction). False fits every scan with its expression code whatever the
    policy. Which scans were fitted with the warp off is the one thing the EDE column depends on
    (`ScanEvaluation.neutral`).
    region: "sphere" (the sampling sphere) or "ball" (`region_radius_mm` around the nose tip).
    training_identities: the identities the model was trained on (the model file's dataset list); the
    others are reported as held out. pose: refine each scan's landmark placement with the model first
    (`backend.fitting.pose`). A scan that cannot be read or fitted gets a row with its reason."""
    from backend.fitting.loop import neutral_warp_off
    from backend.scans.folder import ScanError, load_scan, load_scan_folder

    if region not in REGIONS:
        raise ValueError(f"region {region!r} is not one of {', '.join(REGIONS)}")
    folder = load_scan_folder(scan_folder)
    entries = [e for e in folder.entries if keys is None or e.key in keys]
    if keys is not None:
        missing = sorted(set(keys) - {e.key for e in entries})
        if missing:
            raise ValueError(f"no scan {', '.join(missing)} in {scan_folder}")
    schedule = schedule or FitSchedule.fast()
    trained = None if training_identities is None else set(training_identities)
    rows: list[ScanEvaluation] = [ScanEvaluation(key=k, error=reason) for k, reason in folder.invalid
                                  if keys is None or k in keys]
    shared = folder.shared_topology
    fitted: dict[str, _Fitted] = {}
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(entry.key, i, len(entries))
        neutral = bool(neutral_labels) and neutral_warp_off(entry.neutral)
        row = ScanEvaluation(key=entry.key, identity=entry.identity, expression=entry.expression, neutral=neutral,
                             neutral_scan=entry.neutral, unseen=entry.unseen,
                             training_identity=None if trained is None else entry.identity in trained)
        rows.append(row)
        try:
            scan = load_scan(entry, folder.units)
            target = target_from_scan(scan, seed=seed, dense=shared)
        except ScanError as exc:
            row.error = exc.reason
            continue
        t0 = time.perf_counter()
        result = fit_posed(model, target, schedule, seed=seed, progress=fit_progress, neutral=neutral, pose=pose)
        target = result.target
        row.fit_seconds = time.perf_counter() - t0
        row.evaluations = result.report.evaluations
        face, _ = _fitted_meshes(model, result, resolution)
        m = reconstruction_metrics((_to_scan(face[0], target) * target.units_to_mm, face[1]), target,
                                   region_radius_mm, n_points, seed, region)
        for k, v in m.items():
            setattr(row, k, v)
        fitted[entry.key] = _Fitted(entry, target, result, face, scan.faces)

    if shared:
        _correspondence_columns(model, rows, fitted)
    settings = {"schedule": f"{schedule.name} ({schedule.total_steps} steps, "
                            f"{schedule.evaluations():,} SDF queries)" + (", after a 60-step pose refinement" if pose else ""),
                "mesh": f"marching cubes {resolution}³, trimmed to the face region (backend.geometry.face_region)",
                "compared": "both surfaces as §4.1 prepares the ground truth (seen from the front, holes "
                            "closed: backend.scans.samples.front_surface), model frame, mm",
                "region": ("the 100 mm sampling sphere" if region == "sphere" else
                           f"ball of {region_radius_mm:g} mm around the nose tip") + f", {n_points:,} points per mesh",
                "exact": "Chamfer / F-score exact: each sampled point's distance to the other surface (libigl AABB)",
                "neutral scans": ("fitted with the expression warp off (neutral policy); no EDE"
                                  if neutral_labels and neutral_warp_off(True) else
                                  "fitted with an expression code like the others; EDE over all scans"),
                "identities": "training identities unknown" if trained is None else
                              f"{sum(1 for r in rows if r.training_identity)} scans of training identities, "
                              f"{sum(1 for r in rows if r.training_identity is False)} of held-out ones",
                "EDE/TDE/capture": "fitted codes; vertices visible on the scan and its neutral scan; capture: "
                                   "backend.geometry.capture (moving > 3 mm)"
                                   if shared else "not computed (the folder does not share one topology)"}
    return EvaluationTable(rows, settings)


@dataclass
class _Fitted:
    entry: object
    target: FitTarget
    result: FitResult
    face: tuple[np.ndarray, np.ndarray]   # the fitted face, model frame mm
    scan_faces: np.ndarray                 # the scan's own triangles (shared topology)


def _correspondence_columns(model: ImFacePlusPlus, rows: list[ScanEvaluation], fitted: dict[str, _Fitted]) -> None:
    """EDE, TDE and expression capture for a shared-topology folder (vertex i = vertex i everywhere)."""
    from backend.correspondence import correspondence_errors
    from backend.geometry.capture import expression_capture

    neutral_of: dict[str, _Fitted] = {}
    for fd in fitted.values():
        if fd.entry.neutral:  # type: ignore[attr-defined]
            neutral_of.setdefault(fd.entry.identity, fd)  # type: ignore[attr-defined]
    tmpl = model.template_dense.detach().cpu().numpy() if model.template_dense is not None else None
    for row in rows:
        fd = fitted.get(row.key)
        if fd is None or fd.target.dense_points is None:
            continue
        target, n = fd.target, neutral_of.get(row.identity)
        valid = target.dense_valid.copy()
        neutral_pts = None
        if n is not None and n.target.dense_points is not None and \
                len(n.target.dense_points) == len(target.dense_points):
            neutral_pts = n.target.dense_points
            valid &= n.target.dense_valid
        tmpl_pts = tmpl if tmpl is not None and len(tmpl) == len(target.dense_points) else None
        if valid.any():
            errs = correspondence_errors(model, fd.result.codes, target.dense_points,
                                         None if row.neutral else neutral_pts, tmpl_pts, valid,
                                         neutral=fd.result.neutral)
            row.ede_mm = errs.get("ede_mm", math.nan)
            row.tde_mm = errs.get("tde_mm", math.nan)
        if neutral_pts is not None and not fd.entry.neutral and len(fd.face[1]):  # type: ignore[attr-defined]
            cap = expression_capture((neutral_pts * MM_PER_UNIT, n.scan_faces),  # type: ignore[union-attr]
                                     (target.dense_points * MM_PER_UNIT, fd.scan_faces), fd.face, region=valid)
            row.capture, row.capture_moving_mm, row.capture_static_mm, row.capture_motion_mm = \
                cap.capture, cap.moving_error, cap.static_error, cap.neutral_distance
