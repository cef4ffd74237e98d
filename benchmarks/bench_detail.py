"""The detail field at the ground-truth wrinkles of the procedural default data (report only).

|SDF| (mm) of the refined field f (with DetailNet) and of the base field f̂ at the wrinkle points of
each training scan (the grooves deeper than 0.1 mm and the skin between them), and at the other skin
points; then the transfer: each person's neutral face with the detail code of their wrinkled scans,
measured at the transferred wrinkles.

    .venv/bin/python benchmarks/bench_detail.py --model RUN/model.safetensors --scans SCANS [--samples S]
    .venv/bin/python benchmarks/bench_detail.py --stage-two 300     # small model + a dedicated stage-two run

Without --model a small model is trained (tests/model_fixture.py); `--stage-two N` then runs N
stage-two-only steps on it (training.quality.stage_two_config) and reports before and after.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def report(model_path: str, scans: str, samples: str | None, title: str) -> None:
    import numpy as np

    from backend.model.io import load_model
    from training.quality import transfer_wrinkle_error, wrinkle_point_error

    model, ck = load_model(model_path)
    rows = wrinkle_point_error(model, ck, scans, samples=samples)
    print(f"**{title}**\n| scan | wrinkle points | base f̂ (mm) | refined f (mm) | other skin: base | refined "
          "| pattern corr |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.key} | {r.n_wrinkle} | {r.base_wrinkle_mm:.3f} | {r.refined_wrinkle_mm:.3f} | "
              f"{r.base_other_mm:.3f} | {r.refined_other_mm:.3f} | {r.pattern_corr:.3f} |")
    if rows:
        m = lambda k: float(np.nanmean([getattr(r, k) for r in rows]))  # noqa: E731
        print(f"| **mean** | | {m('base_wrinkle_mm'):.3f} | {m('refined_wrinkle_mm'):.3f} | "
              f"{m('base_other_mm'):.3f} | {m('refined_other_mm'):.3f} | {m('pattern_corr'):.3f} |")
    print("\ntransfer (neutral face + a wrinkled scan's detail code, at the transferred wrinkles):")
    print("| source | base f̂ | own detail | transferred detail | transfer corr | template drift (mm) |\n"
          "|---|---|---|---|---|---|")
    corr, drift = [], []
    for r in rows:
        t = transfer_wrinkle_error(model, ck, scans, r.key, samples=samples)
        corr.append(t["transfer_corr"])
        drift.append(t["template_drift_mm"])
        print(f"| {r.key} | {t['base_mm']:.3f} | {t['own_detail_mm']:.3f} | {t['transferred_detail_mm']:.3f} | "
              f"{t['transfer_corr']:.3f} | {t['template_drift_mm']:.2f} |")
    if corr:
        print(f"| **mean** | | | | {float(np.nanmean(corr)):.3f} | {float(np.mean(drift)):.2f} |")
    print("(pattern corr: correlation of f - f̂ with the grooves at the wrinkle points; transfer corr: of the "
          "change the swapped code makes with the wrinkles it should add; ~1 draws them, ~0 does not; template "
          "drift: how far apart the model puts one skin point in template space on the source scan and on the "
          "neutral one, where DetailNet reads it: a wrinkle moves with its code only where this is small "
          "against the wrinkles' spacing)\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--scans")
    p.add_argument("--samples")
    p.add_argument("--stage-two", type=int, default=0, help="steps of a dedicated stage-two run first")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="overrides of that run")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from model_fixture import model_for_benchmark

    model, scans, tmp = model_for_benchmark(a.model, a.threads, "detail")
    scans, samples = a.scans or scans, a.samples   # samples: None reads the folder in the model's config
    report(model, scans, samples, f"base model {model}")
    if a.stage_two:
        from training.quality import stage_two_config
        from training.train import train

        out = Path(tempfile.mkdtemp(prefix="bench_detail_s2_"))
        cfg = stage_two_config(model, out / "run", a.stage_two, samples, a.overrides)
        cfg.threads = a.threads
        r = train(cfg, overwrite=True, log=lambda m: None)
        report(str(r.model_path), scans, samples, f"after a dedicated stage-two run of {a.stage_two} steps "
                                                   f"{' '.join(a.overrides)}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
