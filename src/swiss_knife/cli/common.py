"""Helpers every subcommand shares: text sources, model loading, calibration lengths, output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserInputError

logger = logging.getLogger("swiss_knife")


def _text_source(args: argparse.Namespace, source: str | None, flag: str, **extra: Any) -> Any:
    """A validated DataConfig for the text named by `flag` (None when it was not given)."""
    from ..config import DataConfig, validate_dict

    if not source:
        return None
    fields = {"source": source, "field": args.field, "split_documents": args.split_documents}
    return validate_dict(DataConfig, {**fields, **extra}, flag)


def _data_config(args: argparse.Namespace) -> Any:
    return _text_source(args, args.eval_data, "--eval-data", add_bos=not args.no_bos)


def _config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The mapping in `--config FILE`, or an empty one; the flags given then override it."""
    from ..config import read_config_file

    if not args.config:
        return {}
    loaded = read_config_file(args.config)
    if not isinstance(loaded, dict):
        raise UserInputError(f"{args.config}: expected a mapping")
    return loaded


# Evaluation flags and the config keys they set.
_EVAL_FLAGS = (
    ("window", ("perplexity", "window")),
    ("stride", ("perplexity", "stride")),
    ("batch_size", ("perplexity", "batch_size")),
    ("max_windows", ("perplexity", "max_windows"), lambda n: n or None),  # 0: the whole text
    ("no_perplexity", ("perplexity", "enabled"), lambda _: False),
    ("speed_batch_sizes", ("speed", "batch_sizes")),
    ("prompt_len", ("speed", "prompt_len")),
    ("new_tokens", ("speed", "new_tokens")),
    ("repeats", ("speed", "repeats")),
    ("warmup", ("speed", "warmup")),
    ("no_speed", ("speed", "enabled"), lambda _: False),
    ("bleu_data", ("bleu", "references")),
    ("harness_tasks", ("harness", "tasks")),
    ("harness_limit", ("harness", "limit")),
    ("seed", ("seed",)),
)


def _eval_config(args: argparse.Namespace) -> Any:
    """The evaluation config: a file (if given), then every flag given on the command line;
    a bad value is reported by the flag that set it."""
    from ..config import EvaluationConfig
    from .validation import _validate_stage, flags_into

    data = _config_file(args)
    given = flags_into(args, _EVAL_FLAGS, data)
    return _validate_stage(EvaluationConfig, data, args, given, where="evaluation options")


def _load(args: argparse.Namespace, path: str, with_tokenizer: bool = True) -> Any:
    from ..config import ModelSpec, validate_dict
    from ..models import load_model

    spec = validate_dict(
        ModelSpec,
        {
            "path": path,
            "gguf_file": args.gguf_file,
            "dtype": args.dtype,
            "device": args.device,
            "trust_remote_code": args.trust_remote_code,
            "revision": args.revision,
        },
        "model options",
    )
    logger.info("loading %s", path)
    _library_progress(args)
    return load_model(spec, with_tokenizer=with_tokenizer)


# (flag attribute, CalibrationSettings key) of the calibration flags.
_CALIBRATION_FLAGS = (
    ("num_samples", "num_samples"),
    ("seq_len", "seq_len"),
    ("seed", "seed"),
    ("calibration_batch_size", "batch_size"),
    ("calibration_precision", "precision"),
    ("spill_activations", "spill_dir"),
)


def _flag(attribute: str) -> str:
    """The option that sets an argparse attribute: num_samples -> --num-samples."""
    return "--" + attribute.replace("_", "-")


def _warn(message: str) -> None:
    """A one-line warning on stderr, beside the `error:` lines main() prints."""
    print(f"warning: {message}", file=sys.stderr)


def _calibration_settings(args: argparse.Namespace, base: Any = None) -> dict[str, Any]:
    """CalibrationSettings keys from the calibration flags given, over `base` (a config's)."""
    settings = dict(base or {})
    for flag, key in _CALIBRATION_FLAGS:
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    return settings


def _calibration_source(args: argparse.Namespace) -> Any:
    """The DataConfig of --calibration-data (validated before any model is loaded), or None."""
    return _text_source(args, args.calibration_data, "--calibration-data")


def _local_hf_config(args: argparse.Namespace, model: str, gguf_file: str | None = None) -> Any:
    """The transformers config of a local model folder, read from its config.json alone; None
    for a hub id, a GGUF file or a config transformers cannot read (loading then says why)."""
    directory = Path(model).expanduser()
    if gguf_file is not None or not (directory / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=args.trust_remote_code)
    except Exception:
        return None


def _max_positions(hf_config: Any) -> int | None:
    """A model config's max_position_embeddings (GPT-2's n_positions too), or None."""
    value = getattr(hf_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _fit_seq_len(args: argparse.Namespace, settings: Any, limit: int | None, model: str) -> Any:
    """`settings` (a config with a seq_len) with sequences `model` can take: a --seq-len above
    its positions is refused (the manifest would record lengths that never ran; silently cut,
    they did before), a default above them shrinks to them."""
    if limit is None or settings.seq_len <= limit:
        return settings
    if "seq_len" in settings.model_fields_set:
        flag = "--seq-len" if args.seq_len is not None else "seq_len (from --config)"
        raise UserInputError(
            f"{flag} {settings.seq_len} exceeds the {limit} positions {model} takes "
            f"(max_position_embeddings); use --seq-len {limit} or less"
        )
    return settings.model_copy(update={"seq_len": limit})


def _fit_calibration(args: argparse.Namespace, config: Any, limit: int | None) -> Any:
    """`config` with calibration windows the model can take (see _fit_seq_len)."""
    settings = getattr(config, "calibration", None)
    if settings is None:
        return config
    fitted = _fit_seq_len(args, settings, limit, args.model)
    return config if fitted is settings else config.model_copy(update={"calibration": fitted})


def _refuse_output_inside(output: str | None, flag: str, inputs: Sequence[str | None]) -> None:
    """Refuse, before any work, a report folder inside (or around) a local input model, or one
    that cannot be created (a file in the way), as check_output_dir does for saved models."""
    if not output:
        return
    from ..errors import OutputExistsError
    from ..paths import check_writable_parent, refuse_inside_inputs

    local = [path for path in inputs if path and Path(path).expanduser().exists()]
    target = Path(output).expanduser().resolve()
    try:
        refuse_inside_inputs(target, local)
        if target.exists() and not target.is_dir():
            raise OutputExistsError(f"{target} is a file; give a folder for the reports")
        check_writable_parent(target)
    except UserInputError as exc:
        raise type(exc)(f"{flag}: {exc}") from None


def _check_eval_tokens(tokens: Any, config: Any, model: Any, source: str | None) -> None:
    """Refuse a text too short for one perplexity window: a perplexity over a handful of tokens
    measures nothing, yet it would be printed like any other."""
    if tokens is None or not config.perplexity.enabled:
        return
    from ..errors import DataError
    from ..evaluation.perplexity import max_positions

    window = config.perplexity.window
    limit = max_positions(model)
    capped = limit is not None and limit < window
    if capped:
        window = limit
    count = int(tokens.numel())
    if count < window:
        why = f" (--window capped at the model's {limit} positions)" if capped else ""
        raise DataError(
            f"{source} has {count} tokens, fewer than one perplexity window of {window}{why}; "
            f"give at least {window} tokens of text, a smaller --window, or --no-perplexity"
        )


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _progress(args: argparse.Namespace) -> bool:
    """Report progress unless -q: a bar in a terminal, INFO log lines otherwise (see progress)."""
    return not args.quiet


def _library_progress(args: argparse.Namespace) -> None:
    """Hide transformers' own bars (e.g. "Loading weights") unless stderr is a terminal.

    transformers draws them on stderr even when it is not a terminal, so `-q` or a redirected
    stderr would otherwise get progress-bar noise around the one-line error.
    """
    if args.quiet or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
