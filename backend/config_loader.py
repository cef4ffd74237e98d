"""The one loader of every configuration dataclass (model, training, preprocessing, fitting schedules).

A config is a plain dataclass tree; `config_from_dict` builds one from JSON/YAML data, checking each
value against its field's type hint (converting only the harmless cases: an integral float to int, an
int to float, a list to a tuple), fixed choices written as `Literal[...]` hints, nested dataclasses,
and unknown fields; every error names the field (`optim.lr`, `model.loss.sdf`).
`check_choices` checks the `Literal` fields of a config built in code.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of the dataclass `cls` from a mapping; ValueError naming the field on a bad value."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(_join(where, u) for u in unknown)}")
    return cls(**{k: _coerce(v, hints[k], _join(where, k)) for k, v in data.items()})


def check_choices(config: Any, where: str = "") -> None:
    """ValueError unless every `Literal`-typed field (recursively) holds one of its choices."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            raise ValueError(_bad_choice(_join(where, f.name), value, hint))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_choices(value, _join(where, f.name))


def read_json_file(path: str | Path, error: type[Exception], missing: str) -> Any:
    """The JSON value in `path`; `error(missing)` when there is no such file, `error` naming the file
    when it is not valid JSON (a config, a manifest, a codes file: one reader, one kind of message)."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON file (or YAML for .yaml/.yml)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml  # optional dependency, only for YAML files

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping")
    return data


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _bad_choice(where: str, value: Any, hint: Any) -> str:
    return f"{where}: {value!r} is not one of {', '.join(repr(c) for c in typing.get_args(hint))}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a JSON/YAML value against a field's type hint, converting the harmless cases."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ValueError(_bad_choice(where, value, hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else config_from_dict(hint, value, where)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value
