"""Strict loading of typed dataclass configs from YAML (the torchtitan / lingua habit).

Every config in the project is a (nested) dataclass. ``from_dict`` builds one from plain data and
refuses anything it does not know: an unknown or misspelled key, or a value of the wrong type, is a
``ConfigError`` that names the key and the file it came from. Validation of values beyond their
type lives in each dataclass's ``__post_init__``.

``apply_overrides`` implements ``--set a.b.c=value``: the value is parsed as YAML (so ``3``,
``1e-4``, ``true``, ``[1, 2]`` and ``null`` work) and goes through the same strict path.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the source file."""


def _one_line(e: Exception) -> str:
    """PyYAML's multi-line messages (problem, then where) on one line."""
    return " ".join(str(e).split())


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping (an empty file is ``{}``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _check_value(tp: Any, value: Any, key: str, source: str) -> Any:
    """Coerce/check ``value`` against type annotation ``tp``; returns the value to store."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: key '{key}': {value!r} "
                          f"matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: key '{key}' must be one of {list(get_args(tp))}, "
                              f"got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_check_value(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {k: _check_value(val_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (allowed under "
            f"'{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(fields))})"
        )
    kwargs = {k: _check_value(hints[k], v, prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data copy of a (nested) dataclass, suitable for ``yaml.safe_dump``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``a.b.c=value`` overrides to nested plain data (in place, and returned).

    Intermediate mappings are created when absent so that strict loading afterwards reports a
    misspelled key by its full dotted name. A list element is addressed by its index (``stages.1.steps``).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"{source}: override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: override {item!r}: value is not valid YAML: "
                              f"{_one_line(e)}") from e
        node: Any = data
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"{source}: override {item!r}: no list index "
                                      f"'{'.'.join(parts[:i + 1])}'")
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{source}: override {item!r}: "
                                  f"'{'.'.join(parts[:i + 1])}' is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{source}: override {item!r}: no list index '{key}'")
            node[int(last)] = value
        else:
            node[last] = value
    return data
