"""Scan-folder ingestion: the default generator's folders and ../shared/datasets/ict-faces go through
the same path a user's scans take."""
from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file

from backend.scans.samples import PreprocessConfig
from training.data.preprocess import preprocess_folder
from backend.scans.folder import load_scan_folder

TINY = PreprocessConfig(n_near=2_000, n_uniform=2_000, n_surface=1_000)


def test_default_folder_preprocesses_with_index_and_cache(default_scans, tmp_path):
    out = tmp_path / "samples"
    report = preprocess_folder(default_scans, out, TINY, workers=2, progress=False)
    assert not report.failed and len(report.processed) == 6
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "imface-samples/1" and index["shared_topology"] is True
    assert index["identities"] == sorted({s["identity"] for s in index["scans"]})
    first = load_file(str(out / index["scans"][0]["samples"]))
    assert first["points"].shape == (4_000, 3) and first["dense_points"].shape[0] == index["n_dense"]
    # Second run: everything is up to date and nothing is recomputed.
    again = preprocess_folder(default_scans, out, TINY, workers=2, progress=False)
    assert sorted(again.cached) == sorted(report.processed) and not again.processed
    # Changing a setting invalidates the cache.
    changed = preprocess_folder(default_scans, out, PreprocessConfig(n_near=1_000, n_uniform=1_000, n_surface=500),
                                workers=2, progress=False)
    assert len(changed.processed) == 6


def test_ict_faces_ingest_through_the_user_path(ict_faces, ict_samples):
    folder = load_scan_folder(ict_faces)
    assert len(folder.entries) == 192 and not folder.invalid and folder.shared_topology
    out, report = ict_samples
    assert not report.failed and len(report.processed) == 192, report.summary()
    index = json.loads((out / "index.json").read_text())
    assert len(index["identities"]) == 16 and len(index["expressions"]) == 12
    assert index["n_dense"] == 11248
    sample = load_file(str(out / "id00" / "neutral.safetensors"))
    # Outer eye corners are 85-105 mm apart on these people: units were read as millimetres.
    eye_mm = np.linalg.norm(sample["landmarks"][0] - sample["landmarks"][1]) * 100
    assert 80 < eye_mm < 110
