"""The command-line options are derived from the method configs, and mean what the YAML keys mean.

For every registered method of every verb with methods, each option the method takes is set to a
value other than its default, once on the command line and once as the key of a recipe stage; the
two configs must be equal. A method added in its own module is covered without an edit here.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from swiss_knife import cli, registry
from swiss_knife.cli_flags import Option, method_options
from swiss_knife.errors import ConfigError
from swiss_knife.recipe import CompressionConfig

KINDS = ("quantize", "prune")
_BUILDERS = {"quantize": cli._quant_config, "prune": cli._prune_config}


def _default(option: Option, method: str) -> Any:
    config_class: Any = registry.get(option_kind(option), method).config_class
    field = config_class.model_fields[option.path[0]]
    if len(option.path) > 1:
        inner = typing.get_args(field.annotation)[0]
        field = inner.model_fields[option.path[1]]
    if field.default is not PydanticUndefined:
        return field.default
    return field.default_factory() if field.default_factory else None


_KIND_OF: dict[int, str] = {}


def option_kind(option: Option) -> str:
    return _KIND_OF[id(option)]


def other_value(option: Option, method: str) -> tuple[Any, list[str]]:
    """A valid value unlike the default, and how it is typed on the command line."""
    default = _default(option, method)
    kwargs = option.kwargs
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        value = not default
        return value, [option.flag if value else "--no-" + option.flag.removeprefix("--")]
    if "choices" in kwargs:
        value = next(c for c in kwargs["choices"] if c is not None and c != default)
        return value, [option.flag, str(value)]
    if kwargs.get("action") == "append":
        return {"re:.*down_proj": 8}, [option.flag, "re:.*down_proj=8"]
    if option.path[-1] == "pattern":
        return "2:4", [option.flag, "2:4"]
    if isinstance(default, list):
        return ["Linear"], [option.flag, "Linear"]
    if isinstance(default, int) or (default is None and option.path[-1] == "group_size"):
        value = (default or 16) + 1 if option.path[-1] != "group_size" else 32
        return value, [option.flag, str(value)]
    if isinstance(default, float):
        value = default / 2 if default else 0.25
        return value, [option.flag, repr(value)]
    raise AssertionError(f"no test value for {option.flag} (default {default!r})")


ROWS: list[tuple[str, str, Option]] = []
for _kind in KINDS:
    for _option in method_options(_kind):
        _KIND_OF[id(_option)] = _kind
        for _method in _option.methods:
            ROWS.append((_kind, _method, _option))


def _with_nested(kind: str, method: str, option: Option, data: dict[str, Any]) -> list[str]:
    """A nested option (fine-tuning of a gradual schedule) needs its switch too."""
    if option.nested_under is None:
        return []
    data.setdefault(option.path[0], {})["steps"] = 2
    return [option.nested_under, "2"]


@pytest.mark.parametrize(
    ("kind", "method", "option"), ROWS, ids=[f"{k}-{m}-{o.flag}" for k, m, o in ROWS]
)
def test_each_flag_means_what_the_recipe_key_means(kind: str, method: str, option: Option) -> None:
    value, typed = other_value(option, method)
    key: dict[str, Any] = {}
    extra = _with_nested(kind, method, option, key)
    node = key
    for part in option.path[:-1]:
        node = node.setdefault(part, {})
    node[option.path[-1]] = value
    argv = [kind, "model", "--method", method, "--output-dir", "out", *extra, *typed]
    args = cli.build_parser().parse_args(argv)
    stage = {"type": kind, "method": method, **key}
    try:
        from_recipe = CompressionConfig.model_validate({"model": "m", "stages": [stage]}).stages[0]
    except ValidationError:
        # A value another setting rules out (static_groups off with act_order on): the command
        # line refuses it too.
        with pytest.raises(ConfigError):
            _BUILDERS[kind](args)
        return
    from_flags = _BUILDERS[kind](args)
    assert from_flags == from_recipe
    reached: Any = from_flags.model_dump()
    for part in option.path:
        reached = reached[part]
    assert reached == value and value != _default(option, method)


def test_every_method_has_options_or_says_it_takes_none() -> None:
    for kind in KINDS:
        options = method_options(kind)
        for method in registry.names(kind):
            taken = [o.flag for o in options if method in o.methods]
            assert "--targets" in taken, (kind, method)


def test_group_size_minus_one_and_zero_mean_per_channel() -> None:
    for spelling in ("0", "-1", "none"):
        argv = ["quantize", "m", "--method", "rtn", "--group-size", spelling, "--output-dir", "o"]
        config = cli._quant_config(cli.build_parser().parse_args(argv))
        assert config.group_size is None


def test_help_shows_defaults_from_the_configs() -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()  # type: ignore[union-attr]
    assert "--clip-search" in help_text and "awq/gptq on; rtn off" in help_text
    assert "--asymmetric" in help_text  # an alias kept for the symmetric field
