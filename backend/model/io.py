"""The model file format: checkpoints and `model.safetensors`, one safetensors file each, no pickle.

`build_model` is the one place an ImFacePlusPlus is built from its config (training and loading
both call it); `load_model` reads a file back into a model; `model_fingerprint` is the content hash
that ties codes files to their model.

Layout of the file:
* tensors `model/<name>`: the model's state_dict;
* tensors `optim/<param id>/<name>`: the optimiser's per-parameter state (Adam's step, exp_avg, ...);
* tensors `rng/torch`, `rng/cuda/<i>`: torch RNG states as uint8 tensors;
* tensors `data/template_landmarks`, `data/template_dense`: what the model was constructed from;
* metadata (strings): `format`, `config` (TrainConfig JSON), `state` (step, epoch, stage, python and
  numpy RNG states, ...), `optim_groups` (the optimiser's param_groups with their hyper-parameters),
  `optim_scalars` (non-tensor per-parameter state), `dataset` (scan keys and identities in code order),
  `content_sha256` (hash of every tensor's bytes, to tell a damaged file from a good one).

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the target
(os.replace), so a crash while saving never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .imface import ImFacePlusPlus

CHECKPOINT_FORMAT = "imface-train-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and what to do in words."""


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    state: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None   # torch optimizer.state_dict() layout
    rng_torch: torch.Tensor | None = None
    rng_cuda: list[torch.Tensor] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # `data/...` extras
    path: Path | None = None


# ---------------------------------------------------------------------------------------- saving


def save_checkpoint(path: str | Path, *, model_state: dict[str, torch.Tensor], config: dict[str, Any],
                    state: dict[str, Any], optimizer_state: dict[str, Any] | None = None,
                    dataset: dict[str, Any] | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                    rng: bool = True) -> Path:
    """Write one checkpoint atomically. `state` must be JSON-serialisable."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model_state.items():
        tensors[f"model/{k}"] = v
    meta: dict[str, str] = {"format": CHECKPOINT_FORMAT}
    if optimizer_state is not None:
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in optimizer_state["state"].items():
            for name, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim/{pid}/{name}"] = val
                else:
                    scalars.setdefault(str(pid), {})[name] = val
        meta["optim_groups"] = json.dumps(optimizer_state["param_groups"])
        meta["optim_scalars"] = json.dumps(scalars)
    for k, v in (extra_tensors or {}).items():
        tensors[f"data/{k}"] = v
    state = dict(state)
    if rng:
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = s
        state["rng_python"] = _python_rng_to_json(random.getstate())
        state["rng_numpy"] = _numpy_rng_to_json(np.random.get_state())
    # safetensors wants contiguous CPU tensors that share no memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta["config"] = json.dumps(config)
    meta["state"] = json.dumps(state)
    meta["dataset"] = json.dumps(dataset or {})
    meta["content_sha256"] = _content_hash(tensors)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as fh:  # make the bytes durable before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---------------------------------------------------------------------------------------- loading


def read_metadata(path: str | Path) -> dict[str, str]:
    """Only the header's metadata (cheap: no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_damaged(path, exc)) from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an ImFace++ training checkpoint "
                              f"(format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    return meta


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint. Raises CheckpointError with a clear message."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(_damaged(path, exc)) from None
    if verify and meta.get("content_sha256") != _content_hash(tensors):
        raise CheckpointError(_damaged(path, "the tensor data does not match the checksum in its header"))
    try:
        config = json.loads(meta["config"])
        state = json.loads(meta["state"])
        dataset = json.loads(meta.get("dataset", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(_damaged(path, f"bad metadata ({exc})")) from None

    ck = Checkpoint(model_state={}, config=config, state=state, dataset=dataset, path=path)
    optim_tensors: dict[str, dict[str, torch.Tensor]] = {}
    cuda: dict[int, torch.Tensor] = {}
    for k, v in tensors.items():
        kind, _, rest = k.partition("/")
        if kind == "model":
            ck.model_state[rest] = v
        elif kind == "optim":
            pid, _, name = rest.partition("/")
            optim_tensors.setdefault(pid, {})[name] = v
        elif kind == "data":
            ck.tensors[rest] = v
        elif k == "rng/torch":
            ck.rng_torch = v
        elif k.startswith("rng/cuda/"):
            cuda[int(k.rsplit("/", 1)[1])] = v
    ck.rng_cuda = [cuda[i] for i in sorted(cuda)]
    if "optim_groups" in meta:
        scalars = json.loads(meta.get("optim_scalars", "{}"))
        per_param: dict[int, dict[str, Any]] = {}
        for pid in set(optim_tensors) | set(scalars):
            per_param[int(pid)] = {**scalars.get(pid, {}), **optim_tensors.get(pid, {})}
        groups = json.loads(meta["optim_groups"])
        for g in groups:  # JSON turned tuples into lists; Adam's betas are a tuple in torch
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        ck.optimizer_state = {"state": per_param, "param_groups": groups}
    return ck


def build_model(config: ModelConfig | dict[str, Any], n_identities: int, n_scans: int,
                template_landmarks: torch.Tensor, template_dense: torch.Tensor | None = None) -> ImFacePlusPlus:
    """A fresh (untrained) ImFace++ from its config and the sizes of its training set."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    return ImFacePlusPlus(cfg, n_identities, n_scans, template_landmarks, template_dense)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[ImFacePlusPlus, Checkpoint]:
    """The trained ImFacePlusPlus of a checkpoint or model.safetensors, in eval mode, and its checkpoint.

    The embedding sizes come from the checkpoint's scan list; `ck.dataset["scans"][i]` is the scan whose
    expression/detail codes are row i (identity codes: `ck.dataset["identities"]`).
    """
    ck = load_checkpoint(path)
    try:
        n_ids, n_scans = len(ck.dataset["identities"]), len(ck.dataset["scans"])
        model = build_model(ck.config["model"], n_ids, n_scans, ck.tensors["template_landmarks"],
                            ck.tensors.get("template_dense"))
        model.load_state_dict(ck.model_state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the model from this checkpoint ({exc})") from None
    return model.to(device).eval(), ck


def model_fingerprint(path: str | Path) -> str:
    """The model file's content hash (from its header: cheap), used to tie codes to their model."""
    return read_metadata(path).get("content_sha256", "") or Path(path).name


def restore_rng(ck: Checkpoint) -> None:
    """Put the global RNGs back to where they were when the checkpoint was written."""
    if ck.rng_torch is not None:
        torch.set_rng_state(ck.rng_torch)
    if ck.rng_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck.rng_cuda[: torch.cuda.device_count()])
    if "rng_python" in ck.state:
        random.setstate(_python_rng_from_json(ck.state["rng_python"]))
    if "rng_numpy" in ck.state:
        np.random.set_state(_numpy_rng_from_json(ck.state["rng_numpy"]))


# ---------------------------------------------------------------------------------------- helpers


def _damaged(path: Path, reason: object) -> str:
    size = path.stat().st_size if path.exists() else 0
    return (f"checkpoint {path} ({size} bytes) is damaged or truncated and cannot be loaded: {reason}. "
            "Resume from another checkpoint (the numbered files in the same folder) or start the run again.")


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _python_rng_to_json(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _python_rng_from_json(js: list) -> tuple:
    return (js[0], tuple(js[1]), js[2])


def _numpy_rng_to_json(st: tuple) -> list:
    name, keys, pos, has_gauss, cached = st
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_rng_from_json(js: list) -> tuple:
    return (js[0], np.asarray(js[1], dtype=np.uint32), js[2], js[3], js[4])
