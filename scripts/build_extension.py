#!/usr/bin/env python3
"""Build the Blender extension zip: stage, bundle pinned wheels, validate, build.

    python scripts/build_extension.py               # every platform, one zip per platform
    python scripts/build_extension.py --host-only   # this machine's platform only (tests, main job)

Steps:
1. Download pyzmq and msgpack (pinned below, unmodified PyPI wheels, `--only-binary=:all: --no-deps`)
   for each target platform and Python (3.11: Blender 4.2-5.0; 3.13: Blender 5.1+) into an ignored
   cache folder (`build/wheel-cache/`, reused offline once filled; `index.json` records which file each
   platform/Python got and its sha256).
2. Stage the extension root in `build/extension/stage/`: the repository's `blender_manifest.toml` (the
   single source of the metadata) with `platforms` and the `wheels` list generated from the staged wheel
   files, `addon/`'s contents (no caches) and `wheels/`.
3. Run Blender's own extension CLI (`blender_ext.py validate` and `build`: the copy inside the `bpy`
   module, or `blender --command extension` when `bpy` is not importable), writing the zip(s) to
   `build/extension/`.
The last line of stdout is JSON: {"zips": [...], "platforms": [...], "wheels": [...]}.
Nothing is ever installed with pip, and nothing outside `build/` is written.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "blender_manifest.toml"
ADDON = ROOT / "addon"

# Pinned runtime dependencies of the extension (they have no dependencies of their own on CPython).
PINS = {"pyzmq": "27.3.0", "msgpack": "1.2.4"}
PYTHONS = ("3.11", "3.13")
# Blender platform -> pip --platform tags (pip expands each to the older compatible tags itself).
PLATFORM_TAGS = {
    "linux-x64": ["manylinux_2_28_x86_64"],      # Blender 4.2+ needs glibc 2.28
    "macos-arm64": ["macosx_11_0_arm64"],        # Blender 4.2 supports macOS 11.2+
    "macos-x64": ["macosx_11_0_x86_64"],
    "windows-x64": ["win_amd64"],
}
SKIP_IN_STAGE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*", "*.blend1")


def host_platform() -> str:
    system = {"darwin": "macos"}.get(platform.system().lower(), platform.system().lower())
    machine = platform.machine().lower()
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64"}.get(machine, machine)
    return f"{system}-{machine}"


def host_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def log(msg: str) -> None:
    print(f"[build_extension] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ wheels


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheels(cache: Path, platforms: list[str], pythons: list[str], offline: bool) -> list[Path]:
    """The pinned wheels for every (platform, Python), from the cache or downloaded into it."""
    cache.mkdir(parents=True, exist_ok=True)
    index_path = cache / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    pins_key = ",".join(f"{k}=={v}" for k, v in sorted(PINS.items()))
    wanted: dict[str, Path] = {}
    for plat in platforms:
        for py in pythons:
            key = f"{pins_key}|{plat}|{py}"
            entry = index.get(key)
            if entry and all((cache / name).is_file() and _sha256(cache / name) == digest
                              for name, digest in entry.items()):
                for name in entry:
                    wanted[name] = cache / name
                continue
            if offline:
                raise SystemExit(f"no cached wheels for {plat} / Python {py} (run once without --offline)")
            tmp = cache / f".download-{plat}-{py}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", py, "--implementation", "cp", "-d", str(tmp)]
            for tag in PLATFORM_TAGS[plat]:
                cmd += ["--platform", tag]
            cmd += [f"{k}=={v}" for k, v in PINS.items()]
            log(f"downloading {', '.join(f'{k}=={v}' for k, v in PINS.items())} for {plat}, Python {py}")
            subprocess.run(cmd, check=True)
            entry = {}
            for whl in sorted(tmp.glob("*.whl")):
                dest = cache / whl.name
                shutil.move(str(whl), dest)
                entry[whl.name] = _sha256(dest)
                wanted[whl.name] = dest
            shutil.rmtree(tmp, ignore_errors=True)
            got = {name.split("-")[0].lower().replace("_", "-") for name in entry}
            missing = {k.lower() for k in PINS} - got
            if missing:
                raise SystemExit(f"pip found no wheel of {sorted(missing)} for {plat} / Python {py}")
            index[key] = entry
            index_path.write_text(json.dumps(index, indent=1, sort_keys=True))
    return [wanted[k] for k in sorted(wanted)]


# ------------------------------------------------------------------------------------------ manifest


def staged_manifest(text: str, platforms: list[str], wheels: list[str]) -> str:
    """The repository manifest with `platforms` and `wheels` (generated) set as top-level keys."""
    lines = text.splitlines()
    lines = [ln for ln in lines if not re.match(r"\s*(platforms|wheels)\s*=", ln)]
    first_table = next((i for i, ln in enumerate(lines) if ln.strip().startswith("[")), len(lines))
    generated = [
        "# Generated by scripts/build_extension.py from the pinned wheel files:",
        "platforms = [" + ", ".join(json.dumps(p) for p in platforms) + "]",
        "wheels = [",
        *[f"  {json.dumps('./wheels/' + w)}," for w in wheels],
        "]",
        "",
    ]
    out = lines[:first_table] + generated + lines[first_table:]
    return "\n".join(out) + "\n"


def stage(out: Path, platforms: list[str], wheels: list[Path]) -> Path:
    stage_dir = out / "stage"
    shutil.rmtree(stage_dir, ignore_errors=True)
    shutil.copytree(ADDON, stage_dir, ignore=SKIP_IN_STAGE)
    (stage_dir / "wheels").mkdir()
    for whl in wheels:
        shutil.copy2(whl, stage_dir / "wheels" / whl.name)
    text = staged_manifest(MANIFEST.read_text(), platforms, [w.name for w in wheels])
    tomllib.loads(text)  # fail here, with the TOML error, rather than inside Blender's validator
    (stage_dir / "blender_manifest.toml").write_text(text)
    return stage_dir


# ------------------------------------------------------------------------------------------ Blender CLI


def extension_cli() -> list[str]:
    """The command that runs Blender's extension CLI: the bpy module's bundled blender_ext.py, or a
    `blender` binary (`blender --command extension`)."""
    spec = importlib.util.find_spec("bpy")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = sorted(Path(loc).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
            if found:
                return [sys.executable, str(found[-1])]
    blender = shutil.which("blender")
    if blender:
        return [blender, "--factory-startup", "--command", "extension"]
    raise SystemExit("neither the bpy module (bash scripts/setup_blender.sh) nor a `blender` binary was found")


def run_cli(cli: list[str], args: list[str]) -> None:
    log(" ".join(args[:1]) + " ...")
    proc = subprocess.run(cli + args, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"blender extension {args[0]} failed (exit {proc.returncode})")


def build(host_only: bool = False, out: Path | None = None, cache: Path | None = None,
          offline: bool = False, pythons: list[str] | None = None) -> dict:
    out = Path(out or ROOT / "build" / "extension")
    cache = Path(cache or ROOT / "build" / "wheel-cache")
    out.mkdir(parents=True, exist_ok=True)
    if host_only:
        platforms = [host_platform()]
        if platforms[0] not in PLATFORM_TAGS:
            raise SystemExit(f"this machine's platform {platforms[0]} is not one the extension supports")
        pythons = pythons or [host_python()]
    else:
        platforms = list(PLATFORM_TAGS)
        pythons = pythons or list(PYTHONS)
    wheels = fetch_wheels(cache, platforms, pythons, offline)
    stage_dir = stage(out, platforms, wheels)
    cli = extension_cli()
    run_cli(cli, ["validate", str(stage_dir)])
    meta = tomllib.loads((stage_dir / "blender_manifest.toml").read_text())
    before = set(out.glob("*.zip"))
    for old in out.glob(f"{meta['id']}-{meta['version']}*.zip"):
        old.unlink()
    if host_only:
        zip_path = out / f"{meta['id']}-{meta['version']}-{platforms[0].replace('-', '_')}.zip"
        run_cli(cli, ["build", "--source-dir", str(stage_dir), "--output-filepath", str(zip_path)])
        zips = [zip_path]
    else:
        run_cli(cli, ["build", "--source-dir", str(stage_dir), "--output-dir", str(out), "--split-platforms"])
        zips = sorted(set(out.glob(f"{meta['id']}-{meta['version']}*.zip")) | (set(out.glob("*.zip")) - before))
    for z in zips:
        if not z.is_file():
            raise SystemExit(f"the build wrote no {z}")
    return {"zips": [str(z) for z in zips], "platforms": platforms, "pythons": pythons,
            "wheels": [w.name for w in wheels]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-only", action="store_true", help="only this machine's platform and Python")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default build/extension)")
    ap.add_argument("--cache", type=Path, default=None, help="wheel cache (default build/wheel-cache)")
    ap.add_argument("--offline", action="store_true", help="use only cached wheels, never download")
    ap.add_argument("--python", action="append", dest="pythons", metavar="X.Y",
                    help="Python version(s) to bundle wheels for (default: 3.11 and 3.13; host's with --host-only)")
    a = ap.parse_args(argv)
    result = build(a.host_only, a.out, a.cache, a.offline, a.pythons)
    for z in result["zips"]:
        log(f"wrote {z}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
