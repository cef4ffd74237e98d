"""Choose the default fitting schedule on a validation split, report it on a test split (report only).

Schedules compared: fast (80 steps), fast with 2x and 4x the steps, and plain 1,500 steps. For every
scan: Chamfer-L1 (mm, 80 mm face region, `backend.evaluate.reconstruction_metrics`), expression capture
(shared-topology folders) and SDF queries. The chosen schedule is the cheapest whose mean validation
Chamfer is within 5% of plain's; the test table then shows all four.

    .venv/bin/python benchmarks/bench_fit_schedule.py --model RUN/model.safetensors --scans ICT \
        --validation id10 id11 --test id12 id13 id14 id15 [--expressions neutral jaw_open ...]

Meshes and metrics follow the pinned evaluation settings (`backend.evaluate.EVAL_SETTINGS`).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEDULES = ("fast", "fastx2", "fastx4", "plain")


def run_split(model, scans: str, people: list[str], schedules, resolution: int,
              expressions: list[str] | None = None) -> dict[str, dict[str, float]]:
    import numpy as np

    from backend.evaluate import reconstruction_metrics
    from backend.fitting import extract_face_mesh, fit, target_from_scan
    from backend.fitting.loop import neutral_warp_off
    from backend.scans.folder import load_scan, load_scan_folder
    from training.quality import _gt_meshes, _measure

    folder = load_scan_folder(scans)
    entries = [e for e in folder.entries if e.identity in people and (not expressions or e.expression in expressions)]
    gt, _ = _gt_meshes(scans, [e.key for e in entries]) if folder.shared_topology else ({}, None)
    out = {}
    for name in schedules:
        from bench_capture import schedule_by_name

        sched = schedule_by_name(name)
        cham, cap, q, secs = [], [], [], []
        for e in entries:
            target = target_from_scan(load_scan(e, folder.units))
            neutral = neutral_warp_off(e.neutral)
            t0 = time.perf_counter()
            res = fit(model, target, sched, neutral=neutral)
            secs.append(time.perf_counter() - t0)
            q.append(res.report.evaluations)
            v, f = extract_face_mesh(model, res.codes, resolution, neutral=neutral,
                                     normalized_from_scan=target.normalized_from_scan)
            cham.append(reconstruction_metrics((v * target.units_to_mm, f), target)["chamfer_mm"])
            if gt and not e.neutral:
                cap.append(_measure(e.key, e, gt, (v * target.units_to_mm, f), "fit").capture)
        out[name] = {"chamfer_mm": float(np.mean(cham)), "capture": float(np.nanmean(cap)) if cap else math.nan,
                     "queries": float(np.mean(q)), "seconds": float(np.mean(secs)), "n": len(entries)}
        print(f"  {name:>7}: Chamfer {out[name]['chamfer_mm']:.3f} mm, capture {out[name]['capture']:.3f}, "
              f"{out[name]['queries']:,.0f} queries, {out[name]['seconds']:.1f} s per fit", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--scans", required=True)
    p.add_argument("--validation", nargs="+", default=["id10", "id11"])
    p.add_argument("--test", nargs="+", default=["id12", "id13", "id14", "id15"])
    p.add_argument("--expressions", nargs="*", help="only these expressions (default: all)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    torch.set_num_threads(a.threads)
    from backend.model.io import load_model

    from backend.evaluate import EVAL_SETTINGS

    model, _ = load_model(a.model)
    res = EVAL_SETTINGS.resolution
    print(f"{EVAL_SETTINGS.describe()}; expressions: {' '.join(a.expressions) if a.expressions else 'all'}")
    print(f"validation {' '.join(a.validation)}:")
    val = run_split(model, a.scans, a.validation, SCHEDULES, res, a.expressions)
    plain = val["plain"]["chamfer_mm"]
    ok = [n for n in SCHEDULES if val[n]["chamfer_mm"] <= 1.05 * plain]
    chosen = min(ok, key=lambda n: val[n]["queries"])
    print(f"chosen on validation: {chosen} ({val[chosen]['chamfer_mm']:.3f} mm vs plain {plain:.3f} mm, "
          f"{val['plain']['queries'] / val[chosen]['queries']:.0f}x fewer queries)")
    print(f"test {' '.join(a.test)}:")
    test = run_split(model, a.scans, a.test, SCHEDULES, res, a.expressions)
    print("| schedule | Chamfer (mm) | vs plain | capture | SDF queries | s per fit |\n|---|---|---|---|---|---|")
    for n in SCHEDULES:
        d = test[n]
        print(f"| {n}{' (chosen)' if n == chosen else ''} | {d['chamfer_mm']:.3f} | "
              f"{d['chamfer_mm'] / test['plain']['chamfer_mm']:.3f} | {d['capture']:.3f} | {d['queries']:,.0f} | "
              f"{d['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
