"""A single mesh or point cloud given to fit (not a scan folder): what it is, and whether it can be used.

Mesh or point cloud (by suffix, and a PLY without faces is a cloud), empty or NaN input, the five
landmarks (a JSON file of coordinates or vertex indices), and the units: a mesh whose landmarks say
it is in other units than declared is refused with the detected units (`LoadedScan.unit_guess`), so
the caller can say which `units` to pass. The command line and the server share these checks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .folder import UNIT_SCALES, LoadedScan, ScanEntry, load_scan
from .mesh_io import CLOUD_SUFFIXES, MESH_SUFFIXES, ScanReadError, read_geometry_file
from .landmarks import LANDMARK_NAMES



class InputError(ValueError):
    """A mesh, point cloud or landmarks file that cannot be fitted, said in one line."""


@dataclass
class FitInput:
    """A checked single-file input, in its own frame and units."""

    path: Path
    name: str
    vertices: np.ndarray        # (N, 3) float64, finite, N > 0
    faces: np.ndarray | None    # (T, 3) int64; None for a point cloud
    landmarks: np.ndarray       # (5, 3) float64, LANDMARK_NAMES order, the input's units
    units: str                  # "mm" | "cm" | "m" as declared

    @property
    def units_to_mm(self) -> float:
        return UNIT_SCALES[self.units]

    def load_mesh(self) -> LoadedScan:
        """The mesh as a scan in mm; InputError when its landmarks say it is in other units."""
        entry = ScanEntry(key=self.name, path=self.path.resolve(), identity=self.name, expression="fit",
                          neutral=False, landmarks_mm=self.landmarks, landmark_indices=None)
        scan = load_scan(entry, self.units)
        if scan.unit_guess is not None:
            raise InputError(f"{self.path}: {scan.unit_guess.describe()}; pass --units with the scan's units "
                             "(mm, cm or m)")
        return scan


def read_fit_input(path: str | Path, units: str = "mm", landmarks: str | Path | None = None) -> FitInput:
    """Read and check a mesh or point-cloud file and its landmarks file."""
    src = Path(path)
    suffix = src.suffix.lower()
    if suffix not in MESH_SUFFIXES | CLOUD_SUFFIXES:
        raise InputError(f"{src}: unsupported file type '{src.suffix}' "
                         f"(meshes: {', '.join(sorted(MESH_SUFFIXES))}; point clouds: "
                         f"{', '.join(sorted(CLOUD_SUFFIXES))} or a PLY without faces)")
    if units not in UNIT_SCALES:
        raise InputError(f"units {units!r} not one of {sorted(UNIT_SCALES)}")
    vertices, faces = read_points(src)
    if len(vertices) == 0:
        raise InputError(f"{src}: the point cloud is empty")
    bad = ~np.isfinite(vertices).all(1)
    if bad.any():
        raise InputError(f"{src}: {int(bad.sum())} of {len(vertices)} points have NaN or infinite coordinates")
    lm = read_landmarks(landmarks, vertices)
    return FitInput(src, src.stem, vertices, faces, lm, units)


def read_landmarks(path: str | Path | None, vertices: np.ndarray | None) -> np.ndarray:
    """(5, 3) landmarks from a JSON file: {name: [x, y, z]} or {name: vertex index}, or those mappings
    under "landmarks_mm" / "landmark_vertex_indices" (the scan-folder manifest's keys)."""
    if path is None:
        raise InputError("a single mesh or point cloud needs its five landmarks: --landmarks FILE.json "
                         f"with {', '.join(LANDMARK_NAMES)} (see docs/using-the-model.md)")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"landmarks file {p} does not exist")
    data = json.loads(p.read_text())
    if isinstance(data, dict) and "landmarks_mm" in data:
        data = data["landmarks_mm"]
    elif isinstance(data, dict) and "landmark_vertex_indices" in data:
        data = data["landmark_vertex_indices"]
    if not isinstance(data, dict) or any(n not in data for n in LANDMARK_NAMES):
        raise InputError(f"{p}: expected an object with the five landmarks {', '.join(LANDMARK_NAMES)}")
    vals = [data[n] for n in LANDMARK_NAMES]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        if vertices is None:
            raise InputError(f"{p}: landmark vertex indices need a mesh with vertices")
        idx = np.asarray(vals, dtype=np.int64)
        if idx.min() < 0 or idx.max() >= len(vertices):
            raise InputError(f"{p}: landmark vertex index out of range (the input has {len(vertices)} vertices)")
        return np.asarray(vertices, dtype=np.float64)[idx]
    try:
        lm = np.asarray(vals, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{p}: landmarks must be [x, y, z] coordinates or vertex indices") from None
    if lm.shape != (5, 3) or not np.isfinite(lm).all():
        raise InputError(f"{p}: landmarks must be five finite [x, y, z] coordinates")
    return lm


def read_points(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(vertices, faces or None) of a mesh or point-cloud file, read as geometry only (mesh_io)."""
    try:
        return read_geometry_file(path)
    except ScanReadError as exc:
        raise InputError(str(exc)) from None
