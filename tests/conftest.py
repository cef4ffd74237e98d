"""Shared fixtures: the embedded default scans (always available) and ../shared data (skipped if absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ICT_FACES = SHARED / "datasets" / "ict-faces"


@pytest.fixture(scope="session")
def ict_faces() -> Path:
    if not (ICT_FACES / "manifest.json").is_file():
        pytest.skip("../shared/datasets/ict-faces is not present")
    return ICT_FACES


@pytest.fixture(scope="session")
def default_scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small procedural scan folder: 2 people x 3 expressions."""
    from training.data.synthetic_faces import generate_scan_folder

    out = tmp_path_factory.mktemp("default_scans")
    return generate_scan_folder(out, n_identities=2, seed=3, expressions=["neutral", "mouth_open", "smile"])


def _small_preprocess_config():
    from backend.scans.samples import PreprocessConfig

    return PreprocessConfig(n_near=2_000, n_uniform=2_000, n_surface=1_000)


@pytest.fixture(scope="session")
def default_samples(default_scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default scans preprocessed with few samples per scan (the full pipeline otherwise)."""
    from training.data.preprocess import preprocess_folder

    out = tmp_path_factory.mktemp("default_samples")
    report = preprocess_folder(default_scans, out, _small_preprocess_config(), workers=2, progress=False)
    assert not report.failed, report.summary()
    return out


@pytest.fixture(scope="session")
def ict_samples(ict_faces: Path, tmp_path_factory: pytest.TempPathFactory):
    """All of ict-faces through the user's preprocessing path, with few samples per scan."""
    from training.data.preprocess import preprocess_folder

    out = tmp_path_factory.mktemp("ict_samples")
    report = preprocess_folder(ict_faces, out, _small_preprocess_config(), workers=2, progress=False)
    return out, report
