"""Mesh extraction: narrow-band (`extract_mesh`) against the dense grid (`extract_mesh_dense`).

For each resolution: seconds, SDF queries, their ratios, whether the two meshes are identical (max
vertex difference), and the Chamfer-L1 distance between them in mm (1 unit = 100 mm).

The default SDF is a stand-in with a network's cost per query: a face-sized head (ellipsoid with a
nose, 1-Lipschitz) plus a random SIREN MLP (3 -> 256 -> 256 -> 256 -> 1, ~1.3e5 multiply-adds per
point, the order of ImFace++'s base chain) scaled to a sub-millimetre perturbation whose gradient
stays below `--perturbation-slope` (0.2), so the sum stays within the extraction's default `band` (1.25).

    python benchmarks/bench_extraction.py                        # 128³ and 256³, stand-in SDF
    python benchmarks/bench_extraction.py --resolutions 128 --threads 1
    python benchmarks/bench_extraction.py --checkpoint run/model.safetensors --scan 0 --no-dense
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.geometry.extraction import extract_mesh, extract_mesh_dense  # noqa: E402
from backend.geometry.metrics import compare_meshes  # noqa: E402
from backend.scans.frame import MM_PER_UNIT  # noqa: E402


class Siren(nn.Module):
    """SIREN MLP (Sitzmann et al. 2020) with its initialisation; random weights, fixed seed."""

    def __init__(self, width: int = 256, hidden_layers: int = 3, omega: float = 30.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        dims = [3] + [width] * hidden_layers
        self.omega = omega
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(width, 1)
        with torch.no_grad():
            for i, layer in enumerate(self.layers + [self.out]):
                bound = 1.0 / layer.in_features if i == 0 else math.sqrt(6.0 / layer.in_features) / omega
                layer.weight.uniform_(-bound, bound, generator=gen)
                b = 1.0 / math.sqrt(layer.in_features)  # torch's default bias range, seeded
                layer.bias.uniform_(-b, b, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sin(self.omega * layer(x))
        return self.out(x).squeeze(-1)


class FaceStandIn(nn.Module):
    """Head-sized ellipsoid ∪ nose (normalised frame: nose tip near z = 0.4) + a scaled SIREN."""

    def __init__(self, slope: float = 0.2, width: int = 256, hidden_layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.siren = Siren(width, hidden_layers, seed=seed)
        self.register_buffer("head_c", torch.tensor([0.0, 0.05, -0.12]))
        self.register_buffer("head_r", torch.tensor([0.72, 0.95, 0.50]))
        self.register_buffer("nose_c", torch.tensor([0.0, 0.02, 0.31]))
        self.register_buffer("nose_r", torch.tensor([0.09, 0.17, 0.10]))
        # Scale the perturbation so its gradient (estimated on random points, x1.5 for safety) stays
        # below `slope`: the sum is then (1 + slope)-Lipschitz.
        pts = (torch.rand(20000, 3, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1).requires_grad_(True)
        grad, = torch.autograd.grad(self.siren(pts).sum(), pts)
        self.amplitude = float(slope / (1.5 * grad.norm(dim=1).max()))
        with torch.no_grad():
            self.rms_mm = float(self.siren(pts.detach()).pow(2).mean().sqrt()) * self.amplitude * MM_PER_UNIT

    @staticmethod
    def _ellipsoid(p: torch.Tensor, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # (|q / r| - 1) * min(r): a 1-Lipschitz function with the ellipsoid as zero set.
        return (((p - c) / r).norm(dim=1) - 1.0) * r.min()

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        base = torch.minimum(self._ellipsoid(p, self.head_c, self.head_r), self._ellipsoid(p, self.nose_c, self.nose_r))
        return base + self.amplitude * self.siren(p)


def checkpoint_sdf(path: Path, scan: int, detail: bool):
    """SDF of one training scan of a trained ImFace++ checkpoint or model file (backend.model.io)."""
    from backend.model.io import load_model

    model, ck = load_model(path)
    info = ck.dataset.get("scans", [{}] * (scan + 1))[scan]
    identity = int(info.get("identity_index", 0))
    codes = model.codes(torch.tensor([scan]), torch.tensor([identity]))
    neutral = torch.tensor([bool(info.get("neutral", False))])
    print(f"checkpoint {path}: scan {scan} ({info.get('key', '?')}), identity {identity}, detail={detail}")

    with torch.no_grad():  # prepared once, frozen: the extraction only reads values
        face = model.field(codes, neutral=neutral, detail=detail)

    def fn(p: torch.Tensor) -> torch.Tensor:
        return face.sdf(p, with_detail=detail, chunk=None)
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--chunk", type=int, default=2 ** 16)
    parser.add_argument("--band", type=float, default=1.25, help="extract_mesh's assumed Lipschitz bound")
    parser.add_argument("--coarse", type=int, default=16, help="extract_mesh's coarse stride")
    parser.add_argument("--perturbation-slope", type=float, default=0.2)
    parser.add_argument("--points", type=int, default=1_000_000, help="surface samples for the Chamfer distance")
    parser.add_argument("--no-dense", action="store_true", help="only the narrow band (e.g. for a slow checkpoint)")
    parser.add_argument("--checkpoint", type=Path, help="a trained ImFace++ checkpoint instead of the stand-in")
    parser.add_argument("--scan", type=int, default=0, help="with --checkpoint: which training scan")
    parser.add_argument("--no-detail", action="store_true", help="with --checkpoint: the base SDF f̂ only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint is not None:
        sdf = checkpoint_sdf(args.checkpoint, args.scan, detail=not args.no_detail)
        inference = args.no_detail  # DetailNet takes a local gradient: no_grad instead of inference_mode
    else:
        sdf = FaceStandIn(slope=args.perturbation_slope)
        inference = True
        print(f"stand-in SDF: head ellipsoid ∪ nose + SIREN 3-256-256-256-1 perturbation "
              f"(rms {sdf.rms_mm:.2f} mm, gradient <= ~{args.perturbation_slope})")
    probe = torch.rand(65536, 3) * 1.2 - 0.6
    with torch.inference_mode() if inference else torch.no_grad():
        sdf(probe[:1024])
        t0 = time.perf_counter()
        sdf(probe)
        per_query = (time.perf_counter() - t0) / len(probe)
    print(f"SDF cost: {per_query * 1e6:.2f} µs per query ({torch.get_num_threads()} torch threads)")

    for res in args.resolutions:
        common = dict(resolution=res, chunk=args.chunk, inference_mode=inference, return_stats=True)
        v_nb, f_nb, s_nb = extract_mesh(sdf, coarse=args.coarse, band=args.band, **common)
        print(f"\n{res}³ narrow band: {s_nb.seconds:.2f} s ({s_nb.seconds_sdf:.2f} s in the SDF, "
              f"{s_nb.seconds_marching:.2f} s marching cubes), {s_nb.queries:,} queries "
              f"({100 * s_nb.queries / s_nb.dense_points:.2f}% of the {s_nb.dense_points:,} grid points), "
              f"{s_nb.kept_cells:,} crossing cells, {len(v_nb):,} vertices, {len(f_nb):,} faces, "
              f"sign violations {s_nb.sign_violations}")
        if args.no_dense:
            continue
        v_d, f_d, s_d = extract_mesh_dense(sdf, **common)
        print(f"{res}³ dense:       {s_d.seconds:.2f} s ({s_d.seconds_sdf:.2f} s in the SDF, "
              f"{s_d.seconds_marching:.2f} s marching cubes), {s_d.queries:,} queries (inside the sphere), "
              f"{len(v_d):,} vertices, {len(f_d):,} faces")
        same = v_nb.shape == v_d.shape and f_nb.shape == f_d.shape and np.array_equal(f_nb, f_d)
        max_dv = float(np.abs(v_nb - v_d).max()) * MM_PER_UNIT if same else float("nan")
        t0 = time.perf_counter()
        m = compare_meshes((v_nb * MM_PER_UNIT, f_nb), (v_d * MM_PER_UNIT, f_d), n_points=args.points)
        print(f"{res}³ ratios: {s_d.queries / max(s_nb.queries, 1):.1f}x fewer queries, "
              f"{s_d.seconds / s_nb.seconds:.1f}x less time; identical faces: {same}, "
              f"max vertex difference {max_dv:.2e} mm; Chamfer-L1 {m['chamfer_l1']:.2e} mm, "
              f"F-score@1mm {m['fscore']:.4f}, N.C. {m['normal_consistency']:.4f} "
              f"({args.points:,} points, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
