"""The training engine: two-stage ImFace++ training with logs, previews, checkpoints and exact resume.

One `Trainer` runs one run directory:

    <run>/config.json            the full TrainConfig (written at start, rewritten on resume)
    <run>/metrics.jsonl          one line per logged step: step, epoch, stage, kappa, lr, loss terms, seconds
    <run>/loss_curve.png         every loss term against the step (log scale)
    <run>/previews/step_*.png    marching-cubes renders of a few training faces
    <run>/checkpoints/last.safetensors (+ numbered copies)   model, optimiser, RNG and progress
    <run>/model.safetensors      the trained model alone, written when the run completes

Schedules are functions of the step only, applied through one hook, `update_step(step)` (threestudio
style): it decides the stage (two starts at T_m = schedule.stage2_start of the run), κ (the model's
`kappa_schedule`), and every parameter group's learning rate. Batches are functions of (seed, step) and
the global torch RNG is reseeded from (seed, step, rank) before every step, so resuming from a checkpoint
replays the same computation: on CPU with a fixed thread count the resumed loss curve is bit-identical.

Distributed: under torchrun (WORLD_SIZE > 1) the trainer joins the process group (NCCL on GPUs, gloo on
CPU), wraps the model in DistributedDataParallel and gives each rank its slice of the global batch;
only rank 0 writes files. Ctrl-C / SIGTERM finish the current step, write a checkpoint and return.
"""
from __future__ import annotations

import gc
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from backend.geometry.extraction import extract_mesh
from backend.model import FaceField
from backend.model.io import CheckpointError, build_model, load_checkpoint, restore_rng, save_checkpoint

from .config import TrainConfig
from .dataset import ProcessedScans, StepBatches, derive_seed, iterate_batches

LAST = "last.safetensors"


@dataclass
class RunResult:
    """What a call to train() did."""

    run_dir: Path
    step: int                      # optimiser steps completed in total (the next step to run)
    total_steps: int
    stage: int
    interrupted: bool              # stopped early (signal or stop_at); resume with resume=True
    checkpoint: Path | None        # the last checkpoint written
    model_path: Path | None        # <run>/model.safetensors when the run completed
    metrics_path: Path
    last_losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0           # wall time of this call
    reason: str = ""               # "completed", "signal SIGINT", "stop_at", ...


@dataclass
class StepSchedule:
    """What update_step decided for one step."""

    step: int
    progress: float
    stage: int
    kappa: float
    lr_factor: float               # schedule factor (warm-up, decay) applied to every group


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, incompatible resume, ...), said in words."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 stop_at: int | None = None, dataset: ProcessedScans | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.stop_at = stop_at
        self._dataset = dataset
        self._log_fn = log
        self._stop_reason: str | None = None
        self._owns_pg = False
        self.rank = int(os.environ.get("RANK", "0"))   # refined in _setup_distributed
        self.is_main = self.rank == 0
        self.step = 0

    # ================================================================== set-up
    def _setup_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.world_size = world
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self._pick_device()
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_pg = True
        if dist.is_initialized():
            self.world_size = dist.get_world_size()
            self.rank = dist.get_rank()
        self.is_main = self.rank == 0

    def _pick_device(self) -> torch.device:
        want = self.cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(want)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainingError(f"device {want!r} requested but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", self.local_rank if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0)
            torch.cuda.set_device(dev)
        return dev

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            import sys

            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)  # beside the progress bar, which is on stderr too

    def _setup(self) -> None:
        cfg = self.cfg.validate()
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self._setup_distributed()
        if cfg.data.scans_per_batch % self.world_size:
            raise TrainingError(f"data.scans_per_batch={cfg.data.scans_per_batch} is not divisible by the "
                                f"{self.world_size} processes")
        self.run_dir = Path(cfg.output)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main:
            self._lock_run_dir()
        last = self.ckpt_dir / LAST
        ck = None
        if self.resume:
            if not last.is_file():
                raise TrainingError(f"cannot resume: {last} does not exist (start without --resume)")
            ck = load_checkpoint(last)
            # The checkpoint's config is the run's; the caller's may only extend or re-time it.
            self._merge_resume_config(TrainConfig.from_dict(ck.config))
        elif last.is_file() and not self.overwrite:
            raise TrainingError(f"{self.run_dir} already holds a run ({last}); pass --resume to continue it, "
                                "--overwrite to start again, or choose another --out")

        if not self.cfg.data.processed:
            raise TrainingError("no training data: set data.processed (--data <preprocessed folder>)")
        if self._dataset is None:
            self._dataset = ProcessedScans.load(self.cfg.data.processed, self.cfg.data.max_samples_per_scan,
                                                self.cfg.seed, self.cfg.data.storage)
        self.data = self._dataset
        for note in self.data.notes:
            self.log(f"note: {note}")
        if self.cfg.data.moving_fraction > 0 and not self.data.shared_topology:
            # The motion is read off the dense correspondences; scans without them are drawn uniformly.
            self.log("note: data.moving_fraction needs a shared-topology folder; points are drawn uniformly")
            self.cfg.data.moving_fraction = 0.0
        if self.cfg.data.moving_fraction > 0:
            marked = self.data.mark_moving()
            self.log(f"{self.cfg.data.moving_fraction:.0%} of the points of {marked} expressive scans are drawn "
                     "where they move")
        self.total_steps = self.cfg.total_steps(self.data.n_scans)
        if self.total_steps < 1:
            raise TrainingError(f"the schedule has {self.total_steps} steps; set schedule.steps or epochs >= 1")
        self.steps_per_epoch = self.data.steps_per_epoch(self.cfg.data.scans_per_batch)

        torch.manual_seed(self.cfg.seed)  # identical initialisation on every rank (DDP also broadcasts)
        tmpl_lm = self.data.template_landmarks()
        tmpl_dense = self.data.template_dense()
        self.model = build_model(self.cfg.model, self.data.n_identities, self.data.n_scans,
                                 tmpl_lm, tmpl_dense).to(self.device)
        self.step = 0
        self.elapsed = 0.0
        self.stage = 0          # no stage entered yet; update_step enters the first one
        self.optimizer: torch.optim.Optimizer | None = None
        self.net: torch.nn.Module = self.model
        if ck is None and self.cfg.init_from:
            self._init_from(Path(self.cfg.init_from))
        if ck is not None:
            self._check_same_data(ck)
            try:
                self.model.load_state_dict(ck.model_state)
            except RuntimeError as exc:
                raise CheckpointError(f"{ck.path}: weights do not fit this model configuration ({exc})") from None
            self.step = int(ck.state["step"])
            self.elapsed = float(ck.state.get("elapsed_seconds", 0.0))
            self._enter_stage(int(ck.state["stage"]))
            if ck.optimizer_state is not None:
                try:
                    self.optimizer.load_state_dict(ck.optimizer_state)  # type: ignore[union-attr]
                except (ValueError, KeyError) as exc:
                    raise CheckpointError(f"{ck.path}: optimiser state does not fit ({exc})") from None
            restore_rng(ck)
            self.log(f"resumed {self.run_dir} at step {self.step}/{self.total_steps} (stage {self.stage})")
        self._prepare_run_dir()

    def _lock_run_dir(self) -> None:
        """One training process per run directory: a second one would interleave logs and checkpoints."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; rely on the user
            return
        fh = open(self.run_dir / ".lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise TrainingError(f"another training process is using {self.run_dir}; wait for it to stop "
                                "(it writes a checkpoint when interrupted) or choose another --out") from None
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_file = fh  # the lock lives as long as this handle (released in run() or at exit)

    def _unlock_run_dir(self) -> None:
        fh = getattr(self, "_lock_file", None)
        if fh is not None:
            fh.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def _merge_resume_config(self, saved: TrainConfig) -> None:
        """Keep the saved run's settings; take from the caller only what can change mid-run."""
        new = self.cfg
        merged = saved
        # What a resume may change: length, intervals, output niceties, workers, device, threads.
        for name in ("steps", "epochs", "log_every", "checkpoint_every", "keep_checkpoints",
                     "preview_every", "curve_every"):
            setattr(merged.schedule, name, getattr(new.schedule, name))
        merged.data.workers = new.data.workers
        if new.data.processed:
            merged.data.processed = new.data.processed
        merged.device, merged.threads, merged.progress = new.device, new.threads, new.progress
        merged.preview = new.preview
        merged.output = new.output
        self.cfg = merged

    def _init_from(self, path: Path) -> None:
        """Start from another run's weights (same data, same model config): e.g. a stage-two-only run."""
        init = load_checkpoint(path)
        self._check_same_data(init)
        try:
            self.model.load_state_dict(init.model_state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit this model configuration ({exc})") from None
        self.log(f"weights from {path}")

    def _check_same_data(self, ck: Any) -> None:
        keys = [s["key"] for s in ck.dataset.get("scans", [])]
        mine = [s.key for s in self.data.scans]
        if keys and keys != mine:
            raise TrainingError(f"cannot resume: the data in {self.cfg.data.processed} lists different scans "
                                f"({len(mine)}) from the checkpoint's ({len(keys)}); the latent codes would "
                                "belong to other scans")

    def _prepare_run_dir(self) -> None:
        self.records: list[dict[str, Any]] = []
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(exist_ok=True)
        (self.run_dir / "previews").mkdir(exist_ok=True)
        self.cfg.save(self.run_dir / "config.json")
        if self.resume and self.metrics_path.exists():
            # Lines past the checkpoint (written before a hard kill) are dropped: those steps run again.
            keep = []
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if rec.get("step", -1) < self.step:
                    keep.append(rec)
            self.records = keep
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.metrics_path)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        if not self.resume:  # a fresh start (or --overwrite): nothing of an older run may remain
            stale = [self.run_dir / "model.safetensors", self.run_dir / "loss_curve.png"]
            stale += list(self.ckpt_dir.glob("*.safetensors")) + list((self.run_dir / "previews").glob("*.png"))
            for p in stale:
                if p.exists():
                    p.unlink()

    # ================================================================== schedules
    def update_step(self, step: int) -> StepSchedule:
        """The one place where progress-dependent behaviour is decided (stage, κ, learning rates)."""
        progress = step / max(1, self.total_steps)
        t_m = float(self.cfg.schedule.stage2_start)
        s2 = self._stage2_step()
        stage = 2 if (s2 is not None and step >= s2) else 1
        if stage < self.stage:
            # Only after a resume with a longer schedule: stage one's optimiser state is gone and its
            # networks are already trained, so stay in stage two (DetailNet waits for κ to rise).
            if not getattr(self, "_warned_stage", False):
                self.log(f"the new schedule puts step {step} in stage one, but the run is already in stage two; "
                         "staying in stage two")
                self._warned_stage = True
            stage = self.stage
        # κ: weight of the detail loss L_f (0 throughout stage one, where forward() ignores it), rising
        # over the first `kappa_ramp` of stage two.
        kappa = stage_two_kappa(progress, t_m, self.cfg.schedule.kappa_ramp) if stage == 2 else 0.0
        if stage != self.stage:
            self._enter_stage(stage)
        factor = self._lr_factor(step, stage)
        if stage == 2:
            factor *= float(self.cfg.optim.detail_lr_scale)
        for g in self.optimizer.param_groups:  # type: ignore[union-attr]
            g["lr"] = g["initial_lr"] * factor * self._kappa_lr_factor(g, kappa)
        return StepSchedule(step=step, progress=progress, stage=stage, kappa=kappa, lr_factor=factor)

    def stage_span(self, stage: int) -> tuple[int, int]:
        """[first, end) steps of a stage."""
        s2 = self._stage2_step()
        if s2 is None:
            return (0, self.total_steps) if stage == 1 else (self.total_steps, self.total_steps)
        return (0, s2) if stage == 1 else (s2, self.total_steps)

    def _lr_factor(self, step: int, stage: int) -> float:
        """Warm-up and decay, restarted for each stage (each has a fresh optimiser over other parameters)."""
        o = self.cfg.optim
        first, end = self.stage_span(stage)
        local, span = step - first, max(1, end - first)
        f = 1.0
        if o.warmup_steps > 0 and local < o.warmup_steps:
            f = (local + 1) / o.warmup_steps
        if o.schedule == "cosine":
            t = min(1.0, max(0.0, (local - o.warmup_steps) / max(1, span - o.warmup_steps)))
            f *= o.min_lr_factor + (1.0 - o.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
        elif o.schedule == "step":
            if o.decay_every > 0 and local >= o.decay_start:
                f *= o.decay_gamma ** ((local - o.decay_start) // o.decay_every + 1)
        elif o.schedule != "constant":
            raise TrainingError(f"unknown optim.schedule {o.schedule!r} (constant | cosine | step)")
        return f

    def _kappa_lr_factor(self, group: dict[str, Any], kappa: float) -> float:
        """§3.5: "we symmetrically adjust the learning rates ... in proportion to the loss weight".

        In stage two only DetailNet and the detail codes train, and only through κ L_f, so their
        learning rates follow κ (Adam is nearly invariant to a loss scale: the lr is what makes the
        ramp real). A group may say otherwise with a "kappa" entry: "kappa", "one_minus_kappa", "none".
        """
        if not self.cfg.optim.kappa_scaled_lr or self.stage != 2:
            return 1.0
        follows = group.get("kappa", "kappa")
        if follows == "kappa":
            return kappa
        if follows == "one_minus_kappa":
            return 1.0 - kappa
        return 1.0

    def _enter_stage(self, stage: int) -> None:
        """Freeze for the stage, and build its optimiser (and DDP wrapper) over the trainable groups."""
        self.model.freeze_for_stage(stage)
        groups = self.model.parameter_groups(stage, self.cfg.optim.lr)
        groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
            g["initial_lr"] = float(g.get("lr", self.cfg.optim.lr))
        o = self.cfg.optim
        self.optimizer = torch.optim.Adam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay)
        if self.world_size > 1:
            # Rebuilt at each stage: DDP registers its gradient hooks on the parameters trainable now.
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        else:
            self.net = self.model
        if self.stage:
            self.log(f"stage {stage} from step {self.step}: "
                     f"{sum(p.numel() for g in groups for p in g['params'])} trainable parameters")
        self.stage = stage

    # ================================================================== the loop
    def run(self) -> RunResult:
        """Set up (or resume), train to the end or to a stop, and return what happened."""
        t_call = time.perf_counter()
        threads = torch.get_num_threads()  # a library call should not change the caller's process
        old_handlers = self._install_signal_handlers()
        try:
            self._setup()
            return self._loop(t_call)
        finally:
            self._restore_signal_handlers(old_handlers)
            self._unlock_run_dir()
            torch.set_num_threads(threads)
            if self._owns_pg and dist.is_initialized():
                # DDP's reducer holds gloo work objects; freed during interpreter teardown, after the
                # group is gone, they intermittently aborted a rank at exit. Free them first.
                self.net = self.model
                gc.collect()
                dist.destroy_process_group()

    def _loop(self, t_call: float) -> RunResult:
        cfg = self.cfg
        sched = cfg.schedule
        batches = StepBatches(
            self.data, self.total_steps, self.rank, self.world_size, seed=cfg.seed,
            scans_per_batch=cfg.data.scans_per_batch, points_per_scan=cfg.data.points_per_scan,
            near_fraction=cfg.data.near_fraction, surface_points=cfg.data.surface_points,
            dense_points=self._dense_count(), moving_fraction=cfg.data.moving_fraction)
        bar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"train {self.run_dir.name}")
        last_ckpt: Path | None = None
        losses: dict[str, float] = {}
        reason = "completed"
        stop_at = self.stop_at if self.stop_at is not None else self.total_steps
        if self.optimizer is None:  # enter the first stage even if no step runs (stop_at=0)
            self.update_step(min(self.step, self.total_steps - 1))
        try:
            it = iterate_batches(batches, self.step, cfg.data.workers, pin_memory=self.device.type == "cuda")
            while self.step < self.total_steps:
                if self.step >= stop_at:
                    reason = "stop_at"
                    break
                batch = next(it)
                k = self.step
                s = self.update_step(k)
                t0 = time.perf_counter()
                losses, stop = self._train_step(batch, s)
                seconds = time.perf_counter() - t0
                self.elapsed += seconds
                self.step = k + 1
                if self.is_main:
                    if (k % sched.log_every == 0) or self.step == self.total_steps or stop:
                        self._write_metrics(k, s, losses, seconds)
                    if bar is not None:
                        bar.update(1)
                        if k % sched.log_every == 0:
                            bar.set_postfix(loss=f"{losses['total']:.4g}", stage=s.stage, kappa=f"{s.kappa:.2f}")
                    if sched.curve_every > 0 and self.step % sched.curve_every == 0:
                        self._plot_curve()
                if sched.checkpoint_every > 0 and self.step % sched.checkpoint_every == 0 and self.step < self.total_steps:
                    last_ckpt = self._checkpoint()
                if sched.preview_every > 0 and self.step % sched.preview_every == 0 and self.step < self.total_steps:
                    self._preview()
                if stop:
                    reason = f"signal {self._stop_reason}"
                    break
        finally:
            if bar is not None:
                bar.close()
        finished = self.step >= self.total_steps
        last_ckpt = self._checkpoint(finished=finished)
        model_path = None
        if self.is_main:
            self._plot_curve()
        if finished:
            if sched.preview_every >= 0:
                self._preview()
            model_path = self._export_model()
            self.log(f"done: {self.step} steps in {self.run_dir}")
        else:
            self.log(f"stopped after {self.step}/{self.total_steps} steps ({reason}); checkpoint {last_ckpt}")
        if self.world_size > 1:
            dist.barrier()
        return RunResult(run_dir=self.run_dir, step=self.step, total_steps=self.total_steps, stage=self.stage,
                         interrupted=not finished, checkpoint=last_ckpt if self.is_main else None,
                         model_path=model_path, metrics_path=self.metrics_path, last_losses=losses,
                         seconds=time.perf_counter() - t_call, reason=reason)

    def _dense_count(self) -> int:
        if self.cfg.data.dense_points is not None:
            return int(self.cfg.data.dense_points)
        return int(getattr(self.cfg.model, "dense_per_batch", 0))

    def _train_step(self, batch: dict[str, torch.Tensor], s: StepSchedule) -> tuple[dict[str, float], bool]:
        # Reseed per step: any randomness inside the model is a function of (seed, step, rank) too.
        torch.manual_seed(derive_seed(self.cfg.seed, "torch", s.step, self.rank))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        out = self.net(batch, stage=s.stage, kappa=s.kappa, neutral_switch=self.cfg.neutral_policy != "code")
        total = out["total"]
        total.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],  # type: ignore[union-attr]
                                           self.cfg.optim.grad_clip)
        self.optimizer.step()  # type: ignore[union-attr]
        names = sorted(out)
        vals = torch.stack([out[n].detach().float().reshape(()) for n in names])
        stop = bool(self._stop_reason)
        if self.world_size > 1:
            # One collective per step: the logged values become means over the global batch (what a
            # single process would see), and every rank learns whether any rank got a stop signal.
            flag = torch.tensor([1.0 if stop else 0.0], device=vals.device)
            vals = torch.cat([vals / self.world_size, flag])
            dist.all_reduce(vals)
            stop = bool(vals[-1].item() > 0)
            vals = vals[:-1]
            if stop and not self._stop_reason:
                self._stop_reason = "signal on another rank"
        values = dict(zip(names, vals.cpu().tolist()))
        if not math.isfinite(values["total"]):
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            raise TrainingError(f"the loss became non-finite at step {s.step} ({bad}); the last checkpoint is "
                                f"{self.ckpt_dir / LAST}. Try a lower optim.lr or optim.grad_clip.")
        return values, stop

    # ================================================================== outputs
    def _write_metrics(self, k: int, s: StepSchedule, losses: dict[str, float], seconds: float) -> None:
        rec: dict[str, Any] = {"step": k, "epoch": k // self.steps_per_epoch, "stage": s.stage,
                               "kappa": s.kappa, "lr": self.cfg.optim.lr * s.lr_factor}
        groups = self.optimizer.param_groups  # type: ignore[union-attr]
        if any("name" in g for g in groups):
            rec["lr_groups"] = {str(g.get("name", i)): g["lr"] for i, g in enumerate(groups)}
        rec.update(losses)
        rec["seconds"] = seconds
        rec["elapsed"] = self.elapsed
        self.records.append(rec)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _checkpoint(self, finished: bool = False) -> Path | None:
        if not self.is_main:
            return None
        if getattr(self, "_saved", None) == (self.step, finished):  # already on disk (stop at an interval)
            return self.ckpt_dir / LAST
        self._saved = (self.step, finished)
        state = {"step": self.step, "epoch": self.step // self.steps_per_epoch, "stage": self.stage,
                 "total_steps": self.total_steps, "elapsed_seconds": self.elapsed, "finished": finished,
                 "world_size": self.world_size, "torch": torch.__version__, "time": time.time()}
        path = save_checkpoint(self.ckpt_dir / LAST, model_state=self.model.state_dict(),
                               config=self.cfg.to_dict(), state=state,
                               optimizer_state=self.optimizer.state_dict(),  # type: ignore[union-attr]
                               dataset=self._dataset_meta(), extra_tensors=self._template_tensors())
        keep = self.cfg.schedule.keep_checkpoints
        if keep > 0:
            numbered = self.ckpt_dir / f"step_{self.step:08d}.safetensors"
            _link_or_copy(path, numbered)
            olds = sorted(self.ckpt_dir.glob("step_*.safetensors"))
            for old in olds[:-keep]:
                old.unlink()
        return path

    def _dataset_meta(self) -> dict[str, Any]:
        return {"processed": str(self.cfg.data.processed), "identities": self.data.identities,
                "scans": [{"key": s.key, "identity": s.identity, "identity_index": s.identity_index,
                           "expression": s.expression, "neutral": s.neutral} for s in self.data.scans]}

    def _template_tensors(self) -> dict[str, torch.Tensor]:
        out = {"template_landmarks": self.data.template_landmarks()}
        td = self.data.template_dense()
        if td is not None:
            out["template_dense"] = td
        return out

    def _export_model(self) -> Path | None:
        """The trained model alone (no optimiser): what fit/extract/the server load."""
        if not self.is_main:
            return None
        path = self.run_dir / "model.safetensors"
        state = {"step": self.step, "stage": self.stage, "total_steps": self.total_steps, "finished": True,
                 "kind": "model"}
        save_checkpoint(path, model_state=self.model.state_dict(), config=self.cfg.to_dict(), state=state,
                        dataset=self._dataset_meta(), extra_tensors=self._template_tensors(), rng=False)
        return path

    def _plot_curve(self) -> None:
        if not self.records:
            return
        try:
            plot_loss_curve(self.records, self.run_dir / "loss_curve.png",
                            stage2_step=self._stage2_step())
        except Exception as exc:  # a plot must never stop training
            warnings.warn(f"loss curve not written: {exc}")

    def _stage2_step(self) -> int | None:
        """First step of stage two (the first k with k / total >= T_m), None if there is none."""
        t_m = self.cfg.schedule.stage2_start
        if t_m >= 1.0:
            return None
        k = int(math.ceil(t_m * self.total_steps))
        while k > 0 and (k - 1) / self.total_steps >= t_m:  # guard against float rounding
            k -= 1
        while k / self.total_steps < t_m:
            k += 1
        return k if k < self.total_steps else None

    def _preview(self) -> None:
        if not self.is_main:
            return
        try:
            render_training_faces(self.model, self.data, self.cfg, self.stage,
                                  self.run_dir / "previews" / f"step_{self.step:08d}.png", self.device,
                                  step=self.step)
        except Exception as exc:  # a preview must never stop training
            warnings.warn(f"preview at step {self.step} failed: {exc}")

    # ================================================================== signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_reason and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_reason = signal.Signals(signum).name
            self.log(f"{self._stop_reason}: finishing the current step, then writing a checkpoint")

        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


# ====================================================================== helpers


def stage_two_kappa(progress: float, t_m: float, ramp: float = 1.0) -> float:
    """κ at run progress t (losses.kappa_schedule's cosine), rising from 0 at T_m to 1 at
    T_m + ramp (1 - T_m) and held at 1 after (ramp = 1: over the whole of stage two)."""
    from backend.model import kappa_schedule

    span = max(1e-12, float(ramp)) * (1.0 - t_m)
    t = t_m + min(1.0, max(0.0, (progress - t_m) / span)) * (1.0 - t_m)
    return float(kappa_schedule(t, t_m))


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def plot_loss_curve(records: list[dict[str, Any]], path: Path, stage2_step: int | None = None) -> None:
    """Every loss term against the step on a log scale; total in black; stage two marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    skip = {"step", "epoch", "stage", "kappa", "lr", "lr_groups", "seconds", "elapsed"}
    terms = sorted({k for r in records for k in r if k not in skip and isinstance(r[k], (int, float))})
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in terms:
        xs = np.array([r["step"] for r in records if name in r], dtype=float)
        ys = np.array([r[name] for r in records if name in r], dtype=float)
        ok = ys > 0
        if not ok.any():
            continue
        style = dict(color="black", linewidth=1.6) if name == "total" else dict(linewidth=0.9, alpha=0.85)
        ax.plot(xs[ok], ys[ok], label=name, **style)
    ax.set_yscale("log")
    if stage2_step is not None and records and stage2_step <= records[-1]["step"]:
        ax.axvline(stage2_step, color="grey", linestyle="--", linewidth=1)
        ax.text(stage2_step, ax.get_ylim()[0], " stage 2", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def preview_scans(data: ProcessedScans, n: int) -> list[int]:
    """A few training scans: identities spread over the folder, the first one neutral, the others
    showing different expressions (so both the identity and the expression halves are visible)."""
    n = max(1, min(n, data.n_scans))
    by_identity: dict[int, list[int]] = {}
    for k, s in enumerate(data.scans):
        by_identity.setdefault(s.identity_index, []).append(k)
    ids = sorted(by_identity)
    chosen: list[int] = []
    for j in range(n * 4):
        if len(chosen) == n:
            break
        members = sorted(by_identity[ids[(j * max(1, len(ids) // n) + j // n) % len(ids)]],
                         key=lambda k: (not data.scans[k].neutral, k))
        pick = members[j % len(members)]
        if pick not in chosen:
            chosen.append(pick)
    for k in range(data.n_scans):  # tiny folders: fill up with whatever is left
        if len(chosen) == n:
            break
        if k not in chosen:
            chosen.append(k)
    return chosen


@torch.no_grad()
def render_training_faces(model: torch.nn.Module, data: ProcessedScans, cfg: TrainConfig, stage: int,
                          path: Path, device: torch.device, step: int | None = None) -> Path:
    """Marching cubes of a few training faces (with DetailNet in stage two), side by side in one PNG."""
    from .preview import render_preview

    was_training = model.training
    model.eval()
    meshes, labels = [], []
    try:
        for k in preview_scans(data, cfg.preview.faces):
            codes = model.codes(torch.tensor([k], device=device),
                                torch.tensor([data.scans[k].identity_index], device=device))
            detail = stage >= 2
            face = model.field(codes, detail=detail)  # hyper-net weights once per face, not once per chunk
            meshes.append(_extract(face, detail, cfg.preview.resolution, cfg.preview.chunk, device))
            labels.append(data.scans[k].key)
    finally:
        model.train(was_training)
    title = f"step {step}" if step is not None else ""
    return render_preview(meshes, labels, title, path, cfg.preview.image_size)


def _extract(face: FaceField, detail: bool, resolution: int, chunk: int,
             device: torch.device) -> tuple[np.ndarray, np.ndarray] | None:
    """Zero level set over the unit sphere (narrow-band marching cubes: the dense grid's mesh), trimmed to
    the face region like every mesh the product hands out (`backend.fitting.meshes.face_only`)."""
    from backend.fitting.meshes import face_only

    # inference_mode off: with DetailNet the SDF takes a gradient of the base field internally.
    v, f = extract_mesh(lambda p: face.sdf(p, with_detail=detail, chunk=None), resolution=resolution,
                        chunk=chunk, device=device, inference_mode=False)
    v, f = face_only(face, v, f, chunk=chunk)
    return (v, f) if len(f) else None
