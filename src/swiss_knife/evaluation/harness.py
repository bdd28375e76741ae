"""Optional bridge to EleutherAI's lm-evaluation-harness for standard benchmarks.

lm-evaluation-harness (Gao et al., https://github.com/EleutherAI/lm-evaluation-harness) implements
hundreds of tasks (HellaSwag, ARC, PIQA, ...) with their published prompts and metrics. Rather
than re-implement them, the in-memory model and tokenizer are wrapped in the harness's ``HFLM``
class, which accepts an already-instantiated ``PreTrainedModel`` as ``pretrained``, and passed to
``lm_eval.simple_evaluate``. The harness is an optional dependency (``swiss-knife[lm-eval]``) and is
imported only when a task is actually run, so the rest of the toolkit works without it. Task data
is downloaded by the harness through the ``datasets`` library, so this needs network access or a
populated Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from swiss_knife.errors import MissingDependencyError, SwissKnifeError, UserInputError

_INSTALL_HINT = "pip install 'swiss-knife[lm-eval]'"


def harness_available() -> bool:
    """Whether ``lm_eval`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):
        # find_spec raises ValueError when sys.modules holds a module without a spec (or None,
        # which is how an import is blocked on purpose).
        return False


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    batch_size: int = 1,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on an in-memory model; return per-task metrics.

    Returns ``results["results"]`` from ``lm_eval.simple_evaluate``: a dict mapping each task name
    to its metrics (e.g. ``{"hellaswag": {"acc,none": 0.41, ...}}``). ``limit`` caps the number of
    examples per task (useful for smoke tests; the scores are then not comparable to published
    ones).
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise UserInputError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserInputError(f"limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserInputError(f"num_fewshot must be >= 0, got {num_fewshot}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MissingDependencyError(
            f"lm-evaluation-harness is not installed; {_INSTALL_HINT}"
        ) from None

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    kwargs: dict[str, Any] = {"model": wrapped, "tasks": list(tasks), "limit": limit}
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    results = lm_eval.simple_evaluate(**kwargs)
    # simple_evaluate returns None on non-zero ranks of a distributed run.
    if results is None or "results" not in results:
        raise SwissKnifeError("lm-evaluation-harness returned no results")
    return dict(results["results"])
