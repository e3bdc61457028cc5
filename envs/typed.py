"""Type checks for the plain config dataclasses (``EnvConfig``, ``SceneConfig``, the collector's ``CollectConfig``).

A value from YAML or a ``key=value`` override of the wrong type (``seed=abc``, ``rollouts_per_task=1.5``) is
refused with a ``ValueError`` naming the key, before anything is written.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def _kind(hint: Any) -> str | None:
    text = str(hint)
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    if hint is str:
        return "str"
    if text.startswith("tuple[float"):
        return "floats"
    if text.startswith("dict"):
        return "dict"
    return None


def _ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "floats":
        return isinstance(value, (list, tuple)) and all(_ok("float", v) for v in value)
    if kind == "dict":
        return isinstance(value, dict)
    return True


def check_types(instance: Any, prefix: str = "") -> None:
    """``ValueError`` naming every field of a dataclass instance whose value is not of its annotated type."""
    hints = typing.get_type_hints(type(instance))
    problems = []
    for f in dataclasses.fields(instance):
        kind = _kind(hints.get(f.name))
        value = getattr(instance, f.name)
        if kind is not None and not _ok(kind, value):
            want = {"floats": "a list of numbers", "dict": "a mapping", "int": "an integer", "float": "a number",
                    "bool": "true or false", "str": "a string"}[kind]
            problems.append(f"{prefix}{f.name} must be {want}, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
