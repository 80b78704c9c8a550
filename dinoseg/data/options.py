"""The options of a dataset description, checked against the dataset constructor's signature before it runs:
every name known, every required argument (the root of a dataset on disk) given, every value of the annotated type.
A value written as text (a dataset string's ``key=value``) is read as that type; any other value must already be
of it. Faults are a `DatasetError` naming the dataset, the option and the value."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from .io import DatasetError

_TRUE, _FALSE, _NONE = ("true", "yes"), ("false", "no"), ("none", "null", "")


class _Mismatch(Exception):
    """A value that is not of the annotated type (caught below to try the next member of a union)."""


def _describe(annotation) -> str:
    """What a value of `annotation` is, in words: "an integer", "a number or None", "a list of integers"..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if origin is Callable or annotation is Callable:
        return "a callable"
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(annotation, _describe(annotation))


def _parse_text(text: str):
    """A sequence written as text (``[64, 96]``), read as YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _Mismatch from None


def _convert(value, annotation, text: bool):
    """`value` as `annotation`; `text`: `value` is the text a user wrote, to be read as that type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (Any, inspect.Parameter.empty):
        return value
    if origin in (typing.Union, types.UnionType):
        # None first, then the other members in order ("auto" is a `bool | str`'s string).
        for member in sorted(args, key=lambda a: a is not type(None)):
            try:
                return _convert(value, member, text)
            except _Mismatch:
                continue
        raise _Mismatch
    if annotation is type(None):
        if value is None or (text and value.strip().lower() in _NONE):
            return None
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if annotation in (int, float):
        if text:
            try:
                return annotation(value.strip())
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, bool) or not isinstance(value, (int, float) if annotation is float else int):
            raise _Mismatch
        return annotation(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        items = _parse_text(value) if text else value
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Mismatch
            return tuple(_convert(v, a, False) for v, a in zip(items, args))
        item = args[0] if args else Any
        return type(items)(_convert(v, item, False) for v in items) if isinstance(items, tuple) else [
            _convert(v, item, False) for v in items]
    if origin is Callable or annotation is Callable:
        if callable(value):
            return value
        raise _Mismatch
    if isinstance(annotation, type) and not isinstance(value, annotation):
        if text:
            try:
                return annotation(value)  # a type built from its text (an enum by value, a path...)
            except Exception:
                raise _Mismatch from None
        raise _Mismatch
    return value


def dataset_options(cls: type, options: Mapping[str, Any], text_keys=(), description: str | None = None) -> dict:
    """`options` checked and converted for ``cls(transforms=..., **options)``: unknown names, missing required
    arguments (a dataset with a ``root`` needs one) and values not of their annotated type are a `DatasetError`
    naming the dataset (`description`: how the user wrote it), the option and the value. `text_keys`: the options
    given as text, read as their type."""
    name = cls.__name__
    prefix = f"dataset {description}: " if description else ""
    signature = inspect.signature(cls.__init__).parameters
    params = {k: p for k, p in signature.items()
              if k not in ("self", "transforms") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.values())  # takes **kwargs: any name may be right
    for key in options:
        if key not in params and not open_ended:
            raise DatasetError(f"{prefix}unknown option {key!r} for dataset {name}; expected one of {list(params)}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be resolved: the values go unchecked
        hints = {}
    if "root" in params and options.get("root") is None:
        raise DatasetError(f"{prefix}{name} needs a root (the dataset folder): add root=PATH to the dataset, or set "
                           "datasets.root")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in options]
    if missing:
        raise DatasetError(f"{prefix}{name} needs {missing[0]}=...")
    checked = {}
    for key, value in options.items():
        annotation = hints.get(key, Any)
        try:
            checked[key] = _convert(value, annotation, key in text_keys and isinstance(value, str))
        except _Mismatch:
            raise DatasetError(f"{prefix}{name} option {key}={value!r} must be {_describe(annotation)}") from None
    return checked
