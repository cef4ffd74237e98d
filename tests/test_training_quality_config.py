"""The training-quality settings: the quality preset, κ's ramp in stage two, stage-two-only runs."""
from __future__ import annotations

import math

import pytest

from backend.model import kappa_schedule
from training.config import PRESETS, TrainConfig, apply_overrides, preset
from training.trainer import stage_two_kappa


def test_quality_preset_sits_between_cpu_and_paper():
    q, c, p = preset("quality"), preset("cpu"), preset("paper")
    assert "quality" in PRESETS and q.preset == "quality"
    assert c.total_steps(192) < q.total_steps(192) < p.total_steps(192)
    assert c.data.points_per_scan < q.data.points_per_scan < p.data.points_per_scan
    assert q.device == "auto"                           # a GPU when there is one
    assert TrainConfig.from_dict(q.to_dict()) == q


def test_kappa_ramp():
    # ramp 1: the paper's cosine over the whole of stage two
    for t in (0.8, 0.85, 0.9, 0.99, 1.0):
        assert stage_two_kappa(t, 0.8, 1.0) == pytest.approx(kappa_schedule(t, 0.8))
    # ramp 0.25: κ reaches 1 a quarter into stage two and stays there
    assert stage_two_kappa(0.8, 0.8, 0.25) == 0.0
    assert stage_two_kappa(0.825, 0.8, 0.25) == pytest.approx(0.5)
    assert stage_two_kappa(0.85, 0.8, 0.25) == pytest.approx(1.0)
    assert stage_two_kappa(0.95, 0.8, 0.25) == 1.0
    assert stage_two_kappa(0.5, 0.0, 0.5) == pytest.approx(1.0)
    assert math.isclose(stage_two_kappa(0.25, 0.0, 0.5), 0.5)


def test_new_fields_are_checked():
    cfg = preset("tiny")
    with pytest.raises(ValueError):
        apply_overrides(cfg, ["schedule.kappa_ramp=0"])
    with pytest.raises(ValueError):
        apply_overrides(cfg, ["optim.detail_lr_scale=0"])
    with pytest.raises(ValueError):
        apply_overrides(cfg, ["neutral_policy=sometimes"])
    assert apply_overrides(cfg, ["neutral_policy=code"]).neutral_policy == "code"
    assert cfg.neutral_policy == "train_switch"
    assert apply_overrides(cfg, ["init_from=/x/model.safetensors"]).init_from == "/x/model.safetensors"
