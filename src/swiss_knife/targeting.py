"""Which modules a compression method touches: one selection syntax for every method.

Quantization and pruning both need to answer "which layers, and with which settings?". Instead of
each method inventing its own filter, they all take a `TargetSpec` and call `resolve_targets`:

- ``targets`` and ``ignore`` hold *patterns*; a pattern is one of
  - an exact full module name: ``"model.layers.0.mlp.down_proj"``;
  - a class name: ``"Linear"`` (``torch.nn.Linear``) or ``"Conv1D"`` (GPT-2's transposed linear,
    ``transformers.pytorch_utils.Conv1D``); the class of the module itself, not its base classes;
  - ``"re:<regex>"``: a Python regular expression that must match the WHOLE name
    (`re.fullmatch`). This is llm-compressor's ``re:`` prefix, but anchored at both ends:
    compressed-tensors uses `re.match` (anchored at the start only), under which ``re:.*proj``
    would also select ``...proj_extra``; with fullmatch a regex selects exactly what it spells,
    so write ``re:.*\\.q_proj`` or ``re:model\\.layers\\.[0-3]\\..*``.
- A module is a target when at least one ``targets`` pattern and no ``ignore`` pattern matches it,
  and it is a linear layer (``nn.Linear`` or ``Conv1D``): weight compression is defined for
  matrices that multiply activations. By default only the linears inside the transformer blocks
  are eligible (`arch.get_blocks`), which is what every published GPTQ/AWQ/Wanda/SparseGPT
  recipe compresses.
- Embeddings are never targets, and neither is an LM head whose weight is tied to the embeddings:
  rewriting it would silently rewrite the input embeddings too.

Mistakes are reported before any work starts, as `UserInputError`: an invalid regex, a pattern
that selects nothing (a typo would otherwise leave layers uncompressed, or compress a layer the
user meant to keep), or a selection that ends up empty. When a pattern only matched modules that
can never be targets, the message says which ones and why.

`resolve_overrides` applies the same syntax to per-pattern settings (e.g. bits per pattern for
mixed precision): for each module the FIRST matching pattern wins, as in an ordered YAML mapping.

The class names ``Linear`` and ``Conv1D`` are exempt from the "selects nothing" check, so the
default spec (both) serves Llama-style models (no Conv1D) and GPT-2 (no nn.Linear in its blocks)
alike; a misspelt class name still fails because it matches nothing and is not one of the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from swiss_knife.arch import get_arch, get_blocks
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError

T = TypeVar("T")

REGEX_PREFIX = "re:"
# Module types whose weight is a matrix applied to activations; the only possible targets.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
# Class-name patterns that may legitimately select nothing in a given model (see module docs).
_LINEAR_CLASS_NAMES = frozenset(t.__name__ for t in LINEAR_TYPES)


@dataclass(frozen=True)
class TargetSpec:
    """Which modules a method compresses: patterns to include, then patterns to exclude.

    Lists are accepted and stored as tuples (so specs built from YAML/JSON stay hashable). Every
    pattern is validated on construction; see the module docstring for the syntax.
    """

    targets: tuple[str, ...] = ("Linear", "Conv1D")
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, Iterable):
                problems.append(f"{field} must be a list of patterns, got {value!r}")
                continue
            patterns = tuple(value)
            # Frozen dataclass: normalise the container once, here, through object.__setattr__.
            object.__setattr__(self, field, patterns)
            for pattern in patterns:
                problem = _pattern_problem(pattern)
                if problem:
                    problems.append(f"{field}: {problem}")
        if not problems and not self.targets:
            problems.append("targets is empty, so nothing would be compressed")
        if problems:
            raise UserInputError("invalid target spec: " + "; ".join(problems))


def _pattern_problem(pattern: Any) -> str | None:
    """Why a pattern is unusable, or None when it is fine."""
    if not isinstance(pattern, str) or not pattern:
        return f"pattern {pattern!r} must be a non-empty string"
    if pattern.startswith(REGEX_PREFIX):
        if not pattern[len(REGEX_PREFIX) :]:
            return f"pattern {pattern!r} has an empty regular expression"
        try:
            _compile(pattern)
        except re.error as exc:
            return f"pattern {pattern!r} is not a valid regular expression ({exc})"
    return None


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern[len(REGEX_PREFIX) :])


def match(name: str, module: nn.Module | None, pattern: str) -> bool:
    """Whether `pattern` selects the module called `name` (full dotted name).

    ``re:`` patterns use `re.fullmatch` on the name; any other pattern is compared with the name
    and with the module's class name (skipped when `module` is None). Raises `UserInputError` for
    an invalid regex.
    """
    if pattern.startswith(REGEX_PREFIX):
        problem = _pattern_problem(pattern)
        if problem:
            raise UserInputError(problem)
        return _compile(pattern).fullmatch(name) is not None
    if pattern == name:
        return True
    return module is not None and type(module).__name__ == pattern


def _matches_any(name: str, module: nn.Module | None, patterns: Iterable[str]) -> bool:
    return any(match(name, module, pattern) for pattern in patterns)


def _tied_linears(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight IS an embedding's weight: {linear name: embedding name}."""
    embedding_weights = {
        id(module.weight): name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    }
    tied: dict[str, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, LINEAR_TYPES) and id(weight) in embedding_weights:
            tied[name] = embedding_weights[id(weight)]
    return tied


def _why_not_eligible(
    name: str,
    module: nn.Module,
    tied: Mapping[str, str],
    blocks_prefix: str | None,
) -> str | None:
    """The reason a module can never be a target, or None when it is an eligible linear."""
    if isinstance(module, nn.Embedding):
        return f"{name} is an embedding; embeddings are never targets"
    if not isinstance(module, LINEAR_TYPES):
        return (
            f"{name} is a {type(module).__name__}, not a Linear/Conv1D layer "
            "(to select the linears inside it, use a regex such as "
            f"'re:{re.escape(name)}\\..*')"
        )
    if name in tied:
        return (
            f"{name} shares its weight with the embedding {tied[name]} (tied weights), so "
            "compressing it would also change the input embeddings; it is never a target"
        )
    if blocks_prefix is not None and not name.startswith(blocks_prefix):
        return (
            f"{name} is outside the transformer blocks ({blocks_prefix}N); "
            "pass within_blocks_only=False to include it"
        )
    return None


def resolve_targets(
    model: nn.Module, spec: TargetSpec | None = None, *, within_blocks_only: bool = True
) -> dict[str, nn.Module]:
    """Full dotted name -> module for every module the spec selects, in model order.

    With `within_blocks_only` (the default) only linears inside the transformer blocks are
    eligible, which needs the model's architecture to be in the `arch` table. Raises
    `UserInputError` for an invalid pattern, a pattern that selects nothing (explaining what it
    matched that cannot be a target), or an empty selection.
    """
    spec = spec or TargetSpec()
    blocks_prefix: str | None = None
    if within_blocks_only:
        arch = get_arch(model)
        get_blocks(model, arch)  # fail early with the arch error if the layout is unexpected
        blocks_prefix = f"{arch.blocks}."
    tied = _tied_linears(model)

    modules = [(name, module) for name, module in model.named_modules() if name]
    problems: list[str] = []

    for pattern in spec.ignore:
        if pattern in _LINEAR_CLASS_NAMES:
            continue
        if not any(match(name, module, pattern) for name, module in modules):
            problems.append(f"ignore pattern {pattern!r} matches no module of the model")

    selected: dict[str, nn.Module] = {}
    for pattern in spec.targets:
        hits = [(name, module) for name, module in modules if match(name, module, pattern)]
        eligible = []
        reasons: list[str] = []
        ignored: list[str] = []
        for name, module in hits:
            reason = _why_not_eligible(name, module, tied, blocks_prefix)
            if reason is not None:
                reasons.append(reason)
            elif _matches_any(name, module, spec.ignore):
                ignored.append(name)
            else:
                eligible.append((name, module))
        selected.update(eligible)
        if pattern in _LINEAR_CLASS_NAMES:
            continue  # may select nothing in this model by design; see the module docstring
        if not hits:
            problems.append(
                f"target pattern {pattern!r} matches no module of the model "
                f"(names look like {_example_names(modules)})"
            )
        elif not eligible and not ignored:
            shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
            problems.append(f"target pattern {pattern!r} selects no compressible layer: {shown}")

    if problems:
        raise UserInputError("; ".join(problems))
    if not selected:
        raise UserInputError(
            f"no layer to compress: targets {list(spec.targets)} minus ignore "
            f"{list(spec.ignore)} leaves nothing"
        )
    # `selected` was filled pattern by pattern; return it in model order instead.
    return {name: module for name, module in modules if name in selected}


def resolve_linear_targets(model: nn.Module, spec: TargetSpec, why: str) -> dict[str, nn.Linear]:
    """`resolve_targets` for a method that handles ``nn.Linear`` only: a targeted GPT-2 style
    Conv1D is refused before any work, `why` saying what cannot take it."""
    targets = resolve_targets(model, spec)
    conv1d = [name for name, module in targets.items() if not isinstance(module, nn.Linear)]
    if conv1d:
        raise UnsupportedArchitectureError(
            f"{len(conv1d)} targeted layer(s) are GPT-2 style Conv1D (e.g. {conv1d[0]}); {why}. "
            "Supported: Llama, Mistral, Qwen2/3, Gemma, Phi-3, OPT and GPT-NeoX style models"
        )
    return {name: module for name, module in targets.items() if isinstance(module, nn.Linear)}


def _example_names(modules: list[tuple[str, nn.Module]]) -> str:
    linears = [name for name, module in modules if isinstance(module, LINEAR_TYPES)]
    return ", ".join(repr(name) for name in linears[:2]) or "(the model has no linear layers)"


def resolve_overrides(
    names: Iterable[str] | Mapping[str, nn.Module], overrides: Mapping[str, T]
) -> dict[str, T]:
    """Per-module settings from an ordered pattern -> value mapping; the first match wins.

    `names` is either plain full names or the name -> module mapping from `resolve_targets`
    (then class-name patterns can match too). Names that no pattern matches are left out, so the
    caller applies its default. Raises `UserInputError` for an invalid pattern or a pattern that
    matches none of the names (a typo would silently fall back to the default).
    """
    modules: dict[str, nn.Module | None] = (
        dict(names.items()) if isinstance(names, Mapping) else dict.fromkeys(names)
    )
    problems = [problem for problem in map(_pattern_problem, overrides) if problem]
    if problems:
        raise UserInputError("invalid override patterns: " + "; ".join(problems))
    resolved: dict[str, T] = {}
    winners: dict[str, str] = {}
    for name, module in modules.items():
        for pattern, value in overrides.items():
            if match(name, module, pattern):
                resolved[name] = value
                winners[name] = pattern
                break
    used = set(winners.values())
    for pattern in overrides:
        if pattern in used:
            continue
        hits = [name for name, module in modules.items() if match(name, module, pattern)]
        if not hits:
            problems.append(f"override pattern {pattern!r} matches none of the targeted layers")
        else:
            # Every layer it matches was taken by an earlier pattern: almost always a general
            # pattern written before a specific one, so the specific setting would be lost.
            earlier = sorted({winners[name] for name in hits})
            problems.append(
                f"override pattern {pattern!r} never applies: every layer it matches is taken "
                f"by an earlier pattern ({', '.join(map(repr, earlier))}); the first matching "
                "pattern wins, so put more specific patterns first"
            )
    if problems:
        raise UserInputError("; ".join(problems))
    return resolved
