"""Area-weighted unit vertex normals of a triangle mesh (numpy arrays or torch tensors)."""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def vertex_normals(vertices: Array, faces: Array) -> Array:
    """Unit normals, the sum of the adjacent faces' area vectors (the faces' winding: outward for
    marching-cubes output); same type (numpy or torch) and device as `vertices`."""
    if isinstance(vertices, torch.Tensor):
        a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
        fn = torch.linalg.cross(b - a, c - a, dim=1)
        n = torch.zeros_like(vertices)
        for k in range(3):
            n.index_add_(0, faces[:, k], fn)
        return n / torch.linalg.vector_norm(n, dim=1, keepdim=True).clamp_min(1e-12)
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    fn = np.cross(b - a, c - a)
    n = np.zeros_like(vertices)
    for i in range(3):
        for k in range(3):
            n[:, k] += np.bincount(faces[:, i], weights=fn[:, k], minlength=len(vertices))
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(length > 0, length, 1.0)
