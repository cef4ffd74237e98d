"""Checkpoints: save -> load is bit-exact (model and optimiser), no pickle, damage is reported clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend.model.io import CheckpointError, load_checkpoint, read_metadata
from training.config import TrainConfig
from synthetic_samples import write_synthetic_processed
from training.train import main
from training.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trainer:
    """A tiny run stopped in stage two (so Adam has state for the detail groups)."""
    root = tmp_path_factory.mktemp("ckpt")
    samples = write_synthetic_processed(root / "samples", n_identities=2, n_samples=1000, n_surface=200,
                                        n_dense=64)
    cfg = TrainConfig.tiny()
    cfg.data.processed = str(samples)
    cfg.output = str(root / "run")
    cfg.schedule.steps, cfg.schedule.stage2_start, cfg.schedule.preview_every = 8, 0.5, -1
    cfg.threads, cfg.progress = 1, False
    t = Trainer(cfg, stop_at=6, log=lambda m: None)
    result = t.run()
    assert result.interrupted and result.step == 6
    return t


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_save_load_is_bit_exact(trained):
    ck = load_checkpoint(trained.ckpt_dir / "last.safetensors")
    assert _same(ck.model_state, trained.model.state_dict())
    assert _same(ck.optimizer_state, trained.optimizer.state_dict())
    assert ck.state["step"] == 6 and ck.state["stage"] == 2
    assert TrainConfig.from_dict(ck.config) == trained.cfg
    assert [s["key"] for s in ck.dataset["scans"]] == [s.key for s in trained.data.scans]

    # Loading into a fresh trainer (resume) restores the same model and optimiser state.
    fresh = Trainer(trained.cfg, resume=True, log=lambda m: None)
    fresh._setup()
    assert fresh.step == 6 and fresh.stage == 2
    assert _same(fresh.model.state_dict(), trained.model.state_dict())
    assert _same(fresh.optimizer.state_dict(), trained.optimizer.state_dict())


def test_checkpoint_is_plain_safetensors(trained):
    """Readable without our code and without pickle: tensors + JSON metadata."""
    from safetensors import safe_open

    path = trained.ckpt_dir / "last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert any(k.startswith("model/") for k in keys) and any(k.startswith("optim/") for k in keys)
    assert "rng/torch" in keys
    json.loads(meta["config"]), json.loads(meta["state"]), json.loads(meta["optim_groups"])
    assert not list(path.parent.glob(".*tmp*"))  # atomic write left no temporary file


def _copy(src: Path, dst: Path, data: bytes | None = None) -> Path:
    dst.write_bytes(src.read_bytes() if data is None else data)
    return dst


def test_damaged_checkpoints_give_clear_errors(trained, tmp_path):
    good = (trained.ckpt_dir / "last.safetensors").read_bytes()
    truncated = _copy(Path(), tmp_path / "truncated.safetensors", good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(truncated)
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF  # inside the tensor data: the header still parses
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(_copy(Path(), tmp_path / "flipped.safetensors", bytes(flipped)))
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(_copy(Path(), tmp_path / "garbage.safetensors", b"not a checkpoint at all"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, str(other))
    with pytest.raises(CheckpointError, match="not an ImFace\\+\\+ training checkpoint"):
        read_metadata(other)


def test_resume_from_a_truncated_checkpoint_is_a_message_not_a_traceback(trained, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = (trained.ckpt_dir / "last.safetensors").read_bytes()
    (run / "checkpoints" / "last.safetensors").write_bytes(good[:1000])
    trained.cfg.save(run / "config.json")
    assert main(["--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "damaged or truncated" in err and "Traceback" not in err


def test_exported_model_loads_for_inference(trained, tmp_path):
    """load_model rebuilds the network from a checkpoint alone (what fit/extract/the server use)."""
    from backend.model.io import load_model

    model, ck = load_model(trained.ckpt_dir / "last.safetensors")
    assert not model.training and ck.state["step"] == 6
    pts = torch.rand(1, 50, 3) * 0.5
    idx = torch.tensor([1])
    ident = torch.tensor([trained.data.scans[1].identity_index])
    with torch.no_grad():
        a = model.field(model.codes(idx, ident)).sdf(pts, with_detail=True)
        b = trained.model.eval().field(trained.model.codes(idx, ident)).sdf(pts, with_detail=True)
    assert torch.equal(a, b)
