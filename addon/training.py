"""Training panel support: the loss history of training jobs, its image, the models the backend knows."""
from __future__ import annotations

import bpy
import numpy as np

from . import state
from .plot import loss_curve_rgba

IMAGE_NAME = "ImFace loss curve"
_HISTORY: dict[str, list[tuple[float, float]]] = {}
_MODELS: list[dict] = []


def record() -> bool:
    """Add the latest (step, loss) of every training job to its history; True when something was added."""
    s = state.peek()
    if s is None or s.client is None:
        return False
    added = False
    for jid, j in s.client.jobs.items():
        if j.get("kind") != "train":
            continue
        m = j.get("metrics") or {}
        step, loss = m.get("step"), m.get("loss", m.get("total"))
        if isinstance(step, (int, float)) and isinstance(loss, (int, float)):
            h = _HISTORY.setdefault(jid, [])
            if not h or step > h[-1][0]:
                h.append((float(step), float(loss)))
                added = True
    return added


def history(job: str | None = None) -> list[tuple[float, float]]:
    if job is None:
        if not _HISTORY:
            return []
        job = list(_HISTORY)[-1]
    return _HISTORY.get(job, [])


def update_image(job: str | None = None):
    """The loss curve of a training job as the image "ImFace loss curve" (Image Editor, panel preview)."""
    h = history(job)
    if len(h) < 2:
        return None
    steps, losses = zip(*h)
    rgba = loss_curve_rgba(steps, losses)
    img = bpy.data.images.get(IMAGE_NAME)
    hgt, wid = rgba.shape[:2]
    if img is None or tuple(img.size) != (wid, hgt):
        if img is not None:
            bpy.data.images.remove(img)
        img = bpy.data.images.new(IMAGE_NAME, wid, hgt, alpha=True)
    img.pixels.foreach_set(np.ascontiguousarray(rgba[::-1]).ravel())   # Blender rows are bottom-up
    img.update()
    return img


def refresh_models() -> list[dict]:
    s = state.get()
    _MODELS[:] = list(s.request("models.list", {}).get("models", []))
    return _MODELS


def models() -> list[dict]:
    return list(_MODELS)
