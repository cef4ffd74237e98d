"""Scan → training samples (ImFace++ §4.1), CPU only, no OpenGL/EGL.

Per scan: rigid alignment to the canonical frontal frame from the landmarks; normalisation (1 unit =
10 cm, origin 4 cm behind the nose tip); crop to the unit sphere; hidden-surface removal by ray casting
along +z; a pseudo-watertight surface from a Delaunay triangulation of the visible x-y coordinates;
then SDF samples (near-surface N(0, 1 cm) offsets and uniform in the sphere) with exact signed distances
and unit gradients, surface points with normals, and the transformed landmarks.

`preprocess_folder` runs that over a scan folder in parallel, with a progress bar, a cache that skips
scans whose source and settings have not changed, and a list of the scans that failed and why.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from backend.geometry.alignment import apply_transform, rigid_transform
from backend.geometry.heightfield import (
    delaunay_heightfield,
    non_manifold_edge_count,
    self_intersecting_faces,
    visible_vertices,
)
from backend.geometry.signed_distance import closest_points, heightfield_signed_distance

from .landmarks import CANONICAL_LANDMARKS_MM, LANDMARK_NAMES, MM_PER_UNIT, NOSE_TIP, NOSE_TIP_DEPTH_MM
from .scan_folder import DEFAULT_MAX_TRIANGLES, LoadedScan, ScanEntry, ScanError, load_scan, load_scan_folder

FORMAT = "imface-samples/1"


@dataclass
class PreprocessConfig:
    n_near: int = 125_000
    n_uniform: int = 125_000
    near_sigma_mm: float = 10.0        # N(0, 1 cm) offsets around the surface
    n_surface: int = 50_000            # on-surface points with normals
    landmark_tolerance_mm: float = 5.0  # a landmark farther than this from the mesh is "off the surface"
    max_triangles: int = DEFAULT_MAX_TRIANGLES
    check_self_intersections: bool = True
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ScanSamples:
    """What preprocessing produces for one scan (see docs/samples-format.md)."""

    tensors: dict[str, np.ndarray]
    warnings: list[str]
    pseudo_watertight: tuple[np.ndarray, np.ndarray]  # (vertices, faces) in model units


def normalization_transform(landmarks_mm: np.ndarray) -> np.ndarray:
    """4x4 transform from the scan's frame (mm) to the normalised model frame."""
    target_nose = np.array([0.0, 0.0, NOSE_TIP_DEPTH_MM])
    aligned = rigid_transform(landmarks_mm, CANONICAL_LANDMARKS_MM, NOSE_TIP, target_nose)
    scale = np.diag([1 / MM_PER_UNIT] * 3 + [1.0])
    return scale @ aligned


def _sample_in_unit_sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return direction * rng.random(n)[:, None] ** (1 / 3)


def _sample_on_surface(rng: np.random.Generator, vertices: np.ndarray, faces: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform points on a triangle mesh, and the index of their triangle."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    tri = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    outside = u + v > 1
    u[outside], v[outside] = 1 - u[outside], 1 - v[outside]
    points = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    return points, tri


def preprocess_scan(scan: LoadedScan, cfg: PreprocessConfig, dense: bool = False) -> ScanSamples:
    """Run the §4.1 pipeline on one loaded scan. Raises ScanError for scans it cannot use."""
    key = scan.entry.key
    notes = list(scan.warnings)
    rng = np.random.default_rng([cfg.seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")])

    # Landmarks must lie on the scan: one far from the surface means a wrong file or wrong indices.
    lm_distance, _, _ = closest_points(scan.landmarks, scan.vertices, scan.faces)
    off = lm_distance > cfg.landmark_tolerance_mm
    if off.any():
        names = ", ".join(f"{LANDMARK_NAMES[i]} ({lm_distance[i]:.1f} mm)" for i in np.flatnonzero(off))
        raise ScanError(key, f"landmark(s) off the surface by more than {cfg.landmark_tolerance_mm} mm: {names}")

    n_nonmanifold = non_manifold_edge_count(scan.faces)
    if n_nonmanifold:
        notes.append(f"non-manifold mesh: {n_nonmanifold} edges shared by more than two triangles "
                     "(harmless here: the surface is rebuilt from the visible vertices)")

    to_model = normalization_transform(scan.landmarks)
    vertices = apply_transform(to_model, scan.vertices)
    landmarks = apply_transform(to_model, scan.landmarks)

    # Crop: keep triangles whose three vertices lie in the unit sphere.
    inside = np.linalg.norm(vertices, axis=1) <= 1.0
    faces = scan.faces[inside[scan.faces].all(axis=1)]
    if len(faces) == 0:
        raise ScanError(key, "no triangle lies within 10 cm of the point 4 cm behind the nose tip: "
                             "is this a face scan with correct landmarks?")
    if cfg.check_self_intersections:
        crossing = self_intersecting_faces(vertices, faces)
        if len(crossing):
            notes.append(f"self-intersecting mesh: {len(crossing)} triangles cross others "
                         "(hidden parts are removed and the surface rebuilt from what the viewer sees)")

    used = np.zeros(len(vertices), dtype=bool)
    used[faces] = True
    visible = np.zeros(len(vertices), dtype=bool)
    visible[used] = visible_vertices(vertices, faces)[used]
    surface_vertices = vertices[visible]
    if len(surface_vertices) < 100:
        raise ScanError(key, f"only {len(surface_vertices)} visible vertices in the face region: "
                             "the scan does not face +z or is too sparse")
    try:
        surface_faces = delaunay_heightfield(surface_vertices)
    except Exception as exc:  # qhull errors on degenerate input
        raise ScanError(key, f"cannot triangulate the visible surface: {exc}") from None
    e1 = surface_vertices[surface_faces[:, 1]] - surface_vertices[surface_faces[:, 0]]
    e2 = surface_vertices[surface_faces[:, 2]] - surface_vertices[surface_faces[:, 0]]
    normals = np.cross(e1, e2)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-300)

    # Near-surface samples: surface points plus N(0, sigma) offsets, kept inside the sphere.
    sigma = cfg.near_sigma_mm / MM_PER_UNIT
    near_chunks, have = [], 0
    while have < cfg.n_near:
        base, _ = _sample_on_surface(rng, surface_vertices, surface_faces, int((cfg.n_near - have) * 1.1) + 16)
        cand = base + rng.standard_normal(base.shape) * sigma
        cand = cand[np.linalg.norm(cand, axis=1) <= 1.0]
        near_chunks.append(cand)
        have += len(cand)
    near = np.concatenate(near_chunks)[: cfg.n_near]
    uniform = _sample_in_unit_sphere(rng, cfg.n_uniform)
    points = np.concatenate([near, uniform])
    sdf, gradients = heightfield_signed_distance(points, surface_vertices, surface_faces, normals)

    surface_points, surface_tri = _sample_on_surface(rng, surface_vertices, surface_faces, cfg.n_surface)
    tensors = {
        "points": points.astype(np.float32),
        "sdf": sdf.astype(np.float32),
        "gradients": gradients.astype(np.float32),
        "surface_points": surface_points.astype(np.float32),
        "surface_normals": normals[surface_tri].astype(np.float32),
        "landmarks": landmarks.astype(np.float32),
        "normalized_from_scan": to_model,
    }
    if dense:
        tensors["dense_points"] = vertices.astype(np.float32)
        tensors["dense_valid"] = (visible & inside).astype(np.uint8)
    return ScanSamples(tensors, notes, (surface_vertices, surface_faces))


# ----------------------------------------------------------------------------------------------
# Batch over a folder


@dataclass
class FolderReport:
    out_dir: Path
    processed: list[str] = field(default_factory=list)   # keys computed in this run
    cached: list[str] = field(default_factory=list)      # keys skipped because they were up to date
    failed: list[tuple[str, str]] = field(default_factory=list)  # (scan, reason)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{len(self.processed)} scans preprocessed, {len(self.cached)} up to date, "
                 f"{len(self.failed)} failed ({self.seconds:.1f} s) -> {self.out_dir}"]
        lines += [f"  FAILED {scan}: {reason}" for scan, reason in self.failed]
        lines += [f"  warning {scan}: {w}" for scan, ws in self.warnings.items() for w in ws]
        return "\n".join(lines)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry_fingerprint(entry: ScanEntry, units: str, cfg: PreprocessConfig, dense: bool) -> str:
    lm = None if entry.landmarks_mm is None else entry.landmarks_mm.round(6).tolist()
    idx = None if entry.landmark_indices is None else entry.landmark_indices.tolist()
    blob = json.dumps([FORMAT, cfg.fingerprint(), units, dense, lm, idx, _file_sha256(entry.path)])
    return hashlib.sha256(blob.encode()).hexdigest()


def _sample_path(out_dir: Path, key: str) -> Path:
    return out_dir / f"{key}.safetensors"


def _process_one(args: tuple[ScanEntry, str, PreprocessConfig, bool, Path, str]) -> tuple[str, str, list[str], str]:
    """Worker: returns (key, status, warnings, reason) with status 'ok' or 'failed'."""
    entry, units, cfg, dense, out_dir, fingerprint = args
    try:
        scan = load_scan(entry, units, cfg.max_triangles)
        samples = preprocess_scan(scan, cfg, dense=dense)
    except ScanError as exc:
        return entry.key, "failed", [], exc.reason
    except Exception as exc:  # a bug or a library failure must not stop the batch either
        return entry.key, "failed", [], f"unexpected {type(exc).__name__}: {exc}"
    path = _sample_path(out_dir, entry.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"format": FORMAT, "fingerprint": fingerprint, "key": entry.key,
            "warnings": json.dumps(samples.warnings)}
    save_file(samples.tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written sample file
    return entry.key, "ok", samples.warnings, ""


def _cached_warnings(path: Path, fingerprint: str) -> list[str] | None:
    """The stored warnings when `path` holds samples made from the same source and settings."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    return json.loads(meta.get("warnings", "[]"))


def preprocess_folder(
    scan_dir: str | Path,
    out_dir: str | Path,
    cfg: PreprocessConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FolderReport:
    """Preprocess every scan of a scan folder into `out_dir` and write `out_dir/index.json`.

    A broken scan is listed in the report and the index with its reason; the others go on."""
    from tqdm import tqdm

    cfg = cfg or PreprocessConfig()
    start = time.perf_counter()
    folder = load_scan_folder(scan_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = FolderReport(out_dir, failed=list(folder.invalid))
    dense = folder.shared_topology

    jobs, done_warnings = [], {}
    for entry in folder.entries:
        if not entry.path.is_file():
            report.failed.append((entry.key, f"mesh file not found: {entry.path}"))
            continue
        fingerprint = _entry_fingerprint(entry, folder.units, cfg, dense)
        cached = _cached_warnings(_sample_path(out_dir, entry.key), fingerprint)
        if cached is not None:
            report.cached.append(entry.key)
            done_warnings[entry.key] = cached
        else:
            jobs.append((entry, folder.units, cfg, dense, out_dir, fingerprint))

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=len(jobs), desc="preprocess", unit="scan", disable=not progress)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_process_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_process_one, jobs):
                results.append(result)
                bar.update()
    bar.close()
    for key, status, notes, reason in results:
        if status == "ok":
            report.processed.append(key)
            done_warnings[key] = notes
        else:
            report.failed.append((key, reason))
    report.warnings = {k: w for k, w in done_warnings.items() if w}
    _write_index(folder, out_dir, cfg, report, done_warnings)
    report.seconds = time.perf_counter() - start
    return report


def _write_index(folder, out_dir: Path, cfg: PreprocessConfig, report: FolderReport, warnings_by_key: dict) -> None:
    ok = [e for e in folder.entries if e.key in warnings_by_key]
    identities = sorted({e.identity for e in ok})
    expressions = sorted({e.expression for e in ok})
    n_dense = None
    if folder.shared_topology and ok:
        from safetensors import safe_open

        with safe_open(str(_sample_path(out_dir, ok[0].key)), "np") as f:
            n_dense = int(f.get_slice("dense_points").get_shape()[0])
    index = {
        "format": FORMAT,
        "n_samples": cfg.n_near + cfg.n_uniform,
        "n_near": cfg.n_near,
        "landmark_names": list(LANDMARK_NAMES),
        "shared_topology": folder.shared_topology,
        "n_dense": n_dense,
        "source_folder": str(folder.root.resolve()),
        "preprocess_config": asdict(cfg),
        "identities": identities,
        "expressions": expressions,
        "scans": [
            {
                "key": e.key, "identity": e.identity, "identity_index": identities.index(e.identity),
                "expression": e.expression, "expression_index": expressions.index(e.expression),
                "neutral": e.neutral, "samples": f"{e.key}.safetensors", "source": str(e.path),
                "warnings": warnings_by_key[e.key],
            }
            for e in ok
        ],
        "failed": [{"scan": scan, "reason": reason} for scan, reason in report.failed],
    }
    tmp = out_dir / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / "index.json")


def load_samples(path: str | Path) -> dict[str, np.ndarray]:
    """Read one scan's samples (safetensors: no pickle)."""
    return load_file(str(path))
