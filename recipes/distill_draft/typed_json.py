"""JSON objects read into frozen dataclasses, strictly, so a mistyped key or value stops a run before it starts
instead of hours into it.

Every key must be a field, every field without a default must be present, and every value must have the
field's declared type: ``bool``, ``int``, ``float`` (an int is widened), ``str``, ``Literal[...]``,
``X | None``, ``tuple[X, ...]`` (from a JSON array) or another dataclass (from a JSON object). A dataclass's
``__post_init__`` may raise ``ValueError`` for rules across fields. Errors name the source and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A JSON value that does not fit its dataclass; the message names the source and the key."""


def from_json(cls: type[T], value: Any, source: str) -> T:
    """``value`` (parsed JSON) as a ``cls``; ``source`` (a file name, say) prefixes every error."""
    return _read(cls, value, source, "")


def to_json(value: Any) -> Any:
    """A dataclass (or anything inside one) as plain JSON values: objects, arrays, numbers, strings, null."""
    if dataclasses.is_dataclass(value):
        return {field.name: to_json(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [to_json(item) for item in value]
    return value


def _read(kind: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _read_object(kind, value, source, key)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _read(inner, value, source, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong_type(source, key, "a list", value)
        return tuple(_read(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if isinstance(value, bool) and kind is not bool:
        raise _wrong_type(source, key, kind.__name__, value)
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise _wrong_type(source, key, kind.__name__, value)
    return value


def _read_object(kind: type, value: Any, source: str, key: str) -> Any:
    if not isinstance(value, dict):
        raise _wrong_type(source, key or "the config", "a JSON object", value)
    fields = {field.name: field for field in dataclasses.fields(kind)}
    unknown = [name for name in value if name not in fields]
    if unknown:
        raise ConfigError(f"{source}: unknown key {', '.join(_join(key, name) for name in unknown)}")
    missing = [name for name, field in fields.items() if name not in value
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing key {', '.join(_join(key, name) for name in missing)}")
    hints = typing.get_type_hints(kind)
    arguments = {name: _read(hints[name], item, source, _join(key, name)) for name, item in value.items()}
    try:
        return kind(**arguments)
    except ValueError as exc:
        raise ConfigError(f"{source}: {key or 'the config'}: {exc}") from exc


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _wrong_type(source: str, key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: {key} must be {expected}, got {type(value).__name__} {value!r}")
