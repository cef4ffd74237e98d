"""Command line and library entry point of training.

    python -m training.train --preset cpu --data <processed> --out runs/cpu
    python -m training.train --out runs/cpu --resume                  # continue where it stopped
    python -m training.train --preset paper --data <processed> --out runs/paper --set optim.lr=2e-4
    torchrun --nproc_per_node 2 -m training.train --preset cpu --data <processed> --out runs/ddp

The product CLI (`imface train`) calls `train(cfg, ...)` with a TrainConfig.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from backend.model.io import CheckpointError
from .config import PRESETS, TrainConfig, apply_overrides, preset
from .dataset import DatasetError, ProcessedScans
from .trainer import RunResult, Trainer, TrainingError


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
          dataset: ProcessedScans | None = None, log: Callable[[str], None] | None = None) -> RunResult:
    """Train (or resume) the run described by cfg; returns when done, stopped or interrupted.

    resume: continue from `<cfg.output>/checkpoints/last.safetensors`; the run's saved settings win
        except the schedule's length and intervals, data.workers, device, threads, preview and progress,
        which come from cfg (so a run can be extended with more steps).
    overwrite: start again in a run directory that already holds a run.
    stop_at: stop (with a checkpoint) once this many steps are done, as if interrupted.
    dataset: an already loaded ProcessedScans (else cfg.data.processed is read).
    log: where messages go (default: tqdm.write on rank 0).
    Raises TrainingError, DatasetError or CheckpointError with a message meant for the user.
    """
    return Trainer(cfg, resume=resume, overwrite=overwrite, stop_at=stop_at, dataset=dataset, log=log).run()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description="Train the ImFace++ model.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configuration (default: cpu, or the "
                   "run's own config with --resume)")
    p.add_argument("--config", type=Path, help="a TrainConfig JSON/YAML file (instead of --preset)")
    p.add_argument("--data", help="preprocessed folder (index.json + safetensors)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a run directory that holds a run")
    p.add_argument("--steps", type=int, help="total optimiser steps (overrides epochs)")
    p.add_argument("--epochs", type=int, help="total epochs (used when --steps is not given)")
    p.add_argument("--stop-at", type=int, help="stop with a checkpoint after this many steps")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch", type=int, help="scans per step (global, over all processes)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set optim.lr=3e-4 --set model.mini_hidden=64")
    p.add_argument("--print-config", action="store_true", help="print the resulting config and exit")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.config is not None:
        cfg = TrainConfig.load(args.config)
    elif args.preset is not None:
        cfg = preset(args.preset)
    elif args.resume and args.out and (Path(args.out) / "config.json").is_file():
        cfg = TrainConfig.load(Path(args.out) / "config.json")
    else:
        cfg = preset("cpu")
    if args.steps is not None:
        cfg.schedule.steps = args.steps
    if args.epochs is not None:
        cfg.schedule.epochs = args.epochs
        if args.steps is None:
            cfg.schedule.steps = None
    flags = {"data.processed": args.data, "output": args.out, "optim.lr": args.lr,
             "data.scans_per_batch": args.batch, "seed": args.seed, "device": args.device,
             "threads": args.threads, "data.workers": args.workers}
    for key, value in flags.items():
        if value is not None:
            obj = cfg
            *parents, leaf = key.split(".")
            for part in parents:
                obj = getattr(obj, part)
            setattr(obj, leaf, value)
    if args.no_progress:
        cfg.progress = False
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    return cfg.validate()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; returns the exit status (0 also after a clean interruption)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as exc:  # bad file, bad override: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at)
    except (TrainingError, DatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint for the step in progress
        print(f"aborted; the last checkpoint is in {Path(cfg.output) / 'checkpoints'}", file=sys.stderr)
        return 130
    if result.interrupted:
        print(f"resume with: python -m training.train --out {result.run_dir} --resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
