"""Command-line options derived from the method configs in the registry.

Every field of every registered config of a kind becomes an option: `group_size` is
`--group-size`, a `Literal` gives the choices, a bool gives `--x/--no-x`, a list of strings takes
commas, and the help is the field's description with each method's default. A field may refine
its option with a `Flag` marker in its annotation (another name, words that mean None, a
repeatable `PATTERN=VALUE` form, an extra switch). A nested config (pruning's `schedule`) gives
options for its own fields. So a method added in its own module has its flags with no edit here,
and `--help` can never restate a default that has drifted.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import Flag

# Fields that are never options: the method is --method, calibration has its own flags.
_NOT_OPTIONS = {"method", "calibration"}


@dataclass(frozen=True)
class Option:
    """One derived option: where its value goes in the config and how argparse reads it."""

    flag: str
    dest: str
    path: tuple[str, ...]  # config key path, e.g. ("schedule", "steps")
    methods: tuple[str, ...]  # the methods whose configs have this field
    kwargs: dict[str, Any]
    marker: Flag
    nested_under: str | None = None  # the option that switches the nested config on


def _flag_marker(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The annotation without Optional, and whether None is allowed."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    plain, _ = _plain(annotation)
    if isinstance(plain, type) and issubclass(plain, BaseModel):
        return plain
    return None


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _none_or(convert: Callable[[str], Any], words: Sequence[str]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.strip().lower() in words:
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {getattr(convert, '__name__', 'a value')} or {'/'.join(words)}, "
                f"got {text!r}"
            ) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def comma_strings(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def comma_ints(text: str) -> list[int]:
    """Comma-separated integers, at least one: '3,5,-2' -> [3, 5, -2]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def pattern_value(
    convert: Callable[[str], Any], metavar: str = "PATTERN=VALUE"
) -> Callable[[str], tuple[str, Any]]:
    """Parse `PATTERN=VALUE` (the pattern may itself contain '=' before the last one)."""

    def parse(text: str) -> tuple[str, Any]:
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern:
            raise argparse.ArgumentTypeError(f"expected {metavar}, got {text!r}")
        try:
            return pattern, convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value in {text!r}") from None

    return parse


def _argparse_kwargs(annotation: Any, marker: Flag) -> dict[str, Any]:
    plain, optional = _plain(annotation)
    none_words = tuple(marker.none) or (("none", "null") if optional else ())
    origin = typing.get_origin(plain)
    if marker.metavar:
        kwargs: dict[str, Any] = {"metavar": marker.metavar}
    else:
        kwargs = {}
    if plain is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = [str(c) for c in typing.get_args(plain)]
        if none_words:
            return {**kwargs, "type": _none_or(str, none_words), "choices": [*choices, None]}
        return {**kwargs, "choices": choices}
    if origin is dict:
        value_type = typing.get_args(plain)[1]
        value_type = typing.get_args(value_type)[0] if typing.get_args(value_type) else value_type
        metavar = marker.metavar or "PATTERN=VALUE"
        return {"type": pattern_value(value_type, metavar), "action": "append", "metavar": metavar}
    if origin is list and typing.get_args(plain)[0] is str:
        return {**kwargs, "type": comma_strings, "metavar": marker.metavar or "A,B"}
    if origin is list and typing.get_args(plain)[0] is int:
        return {**kwargs, "type": comma_ints, "metavar": marker.metavar or "I,J"}
    if plain in (int, float, str):
        convert = plain
        return {**kwargs, "type": _none_or(convert, none_words) if none_words else convert}
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _help(
    field: FieldInfo,
    owners: list[tuple[str, FieldInfo]],
    path: tuple[str, ...],
    marker: Flag,
    single: bool = False,
) -> str:
    text = (field.description or path[-1].replace("_", " ")).rstrip(".")
    defaults: dict[str, list[str]] = {}
    for method, owner in owners:
        if owner.default is not PydanticUndefined:
            value = owner.default
        elif owner.default_factory is not None:
            value = owner.default_factory()  # type: ignore[call-arg]
        else:
            value = None
        defaults.setdefault(_show(value), []).append(method)
    methods = [method for method, _ in owners]
    if len(defaults) == 1:
        default = f"default {next(iter(defaults))}"
    else:
        default = "default " + "; ".join(f"{'/'.join(m)} {v}" for v, m in defaults.items())
    if marker.none:
        default += f"; {'/'.join(marker.none)} = none"
    scope = "" if single else f"[{', '.join(methods)}] "  # a kind of one method needs no tag
    return f"{scope}{text} ({default})".replace("%", "%%")


def method_options(kind: str) -> list[Option]:
    """The options of every method of a kind, one per config field (shared fields once)."""
    from . import registry

    owners: dict[tuple[str, ...], list[tuple[str, FieldInfo]]] = {}
    nested_switch: dict[tuple[str, ...], str] = {}
    for method in registry.methods(kind):
        config_class: Any = method.config_class
        for name, field in config_class.model_fields.items():
            if name in _NOT_OPTIONS or _flag_marker(field).skip:
                continue
            inner = _nested_model(field.annotation)
            if inner is None:
                owners.setdefault((name,), []).append((method.name, field))
                continue
            for sub, sub_field in inner.model_fields.items():
                if _flag_marker(sub_field).skip:
                    continue
                owners.setdefault((name, sub), []).append((method.name, sub_field))
                if _flag_marker(field).switch == sub:
                    nested_switch[(name,)] = sub
    options: list[Option] = []
    for path, fields in owners.items():
        field = fields[0][1]
        marker = _flag_marker(field)
        flag = marker.name or "--" + path[-1].replace("_", "-")
        kwargs = _argparse_kwargs(field.annotation, marker)
        kwargs["help"] = _help(field, fields, path, marker, len(registry.methods(kind)) == 1)
        switch = nested_switch.get(path[:1]) if len(path) > 1 else None
        under = None
        if switch is not None and path[1] != switch:
            switch_field = dict(fields_of(kind, path[:1]))[switch]
            under = _flag_marker(switch_field).name or "--" + switch.replace("_", "-")
        options.append(
            Option(
                flag,
                "opt_" + "__".join(path),
                path,
                tuple(dict.fromkeys(m for m, _ in fields)),
                kwargs,
                marker,
                under,
            )
        )
    return options


def fields_of(kind: str, path: tuple[str, ...]) -> list[tuple[str, FieldInfo]]:
    """The fields of the nested config at `path` (e.g. ('schedule',)) of a kind's methods."""
    from . import registry

    for method in registry.methods(kind):
        config_class: Any = method.config_class
        field = config_class.model_fields.get(path[0])
        inner = _nested_model(field.annotation) if field is not None else None
        if inner is not None:
            return list(inner.model_fields.items())
    return []


def add_method_options(parser: argparse.ArgumentParser, kind: str, title: str) -> list[Option]:
    """Add every derived option of `kind` to the parser; returns them for `collect`."""
    group = parser.add_argument_group(title)
    options = method_options(kind)
    exclusive: dict[str, Any] = {}
    for option in options:
        kwargs = dict(option.kwargs)
        if "type" in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", option.path[-1].upper())  # not the internal dest
        one_of = option.marker.one_of
        if one_of is not None and one_of not in exclusive:
            exclusive[one_of] = group.add_mutually_exclusive_group(required=True)
        target = exclusive[one_of] if one_of is not None else group
        # Not given stays absent (not None): None is a value some options set (--group-size 0).
        target.add_argument(option.flag, dest=option.dest, default=argparse.SUPPRESS, **kwargs)
        for alias, value in option.marker.aliases:
            group.add_argument(
                alias,
                dest=option.dest,
                action="store_const",
                const=value,
                default=argparse.SUPPRESS,
                help=f"same as {option.flag} {_show(value)}",
            )
    return options


def collect(
    args: argparse.Namespace, options: list[Option], data: dict[str, Any]
) -> dict[tuple[str, ...], str]:
    """Put every option given on the command line into the config mapping `data`.

    Returns which option set which key path, so that validation errors can name the option.
    """
    given: dict[tuple[str, ...], str] = {}
    for option in options:
        if not hasattr(args, option.dest):
            continue
        value = getattr(args, option.dest)
        typed = option.flag
        if (
            isinstance(value, bool)
            and option.kwargs.get("action") is argparse.BooleanOptionalAction
        ):
            typed = option.flag if value else "--no-" + option.flag.removeprefix("--")
        if option.kwargs.get("action") == "append":
            value = {**_get(data, option.path, {}), **dict(typing.cast(list[Any], value))}
        _put(data, option.path, value)
        given[option.path] = typed
    return given


def _get(data: dict[str, Any], path: tuple[str, ...], default: Any) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        inner = data.get(key)
        if not isinstance(inner, dict):
            inner = data[key] = {}
        data = inner
    data[path[-1]] = value
