"""A "raw scanner" version of any scan folder: what a real scanner hands over instead of a clean,
registered face. Deterministic: the same folder and seed give the same bytes.

    imface make-raw SCANS --out RAW [--seed 0] [--noise-mm 0.3] [--holes 3] [--fragments 6] ...

Per scan, at least (`RawLevels()`, the stated minimum corruption levels; options only raise them):
* Gaussian noise, σ = 0.3 mm on every coordinate of every vertex;
* 3 holes, 5-15 mm across, in the face (away from the landmarks);
* 6 hair-like fragments: thin ribbons (0.8-2 mm wide, 20-50 mm long) floating 1-10 mm off the
  forehead and temples, each its own piece;
* a neck (an open tube below the lowest point of the face) and the back of the head (an open shell
  behind the face, down to the nape), each its own piece (the underside of the jaw is a gap, as on most
  scans);
* a rotated frame: a uniformly random rotation (another up axis and facing direction) and a shift of
  up to 300 mm;
* uneven density: on one side of a random line through the face every triangle is split in four (4x
  the vertices, T-junctions where the sides meet), on the other side vertices are merged on a 2.5 mm
  grid;
* landmarks moved 1-3 mm in a random direction and given as coordinates;
* no shared topology: vertices and triangles in a random order; the manifest says
  `"shared_topology": false`.

Each manifest entry keeps its other fields and gains `"raw": {"seed", "clean_to_raw": 4x4}` (the
transform from the clean scan's frame, mm, to the raw one), so a benchmark can measure a fit of the raw
scan against the clean surface. Units are millimetres.
"""
from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MINIMUM_NOTE = ("noise σ 0.3 mm, 3 holes of 5-15 mm, 6 hair-like fragments, a neck and the back of the head, "
                "a random rotation, 4x density on one side and a 2.5 mm grid on the other, landmarks moved 1-3 mm, "
                "no shared topology")


@dataclass(frozen=True)
class RawLevels:
    """How much of each corruption (the defaults are the stated minimum)."""

    noise_mm: float = 0.3
    holes: int = 3
    hole_mm: tuple[float, float] = (5.0, 15.0)
    fragments: int = 6
    neck: bool = True
    back_of_head: bool = True
    rotate: bool = True
    shift_mm: float = 300.0
    density: bool = True
    merge_grid_mm: float = 2.5
    landmark_offset_mm: tuple[float, float] = (1.0, 3.0)
    shuffle: bool = True

    def check(self) -> None:
        low = RawLevels()
        if self.noise_mm < low.noise_mm or self.holes < low.holes or self.fragments < low.fragments:
            raise ValueError(f"below the stated minimum corruption ({MINIMUM_NOTE})")


@dataclass
class RawScan:
    vertices: np.ndarray     # (V, 3) mm, raw frame
    faces: np.ndarray        # (T, 3)
    landmarks: np.ndarray    # (5, 3) mm, raw frame, moved
    clean_to_raw: np.ndarray  # 4x4
    stats: dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ geometry


def _ribbon(curve: np.ndarray, side: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """A strip of triangles along a polyline (N, 3), `width` wide across `side` (unit)."""
    a = curve - 0.5 * width * side
    b = curve + 0.5 * width * side
    v = np.concatenate([a, b])
    n = len(curve)
    i = np.arange(n - 1)
    f = np.concatenate([np.stack([i, i + 1, n + i], 1), np.stack([i + 1, n + i + 1, n + i], 1)])
    return v, f


def _grid_surface(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of an (R, C, 3) grid of points (open in both directions)."""
    r, c = points.shape[:2]
    idx = np.arange(r * c).reshape(r, c)
    a, b, cc, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    f = np.concatenate([np.stack([a, cc, b], -1).reshape(-1, 3), np.stack([b, cc, d], -1).reshape(-1, 3)])
    return points.reshape(-1, 3), f


def _tube(top: np.ndarray, axis: np.ndarray, radius: float, length: float, step: float = 3.0
          ) -> tuple[np.ndarray, np.ndarray]:
    """An open cylinder from `top` along `axis` (unit)."""
    u = np.cross(axis, [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    w = np.cross(axis, u)
    n_ang = max(12, int(2 * np.pi * radius / step))
    ang = np.linspace(0, 2 * np.pi, n_ang + 1)
    t = np.linspace(0, length, max(2, int(length / step)))
    ring = radius * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * w)
    pts = top + t[:, None, None] * axis + ring[None]
    return _grid_surface(pts)


def _head_back(center: np.ndarray, axes: np.ndarray, z_cut: float, y_min: float, step: float = 4.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """The part of an ellipsoid (model-frame axes) behind the plane z = z_cut and above y = y_min (the back
    of the head)."""
    n_lat = int(np.pi * axes.max() / step)
    theta = np.linspace(0.05, np.pi - 0.05, n_lat)           # from the top down
    phi = np.linspace(np.pi, 2 * np.pi, 2 * n_lat)           # the back half (z <= center)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    pts = np.stack([axes[0] * np.sin(th) * np.cos(ph), axes[1] * np.cos(th), axes[2] * np.sin(th) * np.sin(ph)], -1)
    pts = pts + center
    v, f = _grid_surface(pts)
    keep = (v[f][:, :, 2] <= z_cut).all(1) & (v[f][:, :, 1] >= y_min).all(1)
    return v, f[keep]


def _subdivide(v: np.ndarray, f: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the masked triangles in four at their edge midpoints (T-junctions at the border)."""
    sel = f[mask]
    if len(sel) == 0:
        return v, f
    e = np.sort(np.concatenate([sel[:, [0, 1]], sel[:, [1, 2]], sel[:, [2, 0]]]), axis=1)
    uniq, inv = np.unique(e, axis=0, return_inverse=True)
    mid = len(v) + inv.reshape(3, -1).T                     # (T, 3): midpoints of edges 01, 12, 20
    v = np.concatenate([v, 0.5 * (v[uniq[:, 0]] + v[uniq[:, 1]])])
    a, b, c = sel.T
    m01, m12, m20 = mid.T
    new = np.concatenate([np.stack([a, m01, m20], 1), np.stack([m01, b, m12], 1), np.stack([m20, m12, c], 1),
                          np.stack([m01, m12, m20], 1)])
    return v, np.concatenate([f[~mask], new])


def _merge_on_grid(v: np.ndarray, f: np.ndarray, vmask: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Merge the masked vertices that share a `cell` grid cell into their mean (vertex clustering);
    collapsed and repeated triangles go."""
    idx = np.flatnonzero(vmask)
    if len(idx) == 0:
        return v, f
    _, group = np.unique(np.floor(v[idx] / cell).astype(np.int64), axis=0, return_inverse=True)
    group = group.reshape(-1)
    rep = np.zeros(group.max() + 1, dtype=np.int64)
    rep[group] = idx                                         # one member of each cell stands for it
    sums = np.zeros((len(rep), 3))
    np.add.at(sums, group, v[idx])
    v = v.copy()
    v[rep] = sums / np.bincount(group)[:, None]
    target = np.arange(len(v))
    target[idx] = rep[group]
    f = target[f]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    _, first = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    return v, f[np.sort(first)]


# ------------------------------------------------------------------------------------------ one scan


def corrupt_scan(vertices_mm: np.ndarray, faces: np.ndarray, landmarks_mm: np.ndarray, seed: int | list[int],
                 levels: RawLevels = RawLevels()) -> RawScan:
    """The raw-scanner version of one clean scan (mm). Deterministic in `seed`."""
    from scipy.spatial.transform import Rotation

    from backend.geometry.alignment import apply_transform
    from backend.geometry.face_region import compact
    from backend.geometry.normals import vertex_normals
    from backend.scans.frame import MM_PER_UNIT, normalization_transform

    rng = np.random.default_rng(seed)
    # Work in the model frame in mm (face looking along +z, nose tip at (0, 0, 40)), then go back.
    to_model = np.diag([MM_PER_UNIT] * 3 + [1.0]) @ normalization_transform(landmarks_mm)
    back = np.linalg.inv(to_model)
    v = apply_transform(to_model, np.asarray(vertices_mm, dtype=np.float64))
    f = np.asarray(faces, dtype=np.int64)
    lm = apply_transform(to_model, np.asarray(landmarks_mm, dtype=np.float64))
    stats: dict[str, object] = {}
    face_v = np.zeros(len(v), dtype=bool)
    face_v[f.ravel()] = True
    front = face_v & (np.linalg.norm(v - lm[2], axis=1) < 75.0) & (vertex_normals(v, f)[:, 2] > 0.3)

    # Holes: discs of 5-15 mm in the face, apart from each other and at least 8 mm from the landmarks.
    centres: list[np.ndarray] = []
    diam = []
    cand = np.flatnonzero(front & (np.linalg.norm(v[:, None] - lm[None], axis=2).min(1) > 8.0 + levels.hole_mm[1] / 2))
    while len(centres) < levels.holes and len(cand):
        c = v[rng.choice(cand)]
        if all(np.linalg.norm(c - o) > 25.0 for o in centres):
            centres.append(c)
            diam.append(rng.uniform(*levels.hole_mm))
        cand = cand[np.linalg.norm(v[cand] - c, axis=1) > 25.0]
    centroid = v[f].mean(1)
    drop = np.zeros(len(f), dtype=bool)
    for c, d in zip(centres, diam):
        drop |= np.linalg.norm(centroid - c, axis=1) < d / 2
    f = f[~drop]
    stats["holes"] = len(centres)
    stats["hole_diameters_mm"] = [round(float(d), 2) for d in diam]

    # Uneven density: split on one side of a random line through the nose tip, merge on the other.
    if levels.density:
        ang = rng.uniform(0, 2 * np.pi)
        side = (v[:, 0] - lm[2, 0]) * np.cos(ang) + (v[:, 1] - lm[2, 1]) * np.sin(ang)
        n_before = len(v)
        v, f = _subdivide(v, f, (side[f] > 10.0).all(1))
        side = np.concatenate([side, np.full(len(v) - n_before, 20.0)])
        protect = np.zeros(len(v), dtype=bool)
        protect[np.linalg.norm(v[:, None] - lm[None], axis=2).min(1) < 3.0] = True  # keep landmark spots intact
        v, f = _merge_on_grid(v, f, (side < -10.0) & ~protect, levels.merge_grid_mm)
        stats["density_angle_deg"] = float(np.rad2deg(ang))

    v, f = compact(v, f)
    pieces_v, pieces_f = [v], [f]

    def add(pv: np.ndarray, pf: np.ndarray) -> None:
        pieces_f.append(pf + sum(len(x) for x in pieces_v))
        pieces_v.append(pv)

    # Hair-like fragments off the forehead and temples.
    upper = np.flatnonzero(v[:, 1] > lm[0, 1] + 15.0)
    normals = vertex_normals(v, f)
    for _ in range(levels.fragments if len(upper) else 0):
        i = rng.choice(upper)
        start = v[i] + normals[i] * rng.uniform(1.0, 10.0)
        length, width = rng.uniform(20.0, 50.0), rng.uniform(0.8, 2.0)
        n = max(3, int(length / 2.0))
        heading = np.array([rng.uniform(-0.6, 0.6), -1.0, rng.uniform(-0.2, 0.2)])
        steps = heading / np.linalg.norm(heading) * (length / (n - 1))
        wiggle = np.cumsum(rng.normal(0.0, 0.6, (n, 3)), axis=0)
        curve = start + np.arange(n)[:, None] * steps + wiggle
        side_dir = np.cross(steps, [0.0, 0.0, 1.0])
        side_dir /= max(np.linalg.norm(side_dir), 1e-9)
        add(*_ribbon(curve, side_dir, width))
    stats["fragments"] = levels.fragments if len(upper) else 0

    middle = v[np.abs(v[:, 0] - lm[2, 0]) < 15.0]
    chin = middle[np.argmin(middle[:, 1])]
    if levels.neck:
        axis = np.array([0.0, -1.0, -0.3])
        # below the lowest point of the face (the chin, or the neck cut of a scan with a neck), behind it
        add(*_tube(np.array([0.0, chin[1] - 20.0, chin[2] - 55.0]), axis / np.linalg.norm(axis), 48.0, 120.0))
    if levels.back_of_head:
        # the cranium behind the ears, down to the nape (about the nose's height)
        add(*_head_back(np.array([0.0, lm[0, 1] + 5.0, lm[2, 2] - 95.0]), np.array([78.0, 110.0, 100.0]),
                        z_cut=lm[2, 2] - 95.0, y_min=lm[2, 1] - 10.0))
    v, f = compact(np.concatenate(pieces_v), np.concatenate(pieces_f))

    v = v + rng.normal(0.0, levels.noise_mm, v.shape)
    offsets = rng.normal(size=(len(lm), 3))
    offsets *= (rng.uniform(*levels.landmark_offset_mm, len(lm)) / np.linalg.norm(offsets, axis=1))[:, None]
    lm = lm + offsets
    stats["landmark_offsets_mm"] = [round(float(x), 3) for x in np.linalg.norm(offsets, axis=1)]

    # Back to the scan's frame, then a random rotation and shift.
    raw_from_clean = np.eye(4)
    if levels.rotate:
        raw_from_clean[:3, :3] = Rotation.random(random_state=rng).as_matrix()
        raw_from_clean[:3, 3] = rng.uniform(-levels.shift_mm, levels.shift_mm, 3)
    m = raw_from_clean @ back
    v, lm = apply_transform(m, v), apply_transform(m, lm)
    if levels.shuffle:
        perm = rng.permutation(len(v))
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(v))
        v, f = v[perm], inv[f]
        f = f[rng.permutation(len(f))]
    stats["vertices"], stats["triangles"] = float(len(v)), float(len(f))
    return RawScan(v, f, lm, raw_from_clean, stats)


# ------------------------------------------------------------------------------------------ a folder


def make_raw_folder(scans: str | Path, out: str | Path, seed: int = 0, levels: RawLevels = RawLevels(),
                    keys: list[str] | None = None) -> Path:
    """Write the raw-scanner version of a scan folder (PLY meshes + manifest.json) to `out`."""
    from backend.scans.folder import ScanError, load_scan, load_scan_folder
    from backend.scans.landmarks import LANDMARK_NAMES
    from training.data.synthetic_faces import write_ply

    levels.check()
    src = Path(scans)
    folder = load_scan_folder(src)
    manifest = json.loads((src / "manifest.json").read_text())
    raw_entries = {e["identity"] + "/" + e["expression"]: e for e in manifest["scans"] if isinstance(e, dict)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for entry in folder.entries:
        if keys is not None and entry.key not in keys:
            continue
        try:
            scan = load_scan(entry, folder.units)
        except ScanError:
            continue
        raw = corrupt_scan(scan.vertices, scan.faces, scan.landmarks, [int(seed), zlib.crc32(entry.key.encode())],
                           levels)
        rel = f"{entry.identity}/{entry.expression}.ply"
        (out / entry.identity).mkdir(parents=True, exist_ok=True)
        write_ply(out / rel, raw.vertices, raw.faces, comment=f"imface raw-scanner version, seed {seed}; millimetres")
        e = {k: v for k, v in raw_entries.get(entry.key, {}).items()
             if k not in ("path", "landmarks_mm", "landmark_vertex_indices")}
        e.update(path=rel, identity=entry.identity, expression=entry.expression, neutral=entry.neutral,
                 landmarks_mm={n: [round(float(c), 4) for c in p] for n, p in zip(LANDMARK_NAMES, raw.landmarks)},
                 raw={"seed": int(seed), "clean_to_raw": raw.clean_to_raw.round(12).tolist(), "stats": raw.stats})
        entries.append(e)
    head = {k: v for k, v in manifest.items() if k not in ("scans", "landmark_vertex_indices", "shared_topology",
                                                          "units", "n_vertices", "n_triangles")}
    head.update(units="mm", shared_topology=False,
                raw_scanner={"source": str(src.resolve()), "seed": int(seed), "levels": asdict(levels),
                             "minimum": MINIMUM_NOTE},
                scans=entries)
    (out / "manifest.json").write_text(json.dumps(head, indent=1))
    return out


# ------------------------------------------------------------------------------------------ command


def add_raw_scans_command(subparsers: argparse._SubParsersAction) -> None:
    """`imface make-raw SCANS --out DIR`: register the subcommand (backend/cli.py calls this)."""
    p = subparsers.add_parser("make-raw", help="a raw-scanner version of a scan folder (noise, holes, hair, "
                                               "neck, rotation, uneven density, moved landmarks)")
    p.add_argument("scans", help="scan folder (manifest.json)")
    p.add_argument("--out", required=True, help="output scan folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan", action="append", help="only this scan (repeatable)")
    p.add_argument("--noise-mm", type=float, default=RawLevels.noise_mm, help="Gaussian noise σ (at least 0.3)")
    p.add_argument("--holes", type=int, default=RawLevels.holes, help="holes of 5-15 mm (at least 3)")
    p.add_argument("--fragments", type=int, default=RawLevels.fragments, help="hair-like fragments (at least 6)")
    p.set_defaults(func=_cmd_make_raw)


def _cmd_make_raw(args: argparse.Namespace) -> int:
    import sys

    levels = RawLevels(noise_mm=args.noise_mm, holes=args.holes, fragments=args.fragments)
    try:
        out = make_raw_folder(args.scans, args.out, seed=args.seed, levels=levels, keys=args.scan)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    n = len(json.loads((out / "manifest.json").read_text())["scans"])
    print(f"{n} raw scans written to {out} (at least: {MINIMUM_NOTE})")
    return 0


# ------------------------------------------------------------------------------------------ measuring


def clean_vs_raw(model, clean: str | Path, raw: str | Path, keys: list[str] | None = None, schedule=None,
                 resolution: int = 128, n_points: int = 100_000, pose: bool = True, seed: int = 0,
                 neutral_labels: bool = True) -> list[dict[str, float | str]]:
    """Fit each scan and its raw-scanner version, and measure both fits against the clean scan's surface
    (`backend.evaluate.reconstruction_metrics`, in the clean scan's frame: the raw fit is brought back with
    the stored `clean_to_raw`). One row per scan: chamfer / chamfer_exact of each and their differences."""
    from backend.evaluate import fitted_face, reconstruction_metrics
    from backend.fitting import target_from_scan
    from backend.fitting.loop import neutral_warp_off
    from backend.fitting.pose import fit_posed
    from backend.geometry.alignment import apply_transform
    from backend.scans.folder import load_scan, load_scan_folder

    fc, fr = load_scan_folder(clean), load_scan_folder(raw)
    raw_meta = {f"{e['identity']}/{e['expression']}": e.get("raw", {})
                for e in json.loads((Path(raw) / "manifest.json").read_text())["scans"]}
    rows = []
    for er in fr.entries:
        if keys is not None and er.key not in keys:
            continue
        ec = next(e for e in fc.entries if e.key == er.key)
        neutral = bool(neutral_labels) and neutral_warp_off(ec.neutral)
        clean_target = target_from_scan(load_scan(ec, fc.units), seed=seed)
        row: dict[str, float | str] = {"key": er.key}
        for name, entry, units, back in (("clean", ec, fc.units, np.eye(4)),
                                         ("raw", er, fr.units, np.linalg.inv(np.array(raw_meta[er.key]["clean_to_raw"])))):
            target = clean_target if name == "clean" else target_from_scan(load_scan(entry, units), seed=seed)
            result = fit_posed(model, target, schedule, neutral=neutral, seed=seed, pose=pose)
            v, f = fitted_face(model, result, resolution)  # the scan's frame, mm
            m = reconstruction_metrics((apply_transform(back, v), f), clean_target, n_points=n_points, seed=seed)
            row[f"{name}_chamfer_mm"] = m["chamfer_mm"]
            row[f"{name}_chamfer_exact_mm"] = m["chamfer_exact_mm"]
            row[f"{name}_fscore_1mm"] = m["fscore_1mm"]
        row["delta_chamfer_mm"] = float(row["raw_chamfer_mm"]) - float(row["clean_chamfer_mm"])
        row["delta_chamfer_exact_mm"] = float(row["raw_chamfer_exact_mm"]) - float(row["clean_chamfer_exact_mm"])
        rows.append(row)
    return rows


def clean_vs_raw_markdown(rows: list[dict[str, float | str]]) -> str:
    heads = ("scan", "clean Chamfer (mm)", "raw Chamfer (mm)", "Δ (mm)", "clean exact (mm)", "raw exact (mm)", "Δ exact (mm)")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    cols = ("clean_chamfer_mm", "raw_chamfer_mm", "delta_chamfer_mm", "clean_chamfer_exact_mm",
            "raw_chamfer_exact_mm", "delta_chamfer_exact_mm")
    for r in rows:
        lines.append(f"| {r['key']} | " + " | ".join(f"{float(r[c]):+.3f}" if c.startswith("delta") else
                                                     f"{float(r[c]):.3f}" for c in cols) + " |")
    if len(rows) > 1:
        lines.append("| **mean** | " + " | ".join(f"{np.mean([float(r[c]) for r in rows]):{'+' if c.startswith('delta') else ''}.3f}"
                                                 for c in cols) + " |")
    return "\n".join(lines) + "\n"
