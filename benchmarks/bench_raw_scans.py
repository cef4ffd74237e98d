"""Real scans: fitting the raw-scanner version of a scan against fitting the clean scan (report only).

Every chosen scan is turned into its raw-scanner version (`training/data/raw_scans.py`: noise, holes,
hair, neck and back of the head, a rotated frame, uneven density, landmarks moved 1-3 mm, no shared
topology); both versions are fitted the same way (pose refinement, then the fast schedule) and both fits
are measured against the *clean* scan's surface (like with like, face sphere, `backend.evaluate`), the
raw fit brought back into the clean frame with the stored transform. The table gives the Chamfer-L1
(point-sampled and exact) of each and the difference. Aim: within 0.2 mm with a model trained on
ict-faces (within 0.3 mm with the small test model: tests/test_raw_scans.py).

    python benchmarks/bench_raw_scans.py                          # small model, a held-out procedural person
    python benchmarks/bench_raw_scans.py --model runs/ict-heldout/run/model.safetensors \\
        --scans ../shared/datasets/ict-faces --identity id12 --identity id13    # held-out ict-faces people
    python benchmarks/bench_raw_scans.py ... --no-pose            # without the pose refinement
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from backend.fitting import FitSchedule
    from backend.model.io import load_model
    from backend.scans.folder import load_scan_folder
    from training.data.raw_scans import clean_vs_raw, clean_vs_raw_markdown, make_raw_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model.safetensors (default: train the small test model first)")
    ap.add_argument("--scans", help="clean scan folder (default: a procedural person the small model did not see)")
    ap.add_argument("--identity", action="append", help="only these people (repeatable)")
    ap.add_argument("--expression", action="append", help="only these expressions (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="raw-scanner seed")
    ap.add_argument("--steps", type=int, default=None, help="fit steps (default: the fast schedule, 80)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--metric-points", type=int, default=100_000)
    ap.add_argument("--no-pose", action="store_true", help="fit without the pose refinement")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.TemporaryDirectory(prefix="bench_raw_")

    if args.model is None:
        from tests.model_fixture import model_for_benchmark
        from training.data.synthetic_faces import generate_scan_folder

        args.model, _, tmp = model_for_benchmark(None, args.threads, "raw")
        if args.scans is None:  # the small model was trained on id00, id01 of seed 3: id02 is new to it
            args.scans = str(generate_scan_folder(Path(work.name) / "clean", n_identities=3, seed=3,
                                                  expressions=["neutral", "mouth_open", "smile"]))
            args.identity = args.identity or ["id02"]
    if args.scans is None:
        ap.error("--scans is needed with --model")
    model, ck = load_model(args.model)
    folder = load_scan_folder(args.scans)
    keys = [e.key for e in folder.entries if (not args.identity or e.identity in args.identity)
            and (not args.expression or e.expression in args.expression)]
    trained = set(ck.dataset.get("identities", []))
    seen = sorted({k.split("/")[0] for k in keys} & trained)
    print(f"{len(keys)} scans; people the model was trained on among them: {', '.join(seen) or 'none'}")
    t0 = time.perf_counter()
    raw = make_raw_folder(args.scans, Path(work.name) / "raw", seed=args.seed, keys=keys)
    print(f"raw-scanner versions written in {time.perf_counter() - t0:.1f} s")
    schedule = FitSchedule.fast() if args.steps is None else FitSchedule.scaled(FitSchedule.fast(), args.steps / 80)
    t0 = time.perf_counter()
    rows = clean_vs_raw(model, args.scans, raw, keys=keys, schedule=schedule, resolution=args.resolution,
                        n_points=args.metric_points, pose=not args.no_pose)
    print(f"fitted and measured in {time.perf_counter() - t0:.0f} s ({schedule.name}, "
          f"{'with' if not args.no_pose else 'without'} pose refinement, marching cubes {args.resolution}³)\n")
    print(clean_vs_raw_markdown(rows))


if __name__ == "__main__":
    main()
