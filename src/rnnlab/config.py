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


PROFILES_DIR = "profiles"  # beside params.yaml: one overlay file per named profile
BASE_PROFILE = "cpu"  # params.yaml itself; its overlay file is empty


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML itself
    keeps the last one silently: a second ``ptb:`` under ``corpora`` would replace the built-in)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name} line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first given at line {seen[key] + 1}); a name (a corpus, a run) must be unique"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str = "params file") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found (run from the repository root)")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_params(path: str | Path = "params.yaml") -> dict:
    """``params.yaml`` with its ``profile`` applied: ``profiles/<profile>.yaml`` merged over it.

    A profile (``cpu``, the default and params.yaml itself; ``full``, the GPU targets; ``tiny``,
    the tests' profile) is selected with ``dvc exp run -S profile=<name>``, never by editing.
    Its overlay is merged key by key (:func:`merge_overlay`)."""
    path = Path(path)
    params = read_yaml(path)
    profile = params.get("profile", BASE_PROFILE)
    if not isinstance(profile, str) or not profile:
        raise ConfigError(f"{path}: profile: expected a profile name, got {profile!r}")
    folder = path.parent / PROFILES_DIR
    overlay_path = folder / f"{profile}.yaml"
    if not overlay_path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(f"{path}: profile: {profile!r} has no file {overlay_path}; known profiles: {known}")
    merged = merge_overlay(params, read_yaml(overlay_path, "profile file"), f"{overlay_path}")
    merged["profile"] = profile
    return merged


def merge_overlay(base: Any, overlay: Any, where: str) -> Any:
    """``overlay`` merged over ``base``: mappings key by key, anything else replaced.

    A training section's ``runs`` may only override runs that params.yaml declares: DVC makes one
    stage per run from params.yaml itself, so a profile cannot add one (it can set ``enabled:
    false`` on the runs it leaves out)."""
    if not isinstance(base, dict) or not isinstance(overlay, dict):
        return overlay
    out = dict(base)
    for key, value in overlay.items():
        if key == "corpora" and where.endswith(".yaml"):
            _check_corpora_overlay(base.get("corpora"), value, where)
        if key == "runs" and isinstance(base.get("runs"), dict) and isinstance(value, dict):
            unknown = sorted(set(value) - set(base["runs"]))
            if unknown:
                raise ConfigError(
                    f"{where}: runs.{unknown[0]}: a profile can only change runs that params.yaml "
                    f"declares (DVC makes one stage per run from it); declared: {sorted(base['runs'])}"
                )
        out[key] = merge_overlay(base[key], value, f"{where}: {key}") if key in base else value
    return out


def _check_corpora_overlay(base: Any, overlay: Any, where: str) -> None:
    """A profile may change a declared corpus's ``options`` (vocabulary limits...), nothing else:
    its files and splits are what ``download``/``prepare`` fetched and checked."""
    if not isinstance(overlay, dict):
        raise ConfigError(f"{where}: corpora: expected a mapping of corpus -> {{options: ...}}, got {overlay!r}")
    for name, entry in overlay.items():
        if not isinstance(base, dict) or name not in base:
            raise ConfigError(
                f"{where}: corpora.{name}: a profile can only change corpora that params.yaml declares; "
                f"declared: {sorted(base or {})}"
            )
        if not isinstance(entry, dict) or set(entry) - {"options"}:
            bad = sorted(set(entry) - {"options"}) if isinstance(entry, dict) else entry
            raise ConfigError(f"{where}: corpora.{name}: a profile may override `options` only, got {bad}")


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


def require_corpus_task(name: str, corpora: dict, tasks: tuple[str, ...], kind: str, where: str) -> None:
    """Before anything trains: the corpus a run names is declared in params ``corpora`` with one of
    ``tasks`` (``kind`` names them in the message: "parallel", "captions", ...)."""
    valid = sorted(n for n, e in corpora.items() if isinstance(e, dict) and e.get("task") in tasks)
    if name not in corpora:
        raise ConfigError(f"{where}.corpus: unknown corpus {name!r}; {kind} corpora: {valid}")
    if name not in valid:
        raise ConfigError(
            f"{where}.corpus: {name!r} is not a {kind} corpus (task {corpora[name].get('task')!r}); "
            f"valid names: {valid}"
        )


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


def merged_runs(name: str, defaults: dict, runs: Any) -> list[tuple[str, str, dict]]:
    """A training section's ``runs`` mapping (run name -> its keys), each merged over ``defaults``:
    ``[(where, run name, merged)]`` in the order params.yaml lists them.

    Run names become folder names and DVC stage names (``train_lm@<name>``): non-empty, no '/'.
    Each stage's own schema checks the other keys, naming ``where`` (``train_lm.runs.ptb-lstm``)."""
    if not isinstance(defaults, dict):
        raise ConfigError(f"{name}.defaults: expected a mapping, got {defaults!r}")
    if "name" in defaults:
        raise ConfigError(f"{name}.defaults.name: a run is named by its key in {name}.runs")
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(
            f"{name}.runs: expected a mapping of run name -> its keys, with at least one run; got {runs!r}"
        )
    out = []
    for run_name, run in runs.items():
        where = f"{name}.runs.{run_name}"
        if not isinstance(run_name, str) or not run_name.strip() or "/" in run_name or "@" in run_name:
            raise ConfigError(f"{where}: a run name must be a non-empty string without '/' or '@'")
        if run is None:
            run = {}
        if not isinstance(run, dict):
            raise ConfigError(f"{where}: expected a mapping, got {run!r}")
        if "name" in run:
            raise ConfigError(f"{where}.name: a run is named by its key in {name}.runs")
        out.append((where, run_name, {**defaults, **run}))
    return out
