"""Scan folder -> training samples: `preprocess_folder` runs the per-scan §4.1 pipeline
(`backend.scans.samples.preprocess_scan`) over a scan folder in parallel, with a progress bar, a cache
that skips scans whose source and settings have not changed, and a list of the scans that failed and
why; it writes one safetensors file per scan and `index.json` (docs/samples-format.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.numpy import save_file

from backend.scans.folder import ScanEntry, ScanError, load_scan, load_scan_folder
from backend.scans.landmarks import LANDMARK_NAMES
from backend.scans.samples import SAMPLES_FORMAT, PreprocessConfig, preprocess_scan

# ----------------------------------------------------------------------------------------------
# Batch over a folder


@dataclass
class FolderReport:
    out_dir: Path
    processed: list[str] = field(default_factory=list)   # keys computed in this run
    cached: list[str] = field(default_factory=list)      # keys skipped because they were up to date
    failed: list[tuple[str, str]] = field(default_factory=list)  # (scan, reason)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{len(self.processed)} scans preprocessed, {len(self.cached)} up to date, "
                 f"{len(self.failed)} failed ({self.seconds:.1f} s) -> {self.out_dir}"]
        lines += [f"  FAILED {scan}: {reason}" for scan, reason in self.failed]
        lines += [f"  warning {scan}: {w}" for scan, ws in self.warnings.items() for w in ws]
        return "\n".join(lines)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry_fingerprint(entry: ScanEntry, units: str, cfg: PreprocessConfig, dense: bool) -> str:
    lm = None if entry.landmarks_mm is None else entry.landmarks_mm.round(6).tolist()
    idx = None if entry.landmark_indices is None else entry.landmark_indices.tolist()
    blob = json.dumps([SAMPLES_FORMAT, cfg.fingerprint(), units, dense, lm, idx, _file_sha256(entry.path)])
    return hashlib.sha256(blob.encode()).hexdigest()


def _sample_path(out_dir: Path, key: str) -> Path:
    return out_dir / f"{key}.safetensors"


def _process_one(args: tuple[ScanEntry, str, PreprocessConfig, bool, Path, str]) -> tuple[str, str, list[str], str]:
    """Worker: returns (key, status, warnings, reason) with status 'ok' or 'failed'."""
    entry, units, cfg, dense, out_dir, fingerprint = args
    try:
        scan = load_scan(entry, units, cfg.max_triangles)
        samples = preprocess_scan(scan, cfg, dense=dense)
    except ScanError as exc:
        return entry.key, "failed", [], exc.reason
    except Exception as exc:  # a bug or a library failure must not stop the batch either
        return entry.key, "failed", [], f"unexpected {type(exc).__name__}: {exc}"
    path = _sample_path(out_dir, entry.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"format": SAMPLES_FORMAT, "fingerprint": fingerprint, "key": entry.key,
            "warnings": json.dumps(samples.warnings)}
    save_file(samples.tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written sample file
    return entry.key, "ok", samples.warnings, ""


def _cached_warnings(path: Path, fingerprint: str) -> list[str] | None:
    """The stored warnings when `path` holds samples made from the same source and settings."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception:
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    return json.loads(meta.get("warnings", "[]"))


def preprocess_folder(
    scan_dir: str | Path,
    out_dir: str | Path,
    cfg: PreprocessConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> FolderReport:
    """Preprocess every scan of a scan folder into `out_dir` and write `out_dir/index.json`.

    A broken scan is listed in the report and the index with its reason; the others go on."""
    from tqdm import tqdm

    cfg = cfg or PreprocessConfig()
    start = time.perf_counter()
    folder = load_scan_folder(scan_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = FolderReport(out_dir, failed=list(folder.invalid))
    dense = folder.shared_topology

    jobs, done_warnings = [], {}
    for entry in folder.entries:
        if not entry.path.is_file():
            report.failed.append((entry.key, f"mesh file not found: {entry.path}"))
            continue
        fingerprint = _entry_fingerprint(entry, folder.units, cfg, dense)
        cached = _cached_warnings(_sample_path(out_dir, entry.key), fingerprint)
        if cached is not None:
            report.cached.append(entry.key)
            done_warnings[entry.key] = cached
        else:
            jobs.append((entry, folder.units, cfg, dense, out_dir, fingerprint))

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=len(jobs), desc="preprocess", unit="scan", disable=not progress)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_process_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_process_one, jobs):
                results.append(result)
                bar.update()
    bar.close()
    for key, status, notes, reason in results:
        if status == "ok":
            report.processed.append(key)
            done_warnings[key] = notes
        else:
            report.failed.append((key, reason))
    report.warnings = {k: w for k, w in done_warnings.items() if w}
    _write_index(folder, out_dir, cfg, report, done_warnings)
    report.seconds = time.perf_counter() - start
    return report


def _write_index(folder, out_dir: Path, cfg: PreprocessConfig, report: FolderReport, warnings_by_key: dict) -> None:
    ok = [e for e in folder.entries if e.key in warnings_by_key]
    identities = sorted({e.identity for e in ok})
    expressions = sorted({e.expression for e in ok})
    n_dense = None
    if folder.shared_topology and ok:
        from safetensors import safe_open

        with safe_open(str(_sample_path(out_dir, ok[0].key)), "np") as f:
            n_dense = int(f.get_slice("dense_points").get_shape()[0])
    index = {
        "format": SAMPLES_FORMAT,
        "n_samples": cfg.n_near + cfg.n_uniform,
        "n_near": cfg.n_near,
        "landmark_names": list(LANDMARK_NAMES),
        "shared_topology": folder.shared_topology,
        "n_dense": n_dense,
        "source_folder": str(folder.root.resolve()),
        "preprocess_config": asdict(cfg),
        "identities": identities,
        "expressions": expressions,
        "scans": [
            {
                "key": e.key, "identity": e.identity, "identity_index": identities.index(e.identity),
                "expression": e.expression, "expression_index": expressions.index(e.expression),
                "neutral": e.neutral, "samples": f"{e.key}.safetensors", "source": str(e.path),
                "warnings": warnings_by_key[e.key],
            }
            for e in ok
        ],
        "failed": [{"scan": scan, "reason": reason} for scan, reason in report.failed],
    }
    tmp = out_dir / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / "index.json")
