"""A tiny preprocessed folder with analytic SDF samples, for tests and smoke runs of the trainer.

Each "face" is a sphere cap whose front touches the nose-tip position (0, 0, 0.4) of the normalised
frame; identities differ by radius, expressions by a small radius change and a vertical shift. The SDF,
its gradient, surface points, normals, landmarks and dense vertices (shared topology: the same sphere
directions for every scan) are exact, so no mesh processing is needed. The files follow
docs/samples-format.md, written with safetensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from backend.scans.landmarks import LANDMARK_NAMES
from backend.scans.samples import SAMPLES_FORMAT

# Landmark directions on the sphere (roughly where eye and mouth corners sit as seen from the centre).
_LANDMARK_DIRS = np.array([[-0.55, 0.45, 0.70], [0.55, 0.45, 0.70], [0.0, 0.0, 1.0],
                           [-0.35, -0.45, 0.82], [0.35, -0.45, 0.82]])
_LANDMARK_DIRS /= np.linalg.norm(_LANDMARK_DIRS, axis=1, keepdims=True)


def _front_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit vectors in the front cap (z > 0.3)."""
    out = []
    while sum(len(o) for o in out) < n:
        v = rng.standard_normal((2 * n, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out.append(v[v[:, 2] > 0.3])
    return np.concatenate(out)[:n]


def _in_unit_sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * rng.random((n, 1)) ** (1.0 / 3.0)


def write_synthetic_processed(folder: str | Path, n_identities: int = 3,
                              expressions: tuple[str, ...] = ("neutral", "smile"),
                              n_samples: int = 4000, n_surface: int = 1000, n_dense: int = 256,
                              shared_topology: bool = True, seed: int = 0,
                              skip_neutral_for: tuple[int, ...] = ()) -> Path:
    """Write index.json + one safetensors file per scan; returns the folder.

    `skip_neutral_for`: identity numbers that get no neutral scan (to exercise the mean fallback).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dense_dirs = _front_directions(np.random.default_rng(seed + 1), n_dense)
    identities = [f"id{i:02d}" for i in range(n_identities)]
    n_near = n_samples // 2
    scans = []
    for i, ident in enumerate(identities):
        radius = 0.45 + 0.25 * i / max(1, n_identities - 1)
        for j, expr in enumerate(expressions):
            neutral = expr == "neutral"
            if neutral and i in skip_neutral_for:
                continue
            r = radius * (1.0 + 0.08 * j)
            centre = np.array([0.0, 0.04 * j, 0.4 - r])
            near_base = centre + r * _front_directions(rng, n_near)
            near = near_base + rng.normal(0.0, 0.1, (n_near, 3))
            points = np.concatenate([near, _in_unit_sphere(rng, n_samples - n_near)])
            rel = points - centre
            dist = np.linalg.norm(rel, axis=1)
            surf_dirs = _front_directions(rng, n_surface)
            tensors = {
                "points": points.astype(np.float32),
                "sdf": (dist - r).astype(np.float32),
                "gradients": (rel / np.maximum(dist, 1e-9)[:, None]).astype(np.float32),
                "surface_points": (centre + r * surf_dirs).astype(np.float32),
                "surface_normals": surf_dirs.astype(np.float32),
                "landmarks": (centre + r * _LANDMARK_DIRS).astype(np.float32),
                "normalized_from_scan": np.eye(4),
            }
            if shared_topology:
                dense = centre + r * dense_dirs
                tensors["dense_points"] = dense.astype(np.float32)
                tensors["dense_valid"] = (np.linalg.norm(dense, axis=1) <= 1.0).astype(np.uint8)
            key = f"{ident}/{expr}"
            (folder / ident).mkdir(exist_ok=True)
            save_file(tensors, str(folder / f"{key}.safetensors"))
            scans.append({"key": key, "identity": ident, "identity_index": i, "expression": expr,
                          "expression_index": j, "neutral": neutral, "samples": f"{key}.safetensors",
                          "source": "synthetic", "warnings": []})
    index = {"format": SAMPLES_FORMAT, "n_samples": n_samples, "n_near": n_near,
             "landmark_names": list(LANDMARK_NAMES), "shared_topology": shared_topology,
             "n_dense": n_dense if shared_topology else None, "identities": identities,
             "expressions": list(expressions), "scans": scans, "failed": []}
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / "index.json")
    return folder
