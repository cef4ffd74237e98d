"""Training on real preprocessing output: the procedural default scans and ../shared/datasets/ict-faces
(skipped when absent). A short run must learn: the loss falls."""
from __future__ import annotations

import json
from pathlib import Path

from training.config import TrainConfig
from training.train import train


def _short_run(samples: Path, out: Path, steps: int) -> list[float]:
    cfg = TrainConfig.tiny()
    cfg.data.processed = str(samples)
    cfg.data.scans_per_batch = 4
    cfg.data.points_per_scan = 512
    cfg.output = str(out)
    cfg.schedule.steps = steps
    cfg.schedule.stage2_start = 1.0  # stage one only: the loss of one objective, comparable over steps
    cfg.schedule.checkpoint_every = 0
    cfg.schedule.preview_every = -1
    cfg.threads = 1
    cfg.progress = False
    result = train(cfg, log=lambda m: None)
    assert result.step == steps and not result.interrupted
    return [json.loads(line)["total"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _falls(total: list[float]) -> bool:
    return sum(total[-5:]) / 5 < 0.7 * sum(total[:5]) / 5


def test_training_on_the_default_data_lowers_the_loss(default_samples, tmp_path):
    total = _short_run(default_samples, tmp_path / "run", steps=40)
    assert _falls(total), total


def test_training_on_ict_faces_learns(ict_samples, tmp_path):
    samples, report = ict_samples
    assert not report.failed
    total = _short_run(samples, tmp_path / "run", steps=40)
    assert _falls(total), total
