"""Run a recipe: stages in order, each saved as a checkpoint, evaluated as the recipe says.

Layout of an output directory:

    recipe.yaml                 the fully resolved recipe
    evaluations/original.json   the baseline, measured first
    stages/NN-TYPE/             a loadable checkpoint per model-changing stage (with manifest, card)
    evaluations/NN-TYPE.json    results of `evaluate` stages
    report.{md,json,html}       every evaluation side by side

A re-run resumes: a stage whose manifest records the same chain of stages (model, data and every
stage up to it) is loaded from disk instead of being redone. Stage types register a runner with
`@register_stage("type")`; the recipe's stage configs live in `config.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import (
    CastConfig,
    DataConfig,
    DistillConfig,
    EvaluateStageConfig,
    EvaluationConfig,
    LayerReductionConfig,
    config_to_dict,
)
from .data import load_token_stream
from .errors import ConfigError, OutputExistsError, UserInputError
from .evaluation import EvaluationReport, evaluate, write_reports
from .evaluation.compare import comparison_rows
from .evaluation.report import markdown_table
from .models import (
    LoadedModel,
    build_manifest,
    cast_model,
    load_model,
    read_manifest,
    render_model_card,
    save_model,
)
from .paths import check_writable_parent, refuse_inside_inputs
from .recipe import CompressionConfig, stage_name

logger = logging.getLogger(__name__)


@dataclass
class PipelineState:
    """What stages see: the current model and the recipe's data, loaded once, lazily."""

    recipe: CompressionConfig
    loaded: LoadedModel
    model: Any
    output_dir: Path
    progress: bool = True
    _eval_tokens: torch.Tensor | None = None

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def eval_tokens(self) -> torch.Tensor | None:
        if self._eval_tokens is None and self.recipe.data.eval is not None:
            self._eval_tokens = load_token_stream(self.recipe.data.eval, self.tokenizer)
        return self._eval_tokens


@dataclass
class StageOutcome:
    """What a stage did: whether it changed the model, in words for the model card."""

    changed_model: bool
    steps: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    report: EvaluationReport | None = None
    # Writes the checkpoint files for formats that are not a plain save_pretrained.
    writer: Callable[[Path], None] | None = None


StageRunner = Callable[[PipelineState, Any], StageOutcome]
_STAGES: dict[str, StageRunner] = {}


def register_stage(type_name: str) -> Callable[[StageRunner], StageRunner]:
    """Register the runner for a stage type; a second runner for the same type is an error.

    Internal: the stage types a recipe accepts come from the method registry (swiss_knife.recipe);
    a new method needs no runner of its own, since quantize and prune stages share one.
    """

    def decorator(fn: StageRunner) -> StageRunner:
        if type_name in _STAGES:
            raise ValueError(f"stage type {type_name!r} is already registered")
        _STAGES[type_name] = fn
        return fn

    return decorator


def registered_stages() -> list[str]:
    return sorted(_STAGES)


@register_stage("cast")
def _run_cast(state: PipelineState, stage: CastConfig) -> StageOutcome:
    before = str(next(state.model.parameters()).dtype).replace("torch.", "")
    state.model = cast_model(state.model, stage)
    return StageOutcome(True, [f"cast weights from {before} to {stage.dtype}"])


def _stage_calibration(state: PipelineState, stage: Any, reason: str | None) -> Any:
    """The stage's calibration windows from data.calibration (or data.eval), or None when
    `reason` (why the stage needs them) is None."""
    from .data import calibration_samples

    if reason is None:
        return None
    source = state.recipe.data.calibration or state.recipe.data.eval
    if source is None:
        raise ConfigError(
            f"stage {stage.method!r}: {reason} needs calibration text: set data.calibration "
            "(or data.eval) in the recipe"
        )
    return calibration_samples(
        source,
        state.tokenizer,
        stage.calibration,
        max_positions=getattr(state.model.config, "max_position_embeddings", None),
    )


def _stage_outcome(state: PipelineState, outcome: Any) -> StageOutcome:
    state.model = outcome.model
    return StageOutcome(
        True,
        outcome.steps,
        info={"format": outcome.format, **outcome.report},
        writer=outcome.writer,
    )


def _run_method(state: PipelineState, stage: Any) -> StageOutcome:
    """A quantize or prune stage: its calibration windows and training text, then its method."""
    from . import registry
    from .api import apply_method
    from .compression.pruning.api import calibration_reason

    method = registry.for_config(stage)
    if method.kind == "prune":
        reason = calibration_reason(stage)
    else:
        reason = f"method {stage.method!r}" if method.needs_data(stage) else None
    calibration = _stage_calibration(state, stage, reason)
    train_tokens = None
    if getattr(stage, "schedule", None) is not None:
        # Fine-tuning reads the calibration text, never the evaluation text it is scored on.
        if state.recipe.data.calibration is None:
            raise ConfigError(
                f"stage {stage.method!r} prunes gradually and fine-tunes between steps: set "
                "data.calibration in the recipe to the text to train on"
            )
        train_tokens = load_token_stream(state.recipe.data.calibration, state.tokenizer)
    outcome = apply_method(
        state.model,
        stage,
        calibration=calibration,
        device=state.loaded.device,
        progress=state.progress,
        tokenizer=state.tokenizer,
        train_tokens=train_tokens,
    )
    return _stage_outcome(state, outcome)


register_stage("quantize")(_run_method)
register_stage("prune")(_run_method)


@register_stage("reduce_layers")
def _run_reduce_layers(state: PipelineState, stage: LayerReductionConfig) -> StageOutcome:
    from .compression.layers import reduce_layers
    from .data import model_calibration_samples

    recipe = state.recipe
    source = recipe.data.calibration or recipe.data.eval
    needs_data = stage.layers is None and stage.selection == "importance"
    if needs_data and source is None:
        raise ConfigError(
            "stage reduce_layers with selection 'importance' needs calibration text: set "
            "data.calibration (or data.eval) in the recipe, or use selection last/first/evenly"
        )
    # With text available the block importance is measured for the table even when the blocks
    # are chosen by position or index.
    calibration = None
    if source is not None:
        calibration = model_calibration_samples(
            state.model, source, state.tokenizer, stage.calibration
        )
    outcome = reduce_layers(
        state.model,
        stage,
        calibration=calibration,
        device=state.loaded.device,
        progress=state.progress,
    )
    state.model = outcome.model
    logger.info("block importance:\n%s", outcome.report["importance_table"])
    return StageOutcome(True, outcome.steps, info=outcome.report)


@register_stage("distill")
def _run_distill(state: PipelineState, stage: DistillConfig) -> StageOutcome:
    """Train a student on the teacher's outputs; the student then continues down the recipe.

    Teacher: the recipe's original model (`teacher: original`, the default, reloaded from disk),
    the model entering this stage (`current`), or a path. Student: the model entering this stage
    (`student: current`, e.g. the output of a pruning or layer-reduction stage), a path, or the
    teacher minus some blocks (`student_from_teacher`). Training files (checkpoints, metrics)
    go to OUTPUT/distill/NAME; a re-run resumes there when nothing upstream changed.
    """
    from .compression.distillation.api import distill

    recipe = state.recipe
    index = next(i for i, s in enumerate(recipe.stages) if s is stage)
    name = stage_name(stage, index)
    if stage.train_data is None:
        raise ConfigError(f"stage {name!r} needs train_data: the text to distil on")
    if stage.teacher == "current" and stage.student == "current" and not stage.student_from_teacher:
        raise ConfigError(
            f"stage {name!r}: the teacher and the student are both the model entering the "
            "stage; set teacher: original (or a path), or student_from_teacher"
        )
    device = recipe.model.device
    if stage.teacher == "original":
        teacher = load_model(recipe.model, with_tokenizer=False, device="cpu").model
    elif stage.teacher == "current":
        teacher = state.model
    else:
        teacher = load_model(stage.teacher, with_tokenizer=False, device="cpu").model
    student: Any = None
    if stage.student_from_teacher is None:
        if stage.student == "current":
            student = state.model
        else:
            student = load_model(stage.student, with_tokenizer=False, device="cpu").model
    result = distill(
        teacher,
        student,
        stage,
        tokenizer=state.tokenizer,
        output_dir=state.output_dir / "distill" / name,
        resume="auto",
        cpu=device == "cpu",
        progress=state.progress,
    )
    state.model = result.student
    steps = [
        f"distilled from the {stage.teacher} model for {result.steps} steps "
        f"({result.tokens:,} tokens, {stage.loss.kd}, alpha {stage.loss.alpha})"
    ]
    if result.kept_blocks is not None:
        steps.insert(0, f"student: the teacher's blocks {result.kept_blocks}")
    if result.best_step is not None and result.best_perplexity is not None:
        steps.append(
            f"kept step {result.best_step} (held-out perplexity {result.best_perplexity:.4g})"
        )
    info: dict[str, Any] = {
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "best_step": result.best_step,
        "best_eval_perplexity": result.best_perplexity,
        "evaluations": [vars(e) for e in result.evaluations],
        "stopped_early": result.stopped_early,
        "kept_blocks": result.kept_blocks,
    }
    return StageOutcome(True, steps, info=info)


@register_stage("evaluate")
def _run_evaluate(state: PipelineState, stage: EvaluateStageConfig) -> StageOutcome:
    return StageOutcome(False, ["evaluated"])


# --------------------------------------------------------------------------- helpers


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data
    except (OSError, json.JSONDecodeError):
        return None


def _chain(recipe: CompressionConfig, upto: int) -> dict[str, Any]:
    """Everything that determines the model after stage `upto`: its resume key."""
    return {
        "model": config_to_dict(recipe.model),
        "data": config_to_dict(recipe.data),
        "seed": recipe.seed,
        "stages": [config_to_dict(s) for s in recipe.stages[: upto + 1]],
    }


def _eval_key(recipe: CompressionConfig, evaluation: EvaluationConfig, upto: int) -> dict[str, Any]:
    return {"chain": _chain(recipe, upto), "evaluation": config_to_dict(evaluation)}


def _check_eval_text(recipe: CompressionConfig) -> None:
    """Refuse a recipe that measures perplexity but gives no text, before any work."""
    if recipe.data.eval is not None:
        return
    evaluations = [recipe.evaluation] if recipe.evaluate_original else []
    for stage in recipe.stages:
        if stage.type == "evaluate":
            evaluations.append(getattr(stage, "evaluation", None) or recipe.evaluation)
        elif stage.evaluate:
            evaluations.append(recipe.evaluation)
    if any(e.perplexity.enabled for e in evaluations):
        raise ConfigError(
            "the recipe measures perplexity but gives no evaluation text: set data.eval "
            "(a text file, folder or dataset), or set evaluation.perplexity.enabled: false"
        )


@dataclass
class PipelineResult:
    output_dir: Path
    reports: list[EvaluationReport]
    final_model_dir: Path | None
    report_paths: dict[str, Path]
    resumed_stages: list[str]


def _recipe_data_paths(recipe: CompressionConfig) -> list[str]:
    """Local text sources the recipe reads (hub dataset names are not paths)."""
    sources = [recipe.data.calibration, recipe.data.eval]
    for stage in recipe.stages:
        sources += [getattr(stage, "train_data", None), getattr(stage, "eval_data", None)]
    return [d.source for d in sources if isinstance(d, DataConfig)]


def _check_output(recipe: CompressionConfig, out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse an output folder this run may not use, writing nothing; True if it must be cleared."""
    recipe_file = out / "recipe.yaml"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if not recipe_file.is_file():
                raise OutputExistsError(
                    f"{out} is not empty and holds no Swiss Knife run; refusing to delete it"
                )
            return True
        if not resume:
            raise OutputExistsError(
                f"output directory {out} is not empty; pass --overwrite to start again"
            )
        elif not recipe_file.is_file():
            raise OutputExistsError(
                f"output directory {out} is not empty and holds no Swiss Knife run; "
                "choose another directory"
            )
        else:
            previous = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
            current = config_to_dict(recipe)
            if previous.get("model") != current["model"]:
                raise OutputExistsError(
                    f"{out} holds a run of another model ({previous.get('model', {}).get('path')}); "
                    "choose another --output-dir or pass --overwrite"
                )
    return False


def _start_output(recipe: CompressionConfig, out: Path, clear: bool) -> None:
    """Clear an earlier run (when asked and allowed) and record this run's recipe."""
    if clear:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".recipe.", dir=out)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(recipe), handle, sort_keys=False)
    os.replace(tmp, out / "recipe.yaml")


def _evaluate(
    state: PipelineState,
    evaluation: EvaluationConfig,
    *,
    name: str,
    reference: Any | None,
    weights_path: Path | None,
) -> EvaluationReport:
    eval_data = state.recipe.data.eval
    logger.info("evaluating %s", name)
    return evaluate(
        state.model,
        state.tokenizer,
        evaluation,
        tokens=state.eval_tokens(),
        reference=reference,
        weights_path=weights_path,
        name=name,
        source=str(weights_path) if weights_path else state.recipe.model.path,
        eval_data=eval_data.source if eval_data else None,
        progress=state.progress,
    )


def _stage_card(
    recipe: CompressionConfig,
    steps: list[str],
    reports: list[EvaluationReport],
    manifest: dict[str, Any],
) -> str:
    """The model card; `reports` are this stage's measurement, after the baseline if any."""
    table = markdown_table(comparison_rows(reports)) if reports else None
    tags = [s.type for s in recipe.stages if s.type != "evaluate"]
    saved_format = str(manifest.get("stage_report", {}).get("format", ""))
    return render_model_card(
        title=f"{Path(recipe.model.path).name} (Swiss Knife)",
        source=recipe.model.path,
        tags=tags,
        steps=steps,
        metrics_table=table,
        plain_transformers=not saved_format.endswith("sparse-bitmask"),
    )


def run_recipe(
    recipe: CompressionConfig,
    output_dir: str | Path | None = None,
    *,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    title: str | None = None,
    notes: list[str] | None = None,
    extra_inputs: list[str | Path] | None = None,
) -> PipelineResult:
    """Run every stage of a recipe, evaluating as it says; resumable.

    `extra_inputs` names further paths (the recipe file) that the output may not contain.
    """
    target = output_dir or recipe.output_dir
    if target is None:
        raise ConfigError("no output directory: pass --output-dir or set output_dir in the recipe")
    unknown = [s.type for s in recipe.stages if s.type not in _STAGES]
    if unknown:
        raise ConfigError(f"no runner for stage type(s) {unknown}; known: {registered_stages()}")
    _check_eval_text(recipe)
    protect = [recipe.model.path] if Path(recipe.model.path).expanduser().exists() else []
    out = Path(target).expanduser().resolve()
    # The recipe's own files (model, data, the recipe itself) must survive an --overwrite.
    inputs = [*protect, *_recipe_data_paths(recipe), *(extra_inputs or ())]
    refuse_inside_inputs(out, [p for p in inputs if Path(p).expanduser().exists()])
    check_writable_parent(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is a file")
    clear = _check_output(recipe, out, resume, overwrite)

    torch.manual_seed(recipe.seed)
    loaded = load_model(recipe.model)  # a model that cannot load leaves the output untouched
    _start_output(recipe, out, clear)
    state = PipelineState(recipe, loaded, loaded.model, out, progress)
    evaluation = recipe.evaluation
    reports: list[EvaluationReport] = []
    resumed: list[str] = []
    needs_reference = evaluation.agreement.enabled and recipe.data.eval is not None
    reference = copy.deepcopy(loaded.model) if needs_reference and recipe.stages else None

    if recipe.evaluate_original:
        path = out / "evaluations" / "original.json"
        key = _eval_key(recipe, evaluation, -1)
        cached = _read_json(path)
        if resume and cached and cached.get("key") == key:
            reports.append(EvaluationReport.from_dict(cached["report"]))
            resumed.append("original")
        else:
            report = _evaluate(
                state, evaluation, name="original", reference=None, weights_path=loaded.weights_path
            )
            _write_json_atomic(path, {"key": key, "report": report.to_dict()})
            reports.append(report)

    final_dir: Path | None = None
    steps: list[str] = []
    for index, stage in enumerate(recipe.stages):
        name = stage_name(stage, index)
        stage_dir = out / "stages" / name
        chain = _chain(recipe, index)
        started = time.perf_counter()
        if stage.type == "evaluate":
            stage_eval = getattr(stage, "evaluation", None) or evaluation
            path = out / "evaluations" / f"{name}.json"
            key = _eval_key(recipe, stage_eval, index)
            cached = _read_json(path)
            if resume and cached and cached.get("key") == key:
                reports.append(EvaluationReport.from_dict(cached["report"]))
                resumed.append(name)
                continue
            report = _evaluate(
                state, stage_eval, name=name, reference=reference, weights_path=final_dir
            )
            _write_json_atomic(path, {"key": key, "report": report.to_dict()})
            reports.append(report)
            continue

        manifest = read_manifest(stage_dir) if resume else None
        if manifest is not None and manifest.get("chain") == chain:
            logger.info("stage %s already done; loading it from %s", name, stage_dir)
            state.model = load_model(
                str(stage_dir), device=recipe.model.device, with_tokenizer=False
            ).model
            steps.extend(manifest.get("steps", []))
            resumed.append(name)
            cached_report = manifest.get("evaluation")
            if manifest.get("evaluation_config") != config_to_dict(evaluation):
                cached_report = None  # measured with other settings: measure again
            final_dir = stage_dir
            if stage.evaluate and cached_report:
                reports.append(EvaluationReport.from_dict(cached_report))
                continue
            if not stage.evaluate:
                continue
            seconds = manifest.get("timings_s", {}).get("stage", 0.0)
        else:
            # Named before it starts: a stage can run for minutes, and the log's last line
            # should say what is happening now, not what finished before it.
            logger.info("stage %d/%d: %s (%s)", index + 1, len(recipe.stages), name, stage.type)
            outcome = _STAGES[stage.type](state, stage)
            seconds = round(time.perf_counter() - started, 3)
            steps.extend(outcome.steps)
            manifest = build_manifest(
                source=recipe.model.path,
                recipe=config_to_dict(recipe),
                timings={"stage": seconds},
                extra={
                    "chain": chain,
                    "stage": config_to_dict(stage),
                    "steps": list(steps),
                    "stage_report": outcome.info,
                },
            )
            save_model(
                state.model,
                stage_dir,
                tokenizer=state.tokenizer,
                overwrite=True,
                protect=protect,
                manifest=manifest,
                model_card=_stage_card(recipe, steps, [], manifest),  # results added once measured
                writer=outcome.writer,
            )
            final_dir = stage_dir
            if not stage.evaluate:
                continue
        report = _evaluate(
            state, evaluation, name=name, reference=reference, weights_path=stage_dir
        )
        reports.append(report)
        # Add the results to the saved checkpoint: manifest and card replaced atomically.
        manifest = {
            **manifest,
            "evaluation": report.to_dict(),
            "evaluation_config": config_to_dict(evaluation),
            "metrics": report.metrics,
        }
        _write_json_atomic(stage_dir / "swiss_knife.json", manifest)
        baseline = [reports[0]] if recipe.evaluate_original else []
        card = _stage_card(recipe, steps, [*baseline, report], manifest)
        fd, tmp = tempfile.mkstemp(prefix=".README.", dir=stage_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(card)
        os.replace(tmp, stage_dir / "README.md")

    if not reports:
        raise UserInputError("the recipe evaluated nothing and has no stages; nothing to report")
    paths = write_reports(
        out,
        reports,
        title=title or f"Swiss Knife run: {Path(recipe.model.path).name}",
        notes=notes,
    )
    return PipelineResult(out, reports, final_dir, paths, resumed)
