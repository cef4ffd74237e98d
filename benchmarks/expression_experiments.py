"""Where is expression motion lost? Small fixed-budget training runs (report only).

Procedural default scans (people 0..N-2 for training, the last person held out; neutral plus four
expressions), one small model per variant (the test model's architecture, tests/model_fixture.py),
trained for a fixed number of steps with `--set` overrides, then:
capture per expression on the training scans (trained codes) and on fits of the held-out person, and
the neutral-vs-expressive face error. One line per variant; docs/training-quality.md records the runs.

    .venv/bin/python benchmarks/expression_experiments.py --work /tmp/exp --steps 400 \
        --variant base --variant lambda4_1e4:model.loss.embedding=1e4 \
        --variant code:neutral_policy=code
A variant is NAME[:SECTION.FIELD=VALUE[,SECTION.FIELD=VALUE...]]; the neutral policy of a variant also
decides how its neutral scans are reconstructed and fitted.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPRESSIONS = ["neutral", "mouth_open", "smile", "brow_raise", "frown"]


def make_data(work: Path, people: int, seed: int) -> tuple[Path, Path, Path]:
    """(train scans, held-out scans, train samples), made once and reused."""
    from backend.scans.samples import PreprocessConfig
    from training.data.preprocess import preprocess_folder
    from training.data.synthetic_faces import generate_scan_folder

    allf = work / "all_scans"
    if not (allf / "manifest.json").is_file():
        generate_scan_folder(allf, n_identities=people, seed=seed, expressions=EXPRESSIONS)
    m = json.loads((allf / "manifest.json").read_text())
    held = f"id{people - 1:02d}"
    for name, keep in (("train_scans", lambda s: s["identity"] != held), ("heldout_scans", lambda s: s["identity"] == held)):
        (work / name).mkdir(exist_ok=True)
        sub = dict(m, scans=[dict(s, path=str((allf / s["path"]).resolve())) for s in m["scans"] if keep(s)])
        (work / name / "manifest.json").write_text(json.dumps(sub, indent=1))
    samples = work / "train_samples"
    if not (samples / "index.json").is_file():
        preprocess_folder(work / "train_scans", samples, PreprocessConfig(n_near=8000, n_uniform=4000, n_surface=4000),
                          workers=1, progress=False)
    return work / "train_scans", work / "heldout_scans", samples


#: The test model's architecture (tests/model_fixture.py) and a short cosine schedule, as overrides of
#: the cpu preset: a few minutes per run on one thread.
SMALL = ("model.id_dim=40", "model.exp_dim=40", "model.detail_dim=40", "model.pe_freqs=3",
         "model.mini_hidden=24", "model.mini_layers=2", "model.detail_hidden=24", "model.detail_layers=2",
         "model.hyper_hidden=16", "model.fusion_width=32", "model.fusion_layers=2", "model.landmark_width=64",
         "model.landmark_layers=2", "model.dense_per_batch=256", "model.loss.embedding=1e5",
         "data.points_per_scan=768", "data.surface_points=192", "data.scans_per_batch=4",
         "optim.lr=2e-3", "optim.warmup_steps=10", "schedule.log_every=50", "schedule.checkpoint_every=0",
         "schedule.keep_checkpoints=0", "schedule.preview_every=-1", "schedule.curve_every=0",
         "neutral_policy=switch")


def config(samples: Path, out: Path, steps: int, overrides: list[str], seed: int):
    """The cpu preset shrunk to SMALL (the baseline: the paper's λ4 = 1e5 and the "switch" neutral policy,
    as the experiments were run), then the variant's overrides."""
    from training.config import TrainConfig, apply_overrides

    cfg = TrainConfig.cpu()
    cfg.data.processed, cfg.schedule.steps, cfg.schedule.epochs = str(samples), steps, None
    cfg.output, cfg.progress, cfg.threads, cfg.seed = str(out), False, 1, seed
    return apply_overrides(cfg, list(SMALL) + overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for data and runs (outside the repository)")
    p.add_argument("--people", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--resolution", type=int, default=80)
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--no-heldout", action="store_true")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from backend.model.io import load_model
    from training.quality import heldout_capture, summarize, training_capture
    from training.train import train

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train_scans, heldout, samples = make_data(work, a.people, a.seed)
    results = []
    for v in a.variant or ["base"]:
        name, _, sets = v.partition(":")
        overrides = [s for s in sets.split(",") if s]
        cfg = config(samples, work / f"run_{name}", a.steps, overrides, a.seed)
        t0 = time.perf_counter()
        r = train(cfg, overwrite=True, log=lambda m: None)
        t_train = time.perf_counter() - t0
        model, ck = load_model(r.model_path)
        policy = cfg.neutral_policy
        tr = summarize(training_capture(model, ck, train_scans, resolution=a.resolution, samples=samples,
                                        neutral_policy=policy))
        ho = {} if a.no_heldout else summarize(heldout_capture(model, heldout, resolution=a.resolution,
                                                               neutral_policy=policy)[0])
        rec = {"variant": name, "overrides": overrides, "steps": a.steps, "train_seconds": round(t_train),
               "train": tr, "heldout": ho}
        results.append(rec)
        (work / f"result_{name}.json").write_text(json.dumps(rec, indent=1))

        def g(d, e, k):
            x = d.get(e, {}).get(k, math.nan)
            return f"{x:.2f}" if math.isfinite(x) else "–"

        per = " ".join(f"{e[:5]}={g(tr, e, 'capture')}/{g(ho, e, 'capture')}" for e in EXPRESSIONS[1:])
        print(f"{name:>14} {a.steps} steps {t_train:4.0f}s | capture train/held-out: all="
              f"{g(tr, 'all expressive', 'capture')}/{g(ho, 'all expressive', 'capture')} {per} | face err mm "
              f"neutral {g(tr, 'neutral', 'face_error')}/{g(ho, 'neutral', 'face_error')} expressive "
              f"{g(tr, 'all expressive', 'face_error')}/{g(ho, 'all expressive', 'face_error')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
