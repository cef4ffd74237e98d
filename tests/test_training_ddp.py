"""torchrun + DistributedDataParallel (gloo, 2 CPU processes) matches one process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.model.io import load_checkpoint
from training.config import TrainConfig
from training.dataset import ProcessedScans
from synthetic_samples import write_synthetic_processed
from training.train import train

REPO = Path(__file__).resolve().parents[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    samples = write_synthetic_processed(tmp_path / "samples", n_identities=2, expressions=("neutral", "smile"),
                                        n_samples=1000, n_surface=200, n_dense=64)
    # Every dense vertex valid: masked means over each rank's shard then equal the global one.
    assert all(bool(d.dense_valid.all()) for d in ProcessedScans.load(samples)._data)

    cfg = TrainConfig.tiny()
    cfg.data.processed = str(samples)
    cfg.data.scans_per_batch = 4           # 2 scans per rank
    cfg.schedule.steps = 3
    cfg.schedule.stage2_start = 0.34       # steps 0-1 in stage one, step 2 in stage two (DDP rebuilt)
    # A checkpoint after every step: compare after the first step and after the stage change.
    cfg.schedule.checkpoint_every, cfg.schedule.keep_checkpoints, cfg.schedule.preview_every = 1, 3, -1
    cfg.threads, cfg.progress = 1, False

    cfg.output = str(tmp_path / "ddp")
    cfg_path = tmp_path / "ddp.json"
    cfg.save(cfg_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "training.train", "--config", str(cfg_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cfg.output = str(tmp_path / "single")
    train(cfg, log=lambda m: None)

    # After one step (the brief's check) within 1e-6; after the stage-two step, where Adam's ratio
    # m / sqrt(v) amplifies float-order noise for gradients that changed sign, within 1e-5.
    for step, atol in ((1, 1e-6), (3, 1e-5)):
        name = f"checkpoints/step_{step:08d}.safetensors"
        ddp, one = load_checkpoint(tmp_path / "ddp" / name), load_checkpoint(tmp_path / "single" / name)
        assert ddp.state["world_size"] == 2 and one.state["world_size"] == 1
        assert ddp.state["stage"] == one.state["stage"] == (1 if step == 1 else 2)
        for k, v in one.model_state.items():
            assert torch.allclose(ddp.model_state[k], v, rtol=0, atol=atol), (step, k)
        # Adam's moments are the averaged gradients themselves: a wrong reduction (sum vs mean) shows
        # here even where the first Adam step (about lr * sign(g)) would hide it.
        for pid, st in one.optimizer_state["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                a, b = ddp.optimizer_state["state"][pid][moment], st[moment]
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()) + 1e-20), (step, pid, moment)

    # Only rank 0 wrote the log; its losses are the global-batch means a single process computes.
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines("ddp"), lines("single"), strict=True):
        assert a["step"] == b["step"] and a["stage"] == b["stage"]
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)
