"""A loss curve as an RGBA pixel array (bpy-free, numpy only): the training panel's image."""
from __future__ import annotations

import numpy as np


def loss_curve_rgba(steps, losses, width: int = 256, height: int = 128, log: bool = True) -> np.ndarray:
    """(height, width, 4) float32 RGBA, row 0 at the TOP: a dark plot area, the curve in orange, a faint
    grid (quarters). Non-finite or non-positive (log) losses are skipped."""
    img = np.zeros((height, width, 4), dtype=np.float32)
    img[...] = (0.12, 0.12, 0.12, 1.0)
    img[:: max(1, height // 4), :, :3] = 0.22
    img[:, :: max(1, width // 4), :3] = 0.22
    s = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(y) & ((y > 0) if log else True)
    s, y = s[ok], y[ok]
    if len(s) < 2:
        return img
    if log:
        y = np.log10(y)
    x0, x1 = s.min(), s.max()
    y0, y1 = y.min(), y.max()
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    px = (s - x0) / max(x1 - x0, 1e-12) * (width - 1)
    py = (1 - (y - y0) / (y1 - y0)) * (height - 1)
    # draw segments by dense sampling
    for i in range(len(px) - 1):
        n = int(max(abs(px[i + 1] - px[i]), abs(py[i + 1] - py[i]))) + 2
        xs = np.linspace(px[i], px[i + 1], n).round().astype(int)
        ys = np.linspace(py[i], py[i + 1], n).round().astype(int)
        img[ys.clip(0, height - 1), xs.clip(0, width - 1)] = (1.0, 0.55, 0.1, 1.0)
    return img
