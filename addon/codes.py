"""Face codes on the Blender side (bpy-free, numpy only).

A face object stores its *base* codes (identity, expression, detail: exact, e.g. from a fit) and a
handful of keyframable *coefficients* per part along the model's principal components:

    codes(t) = base + sum_k coefficient_k(t) * std_k * component_k

Coefficients are in standard deviations of the training codes along each component (the convention of
`backend.editing.CodePCA.code`), so every slider has the same range (+-3 by default) and 1.0 means "one
typical step" whatever the model. The components come from the backend's `codes` request (kind "pca"),
cached per model fingerprint (`PCACache`).

The base codes live on the object as a JSON string in the `imface-codes/1` format of `imface fit`
(`backend/editing.py`), so a codes file and a face object are interchangeable.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PARTS = ("identity", "expression", "detail")
CODES_FORMAT = "imface-codes/1"
# Slider counts per part (the FloatVectorProperty sizes): a handful of F-curves per face.
N_COEFFS = {"identity": 8, "expression": 10, "detail": 4}
SLIDER_RANGE = 3.0


class CodesError(ValueError):
    pass


@dataclass
class PartPCA:
    mean: np.ndarray        # (C,) float32
    components: np.ndarray  # (K, C) float32, orthonormal rows by decreasing variance
    std: np.ndarray         # (K,) float32
    explained: np.ndarray   # (K,) float32 share of the variance

    @property
    def scaled(self) -> np.ndarray:
        """(K, C): std_k * component_k, the code change of coefficient k = 1."""
        return self.std[:, None] * self.components


@dataclass
class ModelPCA:
    fingerprint: str
    parts: dict[str, PartPCA]
    sizes: dict[str, int] = field(default_factory=dict)

    def n_components(self, part: str) -> int:
        return min(self.parts[part].components.shape[0], N_COEFFS[part])

    def compose(self, base: Mapping[str, np.ndarray], coeffs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """base + sum_k c_k std_k component_k, per part, as (C,) float32 arrays (float64 inside)."""
        out = {}
        for part in PARTS:
            b = np.asarray(base[part], dtype=np.float64).reshape(-1)
            p = self.parts[part]
            k = self.n_components(part)
            c = np.asarray(coeffs.get(part, ()), dtype=np.float64).reshape(-1)[:k]
            if c.size:
                b = b + c @ p.scaled[: c.size].astype(np.float64)
            out[part] = b.astype(np.float32)
        return out

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "sizes": self.sizes,
                "parts": {part: {k: getattr(p, k).tolist() for k in ("mean", "components", "std", "explained")}
                          for part, p in self.parts.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ModelPCA":
        parts = {part: PartPCA(*(np.asarray(p[k], dtype=np.float32)
                                 for k in ("mean", "components", "std", "explained")))
                 for part, p in d["parts"].items()}
        for part, p in parts.items():
            p.components = p.components.reshape(-1, p.mean.shape[0])
        return cls(str(d["fingerprint"]), parts, dict(d.get("sizes", {})))


def pca_from_reply(fingerprint: str, body: Mapping[str, Any]) -> ModelPCA:
    """The backend's `codes` reply for kind "pca": per part {mean, components, std, explained} (arrays),
    either at the top level or under "pca"."""
    src = body.get("pca", body)
    parts = {}
    for part in PARTS:
        p = src[part]
        mean = np.asarray(p["mean"], dtype=np.float32).reshape(-1)
        comps = np.asarray(p["components"], dtype=np.float32).reshape(-1, mean.shape[0])
        std = np.asarray(p["std"], dtype=np.float32).reshape(-1)
        explained = np.asarray(p.get("explained", np.zeros_like(std)), dtype=np.float32).reshape(-1)
        parts[part] = PartPCA(mean, comps, std, explained)
    return ModelPCA(fingerprint, parts, {k: int(v.mean.shape[0]) for k, v in parts.items()})


class PCACache:
    """Components per model fingerprint: in memory, and as JSON in a folder (the extension's user
    folder) so that a reopened .blend does not wait for them."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self._mem: dict[str, ModelPCA] = {}

    def _path(self, fingerprint: str) -> Path | None:
        if self.folder is None:
            return None
        safe = hashlib.sha256(fingerprint.encode()).hexdigest()[:32]
        return self.folder / f"pca-{safe}.json"

    def get(self, fingerprint: str) -> ModelPCA | None:
        if fingerprint in self._mem:
            return self._mem[fingerprint]
        path = self._path(fingerprint)
        if path is not None and path.is_file():
            try:
                pca = ModelPCA.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError):
                return None
            if pca.fingerprint == fingerprint:
                self._mem[fingerprint] = pca
                return pca
        return None

    def put(self, pca: ModelPCA) -> None:
        self._mem[pca.fingerprint] = pca
        path = self._path(pca.fingerprint)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(pca.to_json()))
            tmp.replace(path)


# ------------------------------------------------------------------------------------------ stored codes


def codes_to_json(codes: Mapping[str, Any], *, model: str = "", neutral: bool = False,
                  normalized_from_scan: Any = None, source: str = "") -> str:
    """The `imface-codes/1` JSON text stored on a face object (float32 values written exactly)."""
    d: dict[str, Any] = {"format": CODES_FORMAT}
    for part in PARTS:
        arr = np.asarray(codes[part], dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(arr)):
            raise CodesError(f"the {part} code has non-finite values")
        d[part] = [float(x) for x in arr]
    d["model"] = model
    d["neutral"] = bool(neutral)
    if normalized_from_scan is not None:
        d["normalized_from_scan"] = np.asarray(normalized_from_scan, dtype=np.float64).reshape(4, 4).tolist()
    if source:
        d["source"] = source
    return json.dumps(d)


def codes_from_json(text: str, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Parse stored codes: {"identity", "expression", "detail": float32 arrays, "model", "neutral",
    "normalized_from_scan" (4x4 or None), "source"}; sizes checked when given."""
    try:
        d = json.loads(text)
    except ValueError as e:
        raise CodesError(f"stored codes are not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != CODES_FORMAT:
        raise CodesError(f"stored codes are not in the {CODES_FORMAT} format")
    out: dict[str, Any] = {}
    for part in PARTS:
        if part not in d:
            raise CodesError(f"the stored codes have no {part} code")
        arr = np.asarray(d[part], dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(arr)):
            raise CodesError(f"the {part} code has non-finite values")
        if sizes and part in sizes and arr.size != sizes[part]:
            raise CodesError(f"the {part} code has {arr.size} values, this model expects {sizes[part]}")
        out[part] = arr
    out["model"] = str(d.get("model", ""))
    out["neutral"] = bool(d.get("neutral", False))
    nfs = d.get("normalized_from_scan")
    out["normalized_from_scan"] = None if nfs is None else np.asarray(nfs, dtype=np.float64).reshape(4, 4)
    out["source"] = str(d.get("source", ""))
    return out


def codes_digest(codes: Mapping[str, np.ndarray], neutral: bool) -> str:
    """A key for "this exact face": the float32 bytes of the three codes and the neutral flag."""
    h = hashlib.blake2b(digest_size=16)
    for part in PARTS:
        h.update(np.ascontiguousarray(codes[part], dtype=np.float32).tobytes())
    h.update(b"N" if neutral else b"E")
    return h.hexdigest()
