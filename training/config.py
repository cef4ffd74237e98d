"""Typed training configuration (nerfstudio style): one dataclass tree, saved with every run.

`TrainConfig` holds the model configuration (`backend.model.config.ModelConfig`) beside the data,
optimiser, schedule and preview settings. Presets are named configurations, not copies of code:

* `TrainConfig.paper()`: ImFace++ §4.2 (Adam, lr 1e-4, 1,500 epochs, minibatches of 48) for GPUs.
* `TrainConfig.cpu()`: the small model on the embedded default data (the procedural scans), sized to
  reach a recognisable face in a short run on 2 CPU cores (README: the main job).
* `TrainConfig.quality()`: the cpu preset's networks with wider mini-nets, trained longer on more points
  (about an hour on 2 CPU cores; a GPU when there is one): the held-out figures of docs/training-quality.md.
* `TrainConfig.tiny()`: a smoke-test size (seconds), used by tests and `--preset tiny`.

Configs load from and save to JSON or YAML (plain data, never pickle). `apply_overrides` implements the
command line's `--set section.field=value`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from backend.config_loader import check_choices, config_from_dict, read_config_file
from backend.fitting.loop import NEUTRAL_POLICY
from backend.model.config import ModelConfig

CONFIG_FORMAT = "imface-train-config/1"


@dataclass
class DataConfig:
    """Where the preprocessed samples are and how much of them one step sees."""

    processed: str = ""                # folder with index.json + one safetensors file per scan
    points_per_scan: int = 4096        # N: SDF samples per scan per step
    near_fraction: float = 0.5         # share of N drawn from the near-surface part of the file
    surface_points: int = 1024         # M: on-surface points (with normals) per scan per step
    scans_per_batch: int = 8           # B: scans per step, global (split evenly over DDP ranks)
    dense_points: int | None = None    # D for the correspondence losses; None: the model config's count
    # Paper-scale folders do not fit in RAM (16k scans x 250k samples); this keeps a fixed, seeded subset
    # of each scan's samples (near/uniform proportions kept). None keeps everything.
    max_samples_per_scan: int | None = None
    # "memory": every tensor in RAM (float32); "mmap": the big per-sample arrays memory-mapped from the
    # files, held once in the page cache for all DDP ranks of a machine (for paper-scale folders).
    storage: Literal["memory", "mmap"] = "memory"
    workers: int = 0                   # DataLoader worker processes building batches ahead of the step
    # Share of each expressive scan's near-surface and surface draws taken where the scan moves more than
    # 3 mm from the person's neutral (shared-topology folders; ProcessedScans.mark_moving). 0: uniform.
    moving_fraction: float = 0.0


@dataclass
class OptimConfig:
    """Adam, as in the paper, with an optional decay schedule on top of the κ-proportional scaling."""

    lr: float = 1e-4                   # §4.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    min_lr_factor: float = 0.1         # cosine: final lr = lr * min_lr_factor
    decay_every: int = 0               # step: multiply by decay_gamma every decay_every steps ...
    decay_gamma: float = 0.95
    decay_start: int = 0               # ... starting at this step (ImFace's code: 0.95 every 10 epochs from 200)
    # §3.5: "we symmetrically adjust the learning rates ... in proportion to the loss weight": in stage two
    # a parameter group tagged with a κ weight has its lr multiplied by that weight.
    kappa_scaled_lr: bool = True
    # Stage two's learning rate (DetailNet and the detail codes) relative to `lr`: the detail field starts
    # from scratch at T_m while the rest is trained, so it may take a larger step than stage one's end.
    detail_lr_scale: float = 1.0
    grad_clip: float | None = None     # max global grad norm; None: no clipping (paper)


@dataclass
class ScheduleConfig:
    """How long to train, when stage two starts, and how often to log, save and preview."""

    steps: int | None = None           # total optimiser steps; wins over epochs when both are set
    epochs: int | None = 100           # one epoch = every scan seen once (ceil(n_scans / B) steps)
    stage2_start: float = 0.5          # T_m of §3.5: fraction of training after which stage two runs
    # Fraction of stage two over which κ rises from 0 to 1 (the cosine ramp of losses.kappa_schedule);
    # 1.0 spreads it over the whole stage (the paper's T_m..1), smaller values hold κ = 1 afterwards.
    kappa_ramp: float = 1.0
    log_every: int = 1                 # JSONL metrics line every k steps (and the progress bar postfix)
    checkpoint_every: int = 500        # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 2          # numbered checkpoints kept besides last.safetensors (0: only last)
    preview_every: int = 500           # steps between preview images (0: only at the end, -1: never)
    curve_every: int = 100             # steps between loss-curve PNG refreshes


@dataclass
class PreviewConfig:
    """Marching-cubes previews of a few training faces."""

    faces: int = 4                     # how many training scans to show
    resolution: int = 64               # grid cells per axis over [-1, 1]^3
    image_size: int = 256              # pixels per face tile
    chunk: int = 65536                 # points per SDF query


@dataclass
class TrainConfig:
    """The whole run. Saved as config.json in the run directory and inside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    preset: str = "custom"
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    # torch.set_num_threads (None: torch's default, one per core). A fixed count makes CPU runs
    # bit-reproducible; on a machine shared with other busy processes, 1 avoids OpenMP stalls.
    threads: int | None = None
    output: str = "runs/imface"        # run directory
    # A model file (model.safetensors or a checkpoint of the same data and model config) whose weights
    # start the run instead of a fresh initialisation; with schedule.stage2_start = 0 the run is a
    # stage-two-only refinement (DetailNet and detail codes) of that model.
    init_from: str = ""
    # How neutral-labelled scans are treated (backend.fitting.loop.NEUTRAL_POLICY, whose training half this
    # is): "train_switch" and "switch" train them with the expression warp off (eq. 12), "code" with it on.
    neutral_policy: Literal["train_switch", "switch", "code"] = NEUTRAL_POLICY  # type: ignore[assignment]
    progress: bool = True              # tqdm bar on rank 0

    # ---------------------------------------------------------------- presets
    @classmethod
    def paper(cls) -> "TrainConfig":
        """ImFace++ §4.2: Adam lr 1e-4, 1,500 epochs, minibatch 48, m = 4096 correspondence points."""
        return cls(
            model=ModelConfig.paper(),
            # 16,384 samples per scan as in the official ImFace training config; the paper does not say.
            data=DataConfig(points_per_scan=16384, near_fraction=0.5, surface_points=4096,
                            scans_per_batch=48, dense_points=None, workers=4,
                            max_samples_per_scan=None, storage="mmap"),
            optim=OptimConfig(lr=1e-4),
            schedule=ScheduleConfig(steps=None, epochs=1500, stage2_start=0.5, log_every=10,
                                    checkpoint_every=2000, keep_checkpoints=3, preview_every=5000,
                                    curve_every=1000),
            preview=PreviewConfig(faces=6, resolution=128, image_size=320, chunk=262144),
            preset="paper",
            output="runs/imface-paper",
        )

    @classmethod
    def cpu(cls) -> "TrainConfig":
        """Small model on the default data: a recognisable face in a short run on 2 CPU cores."""
        model = ModelConfig.cpu()
        # λ4 1e5 -> 1e4: the code prior was the largest measured cause of washed-out expressions
        # (docs/training-quality.md: capture on training scans 0.42 -> 0.48, held-out 0.02 -> 0.18).
        model.loss.embedding = 1e4
        # λ7 1e2 -> 1e3: with 1e2 the expression warp slid moving skin 2-3 mm along the surface in template
        # space, where DetailNet reads it, so detail codes could not carry forehead wrinkles to another
        # face (docs/training-quality.md, "template drift").
        model.loss.landmark_consistency = 1e3
        return cls(
            model=model,
            # moving_fraction 0.3: closed eyelids are ~1 % of a face's samples and stayed half open
            # (training capture of eyes_closed 0.44 -> 0.88 on ict-faces; docs/training-quality.md).
            data=DataConfig(points_per_scan=1024, near_fraction=0.75, surface_points=256,
                            scans_per_batch=4, dense_points=None, workers=0, moving_fraction=0.3),
            # A higher rate than the paper's: few steps, small batches, and small networks.
            optim=OptimConfig(lr=5e-4, schedule="cosine", warmup_steps=50, min_lr_factor=0.1),
            # One thread: two OpenMP threads stall badly when other jobs share two cores (README, Decisions).
            schedule=ScheduleConfig(steps=1600, epochs=None, stage2_start=0.8, log_every=1,
                                    checkpoint_every=200, keep_checkpoints=1, preview_every=400,
                                    curve_every=100),
            preview=PreviewConfig(faces=4, resolution=96, image_size=192, chunk=32768),
            preset="cpu",
            threads=1,
            output="runs/imface-cpu",
        )

    @classmethod
    def quality(cls) -> "TrainConfig":
        """Between `cpu` and `paper`: about an hour on 2 CPU cores (a GPU is used when there is one).

        The cpu preset's networks with 1.5x wider mini-nets, trained ~3x longer on 1.5x the points per scan,
        with a longer stage two (1,000 steps: the detail field keeps improving with its length,
        docs/training-quality.md)."""
        cfg = cls.cpu()
        # Mini-nets 32 -> 48 wide: the expressions that move least (mouth_left, sneer) stayed under 0.85
        # training capture at width 32 whatever the seed, the share of moving draws or 1.5x the steps; the
        # wider nets reach it for ~1.3x the time per step (docs/training-quality.md, "Wider mini-nets").
        cfg.model.mini_hidden = 48
        cfg.data = DataConfig(points_per_scan=1536, near_fraction=0.75, surface_points=384,
                              scans_per_batch=4, dense_points=None, workers=0, moving_fraction=0.3)
        cfg.optim = OptimConfig(lr=5e-4, schedule="cosine", warmup_steps=100, min_lr_factor=0.05)
        cfg.schedule = ScheduleConfig(steps=5000, epochs=None, stage2_start=0.8, log_every=5,
                                      checkpoint_every=250, keep_checkpoints=1, preview_every=1000,
                                      curve_every=250)
        cfg.preset = "quality"
        cfg.output = "runs/imface-quality"
        return cfg

    @classmethod
    def tiny(cls) -> "TrainConfig":
        """Smoke test: a handful of steps with very few points."""
        cfg = cls.cpu()
        cfg.model = ModelConfig(id_dim=20, exp_dim=20, detail_dim=20, pe_freqs=2, mini_hidden=16,
                                mini_layers=2, detail_hidden=16, detail_layers=2, hyper_hidden=16,
                                fusion_width=32, fusion_layers=2, landmark_width=32, landmark_layers=2,
                                dense_per_batch=64)
        cfg.data = DataConfig(points_per_scan=128, near_fraction=0.5, surface_points=32,
                              scans_per_batch=2, dense_points=None, workers=0)
        cfg.optim = OptimConfig(lr=1e-3)
        cfg.schedule = ScheduleConfig(steps=6, epochs=None, stage2_start=0.5, log_every=1,
                                      checkpoint_every=3, keep_checkpoints=1, preview_every=-1,
                                      curve_every=3)
        cfg.preview = PreviewConfig(faces=2, resolution=24, image_size=96, chunk=8192)
        cfg.preset = "tiny"
        cfg.output = "runs/imface-tiny"
        return cfg

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        fmt = d.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"unsupported training config format {fmt!r} (expected {CONFIG_FORMAT!r})")
        return config_from_dict(cls, d).validate()

    def save(self, path: str | Path) -> None:
        """Write JSON (or YAML for .yaml/.yml) atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional dependency, only for YAML files

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path))

    def validate(self) -> "TrainConfig":
        """Reject values that would fail later and deep inside the run; returns self."""
        check_choices(self)
        d, o, s = self.data, self.optim, self.schedule
        problems = []
        if d.scans_per_batch < 1 or d.points_per_scan < 1 or d.surface_points < 0:
            problems.append("data.scans_per_batch and data.points_per_scan must be >= 1")
        if not 0.0 <= d.near_fraction <= 1.0:
            problems.append("data.near_fraction must be in [0, 1]")
        if not 0.0 <= d.moving_fraction < 1.0:
            problems.append("data.moving_fraction must be in [0, 1)")
        if o.lr <= 0 or len(o.betas) != 2:
            problems.append("optim.lr must be > 0 and optim.betas two numbers")
        if not 0.0 <= s.stage2_start <= 1.0:
            problems.append("schedule.stage2_start (T_m) must be in [0, 1] (1: no stage two)")
        if not 0.0 < s.kappa_ramp <= 1.0:
            problems.append("schedule.kappa_ramp must be in (0, 1]")
        if o.detail_lr_scale <= 0:
            problems.append("optim.detail_lr_scale must be > 0")
        if s.steps is None and s.epochs is None:
            problems.append("schedule.steps or schedule.epochs must be set")
        if s.log_every < 1:
            problems.append("schedule.log_every must be >= 1")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        return self

    # ---------------------------------------------------------------- derived quantities
    def total_steps(self, n_scans: int) -> int:
        """Optimiser steps of the whole run: `schedule.steps`, else epochs x steps per epoch."""
        if self.schedule.steps is not None:
            return int(self.schedule.steps)
        if self.schedule.epochs is None:
            raise ValueError("schedule.steps or schedule.epochs must be set")
        return int(self.schedule.epochs) * steps_per_epoch(n_scans, self.data.scans_per_batch)


def steps_per_epoch(n_scans: int, scans_per_batch: int) -> int:
    return max(1, math.ceil(n_scans / scans_per_batch))


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "paper": TrainConfig.paper,
    "cpu": TrainConfig.cpu,
    "quality": TrainConfig.quality,
    "tiny": TrainConfig.tiny,
}


def preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


def parse_value(text: str) -> Any:
    """A command-line value: JSON first (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.strip().lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "yes", "on"):
            return True
        if low in ("false", "no", "off"):
            return False
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `section.field=value` strings (e.g. `optim.lr=3e-4`, `model.hidden=64`) to a copy of cfg.

    Values go through the same checks as a loaded file, so a typo or a wrong type is an error here.
    """
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node or not isinstance(node[p], dict):
                raise ValueError(f"override {item!r}: no config section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown field {key.strip()!r}")
        node[parts[-1]] = parse_value(text)
    return TrainConfig.from_dict(d)
