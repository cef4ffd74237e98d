"""Evaluation of a trained model on a scan folder: fit every scan, measure, write a table (mm).

Per scan (ImFace++ §4.3, NPHM thesis §5.3):
* the scan is fitted (`backend.fitting.fit`, eq. 21) and its mesh extracted (marching cubes, 256³ by
  default) and put back into the scan's frame in mm;
* Chamfer-L1 (mean of the two directions, mm), F-score@1mm and normal consistency between that mesh
  and the scan's own preprocessed surface (hidden parts removed, pseudo-watertight, exactly what
  training sees: the paper also compares after removing inner structures), both sampled area-uniformly
  in the **face region = the ball of radius 80 mm around the scan's nose-tip landmark** (covers
  forehead to chin and cheek to cheek, and stays inside the 100 mm sampling sphere of §4.1, so the
  comparison never reaches past what the model was trained to represent);
* when the folder shares one topology: EDE (fitted codes, each vertex warped to canonical space vs the
  same vertex on the person's neutral scan) and TDE (to template space vs the model's template
  vertices; only when the model was trained on that topology), mm, over vertices visible on both scans.

The table is written as Markdown and CSV, one row per scan and a mean row.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from backend.fitting import (FitResult, FitSchedule, FitTarget, extract_face_mesh, fit, reference_mesh_mm,
                             scan_frame_mm, target_from_scan)
from backend.model import ImFacePlusPlus

DEFAULT_REGION_MM = 80.0


@dataclass
class ScanEvaluation:
    key: str
    chamfer_mm: float = math.nan
    fscore_1mm: float = math.nan          # percent
    normal_consistency: float = math.nan
    ede_mm: float = math.nan
    tde_mm: float = math.nan
    fit_seconds: float = math.nan
    evaluations: int = 0
    error: str = ""                       # why this scan has no numbers


@dataclass
class EvaluationTable:
    rows: list[ScanEvaluation]
    settings: dict[str, object] = field(default_factory=dict)

    COLUMNS = ("key", "chamfer_mm", "fscore_1mm", "normal_consistency", "ede_mm", "tde_mm", "fit_seconds",
               "evaluations")

    def mean(self) -> dict[str, float]:
        out = {}
        for c in self.COLUMNS[1:]:
            vals = [getattr(r, c) for r in self.rows if not r.error]
            vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
            out[c] = float(np.mean(vals)) if vals else math.nan
        return out

    def to_markdown(self) -> str:
        heads = ["scan", "Chamfer-L1 (mm)", "F-score@1mm (%)", "N.C.", "EDE (mm)", "TDE (mm)", "fit (s)",
                 "SDF queries"]
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

        def fmt(v: float, nd: int) -> str:
            return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):.{nd}f}"

        def row(name: str, d: dict) -> str:
            return (f"| {name} | {fmt(d['chamfer_mm'], 3)} | {fmt(d['fscore_1mm'], 2)} | "
                    f"{fmt(d['normal_consistency'], 4)} | {fmt(d['ede_mm'], 3)} | {fmt(d['tde_mm'], 3)} | "
                    f"{fmt(d['fit_seconds'], 1)} | {fmt(d['evaluations'], 0)} |")

        for r in self.rows:
            if r.error:
                lines.append(f"| {r.key} | failed: {r.error} |" + " |" * (len(heads) - 2))
            else:
                lines.append(row(r.key, asdict(r)))
        lines.append(row("**mean**", self.mean()))
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
            m = self.mean()
            w.writerow(["mean"] + [m[c] for c in self.COLUMNS[1:]] + [""])
        return md, cp


def reconstruction_metrics(mesh_mm: tuple[np.ndarray, np.ndarray], target: FitTarget,
                           region_radius_mm: float = DEFAULT_REGION_MM, n_points: int = 200_000,
                           seed: int = 0) -> dict[str, float]:
    """Chamfer-L1 (mm), F-score@1mm (%), normal consistency of a mesh (scan frame, mm) against the
    target's preprocessed surface, in the ball of `region_radius_mm` around the nose tip."""
    from backend.geometry.metrics import BallRegion, compare_meshes

    ref = reference_mesh_mm(target)
    if ref is None:
        raise ValueError(f"{target.name}: no reference surface to measure against")
    nose = scan_frame_mm(target, target.landmarks[2:3])[0]
    region = BallRegion(tuple(float(c) for c in nose), float(region_radius_mm))
    if len(mesh_mm[1]) == 0:
        return {"chamfer_mm": math.inf, "fscore_1mm": 0.0, "normal_consistency": 0.0}
    r = compare_meshes(mesh_mm, ref, n_points=n_points, threshold_mm=1.0, region=region, seed=seed)
    return {"chamfer_mm": r["chamfer_l1"], "fscore_1mm": 100.0 * r["fscore"],
            "normal_consistency": r["normal_consistency"]}


def measure_fit(model: ImFacePlusPlus, result: FitResult, resolution: int = 256,
                region_radius_mm: float = DEFAULT_REGION_MM, n_points: int = 200_000,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Extract the fitted face (scan frame and units) and put its metrics into `result.report.metrics`
    (Chamfer-L1, F-score@1mm, normal consistency against the target's surface, when it has one).
    Returns the mesh (vertices, faces)."""
    t0 = time.perf_counter()
    target = result.target
    v, f = extract_face_mesh(model, result.codes, resolution, neutral=result.neutral,
                             normalized_from_scan=target.normalized_from_scan)
    result.report.metrics["extraction_seconds"] = time.perf_counter() - t0
    if target.reference is not None:
        result.report.metrics.update(
            reconstruction_metrics((v * target.units_to_mm, f), target, region_radius_mm, n_points, seed))
    return v, f


def evaluate_folder(model: ImFacePlusPlus, scan_folder: str | Path, *, schedule: FitSchedule | None = None,
                    resolution: int = 256, region_radius_mm: float = DEFAULT_REGION_MM, n_points: int = 200_000,
                    keys: list[str] | None = None, seed: int = 0, neutral_labels: bool = True,
                    progress: Callable[[str, int, int], None] | None = None,
                    fit_progress: Callable[[int, int, dict[str, float]], object] | None = None) -> EvaluationTable:
    """Fit and measure every scan of a scan folder (docs/scan-folder.md).

    keys: only these scans. progress(key, i, n) before each scan; fit_progress is passed to `fit`.
    neutral_labels: fit the scans the manifest marks neutral with the expression warp off (eq. 12), as
    training treats them; False fits every scan with its expression code.
    A scan that cannot be read or fitted gets a row with its reason; the others go on."""
    from backend.correspondence import correspondence_errors
    from backend.scans.folder import ScanError, load_scan, load_scan_folder

    folder = load_scan_folder(scan_folder)
    entries = [e for e in folder.entries if keys is None or e.key in keys]
    if keys is not None:
        missing = sorted(set(keys) - {e.key for e in entries})
        if missing:
            raise ValueError(f"no scan {', '.join(missing)} in {scan_folder}")
    schedule = schedule or FitSchedule.fast()
    rows: list[ScanEvaluation] = [ScanEvaluation(key=k, error=reason) for k, reason in folder.invalid
                                  if keys is None or k in keys]
    shared = folder.shared_topology
    fitted: dict[str, tuple[FitTarget, object, bool]] = {}
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(entry.key, i, len(entries))
        row = ScanEvaluation(key=entry.key)
        rows.append(row)
        try:
            scan = load_scan(entry, folder.units)
            target = target_from_scan(scan, seed=seed, dense=shared)
        except ScanError as exc:
            row.error = exc.reason
            continue
        t0 = time.perf_counter()
        neutral = bool(neutral_labels and entry.neutral)
        result = fit(model, target, schedule, seed=seed, progress=fit_progress, neutral=neutral)
        row.fit_seconds = time.perf_counter() - t0
        row.evaluations = result.report.evaluations
        measure_fit(model, result, resolution, region_radius_mm, n_points, seed)
        for k in ("chamfer_mm", "fscore_1mm", "normal_consistency"):
            setattr(row, k, result.report.metrics[k])
        fitted[entry.key] = (target, result.codes, neutral)

    if shared:
        # EDE / TDE against the person's neutral scan and the model's template (same vertex order).
        by_key = {e.key: e for e in entries}
        neutral_of = {}
        for e in entries:
            if e.neutral and e.key in fitted:
                neutral_of.setdefault(e.identity, e.key)
        tmpl = model.template_dense.detach().cpu().numpy() if model.template_dense is not None else None
        for row in rows:
            if row.key not in fitted:
                continue
            target, codes, neutral = fitted[row.key]
            if target.dense_points is None:
                continue
            nk = neutral_of.get(by_key[row.key].identity)
            n_target = fitted[nk][0] if nk is not None else None
            valid = target.dense_valid.copy()
            neutral_pts = None
            if n_target is not None and n_target.dense_points is not None and \
                    len(n_target.dense_points) == len(target.dense_points):
                neutral_pts = n_target.dense_points
                valid &= n_target.dense_valid
            tmpl_pts = tmpl if tmpl is not None and len(tmpl) == len(target.dense_points) else None
            if not valid.any():
                continue
            errs = correspondence_errors(model, codes, target.dense_points, neutral_pts, tmpl_pts, valid,
                                         neutral=neutral)
            row.ede_mm = errs.get("ede_mm", math.nan)
            row.tde_mm = errs.get("tde_mm", math.nan)
    settings = {"schedule": f"{schedule.name} ({schedule.total_steps} steps, "
                            f"{schedule.evaluations():,} SDF queries)",
                "mesh": f"marching cubes {resolution}³, scan frame, mm",
                "region": f"ball of {region_radius_mm:g} mm around the nose tip, {n_points:,} points per mesh",
                "reference": "the scan's preprocessed surface (hidden parts removed, pseudo-watertight)",
                "neutral scans": "fitted with the expression warp off (manifest label)" if neutral_labels
                                 else "fitted with an expression code like the others",
                "EDE/TDE": "fitted codes; vertices visible on the scan and its neutral scan"
                           if shared else "not computed (the folder does not share one topology)"}
    return EvaluationTable(rows, settings)
