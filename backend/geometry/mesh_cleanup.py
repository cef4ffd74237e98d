"""Mesh clean-up for a mesh whose vertices are later moved one by one (the animation decode's template).

Marching cubes leaves sliver triangles (edges far shorter than a cell) and triangles hanging off the
boundary by one vertex. Both make per-vertex normals, and so anything placed along them, sensitive to
the last digits of whatever moved the vertices: a warm-started and a cold decode of the same codes then
differ visibly at the boundary. Collapsing the slivers and trimming the hanging triangles removes that.
"""
from __future__ import annotations

import numpy as np


def clean_mesh(vertices: np.ndarray, faces: np.ndarray, min_edge: float,
               ear_passes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Collapse edges shorter than `min_edge` (cluster mean), drop degenerate and duplicate triangles,
    trim triangles hanging off the boundary by one vertex (2+ boundary edges), keep the largest piece."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    V = np.asarray(vertices, np.float64)
    F = np.asarray(faces, np.int64)
    n = len(V)
    e = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    short = e[np.linalg.norm(V[e[:, 0]] - V[e[:, 1]], axis=1) < min_edge]
    g = coo_matrix((np.ones(len(short)), (short[:, 0], short[:, 1])), shape=(n, n))
    k, labels = connected_components(g, directed=False)
    cnt = np.bincount(labels, minlength=k).astype(np.float64)
    pos = np.zeros((k, 3))
    np.add.at(pos, labels, V)
    pos /= cnt[:, None]
    F = labels[F]
    F = F[(F[:, 0] != F[:, 1]) & (F[:, 1] != F[:, 2]) & (F[:, 2] != F[:, 0])]
    _, first = np.unique(np.sort(F, axis=1), axis=0, return_index=True)
    F = F[np.sort(first)]
    for _ in range(ear_passes):
        edges = np.sort(np.stack([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]], 1), axis=2).reshape(-1, 2)
        _, inv, c = np.unique(edges, axis=0, return_inverse=True, return_counts=True)
        ears = (c[inv.reshape(-1)] == 1).reshape(-1, 3).sum(1) >= 2
        if not ears.any():
            break
        F = F[~ears]
    if len(F) == 0:  # nothing usable left (an untrained template): keep the mesh as it was
        return np.asarray(vertices, np.float32), np.asarray(faces, np.int64)
    m = len(pos)
    e = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    _, lab = connected_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(m, m)), directed=False)
    fl = lab[F[:, 0]]
    F = F[fl == np.bincount(fl).argmax()]
    used = np.unique(F)
    remap = np.full(m, -1, np.int64)
    remap[used] = np.arange(len(used))
    return pos[used].astype(np.float32), remap[F]
