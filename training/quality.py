"""Training quality measured where the answer is known: expression capture of the training scans
(their own trained codes) and of held-out fits, and the detail field's error at ground-truth wrinkles.

* `training_capture`: each training scan of a shared-topology folder is reconstructed from its trained
  codes (marching cubes, the scan's frame, mm) and compared with the ground-truth meshes by
  `backend.geometry.capture.expression_capture` (the moving region: ground-truth vertices that move more
  than 3 mm between the person's neutral and this expression and face, and are seen by, the viewer). With
  `expression="mean"` the person's identity code is combined with the mean training expression code:
  the baseline any trained expression code must beat.
* `heldout_capture`: the same for fits of scans the model never saw (`backend.fitting.fit`).
* `wrinkle_point_error`: |SDF| (mm) of the refined field f and of the base field f̂ at the vertices of
  the procedural default data where the ground truth has a wrinkle groove (training.data.synthetic_faces
  `scan_wrinkles`), and at the other skin vertices of the same scans for comparison.

The neutral policy (`backend.fitting.loop.NEUTRAL_POLICY`) decides whether scans labelled neutral are
reconstructed with the expression warp off: training scans as they were trained (`training_warp_off`),
fits as fitting does (`neutral_warp_off`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from backend.codes import mean_codes, training_face_codes
from backend.fitting import extract_face_mesh
from backend.fitting.loop import neutral_warp_off, training_warp_off
from backend.geometry.capture import expression_capture
from backend.geometry.metrics import EVAL_SETTINGS
from backend.model import FaceCodes, ImFacePlusPlus
from backend.scans.frame import MM_PER_UNIT

#: Region of the capture measure (the evaluation's face region: a ball around the nose tip), mm.
REGION_MM = EVAL_SETTINGS.region_radius_mm


@dataclass
class CaptureRow:
    key: str
    identity: str
    expression: str
    source: str                     # "trained", "mean expression", "fit"
    capture: float = math.nan       # nan for neutral scans (nothing moves)
    moving_error: float = math.nan  # mm
    static_error: float = math.nan  # mm (for a neutral scan: every seen, viewer-facing vertex)
    neutral_distance: float = math.nan
    n_moving: int = 0
    face_error: float = math.nan    # mean over every seen, viewer-facing vertex of the region (moving or not), mm


def _gt_meshes(scan_folder: str | Path, keys: Iterable[str] | None = None):
    """{key: (entry, vertices mm, faces, landmarks mm)} of a shared-topology folder (the scans of `keys`
    and their people's neutral scans), and the folder."""
    from backend.scans.folder import load_scan, load_scan_folder

    folder = load_scan_folder(scan_folder)
    if not folder.shared_topology:
        raise ValueError(f"{scan_folder}: capture needs a folder with one shared topology")
    want = None if keys is None else set(keys)
    people = None if want is None else {k.split("/")[0] for k in want}
    out = {}
    for e in folder.entries:
        if want is None or e.key in want or (e.neutral and e.identity in people):
            s = load_scan(e, folder.units)
            out[e.key] = (e, s.vertices, s.faces, s.landmarks)
    return out, folder


def training_transforms(samples: str | Path) -> dict[str, np.ndarray]:
    """{scan key: normalized_from_scan} of a preprocessed folder: the frame each training scan's codes
    were learned in (recomputing it from the landmarks would follow any later change of the alignment
    rule, not the model)."""
    from safetensors.numpy import load_file

    root = Path(samples)
    index = json.loads((root / "index.json").read_text())
    out = {}
    for row in index["scans"]:
        t = load_file(str(root / row["samples"]))
        out[row["key"]] = np.asarray(t["normalized_from_scan"], np.float64)
    return out


def _transforms(ck, samples: str | Path | None) -> dict[str, np.ndarray]:
    samples = samples if samples is not None else ck.config.get("data", {}).get("processed")
    if not samples or not (Path(samples) / "index.json").is_file():
        raise ValueError("the training samples folder is needed for the training scans' frames "
                         f"(not found: {samples!r}); pass samples=")
    return training_transforms(samples)


def _region(vertices: np.ndarray, landmarks_mm: np.ndarray, radius: float = REGION_MM) -> np.ndarray:
    return np.linalg.norm(vertices - landmarks_mm[2], axis=1) <= radius


def _measure(key: str, entry, gt: dict, recon: tuple[np.ndarray, np.ndarray], source: str) -> CaptureRow:
    """One row: capture against the person's neutral ground truth (or, for a neutral scan, its error)."""
    _, v, f, lm = gt[key]
    row = CaptureRow(key, entry.identity, entry.expression, source)
    neutral_key = next((k for k, (e, *_r) in gt.items() if e.identity == entry.identity and e.neutral), None)
    if neutral_key is None:
        return row
    nv = gt[neutral_key][1]
    c = expression_capture((nv, f), (v, f), recon, region=_region(v, lm))
    row.capture, row.moving_error, row.static_error = c.capture, c.moving_error, c.static_error
    row.neutral_distance, row.n_moving = c.neutral_distance, c.n_moving
    parts = [(e, n) for e, n in ((c.moving_error, c.n_moving), (c.static_error, c.n_static)) if n]
    row.face_error = sum(e * n for e, n in parts) / max(1, sum(n for _, n in parts))
    return row


def training_capture(model: ImFacePlusPlus, ck, scan_folder: str | Path, *, resolution: int = EVAL_SETTINGS.resolution,
                     keys: Iterable[str] | None = None, expression: str = "trained",
                     neutral_policy: str | None = None, samples: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> list[CaptureRow]:
    """Capture of the training scans reconstructed from their trained codes (expression="trained") or
    from the person's identity code with the mean training expression code (expression="mean").
    samples: the training samples folder (default: the one in the model's config), for each scan's frame."""
    frames = _transforms(ck, samples)
    rows_meta = ck.dataset["scans"]
    index = {r["key"]: i for i, r in enumerate(rows_meta)}
    gt, _ = _gt_meshes(scan_folder, keys)
    mean = mean_codes(model)
    out = []
    for key, (entry, v, f, lm) in gt.items():
        if keys is not None and key not in set(keys):
            continue
        if key not in index:
            continue
        if progress is not None:
            progress(key)
        i = index[key]
        codes = training_face_codes(model, i, rows_meta[i]["identity_index"])
        neutral = training_warp_off(bool(rows_meta[i]["neutral"]), neutral_policy)
        if expression == "mean":
            codes = FaceCodes(codes.identity, mean.expression, mean.detail)
            neutral = False
        elif expression != "trained":
            raise ValueError("expression must be 'trained' or 'mean'")
        recon = extract_face_mesh(model, codes, resolution, neutral=neutral, normalized_from_scan=frames[key])
        out.append(_measure(key, entry, gt, recon, "trained" if expression == "trained" else "mean expression"))
    return out


def heldout_capture(model: ImFacePlusPlus, scan_folder: str | Path, *, schedule=None, resolution: int = EVAL_SETTINGS.resolution,
                    keys: Iterable[str] | None = None, neutral_policy: str | None = None, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> tuple[list[CaptureRow], dict[str, dict]]:
    """Fit every scan (or `keys`) of a shared-topology folder and measure capture; also returns each
    fit's Chamfer-free summary {key: {"seconds", "evaluations", "loss"}}."""
    from backend.fitting import fit, target_from_scan
    from backend.scans.folder import load_scan

    gt, folder = _gt_meshes(scan_folder, keys)
    rows, info = [], {}
    for key, (entry, v, f, lm) in gt.items():
        if keys is not None and key not in set(keys):
            continue
        if progress is not None:
            progress(key)
        target = target_from_scan(load_scan(entry, folder.units), seed=seed)
        neutral = neutral_warp_off(entry.neutral, neutral_policy)
        res = fit(model, target, schedule, neutral=neutral, seed=seed)
        recon = extract_face_mesh(model, res.codes, resolution, neutral=neutral,
                                  normalized_from_scan=target.normalized_from_scan)
        rows.append(_measure(key, entry, gt, recon, "fit"))
        info[key] = {"seconds": res.report.seconds, "evaluations": res.report.evaluations,
                     "loss": res.report.losses[-1]["total"] if res.report.losses else math.nan}
    return rows, info


def summarize(rows: list[CaptureRow]) -> dict[str, dict[str, float]]:
    """Per expression (and "all expressive"): mean capture, moving and static error, face error and motion
    (the moving vertices' distance to the neutral surface: capture's scale)."""
    groups: dict[str, list[CaptureRow]] = {}
    for r in rows:
        groups.setdefault(r.expression, []).append(r)
        if math.isfinite(r.capture):
            groups.setdefault("all expressive", []).append(r)
    out = {}
    for name, rs in groups.items():
        def m(attr: str) -> float:
            vals = [getattr(r, attr) for r in rs if math.isfinite(getattr(r, attr))]
            return float(np.mean(vals)) if vals else math.nan
        out[name] = {"capture": m("capture"), "moving_error": m("moving_error"),
                     "static_error": m("static_error"), "face_error": m("face_error"),
                     "motion": m("neutral_distance"), "n": len(rs)}
    return out


def capture_table(rows: list[CaptureRow], title: str = "") -> str:
    """Markdown: one line per expression (means over people) and the expressive mean."""
    s = summarize(rows)
    lines = [f"**{title}**" if title else "",
             "| expression | n | capture | moving err (mm) | static err (mm) | face err (mm) | motion (mm) |",
             "|---|---|---|---|---|---|---|"]

    def fmt(x: float, nd: int = 3) -> str:
        return "–" if not math.isfinite(x) else f"{x:.{nd}f}"

    for name in sorted(s, key=lambda n: (n == "all expressive", n)):
        d = s[name]
        lines.append(f"| {name} | {d['n']} | {fmt(d['capture'])} | {fmt(d['moving_error'])} | "
                     f"{fmt(d['static_error'])} | {fmt(d['face_error'])} | {fmt(d['motion'], 2)} |")
    return "\n".join(lines) + "\n"


def rows_to_json(rows: list[CaptureRow]) -> list[dict]:
    return [asdict(r) for r in rows]


# ------------------------------------------------------------------------------------------ wrinkles


@dataclass
class WrinkleError:
    key: str
    base_wrinkle_mm: float      # mean |f̂| at the wrinkle points (grooves and the skin between them)
    refined_wrinkle_mm: float   # mean |f| there
    base_other_mm: float        # the same at the other skin vertices (no wrinkle)
    refined_other_mm: float
    n_wrinkle: int
    # correlation, over the wrinkle points, of what DetailNet changes (f - f̂) with the grooves (-w: a groove
    # of depth w reads +w outside the smooth surface): ~1 when it draws the wrinkles, ~0 when it only
    # corrects the base surface smoothly (which also lowers |f| at the wrinkle points)
    pattern_corr: float = math.nan


def wrinkle_points(scan_folder: str | Path, key: str, normalized_from_scan: np.ndarray, depth_mm: float = 0.1,
                   spread_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertices mm scan frame, wrinkle mask, other-skin mask) of one scan of a procedural folder.

    The wrinkle points are the ground-truth surface points of the wrinkled skin: the vertices where the
    groove is deeper than `depth_mm` and the skin between the grooves (within `spread_mm` of one), so a
    smooth surface cannot sit at the grooves' depth and score well; the other points are the skin
    vertices with no wrinkle. Both inside the training domain."""
    from backend.scans.folder import load_scan, load_scan_folder
    from training.data.synthetic_faces import scan_detail_offsets

    root = Path(scan_folder)
    manifest = json.loads((root / "manifest.json").read_text())
    raw = next(s for s in manifest["scans"] if f"{s['identity']}/{s['expression']}" == key)
    folder = load_scan_folder(root)
    entry = next(e for e in folder.entries if e.key == key)
    scan = load_scan(entry, folder.units)
    parts = scan_detail_offsets(manifest, raw)
    # the training domain (the unit ball of the model frame): crow's feet lie past the 80 mm face region
    region = np.linalg.norm(_to_model(scan.vertices, normalized_from_scan).numpy(), axis=1) < 0.95
    skin = parts["skin"] != 0.0
    w = parts["wrinkles"]
    groove = region & skin & (w < -depth_mm)
    if not groove.any():
        return scan.vertices, groove, region & skin
    # the wrinkle region: the grooves and the skin between them (within `spread_mm` of a groove vertex)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(scan.vertices[groove]).query(scan.vertices, distance_upper_bound=spread_mm)
    wrinkled = region & skin & np.isfinite(d)
    return scan.vertices, wrinkled, region & skin & ~wrinkled & (np.abs(w) < 1e-3)


def wrinkle_point_error(model: ImFacePlusPlus, ck, scan_folder: str | Path, keys: Iterable[str] | None = None,
                        depth_mm: float = 0.1, codes: dict[str, FaceCodes] | None = None,
                        neutral_policy: str | None = None, samples: str | Path | None = None
                        ) -> list[WrinkleError]:
    """|SDF| in mm of the refined and of the base field at the ground-truth wrinkle points of training
    scans (trained codes, or `codes[key]` when given: e.g. a transferred detail code)."""
    frames = _transforms(ck, samples)
    rows_meta = ck.dataset["scans"]
    index = {r["key"]: i for i, r in enumerate(rows_meta)}
    out = []
    for key in (keys if keys is not None else list(index)):
        v, wr, other = wrinkle_points(scan_folder, key, frames[key], depth_mm)
        if not wr.any():
            continue
        grooves = scan_wrinkles(scan_folder, key)[wr]
        i = index[key]
        c = codes[key] if codes is not None and key in codes else training_face_codes(model, i, rows_meta[i]["identity_index"])
        pts = _to_model(v, frames[key])
        neutral = training_warp_off(bool(rows_meta[i]["neutral"]), neutral_policy)
        fb, fr = field_values(model, c, pts, neutral)
        out.append(WrinkleError(key, float(np.abs(fb[wr]).mean()), float(np.abs(fr[wr]).mean()),
                                float(np.abs(fb[other]).mean()), float(np.abs(fr[other]).mean()), int(wr.sum()),
                                _corr(fr[wr] - fb[wr], -grooves)))
    return out


def scan_wrinkles(scan_folder: str | Path, key: str) -> np.ndarray:
    """The ground-truth wrinkle offset (mm along the normal, negative in a groove) of every vertex of one
    scan of a procedural folder."""
    from training.data.synthetic_faces import scan_detail_offsets

    manifest = json.loads((Path(scan_folder) / "manifest.json").read_text())
    raw = next(s for s in manifest["scans"] if f"{s['identity']}/{s['expression']}" == key)
    return scan_detail_offsets(manifest, raw)["wrinkles"]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _to_model(vertices_mm: np.ndarray, normalized_from_scan: np.ndarray) -> torch.Tensor:
    from backend.geometry.alignment import apply_transform

    return torch.from_numpy(apply_transform(normalized_from_scan, vertices_mm)).float()


def field_values(model: ImFacePlusPlus, codes: FaceCodes, points: torch.Tensor, neutral: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(base f̂, refined f) in mm at model-frame points."""
    with torch.no_grad():
        face = model.field(codes, neutral=neutral, frozen=True)
        fb = face.sdf(points, with_detail=False)
        fr = face.sdf(points, with_detail=True)
    return fb.numpy() * MM_PER_UNIT, fr.numpy() * MM_PER_UNIT


# ------------------------------------------------------------------------------------------ stage two


def stage_two_config(model_path: str | Path, out: str | Path, steps: int, samples: str | Path | None = None,
                     overrides: Iterable[str] = ()):
    """A stage-two-only run on a fixed base model: the model's own training config (same networks, same
    data), its weights as the start (`init_from`), every step in stage two (T_m = 0)."""
    from backend.model.io import load_checkpoint
    from training.config import TrainConfig, apply_overrides

    ck = load_checkpoint(model_path)
    cfg = TrainConfig.from_dict(ck.config)
    cfg.init_from = str(model_path)
    if samples is not None:
        cfg.data.processed = str(samples)
    cfg.schedule.steps, cfg.schedule.epochs = int(steps), None
    cfg.schedule.stage2_start = 0.0
    cfg.schedule.checkpoint_every, cfg.schedule.keep_checkpoints = 0, 0
    cfg.schedule.preview_every, cfg.schedule.curve_every = -1, 0
    cfg.output = str(out)
    cfg.progress = False
    return apply_overrides(cfg, list(overrides)) if overrides else cfg


def _neutral_key(ck, key: str) -> str:
    """The training neutral scan of `key`'s person."""
    person = key.split("/")[0]
    return next(r["key"] for r in ck.dataset["scans"] if r["neutral"] and r["key"].split("/")[0] == person)


def _drift(model: ImFacePlusPlus, ck, frames: dict[str, np.ndarray], gt: dict, key: str,
           vertices: np.ndarray | slice = slice(None)) -> np.ndarray:
    """`template_drift` at `vertices`, from already loaded frames and ground-truth meshes."""
    rows_meta = ck.dataset["scans"]
    index = {r["key"]: i for i, r in enumerate(rows_meta)}
    tmpl = []
    for k in (key, _neutral_key(ck, key)):
        i = index[k]
        codes = training_face_codes(model, i, rows_meta[i]["identity_index"])
        with torch.no_grad():
            face = model.field(codes, neutral=training_warp_off(bool(rows_meta[i]["neutral"])), frozen=True,
                               detail=False)
            tmpl.append(face.to_template(_to_model(gt[k][1][vertices], frames[k])).numpy())
    return np.linalg.norm(tmpl[0] - tmpl[1], axis=1) * MM_PER_UNIT


def template_drift(model: ImFacePlusPlus, ck, scan_folder: str | Path, key: str,
                   samples: str | Path | None = None) -> np.ndarray:
    """Per vertex (mm): how far apart the model puts one skin point in template space when it reads it on
    training scan `key` and on that person's neutral scan (trained codes; shared topology: vertex i is the
    same skin point on both). DetailNet reads the template, so a detail code moves a wrinkle onto another
    face only where this is small against the wrinkles' spacing; 0 for the neutral scan itself."""
    gt, _ = _gt_meshes(scan_folder, [key])
    return _drift(model, ck, _transforms(ck, samples), gt, key)


def transfer_wrinkle_error(model: ImFacePlusPlus, ck, scan_folder: str | Path, source_key: str,
                           samples: str | Path | None = None, depth_mm: float = 0.1) -> dict[str, float]:
    """Transferring details moves the wrinkles: the person's neutral face with the detail code of their
    wrinkled scan `source_key`. The ground truth is the neutral mesh with the source's wrinkles added
    along its normals (shared topology: vertex i is the same skin point); |f| (mm) at those wrinkle
    points with the neutral scan's own detail code, with the source's, and of the base field; transfer_corr:
    the correlation of what the swap changes in f with the wrinkles it should add (~1 when the detail code
    carries the wrinkles, ~0 when it does not); template_drift_mm: `template_drift` at those points."""
    from backend.geometry.normals import vertex_normals
    from training.data.synthetic_faces import scan_detail_offsets

    frames = _transforms(ck, samples)
    rows_meta = ck.dataset["scans"]
    index = {r["key"]: i for i, r in enumerate(rows_meta)}
    neutral_key = _neutral_key(ck, source_key)
    root = Path(scan_folder)
    manifest = json.loads((root / "manifest.json").read_text())
    raw = {f"{s['identity']}/{s['expression']}": s for s in manifest["scans"]}
    gt, _ = _gt_meshes(root, [source_key])   # the source and its person's neutral scan
    _, nv, nf, _ = gt[neutral_key]
    w_src = scan_detail_offsets(manifest, raw[source_key])["wrinkles"]
    w_neu = scan_detail_offsets(manifest, raw[neutral_key])["wrinkles"]
    moved = nv + vertex_normals(nv, nf) * (w_src - w_neu)[:, None]
    _, wr, _ = wrinkle_points(root, source_key, frames[source_key], depth_mm)
    pts = _to_model(moved[wr], frames[neutral_key])
    i, j = index[neutral_key], index[source_key]
    own = training_face_codes(model, i, rows_meta[i]["identity_index"])
    src = training_face_codes(model, j, rows_meta[j]["identity_index"])
    neutral = training_warp_off(True)
    fb, f_own = field_values(model, own, pts, neutral)
    _, f_src = field_values(model, FaceCodes(own.identity, own.expression, src.detail), pts, neutral)
    # what the swap changes against the wrinkles it should add (-(w_src - w_neu): a new groove reads +)
    change = _corr(f_src - f_own, -(w_src - w_neu)[wr])
    drift = _drift(model, ck, frames, gt, source_key, wr)
    return {"base_mm": float(np.abs(fb).mean()), "own_detail_mm": float(np.abs(f_own).mean()),
            "transferred_detail_mm": float(np.abs(f_src).mean()), "transfer_corr": change, "n": int(wr.sum()),
            "template_drift_mm": float(drift.mean())}
