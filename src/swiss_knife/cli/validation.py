"""Validation errors in the words of the command line: the flag a user typed, not the config key
behind it (a recipe user hears about keys, from swiss_knife.config)."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError

# Which flag set which config key: {("calibration", "seq_len"): "--seq-len", ...}, so that a
# validation error speaks of the flag the user typed rather than of the recipe key behind it.
GivenFlags = dict[tuple[Any, ...], str]


# (flag, top-level config key) of every method option a verb has, to say which ones a method takes.
Options = Sequence[tuple[str, str]]


def _method_class(union: Any, method: Any) -> Any:
    """The config class of `method` in a discriminated union such as QuantizeConfig, or None."""
    members = typing.get_args(union)
    if not members:
        return None  # a single config class, not a union of methods
    for cls in typing.get_args(members[0]):
        if method in typing.get_args(cls.model_fields["method"].annotation):
            return cls
    return None


def _method_flags(cls: Any, options: Options) -> list[str]:
    """The flags of `options` that a method's config takes (targets and ignore go unsaid)."""
    if cls is None:
        return []
    flags = [
        flag
        for flag, key in options
        if key in cls.model_fields and key not in ("targets", "ignore")
    ]
    if "calibration" in cls.model_fields:
        flags.append("--calibration-data with its flags")
    return list(dict.fromkeys(flags))


# (argparse attribute, config key path, optional conversion) of hand-written flags.
FlagTable = Sequence[
    tuple[str, tuple[str, ...]] | tuple[str, tuple[str, ...], Callable[[Any], Any]]
]


def flags_into(args: argparse.Namespace, table: FlagTable, data: dict[str, Any]) -> GivenFlags:
    """Copy each flag of `table` that was given (not None, or a set switch) into `data` at its key
    path, over what a --config file put there; returns which flag set which path."""
    given: GivenFlags = {}
    for attr, path, *convert in table:
        value = getattr(args, attr, None)
        if value is None or value is False:
            continue
        inner = data
        for key in path[:-1]:
            inner[key] = dict(inner.get(key) or {})
            inner = inner[key]
        inner[path[-1]] = convert[0](value) if convert else value
        given[path] = "--" + attr.replace("_", "-")
    return given


def _pydantic_message(item: Any) -> str:
    message = str(item["msg"]).removeprefix("Value error, ")
    if len(message) > 1 and message[1].islower():
        message = message[0].lower() + message[1:]
    return message


def _flag_errors(
    error: Any, data: dict[str, Any], given: GivenFlags, cls: Any, options: Options
) -> str | None:
    """A validation error as one line about the flags that caused it, e.g. `--bits does not
    apply to --method bf16; ...`; None when a problem comes from the --config file, which is
    then reported in the file's own terms."""
    method = data.get("method")
    foreign: list[str] = []
    problems: list[str] = []
    for item in error.errors():
        if str(item["type"]).startswith("union_tag"):
            return None
        loc = tuple(item["loc"])
        if loc and loc[0] == method:
            loc = loc[1:]  # the discriminated union's tag, which nobody typed
        if not loc:  # a rule across keys (a model validator): its message names them
            problems.append(_pydantic_message(item))
            continue
        prefixes = (loc[:n] for n in range(len(loc), 0, -1))
        flag = next((given[prefix] for prefix in prefixes if prefix in given), None)
        if flag is None:
            return None
        if item["type"] == "extra_forbidden":
            foreign.append(flag)
        else:
            value = item.get("input")
            shown = f" {value}" if isinstance(value, int | float | str) else ""
            problems.append(f"{flag}{shown}: {_pydantic_message(item)}")
    if foreign:
        foreign = list(dict.fromkeys(foreign))
        takes = _method_flags(cls, options)
        verb = "does" if len(foreign) == 1 else "do"
        text = f"{', '.join(foreign)} {verb} not apply to --method {method}"
        text += f"; it takes {', '.join(takes)}" if takes else ", which takes no options"
        problems.insert(0, text)
    return "; ".join(problems)


def _validate_stage(
    union: Any,
    data: dict[str, Any],
    args: argparse.Namespace,
    given: GivenFlags | None = None,
    options: Options = (),
    where: str = "options",
) -> Any:
    from pydantic import TypeAdapter, ValidationError

    from ..config import format_validation_error

    try:
        return TypeAdapter(union).validate_python(data)
    except ValidationError as exc:
        cls = _method_class(union, data.get("method"))
        message = _flag_errors(exc, data, given or {}, cls, options)
        if message is None:
            # Report paths as the user wrote them in the --config file.
            message = format_validation_error(exc, union, args.config or where)
        raise ConfigError(message) from None
