"""Typed, validated views of ``params.yaml`` sections.

Each stage declares a dataclass for its section; ``parse_section`` fills it from the YAML
mapping and fails with a message naming the exact key (``train_lm.runs[0].dropout``) when a
key is unknown, missing, ill-typed or out of range. ``params.yaml`` stays the single source
of truth: the dataclasses carry no defaults for keys that the file must state.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from rnnlab.errors import ConfigError

T = TypeVar("T")


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def section(params: dict, key: str) -> Any:
    if key not in params:
        raise ConfigError(f"params.yaml: missing section {key!r}")
    return params[key]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def parse_section(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from mapping ``data``; ``where`` is the key path for messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing (expected {_type_name(hints[name])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def require(condition: bool, key: str, expectation: str, value: Any) -> None:
    """Range checks in ``validate`` methods: raise naming the key and what was expected."""
    if not condition:
        raise ConfigError(f"{key}: expected {expectation}, got {value!r}")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested params for MLflow (``train_lm.runs.0.dropout``)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (dict, list)) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out


def merged_runs(name: str, defaults: dict, runs: list) -> list[tuple[str, dict]]:
    """A training section's ``runs`` list, each merged over ``defaults``: ``[(where, merged)]``.

    Every run must be a mapping with a ``name`` usable as a folder name, names unique; the merged
    dict keeps ``name`` (each stage's own schema checks the other keys, naming ``where``)."""
    if "name" in defaults:
        raise ConfigError(f"{name}.defaults.name: a run name belongs in {name}.runs, not defaults")
    if not runs:
        raise ConfigError(f"{name}.runs: expected at least one run")
    out = []
    for i, run in enumerate(runs):
        where = f"{name}.runs[{i}]"
        if not isinstance(run, dict):
            raise ConfigError(f"{where}: expected a mapping, got {run!r}")
        run_name = run.get("name")
        if not isinstance(run_name, str) or not run_name.strip() or "/" in run_name:
            raise ConfigError(f"{where}.name: expected a non-empty string without '/', got {run_name!r}")
        out.append((where, {**defaults, **run}))
    names = [merged["name"] for _, merged in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{name}.runs: run names must be unique, got {names}")
    return out
