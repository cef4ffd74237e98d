"""Training batches from a preprocessed folder (docs/samples-format.md).

`ProcessedScans` reads index.json and every scan's safetensors file (no pickle) into memory as float32
tensors and precomputes what the losses need besides each scan: per identity the neutral landmarks (and
neutral dense vertices), and the template landmarks / template dense vertices the model starts from.

`ProcessedScans.batch(step, rank, world_size)` builds the batch dict `ImFacePlusPlus.forward` takes.
Everything random in it is a pure function of (seed, step, slot): the epoch's scan order comes from
(seed, epoch), each slot's point draws from (seed, step, slot in the global batch), the dense vertex
subset from (seed, step). So resuming at step k reproduces the batch exactly, and the union of the ranks'
shards under DDP is the single-process batch of the same step (rank r takes slots [r*B/W, (r+1)*B/W)).
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from backend.scans.samples import SAMPLES_FORMAT


class DatasetError(ValueError):
    """A preprocessed folder that cannot be trained on, with the reason in words."""


@dataclass
class ScanMeta:
    key: str
    identity: str
    identity_index: int
    expression: str
    neutral: bool


@dataclass
class _Scan:
    points: torch.Tensor            # (N, 3): first n_near near the surface, then uniform
    sdf: torch.Tensor               # (N,)
    gradients: torch.Tensor         # (N, 3)
    n_near: int
    surface_points: torch.Tensor    # (S, 3)
    surface_normals: torch.Tensor   # (S, 3)
    landmarks: torch.Tensor         # (5, 3)
    dense_points: torch.Tensor | None = None  # (V, 3)
    dense_valid: torch.Tensor | None = None   # (V,) bool
    # Indices of the near-surface samples / surface points lying where this scan moves away from the
    # person's neutral (`ProcessedScans.mark_moving`); None until marked, empty for a neutral scan.
    moving_near: torch.Tensor | None = None
    moving_surface: torch.Tensor | None = None


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from (seed, purpose, step, ...): stable across processes, platforms and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


@dataclass
class ProcessedScans:
    """A preprocessed folder held in memory, and the deterministic batch sampler over it."""

    folder: Path
    scans: list[ScanMeta]
    identities: list[str]
    shared_topology: bool
    n_dense: int | None
    _data: list[_Scan] = field(repr=False)
    neutral_landmarks: torch.Tensor = field(repr=False)          # (I, 5, 3) per identity
    neutral_dense: torch.Tensor | None = field(repr=False)       # (I, V, 3) per identity
    neutral_dense_valid: torch.Tensor | None = field(repr=False)  # (I, V) bool
    notes: list[str] = field(default_factory=list)               # things worth telling the user

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder: str | Path, max_samples_per_scan: int | None = None, seed: int = 0,
             storage: str = "memory") -> "ProcessedScans":
        """Read a preprocessed folder.

        storage: "memory" reads every tensor into RAM (float32); "mmap" maps the large per-sample
        arrays (points, sdf, gradients, surface points/normals) from the files instead, so the OS page
        cache holds them once for all DDP ranks on a machine (paper-scale folders do not fit in RAM
        once per process). Landmarks and dense vertices are always read into memory.
        """
        if storage not in ("memory", "mmap"):
            raise ValueError(f"storage must be 'memory' or 'mmap', got {storage!r}")
        folder = Path(folder)
        index_path = folder / "index.json"
        if not index_path.is_file():
            raise DatasetError(f"{folder}: no index.json; is this a preprocessed folder "
                               "(the output of `imface preprocess`)?")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{index_path}: not valid JSON ({exc})") from None
        if index.get("format") != SAMPLES_FORMAT:
            raise DatasetError(f"{index_path}: format {index.get('format')!r}, expected {SAMPLES_FORMAT!r}")
        entries = index.get("scans") or []
        if not entries:
            raise DatasetError(f"{index_path}: lists no scans (did every scan fail preprocessing?)")
        identities = list(index["identities"])
        shared = bool(index.get("shared_topology")) and index.get("n_dense") is not None
        n_near_index = int(index.get("n_near", 0))

        scans: list[ScanMeta] = []
        data: list[_Scan] = []
        for e in entries:
            meta = ScanMeta(key=e["key"], identity=e["identity"], identity_index=int(e["identity_index"]),
                            expression=e.get("expression", ""), neutral=bool(e.get("neutral", False)))
            if not 0 <= meta.identity_index < len(identities) or identities[meta.identity_index] != meta.identity:
                raise DatasetError(f"{index_path}: scan {meta.key!r} has an identity_index that does not "
                                   f"match identities[]")
            scans.append(meta)
            data.append(_load_scan(folder / e["samples"], meta.key, n_near_index, shared,
                                   max_samples_per_scan, seed, storage))
        if shared:
            sizes = {d.dense_points.shape[0] for d in data}  # type: ignore[union-attr]
            if len(sizes) != 1:
                raise DatasetError(f"{folder}: shared_topology is set but dense_points sizes differ: {sorted(sizes)}")
        ds = cls(folder=folder, scans=scans, identities=identities, shared_topology=shared,
                 n_dense=int(data[0].dense_points.shape[0]) if shared else None,  # type: ignore[union-attr]
                 _data=data, neutral_landmarks=torch.empty(0), neutral_dense=None, neutral_dense_valid=None)
        ds._compute_neutrals()
        return ds

    def _compute_neutrals(self) -> None:
        """Per identity: the neutral scan's landmarks (and dense vertices), or the mean over its scans."""
        n_id = len(self.identities)
        lms, dense, valid = [], [], []
        for i in range(n_id):
            members = [k for k, s in enumerate(self.scans) if s.identity_index == i]
            if not members:
                raise DatasetError(f"{self.folder}: identity {self.identities[i]!r} has no scan")
            neutral = [k for k in members if self.scans[k].neutral]
            chosen = neutral or members
            if not neutral:
                # §3.5's landmark losses need the neutral face; the mean of the identity's scans stands in.
                self.notes.append(f"identity {self.identities[i]!r} has no neutral scan: its neutral "
                                  f"landmarks/vertices are the mean over its {len(members)} scans")
            lms.append(torch.stack([self._data[k].landmarks for k in chosen]).mean(0))
            if self.shared_topology:
                pts = torch.stack([self._data[k].dense_points for k in chosen])   # (c, V, 3)
                ok = torch.stack([self._data[k].dense_valid for k in chosen])     # (c, V)
                w = ok.to(pts.dtype).unsqueeze(-1)
                cnt = w.sum(0)
                # Average the valid copies of each vertex; where no copy is valid, the plain mean.
                mean_valid = (pts * w).sum(0) / cnt.clamp_min(1)
                dense.append(torch.where(cnt > 0, mean_valid, pts.mean(0)))
                valid.append(ok.any(0))
        self.neutral_landmarks = torch.stack(lms)
        if self.shared_topology:
            self.neutral_dense = torch.stack(dense)
            self.neutral_dense_valid = torch.stack(valid)

    # ------------------------------------------------------------------ what the model is built from
    @property
    def n_scans(self) -> int:
        return len(self.scans)

    @property
    def n_identities(self) -> int:
        return len(self.identities)

    def template_landmarks(self) -> torch.Tensor:
        """(5, 3): the mean over identities of each identity's neutral landmarks."""
        return self.neutral_landmarks.mean(0)

    def template_dense(self) -> torch.Tensor | None:
        """(V, 3) or None: mean over identities of the neutral vertices, valid copies only.

        A vertex valid for no identity gets the mean over all identities' (invalid) copies, so the
        template stays a complete vertex set in the same order as the scans'.
        """
        if not self.shared_topology:
            return None
        pts, ok = self.neutral_dense, self.neutral_dense_valid
        w = ok.to(pts.dtype).unsqueeze(-1)  # type: ignore[union-attr]
        cnt = w.sum(0)
        mean_valid = (pts * w).sum(0) / cnt.clamp_min(1)  # type: ignore[operator]
        return torch.where(cnt > 0, mean_valid, pts.mean(0))  # type: ignore[union-attr]

    def mark_moving(self, min_motion: float = 0.03) -> int:
        """Find, per expressive scan, the near-surface samples and surface points whose closest ground-truth
        vertex lies more than `min_motion` (model units; 3 mm) from its place on the person's neutral:
        where the expression is. `batch(moving_fraction=...)` draws a share of each scan's points there.

        Expression regions are a few per cent of a face (closed eyelids about 1 %), so uniform draws give
        them a handful of points per step and the warps learn them last. Needs shared topology (the motion
        is read off the correspondences). Returns how many scans have a moving region."""
        from scipy.spatial import cKDTree

        if not self.shared_topology:
            raise DatasetError("drawing points where the face moves needs a shared-topology folder "
                               "(dense correspondences)")
        marked = 0
        for d, meta in zip(self._data, self.scans):
            empty = torch.zeros(0, dtype=torch.long)
            d.moving_near, d.moving_surface = empty, empty
            if meta.neutral:
                continue
            ref = self.neutral_dense[meta.identity_index]                       # type: ignore[index]
            ok = d.dense_valid & self.neutral_dense_valid[meta.identity_index]  # type: ignore[index]
            motion = torch.linalg.norm(d.dense_points - ref, dim=1)              # type: ignore[operator]
            if not bool((ok & (motion > min_motion)).any()):
                continue
            verts = d.dense_points[ok].numpy()                                 # type: ignore[index]
            moves = (motion[ok] > min_motion).numpy()
            tree = cKDTree(verts)
            near = np.asarray(d.points[:d.n_near], dtype=np.float32)
            _, vi = tree.query(near, workers=-1)
            d.moving_near = torch.from_numpy(np.flatnonzero(moves[vi]).astype(np.int64))
            _, vs = tree.query(np.asarray(d.surface_points, dtype=np.float32), workers=-1)
            d.moving_surface = torch.from_numpy(np.flatnonzero(moves[vs]).astype(np.int64))
            marked += bool(len(d.moving_near) and len(d.moving_surface))
        return marked

    def memory_bytes(self) -> int:
        total = 0
        for d in self._data:
            for t in (d.points, d.sdf, d.gradients, d.surface_points, d.surface_normals, d.dense_points):
                if torch.is_tensor(t):  # memory-mapped arrays live in the page cache, not here
                    total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ sampling
    def steps_per_epoch(self, scans_per_batch: int) -> int:
        return max(1, math.ceil(self.n_scans / scans_per_batch))

    def epoch_order(self, seed: int, epoch: int, scans_per_batch: int) -> torch.Tensor:
        """The scan order of one epoch, padded (wrapping round) to a whole number of batches."""
        perm = torch.randperm(self.n_scans, generator=_generator(seed, "epoch", epoch))
        need = self.steps_per_epoch(scans_per_batch) * scans_per_batch
        reps = math.ceil(need / self.n_scans)
        return perm.repeat(reps)[:need]

    def global_slots(self, seed: int, step: int, scans_per_batch: int) -> torch.Tensor:
        """(B,) scan indices of the global batch of `step`."""
        spe = self.steps_per_epoch(scans_per_batch)
        epoch, j = divmod(step, spe)
        return self.epoch_order(seed, epoch, scans_per_batch)[j * scans_per_batch:(j + 1) * scans_per_batch]

    def surface_sample(self, scan: int, count: int, seed: int = 0) -> torch.Tensor:
        """`count` of scan `scan`'s surface samples (all of them when it has fewer), a fixed random subset
        for a given seed."""
        n = self._data[scan].surface_points.shape[0]
        if count >= n:
            return _take(self._data[scan].surface_points, torch.arange(n))
        idx = torch.randperm(n, generator=_generator(seed, "surface_sample", scan))[:count]
        return _take(self._data[scan].surface_points, idx)

    def batch(self, step: int, *, seed: int, scans_per_batch: int, points_per_scan: int,
              near_fraction: float, surface_points: int, dense_points: int = 0,
              rank: int = 0, world_size: int = 1, moving_fraction: float = 0.0) -> dict[str, torch.Tensor]:
        """This rank's share of the global batch of `step` (see the module docstring for the contract).

        moving_fraction: the share of each expressive scan's near-surface and surface draws taken where it
        moves (after `mark_moving`); the rest are drawn as usual."""
        if scans_per_batch % world_size:
            raise ValueError(f"scans_per_batch={scans_per_batch} must be divisible by the world size {world_size}")
        local = scans_per_batch // world_size
        slots = self.global_slots(seed, step, scans_per_batch)
        n_near_draw = int(round(points_per_scan * near_fraction))

        cols: dict[str, list[torch.Tensor]] = {k: [] for k in
                                               ("points", "sdf", "gradients", "surface_points",
                                                "surface_normals", "landmarks", "neutral_landmarks")}
        scan_index, identity_index, neutral = [], [], []
        for slot in range(rank * local, (rank + 1) * local):
            s = int(slots[slot])
            d, meta = self._data[s], self.scans[s]
            if moving_fraction and d.moving_near is None:
                raise ValueError("moving_fraction needs mark_moving() first")
            g = _generator(seed, "points", step, slot)
            n_total = d.points.shape[0]
            n_uni = n_total - d.n_near
            k_near = n_near_draw if n_uni > 0 else points_per_scan
            k_near = k_near if d.n_near > 0 else 0
            k_move = int(round(k_near * moving_fraction)) if moving_fraction and len(d.moving_near) else 0
            idx = [torch.randint(0, d.n_near, (k_near - k_move,), generator=g)] if k_near else []
            if k_move:
                idx.append(d.moving_near[torch.randint(0, len(d.moving_near), (k_move,), generator=g)])
            if points_per_scan - k_near:
                idx.append(d.n_near + torch.randint(0, n_uni, (points_per_scan - k_near,), generator=g))
            pi = torch.cat(idx)
            s_move = int(round(surface_points * moving_fraction)) if moving_fraction and len(d.moving_surface) else 0
            si = torch.randint(0, d.surface_points.shape[0], (surface_points - s_move,), generator=g)
            if s_move:
                si = torch.cat([si, d.moving_surface[torch.randint(0, len(d.moving_surface), (s_move,), generator=g)]])
            cols["points"].append(_take(d.points, pi))
            cols["sdf"].append(_take(d.sdf, pi))
            cols["gradients"].append(_take(d.gradients, pi))
            cols["surface_points"].append(_take(d.surface_points, si))
            cols["surface_normals"].append(_take(d.surface_normals, si))
            cols["landmarks"].append(d.landmarks)
            cols["neutral_landmarks"].append(self.neutral_landmarks[meta.identity_index])
            scan_index.append(s)
            identity_index.append(meta.identity_index)
            neutral.append(meta.neutral)

        out = {k: torch.stack(v) for k, v in cols.items()}
        out["scan_index"] = torch.tensor(scan_index, dtype=torch.long)
        out["identity_index"] = torch.tensor(identity_index, dtype=torch.long)
        out["neutral"] = torch.tensor(neutral, dtype=torch.bool)

        if self.shared_topology and dense_points > 0:
            V = int(self.n_dense)  # type: ignore[arg-type]
            D = min(int(dense_points), V)
            # One vertex subset for the whole global batch (the same on every rank).
            dense_index = torch.randperm(V, generator=_generator(seed, "dense", step))[:D].sort().values
            ids = out["identity_index"]
            dp = torch.stack([self._data[s].dense_points[dense_index] for s in scan_index])
            dv = torch.stack([self._data[s].dense_valid[dense_index] for s in scan_index])
            out["dense_index"] = dense_index
            out["dense_points"] = dp
            out["neutral_dense_points"] = self.neutral_dense[ids][:, dense_index]  # type: ignore[index]
            # A correspondence pair counts only where the vertex is valid on the scan and on its neutral.
            out["dense_valid"] = dv & self.neutral_dense_valid[ids][:, dense_index]  # type: ignore[index]
        return out


def _take(arr: Any, idx: torch.Tensor) -> torch.Tensor:
    """arr[idx] for a tensor or a memory-mapped numpy array (which reads only the pages it needs)."""
    if torch.is_tensor(arr):
        return arr[idx]
    return torch.from_numpy(np.ascontiguousarray(arr[idx.numpy()]))


_MMAP_NAMES = ("points", "sdf", "gradients", "surface_points", "surface_normals")


def _mmap_safetensors(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Memory-map float32 tensors of a safetensors file (format: u64 header size, JSON header, data)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    # One mapping per file, tensors as views into it: a mapping per tensor would exceed the kernel's
    # limit on mappings per process (vm.max_map_count, 65530) with paper-scale folders.
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in names:
        info = header.get(name)
        if info is None or info.get("dtype") != "F32":
            continue  # missing or not float32: the caller reads it normally
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != 4 * int(np.prod(shape)) or 8 + n + end > whole.shape[0]:
            raise ValueError(f"tensor {name} has inconsistent offsets (truncated file?)")
        out[name] = whole[8 + n + start: 8 + n + end].view(np.float32).reshape(shape)
    return out


def _load_scan(path: Path, key: str, n_near_index: int, dense: bool, max_samples: int | None,
               seed: int, storage: str = "memory") -> _Scan:
    if not path.is_file():
        raise DatasetError(f"scan {key!r}: samples file {path} is missing")
    need = ["points", "sdf", "gradients", "surface_points", "surface_normals", "landmarks"]
    if dense:
        need += ["dense_points", "dense_valid"]
    try:
        if storage == "mmap" and max_samples is None:
            # Map the big float32 arrays; read only the small rest (and anything stored in another dtype).
            t: dict[str, Any] = dict(_mmap_safetensors(path, _MMAP_NAMES))
            with safe_open(str(path), framework="pt") as f:
                for n in need:
                    if n not in t and n in f.keys():
                        t[n] = f.get_tensor(n)
        else:
            t = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"scan {key!r}: cannot read {path} ({exc}); re-run preprocessing") from None
    missing = [n for n in need if n not in t]
    if missing:
        raise DatasetError(f"scan {key!r}: {path} lacks {', '.join(missing)}")
    # float32 tensors in memory; memory-mapped arrays (already float32) stay as they are.
    f32 = {n: (t[n].to(torch.float32).contiguous() if torch.is_tensor(t[n]) else t[n])
           for n in need if n != "dense_valid"}
    N = f32["points"].shape[0]
    if tuple(f32["points"].shape) != (N, 3) or tuple(f32["sdf"].shape) != (N,) \
            or tuple(f32["gradients"].shape) != (N, 3):
        raise DatasetError(f"scan {key!r}: points/sdf/gradients shapes disagree "
                           f"{tuple(f32['points'].shape)}, {tuple(f32['sdf'].shape)}, {tuple(f32['gradients'].shape)}")
    if tuple(f32["landmarks"].shape) != (5, 3):
        raise DatasetError(f"scan {key!r}: landmarks must be (5, 3), got {tuple(f32['landmarks'].shape)}")
    if f32["surface_points"].shape[0] == 0:
        raise DatasetError(f"scan {key!r}: no surface points")
    n_near = min(n_near_index, N) if n_near_index > 0 else N
    points, sdf, grads = f32["points"], f32["sdf"], f32["gradients"]
    if max_samples is not None and max_samples < N:
        # A fixed, seeded subset per scan, near/uniform proportions kept (memory cap for large folders).
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        keep_near = int(round(max_samples * n_near / N))
        keep_uni = max_samples - keep_near
        sel = np.concatenate([np.sort(rng.choice(n_near, keep_near, replace=False)),
                              n_near + np.sort(rng.choice(N - n_near, min(keep_uni, N - n_near), replace=False))])
        sel_t = torch.from_numpy(sel.astype(np.int64))
        points, sdf, grads = points[sel_t].clone(), sdf[sel_t].clone(), grads[sel_t].clone()
        n_near = keep_near
    scan = _Scan(points=points, sdf=sdf, gradients=grads, n_near=n_near,
                 surface_points=f32["surface_points"], surface_normals=f32["surface_normals"],
                 landmarks=f32["landmarks"])
    if dense:
        scan.dense_points = f32["dense_points"]
        scan.dense_valid = t["dense_valid"].to(torch.bool)
        if scan.dense_valid.shape != scan.dense_points.shape[:1]:
            raise DatasetError(f"scan {key!r}: dense_valid shape {tuple(scan.dense_valid.shape)} does not "
                               f"match dense_points {tuple(scan.dense_points.shape)}")
    return scan


class StepBatches(torch.utils.data.Dataset):
    """Map-style view `step -> batch` so a DataLoader can build batches ahead in worker processes.

    Index it with step numbers (the sampler is a range of steps); the result does not depend on which
    process builds it, so workers change speed, not results.
    """

    def __init__(self, scans: ProcessedScans, total_steps: int, rank: int, world_size: int,
                 **batch_kwargs: Any) -> None:
        self.scans = scans
        self.total_steps = total_steps
        self.rank = rank
        self.world_size = world_size
        self.kwargs = batch_kwargs

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.scans.batch(int(step), rank=self.rank, world_size=self.world_size, **self.kwargs)


def iterate_batches(batches: StepBatches, start_step: int, workers: int = 0,
                    pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for steps start_step, start_step + 1, ... up to total_steps, in order."""
    steps = range(start_step, batches.total_steps)
    if workers <= 0:
        for s in steps:
            yield batches[s]
        return
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers,
                                         pin_memory=pin_memory, prefetch_factor=2)
    yield from loader
