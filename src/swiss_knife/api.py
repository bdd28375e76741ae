"""The Python API, in the words of the command line: load, quantize, prune, save.

    import swiss_knife as sk

    model = sk.load("path/or/hub-id")
    sk.quantize(model, sk.GPTQConfig(bits=4, group_size=64), calibration="wiki.txt")
    sk.save(model, "out")                 # the compressed checkpoint, manifest and model card

`model` is what `sk.load` returns (the network with its tokenizer) or a bare transformers model.
A compressed model remembers how it must be saved: `sk.save` writes its real format (integers and
scales, not the fake-quantized floats it computes with in memory), and so does a plain
`model.save_pretrained(dir)` on it, so neither can silently write the wrong thing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import registry
from .config import DataConfig, config_to_dict
from .errors import UserInputError
from .models import LoadedModel, build_manifest, load_model, render_model_card, save_model

logger = logging.getLogger(__name__)

# The attribute a compressed model carries: how to save it and what was done to it.
_STATE = "_swiss_knife_compressed"


@dataclass
class Compressed:
    """What a compression verb did, and how its result is saved."""

    model: nn.Module
    format: str
    steps: list[str]
    report: dict[str, Any]
    config: Any
    writer: Any = field(repr=False)  # writes config.json + weights into a folder
    tokenizer: Any | None = field(default=None, repr=False)
    source: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def load(source: str, *, stream: bool = False, **options: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer: a hub id, a local folder or a .gguf file.

    Options are those of `ModelSpec` (dtype, device, gguf_file, revision, trust_remote_code).
    ``stream=True`` reads nothing but the config: the model's blocks are read from the local
    safetensors folder one at a time when `sk.evaluate` measures its perplexity, so a model
    larger than memory can be measured (to compress one, see `sk.compress_checkpoint`).

        model = sk.load("HuggingFaceTB/SmolLM2-135M", dtype="bf16")
        big = sk.load("./Llama-3-70B", stream=True)
        sk.evaluate(big.model, big.tokenizer, sk.EvaluationConfig(...), tokens=ids)
    """
    if not stream:
        return load_model(source, **options)
    from .config import ModelSpec, validate_dict
    from .device import resolve_device
    from .models import open_streamed_model

    spec = validate_dict(ModelSpec, {"path": source, **options}, "model options")
    if spec.gguf_file:
        raise UserInputError(
            f"cannot stream {source} from disk: a GGUF file is dequantized whole by transformers"
        )
    return open_streamed_model(
        source,
        dtype=spec.dtype,
        device=resolve_device(spec.device),
        trust_remote_code=spec.trust_remote_code,
    )


class _Api:
    """Errors for an API user: they name the arguments."""

    def no_calibration(self, label: str, reason: str) -> UserInputError:
        return UserInputError(f"{label}: {reason} needs calibration text: pass calibration=")

    def no_train_text(self, label: str) -> UserInputError:
        return UserInputError(
            f"{label} prunes gradually and fine-tunes between steps; that runs through "
            "sk.prune on a loaded model"
        )


def compress_checkpoint(
    source: str | Path,
    config: Any,
    output_dir: str | Path,
    *,
    calibration: str | Path | DataConfig | torch.Tensor | None = None,
    stream: str = "auto",
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
) -> Path:
    """Apply one stage (a quantize, prune, cast or layer-reduction config) to the checkpoint
    in `source` and save the result in `output_dir`, as the command line does: streamed from
    disk one block at a time where the stage and the checkpoint allow (``stream`` "auto";
    "on" refuses otherwise, "off" loads the whole model). `calibration` is a text file, a
    DataConfig, or token ids ``(num_samples, seq_len)`` as `quantize` takes them. Returns the
    output folder.

        sk.compress_checkpoint("./Llama-3-70B", sk.GPTQConfig(bits=4, group_size=128),
                               "./70b-w4", calibration="wiki.txt")
    """
    import shutil

    from .config import CastConfig, LayerReductionConfig, ModelSpec, validate_dict
    from .device import resolve_device
    from .models import check_output_dir
    from .stages import STREAM_MODES, open_for_stage, run_stage, write_checkpoint

    if stream not in STREAM_MODES:
        raise UserInputError(f"stream must be one of {', '.join(STREAM_MODES)}, got {stream!r}")
    if not isinstance(config, CastConfig | LayerReductionConfig):
        registry.for_config(config)  # a one-line error for what is not a stage config
    source = str(source)
    spec = validate_dict(ModelSpec, {"path": source, "dtype": dtype, "device": device}, "model")
    directory = Path(source).expanduser()
    protect = [source] if directory.exists() else []
    out = check_output_dir(output_dir, overwrite=overwrite, protect=protect)
    data = _stage_data(calibration)
    label = str(getattr(config, "method", None) or getattr(config, "type", "stage"))
    loaded, staging = open_for_stage(
        stream,
        config,
        source,
        out,
        gguf_file=None,
        dtype=dtype,
        device=resolve_device(device),
        trust_remote_code=False,
        load_whole=lambda: load_model(spec),
    )
    try:
        result = run_stage(
            loaded.model,
            config,
            tokenizer=loaded.tokenizer,
            device=loaded.device,
            data=data,
            speaker=_Api(),
            label=label,
            progress=progress,
        )
        manifest = build_manifest(
            source=source,
            recipe={"stage": config_to_dict(config)},
            extra={"steps": result.steps, "format": result.format, "stage_report": result.report},
        )
        return write_checkpoint(
            result,
            out,
            tokenizer=loaded.tokenizer,
            manifest=manifest,
            title=f"{Path(source).name} (Swiss Knife)",
            source=source,
            tags=[label],
            steps=result.steps,
            overwrite=overwrite,
            protect=protect,
            staging=staging,
        )
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the save succeeded


def _stage_data(calibration: Any) -> Any:
    """The `StageData` of `compress_checkpoint`'s calibration argument: a text file, a
    DataConfig, or token ids ``(num_samples, seq_len)`` already drawn."""
    from .stages import StageData

    source = _calibration_source(calibration)
    if not isinstance(source, torch.Tensor):
        return StageData(source)
    if source.ndim != 2 or source.is_floating_point() or source.numel() == 0:
        raise UserInputError(
            "calibration token ids must be a non-empty integer tensor (num_samples, "
            f"seq_len), got {source.dtype} of shape {tuple(source.shape)}"
        )
    return StageData(tokens=source)


def _calibration_source(calibration: Any) -> torch.Tensor | DataConfig | None:
    """What the user passed as calibration, as token ids, a DataConfig (a path becomes one) or
    None; anything else is refused in one line."""
    if calibration is None or isinstance(calibration, torch.Tensor | DataConfig):
        return calibration
    if isinstance(calibration, str | Path):
        return DataConfig(source=str(calibration))
    raise UserInputError(
        "calibration must be token ids (num_samples, seq_len), a text file or a DataConfig"
    )


def _parts(model: LoadedModel | nn.Module) -> tuple[nn.Module, Any | None, Any, str | None]:
    """(network, tokenizer, device, source) of what the user passed."""
    if isinstance(model, LoadedModel):
        return model.model, model.tokenizer, model.device, model.source
    if isinstance(model, nn.Module):
        device = next(model.parameters()).device
        return model, None, device, None
    raise UserInputError(f"expected a model from sk.load or a torch module, got {type(model)!r}")


def _calibration(calibration: Any, network: nn.Module, tokenizer: Any | None, config: Any) -> Any:
    """Token windows from a tensor, a text file path or a DataConfig (with the config's counts)."""
    calibration = _calibration_source(calibration)
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if tokenizer is None:
        raise UserInputError("calibration text needs a tokenizer: pass a model from sk.load")
    from .config import CalibrationSettings
    from .data import model_calibration_samples

    settings = getattr(config, "calibration", None) or CalibrationSettings()
    return model_calibration_samples(network, calibration, tokenizer, settings)


def _compress(
    kind: str,
    model: LoadedModel | nn.Module,
    config: Any,
    calibration: Any,
    progress: bool,
    **extra: Any,
) -> Compressed:
    method = registry.for_config(config)
    if method.kind != kind:
        raise UserInputError(
            f"{type(config).__name__} configures {method.kind}, not {kind}; "
            f"call sk.{method.kind}(model, config)"
        )
    network, tokenizer, device, source = _parts(model)
    samples = _calibration(calibration, network, tokenizer, config)
    outcome = apply_method(
        network,
        config,
        calibration=samples,
        device=device,
        progress=progress,
        **extra,
    )
    earlier = getattr(network, _STATE, None)
    result = Compressed(
        model=outcome.model,
        format=outcome.format,
        steps=[*(earlier.steps if earlier else []), *outcome.steps],
        report=outcome.report,
        config=config,
        writer=outcome.writer,
        tokenizer=tokenizer,
        source=source,
        history=[*(earlier.history if earlier else []), {kind: config_to_dict(config)}],
    )
    _remember(outcome.model, result)
    if isinstance(model, LoadedModel):
        model.model = outcome.model
    return result


def apply_method(
    network: nn.Module,
    config: Any,
    *,
    calibration: Any = None,
    device: Any = None,
    progress: bool = False,
    train_tokens: Any = None,
) -> Any:
    """Run the registered method a quantize or prune config names on a network; its outcome.

    The one place where the command line, recipes and this API hand a config to its method.
    """
    from .calibration import spilled_to

    settings = getattr(config, "calibration", None)
    with spilled_to(getattr(settings, "spill_dir", None)):
        return _apply(network, config, calibration, device, progress, train_tokens)


def _apply(
    network: nn.Module,
    config: Any,
    calibration: Any,
    device: Any,
    progress: bool,
    train_tokens: Any,
) -> Any:
    kind = registry.for_config(config).kind
    if kind == "quantize":
        from .compression.quantization.api import quantize as run_quantize

        return run_quantize(
            network,
            config,
            calibration=calibration,
            device=device,
            progress=progress,
        )
    if kind == "prune":
        from .compression.pruning.api import prune as run_prune

        return run_prune(
            network,
            config,
            calibration=calibration,
            device=device,
            progress=progress,
            train_tokens=train_tokens,
        )
    raise UserInputError(f"{type(config).__name__} is a {kind} config; use sk.{kind}")


def quantize(
    model: LoadedModel | nn.Module,
    config: Any,
    *,
    calibration: Any = None,
    progress: bool = False,
) -> Compressed:
    """Quantize a model in place with any registered method's config.

        sk.quantize(model, sk.RTNConfig(bits=4, group_size=64))
        sk.quantize(model, sk.GPTQConfig(bits=4, group_size=64), calibration="wiki.txt")

    `calibration` is a text file, a `DataConfig`, or token ids (num_samples, seq_len); the
    config's `calibration` settings say how many windows of what length are drawn from text.
    """
    return _compress("quantize", model, config, calibration, progress)


def prune(
    model: LoadedModel | nn.Module,
    config: Any,
    *,
    calibration: Any = None,
    train_tokens: Any = None,
    progress: bool = False,
) -> Compressed:
    """Prune a model in place with any registered pruning method's config.

    sk.prune(model, sk.SparseGPTPruneConfig(pattern="2:4"), calibration="wiki.txt")
    """
    return _compress("prune", model, config, calibration, progress, train_tokens=train_tokens)


def _remember(network: nn.Module, result: Compressed) -> None:
    """Make the model save its real format, through sk.save and save_pretrained alike."""
    object.__setattr__(network, _STATE, result)
    if result.format == "dense":
        return  # an ordinary checkpoint: transformers' own save is the right one

    def save_pretrained(save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            logger.warning(
                "save_pretrained options are ignored for a %s model: it is written in its "
                "compressed format",
                result.format,
            )
        _without_override(network, lambda: result.writer(Path(save_directory)))

    object.__setattr__(network, "save_pretrained", save_pretrained)


def _without_override(network: nn.Module, fn: Any) -> None:
    # Writers of some formats call the model's own save_pretrained; let them reach it.
    override = network.__dict__.pop("save_pretrained", None)
    try:
        fn()
    finally:
        if override is not None:
            object.__setattr__(network, "save_pretrained", override)


def save(
    model: LoadedModel | nn.Module,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer: Any | None = None,
) -> Path:
    """Save a model as a checkpoint that transformers loads, atomically, with its manifest and
    model card. A compressed model is written in its compressed format.

        sk.save(model, "out")
    """
    network, loaded_tokenizer, _, source = _parts(model)
    state: Compressed | None = getattr(network, _STATE, None)
    tokenizer = tokenizer or loaded_tokenizer or (state.tokenizer if state else None)
    source = source or (state.source if state else None)
    protect = [source] if source and Path(source).expanduser().exists() else []
    steps = state.steps if state else []
    manifest = build_manifest(
        source=source,
        recipe={k: v for entry in (state.history if state else []) for k, v in entry.items()},
        extra={"steps": steps, "format": state.format if state else "dense"},
    )
    card = render_model_card(
        title=f"{Path(source).name if source else 'model'} (Swiss Knife)",
        source=source,
        tags=[entry_kind for entry in (state.history if state else []) for entry_kind in entry],
        steps=steps,
        plain_transformers=not (state and state.format.endswith("sparse-bitmask")),
    )
    saved: list[Path] = []

    def write() -> None:
        saved.append(
            save_model(
                network,
                output_dir,
                tokenizer=tokenizer,
                overwrite=overwrite,
                protect=protect,
                manifest=manifest,
                model_card=card,
                writer=state.writer if state else None,
            )
        )

    _without_override(network, write)
    return saved[0]


def export_gguf(
    model: LoadedModel | nn.Module | str | Path,
    output_file: str | Path,
    config: Any = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a GGUF file that llama.cpp (ollama, LM Studio, llama-cpp-python) runs; the report.

        sk.export_gguf("out-gptq", "model.gguf", sk.GGUFExportConfig(tensor_type="auto"))
        sk.export_gguf(model, "model-q4_k.gguf", sk.GGUFExportConfig(tensor_type="q4_k"))

    `model` is a checkpoint folder, or a model from `sk.load` / `sk.quantize` / `sk.prune`, which
    is saved to a temporary folder in its compressed format first (so `tensor_type="auto"` keeps
    its grid). `config` defaults to `GGUFExportConfig()` (q8_0). `overwrite` replaces only a GGUF
    file Swiss Knife wrote.
    """
    import tempfile

    from .export.method import GGUFExportConfig
    from .export.method import export as run_export

    config = config if config is not None else GGUFExportConfig()
    if not isinstance(config, GGUFExportConfig):
        raise UserInputError(
            f"sk.export_gguf takes a GGUFExportConfig, got {type(config).__name__}"
        )
    if isinstance(model, str | Path):
        return run_export(model, config, output_file, overwrite=overwrite, progress=progress)
    with tempfile.TemporaryDirectory(prefix="swiss-knife-export-") as scratch:
        folder = save(model, Path(scratch) / "model")
        return run_export(folder, config, output_file, overwrite=overwrite, progress=progress)
