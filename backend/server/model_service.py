"""What the server asks of the model: loading, the shared template mesh, codes, decodes, extraction, fits.

This is the ONE module of `backend/server` that names the product's model-facing modules (a rename
re-points the import block below and nothing else). The server process and its worker processes
both use it; the request loop imports it (and torch) only once a model is used. Training is never
imported: it runs as a child process (`TRAIN_MODULE`, `CLI_MODULE`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# ---------------------------------------------------------------------------------- product imports
# (the layout of issue 8; /tmp/renames.md lists where each name came from)
from backend.animation_decode import TemplateMesh, TopologyDecoder, extract_template_mesh
from backend.codes import PARTS, CodesError, code_sizes, mean_codes, training_face_codes
from backend.editing import code_pca, sample_codes
from backend.fitting import (FitInputError, FitSchedule, check_landmark_units, extract_face_mesh,
                             target_from_point_cloud, target_from_scan)
from backend.fitting.pose import fit_posed
from backend.model import FaceCodes
from backend.model.io import CheckpointError, load_model, model_fingerprint, read_metadata
from backend.scans.folder import (UNIT_SCALES, LoadedScan, ManifestError, ScanEntry, ScanError,
                                  load_scan_folder)
from backend.scans.frame import MM_PER_UNIT
from backend.scans.inputs import InputError

# Child processes (run with `python -m ...`, never imported here):
TRAIN_MODULE = "training.train"        # python -m training.train --preset P --data SAMPLES --out RUN [--resume]
CLI_MODULE = "backend.cli"             # python -m backend.cli preprocess SCANS --out DIR / make-default --out DIR
# ---------------------------------------------------------------------------------------------------


class ModelUnusable(ValueError):
    """A model file that loads but cannot serve (its template has no surface: not trained enough)."""


MODEL_ERRORS = (CheckpointError, CodesError, FitInputError, ScanError, ManifestError, InputError, ModelUnusable)


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------ template


def build_template(model: Any, resolution: int) -> TemplateMesh:
    """The template mesh of the animation decode; a model with no template surface cannot serve."""
    try:
        return extract_template_mesh(model, resolution)
    except RuntimeError as exc:
        raise ModelUnusable(str(exc)) from None


def template_uvs(vertices: np.ndarray) -> np.ndarray:
    """Per-vertex UVs of the template: the orthographic projection along +z (the face's viewing axis)
    of the template-space position, u = (x + 1) / 2, v = (y + 1) / 2, clipped to [0, 1]. The template
    lies in the unit sphere, so this is fixed for every model (a texture painted in this square
    lines up on any model's template)."""
    v = np.asarray(vertices, dtype=np.float32)
    return np.clip((v[:, :2] + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)


def new_decoder(model: Any, template: TemplateMesh) -> TopologyDecoder:
    return TopologyDecoder(model, template)


def new_reference_decoder(model: Any, template: TemplateMesh) -> TopologyDecoder:
    """A decoder as the server makes them (tests compare against a fresh one: a cold decode)."""
    return new_decoder(model, template)


# ------------------------------------------------------------------------------------------ the model


@dataclass
class LoadedModel:
    path: Path
    model: Any
    checkpoint: Any
    fingerprint: str
    device: torch.device
    template: TemplateMesh | None = None
    uvs: np.ndarray | None = None
    template_resolution: int = 0
    seconds: float = 0.0
    _sizes: dict[str, int] = field(default_factory=dict)

    @property
    def sizes(self) -> dict[str, int]:
        if not self._sizes:
            self._sizes = {k: int(v) for k, v in code_sizes(self.model).items()}
        return self._sizes

    @property
    def scans(self) -> list[dict[str, Any]]:
        return list(self.checkpoint.dataset.get("scans", []))

    @property
    def identities(self) -> list[Any]:
        return list(self.checkpoint.dataset.get("identities", []))

    @property
    def name(self) -> str:
        return self.path.parent.name if self.path.name == "model.safetensors" else self.path.stem

    def info(self) -> dict[str, Any]:
        return {"id": self.fingerprint, "name": self.name, "path": str(self.path), "sizes": dict(self.sizes),
                "n_vertices": 0 if self.template is None else int(len(self.template.vertices)),
                "n_faces": 0 if self.template is None else int(len(self.template.faces)),
                "n_identities": len(self.identities), "n_scans": len(self.scans),
                "template_resolution": self.template_resolution}


def fingerprint(path: str | Path) -> str:
    """The model file's content hash (read from its header; raises CheckpointError for other files)."""
    read_metadata(path)
    return model_fingerprint(path)


def load(path: str | Path, *, device: str | torch.device = "auto", template_resolution: int | None = 160) -> LoadedModel:
    t0 = time.perf_counter()
    dev = pick_device(device) if isinstance(device, str) else device
    path = Path(path)
    model, ck = load_model(path, device=dev)
    for p in model.parameters():
        p.requires_grad_(False)
    lm = LoadedModel(path, model, ck, model_fingerprint(path), dev)
    if template_resolution:
        lm.template = build_template(model, template_resolution)
        lm.uvs = template_uvs(lm.template.vertices)
        lm.template_resolution = int(template_resolution)
    lm.seconds = time.perf_counter() - t0
    return lm


def scan_step(path: str | Path) -> int | None:
    """The step a training checkpoint was written at (None when unreadable)."""
    import json

    try:
        return int(json.loads(read_metadata(path).get("state", "{}")).get("step"))
    except (CheckpointError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ codes


def to_numpy_codes(codes: FaceCodes) -> dict[str, np.ndarray]:
    return {p: getattr(codes, p).detach().to("cpu", torch.float32).contiguous().numpy() for p in PARTS}


def to_face_codes(codes: dict[str, np.ndarray], device: torch.device) -> FaceCodes:
    return FaceCodes(*(torch.tensor(np.asarray(codes[p], dtype=np.float32), device=device) for p in PARTS))


def codes_mean(lm: LoadedModel) -> dict[str, np.ndarray]:
    return to_numpy_codes(mean_codes(lm.model))


def codes_scan(lm: LoadedModel, index: int) -> tuple[dict[str, np.ndarray], int]:
    row = lm.scans[index]
    ident = int(row["identity_index"])
    return to_numpy_codes(training_face_codes(lm.model, index, ident)), ident


def codes_pca(lm: LoadedModel, part: str, n_components: int | None) -> dict[str, np.ndarray]:
    pca = code_pca(lm.model, part, n_components)
    return {"mean": pca.mean.cpu().numpy().astype(np.float32),
            "components": pca.components.cpu().numpy().astype(np.float32),
            "std": pca.std.cpu().numpy().astype(np.float32),
            "explained": pca.explained.cpu().numpy().astype(np.float32)}


def codes_sample(lm: LoadedModel, n: int, seed: int, scale: float) -> dict[str, np.ndarray]:
    return to_numpy_codes(sample_codes(lm.model, n, seed=seed, scale=scale))


# ------------------------------------------------------------------------------------------ meshes


def decode(decoder: TopologyDecoder, codes: dict[str, np.ndarray], neutral: bool) -> tuple[np.ndarray, int]:
    """(vertices float32 (V, 3) mm in the model frame, unconverged vertex count); warm-starts `decoder`."""
    d = decoder.decode(to_face_codes(codes, decoder.device), neutral=neutral)
    return (d.vertices * MM_PER_UNIT).astype(np.float32), int(d.n_unconverged)


def extract(lm: LoadedModel, codes: dict[str, np.ndarray], resolution: int, neutral: bool) -> dict[str, np.ndarray]:
    v, f = extract_face_mesh(lm.model, to_face_codes(codes, lm.device), resolution, neutral=neutral)
    return {"vertices": np.asarray(v, dtype=np.float32), "faces": np.asarray(f, dtype=np.int32)}


# ------------------------------------------------------------------------------------------ fitting


class Cancelled(Exception):
    pass


def fit_schedule(kind: str, steps: int | None) -> Any:
    if kind == "plain":
        return FitSchedule.plain(steps=steps or 1500)
    s = FitSchedule.fast()
    return FitSchedule.scaled(s, steps / s.total_steps) if steps else s


def run_fit(lm: LoadedModel, vertices: np.ndarray, faces: np.ndarray | None, landmarks: np.ndarray, *,
            name: str = "scan", units: str = "mm", neutral: bool = False, partial: bool = False,
            camera: np.ndarray | None = None, view_direction: np.ndarray | None = None,
            schedule: str = "fast", steps: int | None = None, resolution: int = 128, seed: int = 0,
            noise_mm: float = 0.5, registered: bool = True, pose: bool = True,
            progress: Callable[[int, int, dict[str, float]], Any] | None = None,
            cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Fit codes to a mesh or point cloud (the `imface fit` single-file path), then the fitted mesh
    (marching cubes) and the registered mesh (template topology), both in mm in the model frame.

    landmarks: (5, 3) in the input's units. Raises FitInputError/ScanError for unusable input and
    Cancelled when `cancel()` turned true."""
    model = lm.model
    scale = UNIT_SCALES[units]
    lmk = np.asarray(landmarks, dtype=np.float64)
    is_partial = partial or faces is None or camera is not None or view_direction is not None
    if is_partial:
        target = target_from_point_cloud(vertices, lmk, camera=camera, view_direction=view_direction,
                                         units_to_mm=scale, noise_mm=noise_mm, seed=seed, name=name)
    else:
        check_landmark_units(lmk * scale, name)
        entry = ScanEntry(key=name, path=Path(name), identity=name, expression="fit", neutral=False,
                          landmarks_mm=lmk, landmark_indices=None)
        scan = LoadedScan(entry, np.asarray(vertices, np.float64) * scale, np.asarray(faces, np.int64),
                          lmk * scale, [])
        target = target_from_scan(scan, seed=seed)
        target.normalized_from_scan = target.normalized_from_scan @ np.diag([scale] * 3 + [1.0])
        target.units_to_mm = scale
    # The rigid pose refined with the codes, as `imface fit` does (landmarks clicked a few mm off cost ~1 mm).
    result = fit_posed(model, target, fit_schedule(schedule, steps), seed=seed, progress=progress, cancel=cancel,
                       neutral=neutral, pose=pose)
    if result.report.cancelled:
        raise Cancelled()
    target = result.target  # the pose-refined one: its frame places the fitted face on the scan
    codes = to_numpy_codes(result.codes)
    out: dict[str, Any] = {"codes": codes, "normalized_from_scan": np.asarray(target.normalized_from_scan, np.float64),
                           "neutral": bool(result.neutral), "warnings": list(target.warnings)}
    if cancel is not None and cancel():
        raise Cancelled()
    out["fitted"] = extract(lm, codes, resolution, result.neutral)
    rep = result.report
    metrics: dict[str, Any] = {"steps": rep.steps, "evaluations": rep.evaluations, "seconds": rep.seconds,
                               "loss": float(rep.losses[-1]["total"]) if rep.losses else float("nan")}
    if registered and lm.template is not None:
        if cancel is not None and cancel():
            raise Cancelled()
        dec = new_decoder(model, lm.template)
        v, unconverged = decode(dec, codes, result.neutral)
        out["registered"] = {"vertices": v}
        metrics["registered_unconverged"] = unconverged
    out["metrics"] = metrics
    return out


def check_scan_folder(root: Path) -> list[Path]:
    """The mesh files a scan folder's manifest names (ManifestError when it cannot be read)."""
    folder = load_scan_folder(root)
    return [e.path for e in folder.entries]
