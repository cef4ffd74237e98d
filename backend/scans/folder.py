"""Reading a user's scan folder: `manifest.json` plus meshes (OBJ, PLY, STL, OFF; read by `mesh_io`).

Schema (docs/scan-folder.md): per scan its path, identity, expression, neutral flag, optional `unseen`
flag (an expression left out of training, reported apart by the evaluation) and the five landmarks, either as millimetre coordinates (`landmarks_mm`) or as vertex indices
(`landmark_vertex_indices`, per scan or once for the folder). Every check here turns a bad input into
a `ScanError` that names the scan and the problem, so a batch can list it and go on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend.config_loader import read_json_file

from .landmarks import LANDMARK_NAMES
from .mesh_io import MESH_SUFFIXES, ScanLimits, ScanReadError, read_geometry_file

DEFAULT_MAX_TRIANGLES = 2_000_000
# Outer eye corners are 85-105 mm apart on adults; this wider band still flags unit mistakes.
EYE_DISTANCE_MM = (55.0, 150.0)
UNIT_SCALES = {"m": 1000.0, "cm": 10.0, "mm": 1.0}


class ManifestError(ValueError):
    """The manifest as a whole cannot be read: nothing in the folder can be processed."""


class ScanError(ValueError):
    """One scan cannot be used; `scan` names it and `reason` says why."""

    def __init__(self, scan: str, reason: str) -> None:
        super().__init__(f"{scan}: {reason}")
        self.scan = scan
        self.reason = reason


@dataclass
class ScanEntry:
    key: str                         # "<identity>/<expression>", unique in the folder
    path: Path
    identity: str
    expression: str
    neutral: bool
    landmarks_mm: np.ndarray | None  # (5, 3) in the manifest's units, or None when given as indices
    landmark_indices: np.ndarray | None
    unseen: bool = False             # an expression the model was not trained on (evaluation reports it apart)


@dataclass
class ScanFolder:
    root: Path
    entries: list[ScanEntry]
    shared_topology: bool
    units: str
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (scan, reason) for unusable entries


@dataclass
class UnitGuess:
    """A scan whose landmarks say it is in other units than declared, and the factor applied."""

    scale: float          # millimetres per unit of the file, as detected
    eye_distance: float   # outer eye corners apart, in the declared units scaled to mm

    def describe(self) -> str:
        return (f"the scan looks like it is in {_unit_name(self.scale)} (outer eye corners "
                f"{self.eye_distance:.4g} apart)")


@dataclass
class LoadedScan:
    """A scan ready for preprocessing: vertices in millimetres, landmarks in millimetres."""

    entry: ScanEntry
    vertices: np.ndarray  # (V, 3) float64 mm
    faces: np.ndarray     # (T, 3) int64
    landmarks: np.ndarray  # (5, 3) float64 mm
    warnings: list[str]
    unit_guess: UnitGuess | None = None  # set when the scan was rescaled from its detected units


def _landmark_array(scan: str, value: Any, what: str) -> np.ndarray:
    if not isinstance(value, dict):
        raise ScanError(scan, f"'{what}' must be an object mapping the landmark names to values")
    missing = [n for n in LANDMARK_NAMES if n not in value]
    if missing:
        raise ScanError(scan, f"missing landmark(s) {', '.join(missing)} in '{what}'")
    try:
        return np.array([value[n] for n in LANDMARK_NAMES], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ScanError(scan, f"'{what}' holds a value that is not a number: {exc}") from None


def load_scan_folder(root: str | Path) -> ScanFolder:
    """Parse and check `root/manifest.json`. Entries that are malformed are collected in `invalid`
    instead of stopping the folder; a manifest that cannot be read at all raises ManifestError."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    manifest = read_json_file(manifest_path, ManifestError,
                              f"{root}: no manifest.json (see docs/scan-folder.md for the format)")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("scans"), list):
        raise ManifestError(f"{manifest_path}: expected an object with a 'scans' list")
    units = manifest.get("units", "mm")
    if units not in UNIT_SCALES:
        raise ManifestError(f"{manifest_path}: units '{units}' not one of {sorted(UNIT_SCALES)}")
    shared_topology = bool(manifest.get("shared_topology", False))
    folder_indices = manifest.get("landmark_vertex_indices")

    entries: list[ScanEntry] = []
    invalid: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(manifest["scans"]):
        name = raw.get("path", f"scans[{number}]") if isinstance(raw, dict) else f"scans[{number}]"
        try:
            entries.append(_parse_entry(root, raw, name, folder_indices, seen))
        except ScanError as exc:
            invalid.append((exc.scan, exc.reason))
    return ScanFolder(root, entries, shared_topology, units, invalid)


def _parse_entry(root: Path, raw: Any, name: str, folder_indices: Any, seen: set[str]) -> ScanEntry:
    if not isinstance(raw, dict):
        raise ScanError(name, "scan entry is not an object")
    for key in ("path", "identity", "expression"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ScanError(name, f"missing or empty '{key}'")
    path = (root / raw["path"]).resolve()
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise ScanError(name, f"unsupported mesh type '{path.suffix}' (use {', '.join(sorted(MESH_SUFFIXES))})")
    key = f"{raw['identity']}/{raw['expression']}"
    if key in seen:
        raise ScanError(name, f"duplicate identity/expression pair '{key}'")
    seen.add(key)
    neutral = raw.get("neutral", raw["expression"] == "neutral")
    if not isinstance(neutral, bool):
        raise ScanError(name, "'neutral' must be true or false")
    unseen = raw.get("unseen", False)
    if not isinstance(unseen, bool):
        raise ScanError(name, "'unseen' must be true or false")
    landmarks = indices = None
    if "landmarks_mm" in raw:
        landmarks = _landmark_array(name, raw["landmarks_mm"], "landmarks_mm")
    else:
        source = raw.get("landmark_vertex_indices", folder_indices)
        if source is None:
            raise ScanError(name, "no landmarks: give 'landmarks_mm' or 'landmark_vertex_indices'")
        values = _landmark_array(name, source, "landmark_vertex_indices")
        if np.any(values != np.round(values)) or np.any(values < 0):
            raise ScanError(name, "landmark vertex indices must be non-negative integers")
        indices = values.astype(np.int64)
    return ScanEntry(key, path, raw["identity"], raw["expression"], neutral, landmarks, indices, unseen)


def load_scan(entry: ScanEntry, units: str = "mm", max_triangles: int = DEFAULT_MAX_TRIANGLES) -> LoadedScan:
    """Read one scan's mesh and landmarks, in millimetres, and check them. Raises ScanError."""
    scan = entry.key
    if not entry.path.is_file():
        raise ScanError(scan, f"mesh file not found: {entry.path}")
    try:
        # Geometry only, in the file's vertex order; counts checked from the header before reading.
        vertices, faces = read_geometry_file(entry.path, ScanLimits(max_faces=max_triangles))
    except (ScanReadError, OSError) as exc:
        raise ScanError(scan, f"cannot read mesh {entry.path.name}: {exc}") from None
    if faces is None:  # (mesh_io has checked coordinates, indices and counts)
        raise ScanError(scan, "empty mesh: no triangles")

    notes: list[str] = []
    unit_guess = None
    if entry.landmark_indices is not None:
        if entry.landmark_indices.max() >= len(vertices):
            raise ScanError(scan, f"landmark vertex index {int(entry.landmark_indices.max())} is out of range "
                                  f"(mesh has {len(vertices)} vertices)")
        landmarks = vertices[entry.landmark_indices].copy()
    else:
        assert entry.landmarks_mm is not None
        landmarks = entry.landmarks_mm.copy()
        if not np.isfinite(landmarks).all():
            raise ScanError(scan, "landmarks contain NaN or infinite values")

    scale = UNIT_SCALES[units]
    eye_distance = float(np.linalg.norm(landmarks[0] - landmarks[1])) * scale
    if not EYE_DISTANCE_MM[0] <= eye_distance <= EYE_DISTANCE_MM[1]:
        guessed = _guess_unit_scale(eye_distance)
        if guessed is None:
            raise ScanError(scan, f"outer eye corners are {eye_distance:.4g} {'mm' if scale == 1 else 'mm after unit scaling'} "
                                  f"apart, expected {EYE_DISTANCE_MM[0]:.0f}-{EYE_DISTANCE_MM[1]:.0f} mm: "
                                  "wrong landmarks or wrong units")
        scale *= guessed
        unit_guess = UnitGuess(scale, eye_distance)
        notes.append(f"{unit_guess.describe()}; scaled by {scale:g} to millimetres")
    vertices = vertices * scale
    landmarks = landmarks * scale
    return LoadedScan(entry, vertices, faces, landmarks, notes, unit_guess)


def _guess_unit_scale(eye_distance: float) -> float | None:
    for factor in (1000.0, 10.0, 0.1):
        if EYE_DISTANCE_MM[0] <= eye_distance * factor <= EYE_DISTANCE_MM[1]:
            return factor
    return None


def _unit_name(scale: float) -> str:
    return {1000.0: "metres", 10.0: "centimetres", 0.1: "tenths of a millimetre"}.get(scale, f"units x{scale:g}")
