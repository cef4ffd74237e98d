"""Expression capture of a trained model (report only): per expression, the share of the ground-truth
motion the surface reproduces, with the error in the moving and in the static region (mm), for

* the training scans reconstructed from their trained codes (and, as the floor, the same people with the
  mean training expression code), and
* fits of held-out scans (`--heldout`, a shared-topology folder the model never saw),

plus the neutral-vs-expressive fit comparison (face err: mean distance of every viewer-facing ground-truth
vertex in the 80 mm face region to the reconstruction). Both folders must share one topology.

    .venv/bin/python benchmarks/bench_capture.py --model RUN/model.safetensors --train-scans SCANS \
        [--samples SAMPLES] [--heldout HELDOUT_SCANS] [--schedule fast|plain|fastx3] [--people id00 id01 ...]

Meshes follow the pinned evaluation settings (`backend.evaluate.EVAL_SETTINGS`; `--resolution` for quick looks).

Without --model a small model is trained first (tests/model_fixture.py) on procedural scans.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def schedule_by_name(name: str):
    from backend.fitting import FitSchedule

    if name == "fast":
        return FitSchedule.fast()
    if name == "plain":
        return FitSchedule.plain()
    if name.startswith("fastx"):
        return FitSchedule.scaled(FitSchedule.fast(), float(name[5:]))
    raise SystemExit(f"unknown schedule {name!r} (fast | plain | fastxK)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--train-scans", help="the scan folder the model was trained on (shared topology)")
    p.add_argument("--samples", help="its preprocessed folder (default: the one in the model's config)")
    p.add_argument("--heldout", help="a shared-topology scan folder of people the model never saw")
    p.add_argument("--keys", nargs="*", help="only these scans of the held-out folder")
    p.add_argument("--schedule", default="fast")
    p.add_argument("--neutral-policy", choices=("train_switch", "switch", "code"), default=None,
                   help="default: backend.fitting.loop.NEUTRAL_POLICY")
    p.add_argument("--resolution", type=int, default=None, help="default: EVAL_SETTINGS.resolution")
    p.add_argument("--people", nargs="*", help="only these training identities")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-mean", action="store_true", help="skip the mean-expression floor")
    p.add_argument("--json", help="write every row here")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from backend.model.io import load_model
    from model_fixture import model_for_benchmark
    from training.quality import capture_table, heldout_capture, rows_to_json, training_capture

    from backend.evaluate import EVAL_SETTINGS

    a.resolution = a.resolution or EVAL_SETTINGS.resolution
    model_path, scans, tmp = model_for_benchmark(a.model, a.threads, "capture")
    scans = a.train_scans or scans
    model, ck = load_model(model_path)
    out: dict[str, list] = {}
    t0 = time.perf_counter()
    if scans:
        keys = None if not a.people else [r["key"] for r in ck.dataset["scans"] if r["identity"] in a.people]
        rows = training_capture(model, ck, scans, resolution=a.resolution, samples=a.samples,
                                neutral_policy=a.neutral_policy, keys=keys)
        print(capture_table(rows, f"training scans, trained codes ({model_path})"))
        out["trained"] = rows_to_json(rows)
        if not a.no_mean:
            rows = training_capture(model, ck, scans, resolution=a.resolution, samples=a.samples,
                                    expression="mean", neutral_policy=a.neutral_policy, keys=keys)
            print(capture_table(rows, "training scans, the person's identity code + the mean expression code"))
            out["mean"] = rows_to_json(rows)
    if a.heldout:
        rows, info = heldout_capture(model, a.heldout, schedule=schedule_by_name(a.schedule),
                                     resolution=a.resolution, keys=a.keys, neutral_policy=a.neutral_policy)
        print(capture_table(rows, f"held-out fits ({a.schedule} schedule, {a.heldout})"))
        out["heldout"] = rows_to_json(rows)
        out["heldout_fits"] = info
    print(f"({time.perf_counter() - t0:.0f} s; marching cubes {a.resolution}³; moving = ground-truth vertices "
          f"moving > 3 mm, facing and seen by the viewer, in the {EVAL_SETTINGS.region_radius_mm:g} mm ball around the nose tip)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
