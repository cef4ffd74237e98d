"""The linearised stage two (training.detail_refit) against the trainer's stage two, side by side (report only).

Both start from the same trained model. The trainer's stage two (the paper's loss, a dedicated run:
training.quality.stage_two_config) runs --steps steps; the refit then gets the same wall time. Printed:
seconds per step of each, the ratio, and at the ground-truth wrinkle points of the procedural data the
refined |f|, the pattern correlation and the transfer correlation (bench_detail.py explains them).

    .venv/bin/python benchmarks/bench_detail_refit.py --scans-per-batch 4 --batch-points 1024 --points 4000
                                                      # a small model (6 scans), trained first
    .venv/bin/python benchmarks/bench_detail_refit.py --model RUN/model.safetensors --scans SCANS --samples S
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def measure(model, ck, scans: str, samples: str) -> tuple[float, float, float, int]:
    """(refined |f| mm, pattern corr, transfer corr) over the wrinkled training scans, and their count."""
    import numpy as np

    from training.quality import transfer_wrinkle_error, wrinkle_point_error

    rows = wrinkle_point_error(model, ck, scans, samples=samples)
    moved = [transfer_wrinkle_error(model, ck, scans, r.key, samples=samples)["transfer_corr"] for r in rows]
    return (float(np.mean([r.refined_wrinkle_mm for r in rows])), float(np.nanmean([r.pattern_corr for r in rows])),
            float(np.nanmean(moved)), len(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--scans")
    p.add_argument("--samples")
    p.add_argument("--steps", type=int, default=100, help="steps of the trainer's stage two")
    p.add_argument("--points", type=int, default=5000, help="refit: surface samples per scan")
    p.add_argument("--scans-per-batch", type=int, default=16, help="refit: scans per step")
    p.add_argument("--batch-points", type=int, default=256, help="refit: samples per scan in a step")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from backend.model.io import load_model
    from model_fixture import model_for_benchmark
    from training.dataset import ProcessedScans
    from training.detail_refit import detail_targets, refit_details
    from training.quality import stage_two_config
    from training.train import train

    model_path, scans, tmp = model_for_benchmark(a.model, a.threads, "refit")
    scans = a.scans or scans
    model, ck = load_model(model_path)
    samples = a.samples or ck.config["data"]["processed"]
    before = measure(model, ck, scans, samples)

    with tempfile.TemporaryDirectory(prefix="bench_refit_stage2_") as out:
        cfg = stage_two_config(model_path, Path(out) / "run", a.steps, samples)
        cfg.threads = a.threads
        t0 = time.perf_counter()
        run = train(cfg, overwrite=True, log=lambda m: None)
        t_trainer = time.perf_counter() - t0
        trained = measure(*load_model(run.model_path), scans, samples)

    # The refit's targets depend only on the frozen base: computed once, timed on their own, and given to
    # both the timing probe and the run (the run's wall time counts them once).
    data = ProcessedScans.load(samples)
    opts = dict(scans_per_batch=a.scans_per_batch, batch_points=a.batch_points)
    t0 = time.perf_counter()
    targets = detail_targets(model, data, a.points)
    t_targets = time.perf_counter() - t0
    probe = 50
    t0 = time.perf_counter()
    refit_details(model, data, probe, targets=targets, **opts)
    per_step = (time.perf_counter() - t0) / probe
    steps = max(probe, int((t_trainer - t_targets) / per_step))
    model, ck = load_model(model_path)   # the probe trained it: start again from the model as trained
    t0 = time.perf_counter()
    refit_details(model, data, steps, targets=targets, **opts)
    t_steps = time.perf_counter() - t0
    t_refit = t_targets + t_steps
    refit = measure(model, ck, scans, samples)

    s_trainer = t_trainer / a.steps
    s_refit = t_steps / steps
    print(f"\nmodel {model_path}: {before[3]} wrinkled training scans")
    print("| stage two | steps | wall (s) | s per step | refined \\|f\\| at the wrinkles (mm) | pattern corr | "
          "transfer corr |\n|---|---:|---:|---:|---:|---:|---:|")
    print(f"| none (the model as trained) | – | – | – | {before[0]:.3f} | {before[1]:.3f} | {before[2]:.3f} |")
    print(f"| trainer (paper loss) | {a.steps} | {t_trainer:.1f} | {s_trainer:.4f} | {trained[0]:.3f} | "
          f"{trained[1]:.3f} | {trained[2]:.3f} |")
    print(f"| refit (linearised, same wall time) | {steps} | {t_refit:.1f} | {s_refit:.4f} | {refit[0]:.3f} | "
          f"{refit[1]:.3f} | {refit[2]:.3f} |")
    print(f"\nper step: the refit is {s_trainer / s_refit:.1f}x faster ({t_targets:.1f} s once for its targets, "
          "included in its wall time)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
