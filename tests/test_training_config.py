"""Training configuration: presets, JSON/YAML round trips, command-line overrides."""
from __future__ import annotations

import json

import pytest

from training.config import PRESETS, TrainConfig, apply_overrides, preset
from training.train import build_parser, config_from_args, main


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(tmp_path, name):
    cfg = preset(name)
    path = tmp_path / "config.json"
    cfg.save(path)
    back = TrainConfig.load(path)
    assert back == cfg
    assert back.to_dict() == json.loads(path.read_text())


def test_yaml_round_trip(tmp_path):
    pytest.importorskip("yaml")
    cfg = TrainConfig.paper()
    cfg.data.processed = "/some/where"
    path = tmp_path / "config.yaml"
    cfg.save(path)
    assert TrainConfig.load(path) == cfg


def test_paper_preset_matches_the_paper():
    cfg = TrainConfig.paper()
    assert cfg.optim.lr == 1e-4
    assert cfg.schedule.epochs == 1500 and cfg.schedule.steps is None
    assert cfg.data.scans_per_batch == 48
    # 16,434 FaceScape scans at 48 per step: 343 steps per epoch.
    assert cfg.total_steps(16434) == 1500 * 343


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(TrainConfig.cpu(), ["optim.lr=3e-4", "schedule.steps=10", "data.dense_points=null",
                                              "model.mini_hidden=48", "model.loss.sdf=100", "seed=7"])
    assert cfg.optim.lr == 3e-4 and cfg.schedule.steps == 10 and cfg.data.dense_points is None
    assert cfg.model.mini_hidden == 48 and cfg.model.loss.sdf == 100 and cfg.seed == 7
    with pytest.raises(ValueError, match="unknown field"):
        apply_overrides(cfg, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, ["schedule.steps=ten"])
    with pytest.raises(ValueError, match="no config section"):
        apply_overrides(cfg, ["nope.lr=1"])
    with pytest.raises(ValueError, match="near_fraction"):
        apply_overrides(cfg, ["data.near_fraction=1.5"])


def test_unknown_keys_in_a_file_are_errors(tmp_path):
    d = TrainConfig.cpu().to_dict()
    d["optim"]["lrr"] = 1.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="optim.lrr"):
        TrainConfig.load(path)


def test_cli_flags_and_print_config(tmp_path, capsys):
    args = build_parser().parse_args(["--preset", "tiny", "--data", "D", "--out", str(tmp_path / "r"),
                                      "--steps", "5", "--lr", "0.01", "--set", "data.scans_per_batch=4"])
    cfg = config_from_args(args)
    assert (cfg.data.processed, cfg.schedule.steps, cfg.optim.lr, cfg.data.scans_per_batch) == ("D", 5, 0.01, 4)
    assert main(["--preset", "cpu", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert TrainConfig.from_dict(printed) == TrainConfig.cpu()
    assert main(["--preset", "cpu", "--set", "optim.nope=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
