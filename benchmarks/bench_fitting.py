"""Fitting a scan: the default coarse-to-fine schedule against a plain 1,500-step schedule.

Both fit the same scan from the same start (mean training codes) with the same objective (eq. 21 +
normal term, training loss weights). Along each run the codes are snapshotted; every snapshot is
turned into a mesh (marching cubes, `--resolution`) and measured against the scan in mm (Chamfer-L1,
F-score@1mm, face region of 80 mm around the nose tip), so the table shows Chamfer against iterations,
SDF queries and seconds side by side. The trained codes of the scan (when it is a training scan) and
the mean codes give the scale. Nothing is extrapolated: every row is a fit that was run.

    python benchmarks/bench_fitting.py                       # trains a small model first (~1 min)
    python benchmarks/bench_fitting.py --model runs/imface-cpu/model.safetensors --scans runs/default/scans
    python benchmarks/bench_fitting.py --plain-steps 300     # a shorter plain run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.codes import mean_codes, training_face_codes  # noqa: E402
from backend.evaluate import reconstruction_metrics  # noqa: E402
from backend.fitting import FitSchedule, extract_face_mesh, fit, target_from_scan  # noqa: E402
from backend.model.io import load_model  # noqa: E402
from backend.scans.folder import load_scan, load_scan_folder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model.safetensors (default: train a small one first)")
    ap.add_argument("--scans", help="scan folder (default: the small model's training scans)")
    ap.add_argument("--scan", action="append", help="scan key(s) to fit (default: the first non-neutral scan)")
    ap.add_argument("--plain-steps", type=int, default=1500)
    ap.add_argument("--plain-points", type=int, default=2048,
                    help="SDF samples per plain step (+ half as many surface points)")
    ap.add_argument("--plain-lr", type=float, default=1e-3)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--metric-points", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tests.model_fixture import model_for_benchmark

    args.model, tiny_scans, tmp = model_for_benchmark(args.model, args.threads, "fitting")
    args.scans = args.scans or tiny_scans
    if args.scans is None:
        ap.error("--scans is needed with --model")
    model, ck = load_model(args.model)
    folder = load_scan_folder(args.scans)
    entries = [e for e in folder.entries if (e.key in args.scan if args.scan else not e.neutral)]
    if not args.scan:
        entries = entries[:1]
    trained_keys = [s["key"] for s in ck.dataset.get("scans", [])]

    fast = FitSchedule.fast()
    plain = FitSchedule.plain(args.plain_steps, args.plain_points, args.plain_points // 2, args.plain_lr)
    fast_snaps = tuple(sorted({sum(s.steps for s in fast.stages[:i + 1]) for i in range(len(fast.stages))}
                              | {fast.total_steps // 4, fast.total_steps // 2}))
    per_step = plain.evaluations() // plain.total_steps
    budget = fast.evaluations()
    plain_snaps = {max(1, round(k * budget / per_step)) for k in (1, 3)} | {50, 100, 200, 400, 800, 1500}
    plain_snaps = tuple(sorted(s for s in plain_snaps if s <= plain.total_steps) + [plain.total_steps])
    print(f"model {args.model} ({model.cfg.id_dim}-d codes), threads {args.threads}, marching cubes "
          f"{args.resolution}³, metrics on {args.metric_points:,} points in the 80 mm face region")
    print(f"fast : {len(fast.stages)} stages, {fast.total_steps} steps, {fast.evaluations():,} SDF queries")
    print(f"plain: 1 stage, {plain.total_steps} steps x {args.plain_points}+{args.plain_points // 2} points, "
          f"lr {args.plain_lr:g} constant, {plain.evaluations():,} SDF queries "
          f"({plain.evaluations() / fast.evaluations():.1f}x the fast schedule)")

    for entry in entries:
        target = target_from_scan(load_scan(entry, folder.units))

        def chamfer(codes, neutral: bool = False) -> dict[str, float]:
            mesh = extract_face_mesh(model, codes, args.resolution, neutral=neutral,
                                     normalized_from_scan=target.normalized_from_scan)
            return reconstruction_metrics(mesh, target, n_points=args.metric_points)

        print(f"\n== {entry.key}")
        rows = []
        m = chamfer(mean_codes(model))
        rows.append(("mean codes (start)", 0, 0, 0.0, m))
        if entry.key in trained_keys:
            i = trained_keys.index(entry.key)
            row = ck.dataset["scans"][i]
            rows.append(("trained codes", 0, 0, 0.0,
                         chamfer(training_face_codes(model, i, row["identity_index"]), row["neutral"])))
        for name, sched, snaps in (("fast", fast, fast_snaps), ("plain", plain, plain_snaps)):
            t0 = time.perf_counter()
            res = fit(model, target, sched, snapshots=snaps)
            wall = time.perf_counter() - t0
            for step in sorted(res.snapshots):
                codes, secs, queries = res.snapshots[step]
                rows.append((name, step, queries, secs, chamfer(codes)))
            print(f"  {name}: {res.report.steps} steps in {wall:.1f} s", flush=True)
        print(f"  {'run':<20}{'step':>6}{'SDF queries':>14}{'seconds':>10}{'Chamfer mm':>12}{'F@1mm %':>9}{'N.C.':>8}")
        for name, step, q, secs, m in rows:
            print(f"  {name:<20}{step:>6}{q:>14,}{secs:>10.1f}{m['chamfer_mm']:>12.4f}{m['fscore_1mm']:>9.2f}"
                  f"{m['normal_consistency']:>8.4f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
