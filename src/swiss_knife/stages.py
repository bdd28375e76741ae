"""The one stage runner: a loaded model and a stage config in, the changed model out.

`swiss-knife quantize`, `prune` and `reduce-layers`, the recipe runner (`swiss_knife.pipeline`)
and the Python API all hand a config to `run_stage`, which finds why the stage needs text,
draws the calibration windows (and the fine-tuning stream of a gradual schedule), runs the
method and says what it did; `write_checkpoint` saves the result with its manifest and model
card. What differs between the interfaces is only how they name a missing input: the command
line speaks of flags (`--calibration-data`), a recipe of keys (`data.calibration`); a `Speaker`
carries those words.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .config import CastConfig, DataConfig, LayerReductionConfig
from .errors import ConfigError, SwissKnifeError, UserInputError

logger = logging.getLogger(__name__)


class Speaker(Protocol):
    """How one interface names the text a stage is missing."""

    def no_calibration(self, label: str, reason: str) -> SwissKnifeError: ...

    def no_train_text(self, label: str) -> SwissKnifeError: ...


class CommandLine:
    """Errors for a command-line user: they name flags."""

    def no_calibration(self, label: str, reason: str) -> SwissKnifeError:
        if reason == "selection 'importance'":
            return UserInputError(
                "--selection importance needs --calibration-data; or use --selection "
                "last/first/evenly, or --layers"
            )
        return UserInputError(f"{reason} needs --calibration-data")

    def no_train_text(self, label: str) -> SwissKnifeError:
        return UserInputError(
            "a gradual schedule fine-tunes between steps and needs --train-data "
            "(or --calibration-data)"
        )


class Recipe:
    """Errors for a recipe user: they name the recipe's keys."""

    def no_calibration(self, label: str, reason: str) -> SwissKnifeError:
        if reason == "selection 'importance'":
            return ConfigError(
                f"stage {label} with selection 'importance' needs calibration text: set "
                "data.calibration (or data.eval) in the recipe, or use selection "
                "last/first/evenly"
            )
        return ConfigError(
            f"stage {label!r}: {reason} needs calibration text: set data.calibration "
            "(or data.eval) in the recipe"
        )

    def no_train_text(self, label: str) -> SwissKnifeError:
        return ConfigError(
            f"stage {label!r} prunes gradually and fine-tunes between steps: set "
            "data.calibration in the recipe to the text to train on"
        )


@dataclass(frozen=True)
class StageData:
    """The texts a stage may read: calibration windows are drawn from `calibration`, and the
    fine-tuning of a gradual schedule reads `train`."""

    calibration: DataConfig | None = None
    train: DataConfig | None = None
    # Windows already drawn, ``(num_samples, seq_len)`` token ids (the Python API accepts them
    # as `sk.quantize` does); used instead of drawing from `calibration`.
    tokens: Any | None = None


@dataclass
class StageResult:
    """What a stage did to the model, in words for the card and numbers for the report."""

    model: nn.Module
    steps: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    format: str = "dense"
    # Writes the checkpoint files for formats that are not a plain save_pretrained.
    writer: Callable[[Path], None] | None = None


def calibration_reason(stage: Any) -> str | None:
    """Why a stage needs calibration text, in words, or None when it runs without any."""
    if isinstance(stage, LayerReductionConfig):
        by_importance = stage.layers is None and stage.selection == "importance"
        return "selection 'importance'" if by_importance else None
    if isinstance(stage, CastConfig):
        return None
    from . import registry

    method = registry.for_config(stage)
    if method.kind == "prune":
        from .compression.pruning.api import calibration_reason as prune_reason

        return prune_reason(stage)
    if method.kind == "quantize":
        return f"method {stage.method!r}" if method.needs_data(stage) else None
    return None


def trains(stage: Any) -> bool:
    """Whether the stage fine-tunes (a gradual pruning schedule) and so reads training text."""
    return getattr(stage, "schedule", None) is not None


def check_data(stage: Any, data: StageData, speaker: Speaker, label: str) -> None:
    """Refuse, before any weights load, a stage whose text is missing."""
    reason = calibration_reason(stage)
    if reason is not None and data.calibration is None and data.tokens is None:
        raise speaker.no_calibration(label, reason)
    if trains(stage) and data.train is None:
        raise speaker.no_train_text(label)


def run_stage(
    model: nn.Module,
    stage: Any,
    *,
    tokenizer: Any,
    device: Any,
    data: StageData,
    speaker: Speaker,
    label: str,
    progress: bool = False,
) -> StageResult:
    """Calibrate and apply one model-changing stage (cast, layer reduction, any quantize or
    prune method) to a loaded model; the model is changed in place where the method allows."""
    from .data import load_token_stream, model_calibration_samples

    check_data(stage, data, speaker, label)
    if isinstance(stage, CastConfig):
        from .models import cast_model

        before = str(next(model.parameters()).dtype).replace("torch.", "")
        return StageResult(
            cast_model(model, stage), [f"cast weights from {before} to {stage.dtype}"]
        )
    calibration = None
    # Layer reduction measures block importance for its table whenever it has text, even when
    # the blocks are chosen by position or index; the methods draw windows only when they read
    # them.
    wants = isinstance(stage, LayerReductionConfig) or calibration_reason(stage) is not None
    if wants and data.tokens is not None:
        calibration = data.tokens
    elif wants and data.calibration is not None:
        calibration = model_calibration_samples(
            model, data.calibration, tokenizer, stage.calibration
        )
    if isinstance(stage, LayerReductionConfig):
        from .compression.layers import reduce_layers

        outcome = reduce_layers(
            model, stage, calibration=calibration, device=device, progress=progress
        )
        return StageResult(outcome.model, outcome.steps, outcome.report)
    from .api import apply_method

    train_tokens = None
    if trains(stage) and data.train is not None:
        train_tokens = load_token_stream(data.train, tokenizer)
    done = apply_method(
        model,
        stage,
        calibration=calibration,
        device=device,
        progress=progress,
        train_tokens=train_tokens,
    )
    return StageResult(done.model, done.steps, done.report, done.format, done.writer)


def write_checkpoint(
    result: StageResult,
    out: Path,
    *,
    tokenizer: Any,
    manifest: dict[str, Any],
    title: str,
    source: str,
    tags: list[str],
    steps: list[str],
    overwrite: bool,
    protect: list[str],
    metrics_table: str | None = None,
    staging: Path | None = None,
) -> Path:
    """Save a stage's model with its manifest and model card, atomically; the folder.
    `staging`: the work folder a streamed stage has written its blocks into."""
    from .models import render_model_card, save_model

    card = render_model_card(
        title=title,
        source=source,
        tags=tags,
        steps=steps,
        metrics_table=metrics_table,
        plain_transformers=not result.format.endswith("sparse-bitmask"),
    )
    return save_model(
        result.model,
        out,
        tokenizer=tokenizer,
        overwrite=overwrite,
        protect=protect,
        manifest=manifest,
        model_card=card,
        writer=result.writer,
        staging=staging,
    )


STREAM_MODES = ("auto", "on", "off")


def stream_decision(
    mode: str, stage: Any, directory: Path | None, gguf_file: str | None
) -> tuple[bool, str | None]:
    """Whether a stage runs streamed from disk (`swiss_knife.streaming`), and why not.

    ``auto`` (the default) streams whenever the stage and the checkpoint allow it; ``on``
    refuses to run otherwise (`UserInputError` naming the reason); ``off`` loads the model.
    """
    from .streaming import source_refusal, stream_refusal

    if mode == "off":
        return False, None
    reason = stream_refusal(stage) or source_refusal(directory, gguf_file)
    if reason is None:
        return True, None
    if mode == "on":
        raise UserInputError(f"cannot stream this stage from disk: {reason}")
    return False, reason


def open_streamed_stage(
    directory: Path, out: Path, *, dtype: str, device: Any, trust_remote_code: bool
) -> tuple[nn.Module, Path]:
    """The streamed model of the checkpoint in `directory`, writing into a new work folder
    beside `out`; (model, work folder). The caller deletes the folder if the stage fails."""
    import shutil

    from .models import DTYPES
    from .paths import work_dir
    from .streaming import open_streamed

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = work_dir(out, "partial")
    try:
        model = open_streamed(
            directory,
            staging,
            dtype=DTYPES.get(dtype),
            device=device,
            trust_remote_code=trust_remote_code,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model, staging


def open_for_stage(
    mode: str,
    stage: Any,
    source: str,
    out: Path,
    *,
    gguf_file: str | None,
    dtype: str,
    device: Any,
    trust_remote_code: bool,
    load_whole: Callable[[], Any],
) -> tuple[Any, Path | None]:
    """The model a stage runs on: streamed from the local folder `source` where `mode` and the
    stage allow (a `LoadedModel` and the work folder beside `out` its blocks are written into),
    or `load_whole()` and None, saying in the log why it is not streamed."""
    from .models import LoadedModel, load_tokenizer
    from .streaming import StreamRefused

    directory = Path(source).expanduser()
    local = directory if directory.is_dir() else None
    streamed, reason = stream_decision(mode, stage, local, gguf_file)
    if not streamed:
        if reason is not None and local is not None:
            logger.info("loading the whole model (not streamed: %s)", reason)
        return load_whole(), None
    assert local is not None
    try:
        network, staging = open_streamed_stage(
            local, out, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
    except StreamRefused as exc:
        if mode == "on":
            raise UserInputError(f"cannot stream this checkpoint from disk: {exc}") from exc
        logger.info("loading the whole model (not streamed: %s)", exc)
        return load_whole(), None
    logger.info("streaming %s one block at a time", source)
    tokenizer = load_tokenizer(str(local), trust_remote_code=trust_remote_code)
    return LoadedModel(network, tokenizer, source, local, None, device), staging
