"""quantize, prune and reduce-layers: flags to a validated config, then the shared stage runner."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cli_flags import (
    Option,
    collect,
    method_options,
)
from ..errors import SwissKnifeError, UserInputError
from .common import (
    _CALIBRATION_FLAGS,
    _calibration_settings,
    _calibration_source,
    _config_file,
    _fit_calibration,
    _flag,
    _load,
    _local_hf_config,
    _max_positions,
    _print_json,
    _progress,
    _text_source,
    _warn,
)
from .validation import GivenFlags, Options, _method_class, _validate_stage

logger = logging.getLogger("swiss_knife")


def _stage_data(args: argparse.Namespace, stage_type: str) -> dict[str, Any]:
    """The --config file's mapping (if any), with the stage type and --method applied."""
    data = _config_file(args)
    data["type"] = stage_type
    if args.method:
        data["method"] = args.method
    if "method" not in data:
        raise UserInputError("give --method (or method: in --config)")
    return data


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
    staging: Path | None = None,
) -> tuple[Path, int]:
    """Save a stage's result with its manifest and model card; (folder, weight bytes)."""
    from ..config import config_to_dict
    from ..evaluation.size import weight_files
    from ..models import build_manifest
    from ..stages import write_checkpoint

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
        staging=staging,
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
    from ..config import LayerReductionConfig
    from ..models import check_output_dir
    from ..stages import CommandLine, StageData, calibration_reason, check_data, run_stage, trains

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
    loaded, staging = _open(args, config, out)
    try:
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
            staging=staging,
        )
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return config, result, saved, disk


def _open(args: argparse.Namespace, config: Any, out: Path) -> tuple[Any, Path | None]:
    """The model, streamed from disk where `--stream` and the stage allow (with the work
    folder its blocks are written into) or loaded whole (and None)."""
    from ..device import resolve_device
    from ..stages import open_for_stage

    return open_for_stage(
        getattr(args, "stream", "off"),
        config,
        args.model,
        out,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=resolve_device(args.device),
        trust_remote_code=args.trust_remote_code,
        load_whole=lambda: _load(args, args.model),
    )


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
    from ..recipe import QuantizeConfig

    options = method_options("quantize")
    data = _stage_data(args, "quantize")
    given: GivenFlags = collect(args, options, data)
    _add_calibration_flags(args, data, given, QuantizeConfig)
    return _validate_stage(QuantizeConfig, data, args, given, _pairs(options))


def _layer_reduction_config(args: argparse.Namespace) -> Any:
    from ..config import LayerReductionConfig

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
    from ..arch import num_layers

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
    from ..compression.layers import removal_count

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
    from ..compression.quantization.api import check_quantize
    from ..compression.quantization.base import get_method

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
    from ..compression.quantization.api import check_quantize

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
    from ..recipe import PruneConfig

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

    from ..arch import get_arch
    from ..compression.pruning.sparse_format import is_sparse_bitmask_checkpoint

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
    from ..compression.pruning.api import calibration_reason

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
