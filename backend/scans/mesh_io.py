"""Scan files read as geometry only, with every size bounded before anything big is allocated.

Every scan the product reads (a scan folder, the file given to `imface fit`, a client's upload or path in
the server) goes through here, never through a general-purpose loader: trimesh would follow an OBJ's
`mtllib` (and the textures it names) and a PLY's `TextureFile` comment through its resolver, which could
read files outside the folders a backend may read. Vertices keep the file's order (shared-topology
correspondences depend on it). Here:

* OBJ: only `v x y z` and `f a b c ...` lines are read (polygons become triangle fans; `a/b/c` index
  forms and negative indices are understood); `mtllib`, `usemtl`, `vt`, `vn` and every other line are
  ignored, so no other file is ever opened.
* PLY (ascii, binary little/big endian): the header is read first (at most 64 KiB); the vertex and face
  counts it declares are checked against the limits and against the file size before the body is read.
  Only x, y, z of `vertex` and the index list of `face` are used; other elements are skipped by size.
* STL (binary; ascii as a text fallback), XYZ/TXT/PTS (x y z columns), NPY (float arrays, no pickle,
  shape read from the header first).

`read_geometry` returns float64 vertices (V, 3) and int64 faces (F, 3) or None for a point cloud.
Every failure is a `ScanReadError` (wire code `bad_scan`).
"""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

MESH_SUFFIXES = frozenset({".obj", ".ply", ".stl", ".off"})
CLOUD_SUFFIXES = frozenset({".xyz", ".txt", ".pts", ".npy"})


class ScanReadError(ValueError):
    """The file does not read as geometry within the limits (wire code bad_scan)."""


@dataclass(frozen=True)
class ScanLimits:
    max_bytes: int = 1 << 30            # a file bigger than this is not read at all (1 GiB)
    max_vertices: int = 10_000_000
    max_faces: int = 20_000_000
    max_header_bytes: int = 65_536      # PLY header


DEFAULT_SCAN_LIMITS = ScanLimits()


def read_geometry(fh: BinaryIO, suffix: str, limits: ScanLimits = DEFAULT_SCAN_LIMITS,
                  name: str = "scan") -> tuple[np.ndarray, np.ndarray | None]:
    """(vertices float64 (V, 3), faces int64 (F, 3) or None) of an open binary file."""
    suffix = suffix.lower()
    size = _size(fh)
    if size > limits.max_bytes:
        raise ScanReadError(f"{name}: {size:,} bytes is above the limit of {limits.max_bytes:,}")
    if suffix == ".obj":
        v, f = _read_obj(fh, limits, name)
    elif suffix == ".ply":
        v, f = _read_ply(fh, size, limits, name)
    elif suffix == ".stl":
        v, f = _read_stl(fh, size, limits, name)
    elif suffix == ".off":
        v, f = _read_off(fh, limits, name)
    elif suffix in (".xyz", ".txt", ".pts"):
        v, f = _read_xyz(fh, limits, name), None
    elif suffix == ".npy":
        v, f = _read_npy(fh, limits, name), None
    else:
        raise ScanReadError(f"{name}: unsupported file type '{suffix}' (meshes: {', '.join(sorted(MESH_SUFFIXES))}; "
                            f"point clouds: {', '.join(sorted(CLOUD_SUFFIXES))})")
    if len(v) == 0:
        raise ScanReadError(f"{name}: empty: no vertices")
    if not np.isfinite(v).all():
        raise ScanReadError(f"{name}: {int((~np.isfinite(v).all(1)).sum())} vertices have NaN or infinite "
                            "coordinates")
    if f is not None:
        if len(f) == 0:
            f = None
        elif f.min() < 0 or f.max() >= len(v):
            raise ScanReadError(f"{name}: triangles refer to vertices that do not exist")
    return v, f


def read_geometry_file(path: str | Path, limits: ScanLimits = DEFAULT_SCAN_LIMITS) -> tuple[np.ndarray, np.ndarray | None]:
    path = Path(path)
    with open(path, "rb") as fh:
        return read_geometry(fh, path.suffix, limits, path.name)


def obj_material_libraries(fh: BinaryIO, max_bytes: int = 1 << 30) -> list[str]:
    """The `mtllib` names an OBJ refers to (to check a training folder before a loader sees it)."""
    out: list[str] = []
    read = 0
    for line in fh:
        read += len(line)
        if read > max_bytes:
            break
        if line.startswith(b"mtllib"):
            out.extend(p.decode("utf-8", "replace") for p in line.split()[1:])
    return out


# ------------------------------------------------------------------------------------------ helpers


def _size(fh: BinaryIO) -> int:
    pos = fh.tell()
    fh.seek(0, io.SEEK_END)
    size = fh.tell()
    fh.seek(pos)
    return size


def _check_counts(nv: int, nf: int, limits: ScanLimits, name: str) -> None:
    if nv > limits.max_vertices:
        raise ScanReadError(f"{name}: {nv:,} vertices is above the limit of {limits.max_vertices:,}")
    if nf > limits.max_faces:
        raise ScanReadError(f"{name}: {nf:,} triangles is above the limit of {limits.max_faces:,}; decimate the scan")


def _floats(tokens: list[bytes], name: str, what: str) -> np.ndarray:
    try:
        return np.array(tokens, dtype=np.float64) if tokens else np.zeros(0)
    except ValueError:
        raise ScanReadError(f"{name}: {what} holds something that is not a number") from None


def _fan(polys: list[list[int]]) -> np.ndarray:
    tris = [(p[0], p[i], p[i + 1]) for p in polys for i in range(1, len(p) - 1)]
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


# ------------------------------------------------------------------------------------------ OBJ

_SLASH = re.compile(rb"/[^\s]*")


def _read_obj(fh: BinaryIO, limits: ScanLimits, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = fh.read()
    vlines: list[bytes] = []
    flines: list[bytes] = []
    for line in data.splitlines():
        if line.startswith(b"v ") or line.startswith(b"v\t"):
            vlines.append(line)
        elif line.startswith(b"f ") or line.startswith(b"f\t"):
            flines.append(line)
        # every other statement (mtllib, usemtl, vt, vn, o, g, s, ...) is ignored: no file is opened
    del data
    _check_counts(len(vlines), len(flines), limits, name)
    rows = [ln.split()[1:4] for ln in vlines]
    if any(len(r) != 3 for r in rows):
        raise ScanReadError(f"{name}: a 'v' line has fewer than three coordinates")
    v = _floats([t for r in rows for t in r], name, "a 'v' line").reshape(-1, 3)
    nv = len(v)
    polys: list[list[int]] = []
    for ln in flines:
        toks = _SLASH.sub(b"", ln).split()[1:]
        if len(toks) < 3:
            raise ScanReadError(f"{name}: an 'f' line has fewer than three vertices")
        try:
            idx = [int(t) for t in toks]
        except ValueError:
            raise ScanReadError(f"{name}: an 'f' line holds something that is not a vertex index") from None
        polys.append([i - 1 if i > 0 else nv + i for i in idx])
    f = _fan(polys)
    _check_counts(nv, len(f), limits, name)
    return v, f


# ------------------------------------------------------------------------------------------ PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


@dataclass
class _Element:
    name: str
    count: int
    props: list[tuple[str, str | tuple[str, str]]]  # (name, dtype) or (name, (count dtype, item dtype))


def _ply_header(fh: BinaryIO, limits: ScanLimits, name: str) -> tuple[str, list[_Element], int]:
    head = fh.read(limits.max_header_bytes)
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise ScanReadError(f"{name}: not a PLY file (or its header is longer than {limits.max_header_bytes} bytes)")
    nl = head.find(b"\n", end)
    body_start = (nl + 1) if nl >= 0 else len(head)
    fmt = ""
    elements: list[_Element] = []
    for raw in head[:end].split(b"\n")[1:]:
        parts = raw.decode("ascii", "replace").split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue  # (a "comment TextureFile ..." names a texture: never opened here)
        if parts[0] == "format" and len(parts) >= 2:
            fmt = parts[1]
        elif parts[0] == "element" and len(parts) == 3:
            try:
                count = int(parts[2])
            except ValueError:
                raise ScanReadError(f"{name}: bad PLY element count {parts[2]!r}") from None
            if count < 0:
                raise ScanReadError(f"{name}: negative PLY element count")
            elements.append(_Element(parts[1], count, []))
        elif parts[0] == "property" and elements:
            if len(parts) == 5 and parts[1] == "list":
                if parts[2] not in _PLY_TYPES or parts[3] not in _PLY_TYPES:
                    raise ScanReadError(f"{name}: unknown PLY property type in {raw!r}")
                elements[-1].props.append((parts[4], (_PLY_TYPES[parts[2]], _PLY_TYPES[parts[3]])))
            elif len(parts) == 3 and parts[1] in _PLY_TYPES:
                elements[-1].props.append((parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise ScanReadError(f"{name}: cannot read PLY property line {raw[:80]!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ScanReadError(f"{name}: unknown PLY format {fmt!r}")
    return fmt, elements, body_start


def _read_ply(fh: BinaryIO, size: int, limits: ScanLimits, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    fmt, elements, start = _ply_header(fh, limits, name)
    counts = {e.name: e.count for e in elements}
    nv, nf = counts.get("vertex", 0), counts.get("face", 0)
    _check_counts(nv, nf, limits, name)  # bounded from the header, before the body is read
    if nv == 0:
        raise ScanReadError(f"{name}: empty: no vertices")
    vertex = next((e for e in elements if e.name == "vertex"), None)
    if vertex is None or not all(any(p[0] == c for p in vertex.props) for c in "xyz"):
        raise ScanReadError(f"{name}: the PLY has no vertex element with x, y, z")
    fh.seek(start)
    if fmt == "ascii":
        return _read_ply_ascii(fh, elements, limits, name)
    order = "<" if fmt == "binary_little_endian" else ">"
    # Lower bound of the body size from the declared counts: a header promising more than the file
    # holds is refused before anything is allocated.
    need = 0
    for e in elements:
        for _, t in e.props:
            need += e.count * (np.dtype(t).itemsize if isinstance(t, str) else np.dtype(t[0]).itemsize)
    if start + need > size:
        raise ScanReadError(f"{name}: the PLY header declares more data than the file holds (truncated?)")
    v = None
    f = None
    for e in elements:
        if all(isinstance(t, str) for _, t in e.props):
            dt = np.dtype([(n, order + t) for n, t in e.props])  # type: ignore[operator]
            nbytes = dt.itemsize * e.count
            buf = fh.read(nbytes)
            if len(buf) != nbytes:
                raise ScanReadError(f"{name}: the PLY file ends inside element '{e.name}'")
            arr = np.frombuffer(buf, dtype=dt, count=e.count)
            if e.name == "vertex":
                v = np.stack([arr[c].astype(np.float64) for c in "xyz"], axis=1)
        elif e.name == "face" and len(e.props) == 1:
            cnt_t, item_t = e.props[0][1]  # type: ignore[misc]
            f = _read_ply_faces(fh, e.count, order + cnt_t, order + item_t, name)
        else:
            raise ScanReadError(f"{name}: PLY element '{e.name}' with list properties is not supported")
    assert v is not None
    if f is not None:
        _check_counts(len(v), len(f), limits, name)
    return v, f


def _read_ply_faces(fh: BinaryIO, count: int, cnt_t: str, item_t: str, name: str) -> np.ndarray:
    if count == 0:
        return np.zeros((0, 3), np.int64)
    cs, isz = np.dtype(cnt_t).itemsize, np.dtype(item_t).itemsize
    first = fh.read(cs)
    if len(first) != cs:
        raise ScanReadError(f"{name}: the PLY file ends inside its faces")
    k = int(np.frombuffer(first, dtype=cnt_t)[0])
    if not 3 <= k <= 64:
        raise ScanReadError(f"{name}: a PLY face with {k} vertices")
    fh.seek(-cs, io.SEEK_CUR)
    dt = np.dtype([("n", cnt_t), ("i", item_t, (k,))])
    nbytes = dt.itemsize * count
    buf = fh.read(nbytes)
    if len(buf) != nbytes:
        raise ScanReadError(f"{name}: the PLY faces are not all {k}-gons or the file is truncated "
                            "(mixed polygon sizes are not supported in binary PLY)")
    arr = np.frombuffer(buf, dtype=dt, count=count)
    if (arr["n"] != k).any():
        raise ScanReadError(f"{name}: mixed polygon sizes in a binary PLY are not supported; triangulate it")
    idx = arr["i"].astype(np.int64)
    if k == 3:
        return idx
    return np.concatenate([idx[:, [0, i, i + 1]] for i in range(1, k - 1)])


def _read_ply_ascii(fh: BinaryIO, elements: list[_Element], limits: ScanLimits,
                    name: str) -> tuple[np.ndarray, np.ndarray | None]:
    lines = iter(fh.read().split(b"\n"))
    v = None
    polys: list[list[int]] = []
    has_faces = False
    for e in elements:
        rows = []
        for _ in range(e.count):
            try:
                rows.append(next(lines).split())
            except StopIteration:
                raise ScanReadError(f"{name}: the PLY file ends inside element '{e.name}'") from None
        if e.name == "vertex":
            names = [p[0] for p in e.props]
            if any(isinstance(t, tuple) for _, t in e.props):
                raise ScanReadError(f"{name}: list properties on PLY vertices are not supported")
            cols = [names.index(c) for c in "xyz"]
            if any(len(r) < len(names) for r in rows):
                raise ScanReadError(f"{name}: a PLY vertex line is short")
            v = _floats([r[c] for r in rows for c in cols], name, "a PLY vertex line").reshape(-1, 3)
        elif e.name == "face":
            has_faces = True
            for r in rows:
                try:
                    k = int(r[0])
                    idx = [int(t) for t in r[1:1 + k]]
                except (ValueError, IndexError):
                    raise ScanReadError(f"{name}: a PLY face line is not a list of indices") from None
                if k < 3 or len(idx) != k:
                    raise ScanReadError(f"{name}: a PLY face line is short")
                polys.append(idx)
    assert v is not None
    f = _fan(polys) if has_faces else None
    if f is not None:
        _check_counts(len(v), len(f), limits, name)
    return v, f


# ------------------------------------------------------------------------------------------ STL, OFF


def _read_stl(fh: BinaryIO, size: int, limits: ScanLimits, name: str) -> tuple[np.ndarray, np.ndarray]:
    head = fh.read(84)
    if len(head) == 84:
        n = struct.unpack("<I", head[80:84])[0]
        if 84 + 50 * n == size:  # binary
            _check_counts(3 * n, n, limits, name)
            dt = np.dtype([("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("a", "<u2")])
            arr = np.frombuffer(fh.read(50 * n), dtype=dt, count=n)
            v = arr["v"].reshape(-1, 3).astype(np.float64)
            return v, np.arange(3 * n, dtype=np.int64).reshape(-1, 3)
    fh.seek(0)
    toks = [ln.split()[1:4] for ln in fh.read().splitlines() if ln.strip().startswith(b"vertex")]
    if not toks or len(toks) % 3:
        raise ScanReadError(f"{name}: not a binary STL and not an ascii STL with whole triangles")
    _check_counts(len(toks), len(toks) // 3, limits, name)
    v = _floats([t for r in toks for t in r], name, "an STL vertex").reshape(-1, 3)
    return v, np.arange(len(v), dtype=np.int64).reshape(-1, 3)


def _read_off(fh: BinaryIO, limits: ScanLimits, name: str) -> tuple[np.ndarray, np.ndarray]:
    lines = [ln for ln in (x.split(b"#")[0].strip() for x in fh.read().splitlines()) if ln]
    if not lines or not lines[0].startswith(b"OFF"):
        raise ScanReadError(f"{name}: not an OFF file")
    head = lines[0][3:].split() or (lines.pop(1).split() if len(lines) > 1 else [])
    try:
        nv, nf = int(head[0]), int(head[1])
    except (ValueError, IndexError):
        raise ScanReadError(f"{name}: bad OFF counts line") from None
    _check_counts(nv, nf, limits, name)
    body = lines[1:]
    if len(body) < nv + nf:
        raise ScanReadError(f"{name}: the OFF file is truncated")
    v = _floats([t for ln in body[:nv] for t in ln.split()[:3]], name, "an OFF vertex").reshape(-1, 3)
    polys = []
    for ln in body[nv:nv + nf]:
        t = ln.split()
        try:
            k = int(t[0])
            polys.append([int(x) for x in t[1:1 + k]])
        except (ValueError, IndexError):
            raise ScanReadError(f"{name}: bad OFF face line") from None
        if k < 3 or len(polys[-1]) != k:
            raise ScanReadError(f"{name}: bad OFF face line")
    return v, _fan(polys)


# ------------------------------------------------------------------------------------------ point clouds


def _read_xyz(fh: BinaryIO, limits: ScanLimits, name: str) -> np.ndarray:
    rows = [ln.replace(b",", b" ").split()[:3] for ln in fh.read().splitlines()]
    rows = [r for r in rows if r and not r[0].startswith(b"#")]
    if len(rows) > limits.max_vertices:
        raise ScanReadError(f"{name}: {len(rows):,} points is above the limit of {limits.max_vertices:,}")
    if any(len(r) < 3 for r in rows):
        raise ScanReadError(f"{name}: a line has fewer than three columns (x y z)")
    return _floats([t for r in rows for t in r], name, "a point line").reshape(-1, 3)


def _read_npy(fh: BinaryIO, limits: ScanLimits, name: str) -> np.ndarray:
    from numpy.lib import format as npf

    try:
        version = npf.read_magic(fh)
        shape, fortran, dtype = (npf.read_array_header_1_0(fh) if version == (1, 0)
                                 else npf.read_array_header_2_0(fh))
    except (ValueError, OSError) as exc:
        raise ScanReadError(f"{name}: not a .npy file ({exc})") from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise ScanReadError(f"{name}: .npy of {dtype} (numbers only; no pickled objects)")
    n = int(np.prod(shape)) if shape else 1
    if len(shape) != 2 or shape[1] != 3:
        raise ScanReadError(f"{name}: .npy of shape {shape}, expected (N, 3)")
    if shape[0] > limits.max_vertices:
        raise ScanReadError(f"{name}: {shape[0]:,} points is above the limit of {limits.max_vertices:,}")
    buf = fh.read(n * dtype.itemsize)
    if len(buf) != n * dtype.itemsize:
        raise ScanReadError(f"{name}: the .npy file is truncated")
    arr = np.frombuffer(buf, dtype=dtype, count=n)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return arr.astype(np.float64)
