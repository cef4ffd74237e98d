"""Preprocessing speed: seconds per scan (one core, 250k samples) and scans per minute over a folder.

Prints, side by side in one run, the exact signed distance of this pipeline (libigl AABB tree) against
the straightforward way (trimesh.proximity.closest_point on the same points), with the largest
difference between them.

  python benchmarks/bench_preprocess.py                       # ../shared/datasets/ict-faces if present
  python benchmarks/bench_preprocess.py --scans DIR --workers 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=Path, default=REPO.parent / "shared" / "datasets" / "ict-faces")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--reference-points", type=int, default=20_000,
                        help="points for the side-by-side closest-point comparison")
    parser.add_argument("--skip-folder", action="store_true", help="only the per-scan figures")
    args = parser.parse_args()

    import trimesh

    from backend.geometry.signed_distance import closest_points
    from backend.scans.folder import load_scan, load_scan_folder
    from backend.scans.samples import PreprocessConfig, preprocess_scan
    from training.data.preprocess import preprocess_folder

    scans = args.scans
    if not (scans / "manifest.json").is_file():
        from training.data.synthetic_faces import generate_scan_folder

        scans = generate_scan_folder(Path(tempfile.mkdtemp()) / "default", n_identities=8, seed=0)
        print(f"(no {args.scans}; using the procedural default folder {scans})")
    folder = load_scan_folder(scans)
    cfg = PreprocessConfig()
    scan = load_scan(folder.entries[0], folder.units)
    print(f"scan {folder.entries[0].key}: {len(scan.vertices):,} vertices, {len(scan.faces):,} triangles, "
          f"{cfg.n_near + cfg.n_uniform:,} SDF samples")

    preprocess_scan(scan, cfg, dense=folder.shared_topology)  # warm-up (imports, embree init)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        samples = preprocess_scan(scan, cfg, dense=folder.shared_topology)
        times.append(time.perf_counter() - t0)
    print(f"per scan (this process): {min(times):.2f} s  (median {np.median(times):.2f} s of 3)")

    vertices, faces = samples.pseudo_watertight
    pts = samples.tensors["points"][: args.reference_points].astype(np.float64)
    t0 = time.perf_counter()
    ours, _, _ = closest_points(pts, vertices, faces)
    t_ours = time.perf_counter() - t0
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    t0 = time.perf_counter()
    _, reference, _ = trimesh.proximity.closest_point(mesh, pts)
    t_ref = time.perf_counter() - t0
    print(f"exact distance, {len(pts):,} points: libigl {t_ours:.3f} s vs trimesh.proximity {t_ref:.3f} s "
          f"= {t_ref / t_ours:.1f}x faster; max |difference| {np.abs(ours - reference).max() * 100:.2e} mm")

    if args.skip_folder:
        return
    with tempfile.TemporaryDirectory() as out:
        report = preprocess_folder(scans, out, cfg, workers=args.workers)
    n = len(report.processed)
    print(f"folder {scans.name}: {n} scans in {report.seconds:.1f} s with {args.workers} workers = "
          f"{60 * n / report.seconds:.1f} scans/min ({report.seconds * args.workers / max(n, 1):.2f} core-s per scan); "
          f"{len(report.failed)} failed")


if __name__ == "__main__":
    main()
