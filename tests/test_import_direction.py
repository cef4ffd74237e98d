"""The layout's one-way rule, checked two ways.

1. Statically: every import in backend/, training/ and addon/ (top-level, inside functions, relative,
   and `importlib.import_module` / `__import__` with a literal name):
   * backend/ never imports training/ (except backend/cli.py, the `imface` command line: the top floor);
   * backend/ imports nothing of addon/ but the bpy-free `addon.link` package (the wire protocol);
   * addon/ never imports torch; addon/link/ never imports bpy;
   * training/ never imports addon/.
2. Dynamically: fresh interpreters import every backend module (no `training` in sys.modules after)
   and the add-on's link package (no `torch`, no `bpy`).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_FLOOR = {"backend/cli.py"}  # may import training (inside its commands)


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the file of `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            if mod == "__future__":
                continue
            found.append((node.lineno, mod))
            # `from pkg import sub` may import a submodule: count pkg.sub too
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(rel_path: str, source: str) -> list[str]:
    """The layout rules broken by one file (path relative to the repository root)."""
    rel = Path(rel_path)
    module = _module_name(rel)
    out = []
    for line, name in imports_of(source, module, rel.name == "__init__.py"):
        where = f"{rel_path}:{line} imports {name}"
        top = rel.parts[0]
        if top == "backend":
            if _within(name, "training") and rel_path not in TOP_FLOOR:
                out.append(f"{where}: backend/ must not import training/ (start a child process instead)")
            if _within(name, "addon") and not _within(name, "addon.link"):
                out.append(f"{where}: backend/ may import only addon.link of the add-on")
        elif top == "training":
            if _within(name, "addon"):
                out.append(f"{where}: training/ must not import the add-on")
        elif top == "addon":
            if _within(name, "torch"):
                out.append(f"{where}: the add-on must not import torch")
            if rel.parts[1:2] == ("link",) and _within(name, "bpy"):
                out.append(f"{where}: addon/link must not import bpy")
    return out


def _files() -> list[Path]:
    return sorted(p for top in ("backend", "training", "addon") for p in (REPO / top).rglob("*.py"))


def test_no_import_goes_the_wrong_way() -> None:
    found = [v for p in _files() for v in violations(p.relative_to(REPO).as_posix(), p.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path, source, broken", [
    ("backend/fitting/loop.py", "from training.config import TrainConfig\n", True),
    ("backend/evaluate.py", "def f():\n    import training.data.preprocess\n", True),
    ("backend/evaluate.py", "import importlib\nimportlib.import_module('training.train')\n", True),
    ("backend/evaluate.py", "__import__('training')\n", True),
    ("backend/cli.py", "def f():\n    from training.train import train\n", False),
    ("backend/server.py", "from addon.link.protocol import pack\n", False),
    ("backend/server.py", "from addon import registration\n", True),
    ("backend/server.py", "import addon\n", True),
    ("addon/panel.py", "import torch\n", True),
    ("addon/panel.py", "import bpy\n", False),
    ("addon/link/client.py", "import bpy\n", True),
    ("addon/link/client.py", "from .. import props\n", False),
    ("addon/link/client.py", "def f():\n    from torch import nn\n", True),
    ("training/trainer.py", "from backend.model import ImFacePlusPlus\n", False),
    ("training/trainer.py", "from addon.link import protocol\n", True),
])
def test_the_checker_catches_each_rule(path: str, source: str, broken: bool) -> None:
    assert bool(violations(path, source)) == broken


def test_relative_imports_resolve() -> None:
    names = {n for _, n in imports_of("from . import protocol\nfrom ..units import x\n", "addon.link.client")}
    assert {"addon.link.protocol", "addon.units.x", "addon.units"} <= names


def _fresh(code: str) -> dict:
    env_code = f"import sys, json\nsys.path.insert(0, {str(REPO)!r})\n{code}"
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_backend_loads_no_training_code() -> None:
    res = _fresh(
        "import importlib, pkgutil, backend\n"
        # __main__ modules run a command when imported; their imports are read by the static test.
        "mods = [m.name for m in pkgutil.walk_packages(backend.__path__, 'backend.')\n"
        "        if not m.name.endswith('.__main__')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps({'modules': mods, 'training': sorted(k for k in sys.modules if k.split('.')[0] == 'training')}))")
    assert "backend.model.io" in res["modules"] and "backend.scans.folder" in res["modules"]
    assert res["training"] == []


def test_addon_link_loads_neither_torch_nor_bpy() -> None:
    if not (REPO / "addon" / "link" / "__init__.py").is_file():
        pytest.skip("addon/link does not exist yet")
    res = _fresh(
        "import importlib, pkgutil\n"
        "import addon.link as link\n"
        "mods = [m.name for m in pkgutil.walk_packages(link.__path__, 'addon.link.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps({'loaded': sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'bpy'))}))")
    assert res["loaded"] == []


def test_addon_root_imports_without_blender() -> None:
    res = _fresh("import addon\nprint(json.dumps({'bpy': 'bpy' in sys.modules, 'torch': 'torch' in sys.modules}))")
    assert res == {"bpy": False, "torch": False}
