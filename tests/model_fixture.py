"""One small trained ImFace++ model for the tests of fitting, correspondence, editing and the commands
(and for the benchmarks when no model is given): procedural default scans, 2 people x 3 expressions,
preprocessed with few samples, trained for a short two-stage run on the CPU.

Small, not trivial: the codes must mean something for a fit to be compared with the trained codes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

EXPRESSIONS = ("neutral", "mouth_open", "smile")


@dataclass
class TinyModel:
    path: Path          # model.safetensors
    scans: Path         # the scan folder it was trained on (shared topology)
    samples: Path       # its preprocessed samples
    seconds: float      # time to make it


def train_tiny_model(workdir: str | Path, steps: int = 160, seed: int = 3, threads: int | None = None,
                     n_identities: int = 2, expressions: tuple[str, ...] = EXPRESSIONS) -> TinyModel:
    """Scans -> samples -> a trained model in `workdir` (about a minute on two CPU cores)."""
    from backend.model import ModelConfig
    from training.config import DataConfig, OptimConfig, ScheduleConfig, TrainConfig
    from backend.scans.samples import PreprocessConfig
    from training.data.preprocess import preprocess_folder
    from training.data.synthetic_faces import generate_scan_folder
    from training.train import train

    t0 = time.perf_counter()
    workdir = Path(workdir)
    scans = generate_scan_folder(workdir / "scans", n_identities=n_identities, seed=seed,
                                 expressions=list(expressions))
    samples = workdir / "samples"
    preprocess_folder(scans, samples, PreprocessConfig(n_near=8000, n_uniform=4000, n_surface=4000),
                      workers=1, progress=False)
    cfg = TrainConfig.cpu()
    # Narrower than the cpu preset (same architecture): a few hundred steps must give usable codes.
    cfg.model = ModelConfig(id_dim=40, exp_dim=40, detail_dim=40, pe_freqs=3, mini_hidden=24, mini_layers=2,
                            detail_hidden=24, detail_layers=2, hyper_hidden=16, fusion_width=32,
                            fusion_layers=2, landmark_width=64, landmark_layers=2, dense_per_batch=256)
    cfg.data = DataConfig(processed=str(samples), points_per_scan=768, near_fraction=0.75, surface_points=192,
                          scans_per_batch=2, dense_points=None, workers=0)
    cfg.optim = OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=10, min_lr_factor=0.1)
    cfg.schedule = ScheduleConfig(steps=steps, epochs=None, stage2_start=0.8, log_every=10, checkpoint_every=0,
                                  keep_checkpoints=0, preview_every=-1, curve_every=0)
    cfg.output = str(workdir / "run")
    cfg.progress = False
    cfg.threads = threads
    cfg.seed = seed
    result = train(cfg, overwrite=True, log=lambda m: None)
    if result.model_path is None:
        raise RuntimeError(f"training the test model did not finish ({result.reason})")
    return TinyModel(result.model_path, scans, samples, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ fixtures
# Imported by the test modules that need a trained model (pytest collects fixtures from imports). The
# cache makes the training happen once per session even when several modules import the fixture.
import pytest  # noqa: E402

_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    if "model" not in _CACHE:
        _CACHE["model"] = train_tiny_model(tmp_path_factory.mktemp("tiny_model"), threads=1)
    return _CACHE["model"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def loaded_model(tiny_model: TinyModel):
    """(model, checkpoint) of the tiny model, loaded once."""
    if "loaded" not in _CACHE:
        from backend.model.io import load_model

        _CACHE["loaded"] = load_model(tiny_model.path)
    return _CACHE["loaded"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in these tests: the small tensors here gain nothing from a second thread, and on a
    shared machine two threads fighting another process for the cores cost up to 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_codes(model, ck, key: str):
    """The trained codes of training scan `key`, and whether it was trained with the expression warp off
    (and so must be reconstructed that way)."""
    from backend.codes import training_face_codes
    from backend.fitting.loop import training_warp_off

    i = [row["key"] for row in ck.dataset["scans"]].index(key)
    row = ck.dataset["scans"][i]
    return training_face_codes(model, i, row["identity_index"]), training_warp_off(bool(row["neutral"]))


def model_for_benchmark(model: str | None, threads: int | None, tag: str):
    """(model path, its training scan folder or None, temporary folder to clean up or None): the given
    model, or a small one trained now when none is given."""
    import tempfile

    if model is not None:
        return model, None, None
    tmp = tempfile.TemporaryDirectory(prefix=f"bench_{tag}_")
    print("training a small model (no --model given) ...", flush=True)
    tiny = train_tiny_model(tmp.name, threads=threads)
    print(f"  done in {tiny.seconds:.0f} s: {tiny.path}")
    return str(tiny.path), str(tiny.scans), tmp
