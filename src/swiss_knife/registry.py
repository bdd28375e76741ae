"""One registry for every method of every verb, keyed by kind and name, and by config type.

A method module registers itself with `register(kind, name, ConfigClass, ...)` next to its config
class and its orchestrator; everything that lists methods (the recipe's stage union and JSON
Schema, the `--method` choices, each method's CLI flags, the test matrices) reads this registry.
The built-in methods of a kind are found by importing every module of the kind's package, so a new
method is one new module: no import list to edit. A second registration of a name or a config
class is an error.

The kinds: `quantize` and `prune` (methods chosen by `method:`), `reduce_layers` and `distill`
(one config each, registered under the kind's own name), and `export` (file formats, chosen by
`format:`; GGUF today).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserInputError

# The package whose modules hold each kind's built-in methods.
_PACKAGES = {
    "quantize": "swiss_knife.compression.quantization",
    "prune": "swiss_knife.compression.pruning",
    "reduce_layers": "swiss_knife.compression.layers",
    "distill": "swiss_knife.compression.distillation.api",
    "export": "swiss_knife.export.method",
}
KINDS = tuple(_PACKAGES)
# What a kind's methods are called in messages.
_NOUNS = {"quantize": "quantization method", "prune": "pruning method"}


@dataclass(frozen=True)
class Method:
    """A registered method: what it is called, what config it takes, how to run it."""

    kind: str
    name: str
    config_class: type
    apply: Callable[..., Any]
    # Whether a run with this config needs calibration data; a bool or a function of the config
    # (structured pruning needs data only for activation importance).
    calibration: bool | Callable[[Any], bool]
    # Refuses a config against a model's shapes alone (the model may sit on the meta device).
    check: Callable[[Any, Any], None] | None
    description: str

    @property
    def needs_calibration(self) -> bool:
        """Whether every run of this method needs calibration data."""
        return self.calibration is True

    def needs_data(self, config: Any) -> bool:
        """Whether a run with this config needs calibration data: asked here, and only here."""
        if callable(self.calibration):
            return bool(self.calibration(config))
        return self.calibration


_REGISTRY: dict[str, dict[str, Method]] = {kind: {} for kind in KINDS}
_BY_CONFIG: dict[type, Method] = {}
_LOADED: set[str] = set()
# Each kind's built-in modules in file order: methods() lists by it, so the order of names in help
# and messages does not depend on which module some other import happened to load first.
_MODULE_ORDER: dict[str, list[str]] = {}


def register(
    kind: str,
    name: str,
    config_class: type,
    *,
    needs_calibration: bool | Callable[[Any], bool],
    check: Callable[[Any, Any], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `apply(model, config, ctx)` as method `name` of `kind`; returns a decorator."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        noun = _NOUNS.get(kind, f"{kind} method")
        if name in _REGISTRY[kind]:
            raise ValueError(f"{noun} {name!r} is already registered")
        doc = (config_class.__doc__ or "").strip().splitlines()
        method = Method(
            kind, name, config_class, fn, needs_calibration, check, doc[0] if doc else ""
        )
        _REGISTRY[kind][name] = method
        # HalfPrecisionConfig serves fp16 and bf16: the config type maps to its first method.
        _BY_CONFIG.setdefault(config_class, method)
        return fn

    return decorator


def load_builtins(kind: str | None = None) -> None:
    """Import every module of the kind's package (all kinds by default), registering them."""
    for each in [kind] if kind else list(KINDS):
        if each in _LOADED:
            continue
        _LOADED.add(each)
        package = importlib.import_module(_PACKAGES[each])
        modules = [
            f"{package.__name__}.{info.name}"
            for info in sorted(
                pkgutil.iter_modules(getattr(package, "__path__", [])), key=lambda i: i.name
            )
            if not info.name.startswith("_")
        ]
        _MODULE_ORDER[each] = modules
        for module in modules:
            importlib.import_module(module)


def methods(kind: str) -> list[Method]:
    """The kind's methods: built-ins in module file order (registration order within a module),
    then any registered from elsewhere, in registration order."""
    load_builtins(kind)
    order = _MODULE_ORDER.get(kind, [])

    def rank(method: Method) -> int:
        module = getattr(method.apply, "__module__", "")
        return order.index(module) if module in order else len(order)

    return sorted(_REGISTRY[kind].values(), key=rank)


def names(kind: str) -> list[str]:
    return [method.name for method in methods(kind)]


def get(kind: str, name: str) -> Method:
    load_builtins(kind)
    if name not in _REGISTRY[kind]:
        noun = _NOUNS.get(kind, f"{kind} method")
        raise UserInputError(f"unknown {noun} {name!r}; available: {', '.join(names(kind))}")
    return _REGISTRY[kind][name]


def for_config(config: Any) -> Method:
    """The method a config object asks for (its `method` field where a class serves several)."""
    load_builtins()
    cls = type(config)
    for klass in cls.__mro__:
        method = _BY_CONFIG.get(klass)
        if method is None:
            continue
        name = getattr(config, "method", None)
        if isinstance(name, str) and name in _REGISTRY[method.kind]:
            return _REGISTRY[method.kind][name]
        return method
    raise UserInputError(f"{cls.__name__} is not the config of any registered method")


def config_classes(kind: str) -> list[type]:
    """The distinct config classes of a kind, in registration order."""
    seen: list[type] = []
    for method in methods(kind):
        if method.config_class not in seen:
            seen.append(method.config_class)
    return seen
