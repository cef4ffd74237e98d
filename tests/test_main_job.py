"""The main job end to end through the real command line: default scans → samples → training → previews."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_main_job_small(tmp_path):
    out = tmp_path / "run"
    proc = _run("main", "--out", str(out), "--identities", "2", "--samples", "4000", "--steps", "4",
                "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "scans" / "manifest.json").is_file()
    index = json.loads((out / "samples" / "index.json").read_text())
    assert len(index["scans"]) == 2 * 11 and not index["failed"]
    assert (out / "preview.png").stat().st_size > 10_000
    assert (out / "train" / "model.safetensors").is_file()
    assert (out / "train" / "loss_curve.png").is_file()
    assert (out / "train" / "config.json").is_file()
    assert "[4/4]" in proc.stdout
    # Running it again reuses everything: scans are rewritten identically, samples come from the cache,
    # and the finished training run is not started over.
    again = _run("main", "--out", str(out), "--identities", "2", "--samples", "4000", "--steps", "4",
                 "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 scans preprocessed, 22 up to date" in again.stdout
