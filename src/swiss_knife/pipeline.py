"""Run a recipe: stages in order, each saved as a checkpoint, evaluated as the recipe says.

Layout of an output directory:

    recipe.yaml                 the fully resolved recipe
    evaluations/original.json   the baseline, measured first
    stages/NN-TYPE/             a loadable checkpoint per model-changing stage (with manifest, card)
    evaluations/NN-TYPE.json    results of `evaluate` stages
    report.{md,json,html}       every evaluation side by side

A re-run resumes: a stage whose manifest records the same chain of stages (model, data and every
stage up to it) is loaded from disk instead of being redone. Every model-changing stage but
distillation runs through the shared runner in `swiss_knife.stages`; stage configs come from
the method registry (`swiss_knife.recipe`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import (
    DataConfig,
    DistillConfig,
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
    load_model,
    read_manifest,
    render_model_card,
)
from .paths import check_writable_parent, refuse_inside_inputs
from .recipe import CompressionConfig, stage_name
from .stages import Recipe, StageData, StageResult, run_stage, write_checkpoint

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
    """What a distillation stage did, in words for the model card and numbers for the report."""

    steps: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _stage_data(recipe: CompressionConfig) -> StageData:
    """The recipe's texts as a stage reads them: calibration from data.calibration (or
    data.eval), fine-tuning from data.calibration only, never the text it is scored on."""
    return StageData(
        calibration=recipe.data.calibration or recipe.data.eval, train=recipe.data.calibration
    )


def _run_model_stage(state: PipelineState, stage: Any, name: str) -> StageResult:
    """Any stage that changes the model: distillation here, the rest through the one runner."""
    if isinstance(stage, DistillConfig):
        outcome = _run_distill(state, stage, name)
        return StageResult(state.model, outcome.steps, outcome.info)
    result = run_stage(
        state.model,
        stage,
        tokenizer=state.tokenizer,
        device=state.loaded.device,
        data=_stage_data(state.recipe),
        speaker=Recipe(),
        label=getattr(stage, "method", None) or stage.type,
        progress=state.progress,
    )
    state.model = result.model
    if isinstance(stage, LayerReductionConfig):
        logger.info("block importance:\n%s", result.report["importance_table"])
    return result


def _run_distill(state: PipelineState, stage: DistillConfig, name: str) -> StageOutcome:
    """Train a student on the teacher's outputs; the student then continues down the recipe.

    Teacher: the recipe's original model (`teacher: original`, the default, reloaded from disk),
    the model entering this stage (`current`), or a path. Student: the model entering this stage
    (`student: current`, e.g. the output of a pruning or layer-reduction stage), a path, or the
    teacher minus some blocks (`student_from_teacher`). Training files (checkpoints, metrics)
    go to OUTPUT/distill/NAME; a re-run resumes there when nothing upstream changed.
    """
    from .compression.distillation.api import distill

    recipe = state.recipe
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
    return StageOutcome(steps, info=info)


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
    # The GGUF file of the last export stage, if the recipe has one.
    gguf_file: Path | None = None


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


def _evaluate_gguf(
    state: PipelineState,
    evaluation: EvaluationConfig,
    name: str,
    path: Path,
    reference: Any | None,
) -> EvaluationReport:
    """Measure a GGUF file in llama.cpp on the same tokens as the transformers stages."""
    from .evaluation.llama_cpp import evaluate_gguf

    logger.info("evaluating %s in llama.cpp", name)
    eval_data = state.recipe.data.eval
    return evaluate_gguf(
        path,
        state.tokenizer,
        evaluation,
        tokens=state.eval_tokens(),
        reference=reference,
        name=name,
        eval_data=eval_data.source if eval_data else None,
        progress=state.progress,
    )


def _card_title(recipe: CompressionConfig) -> str:
    return f"{Path(recipe.model.path).name} (Swiss Knife)"


def _card_tags(recipe: CompressionConfig) -> list[str]:
    return [s.type for s in recipe.stages if s.type != "evaluate"]


def _stage_card(
    recipe: CompressionConfig,
    steps: list[str],
    reports: list[EvaluationReport],
    manifest: dict[str, Any],
) -> str:
    """The model card; `reports` are this stage's measurement, after the baseline if any."""
    table = markdown_table(comparison_rows(reports)) if reports else None
    saved_format = str(manifest.get("stage_report", {}).get("format", ""))
    return render_model_card(
        title=_card_title(recipe),
        source=recipe.model.path,
        tags=_card_tags(recipe),
        steps=steps,
        metrics_table=table,
        plain_transformers=not saved_format.endswith("sparse-bitmask"),
    )


def _prepare_output(
    recipe: CompressionConfig,
    output_dir: str | Path | None,
    extra_inputs: list[str | Path] | None,
) -> tuple[Path, list[str]]:
    """The resolved output folder and the inputs to protect, refused before any work when it
    would sit inside an input or cannot be written."""
    target = output_dir or recipe.output_dir
    if target is None:
        raise ConfigError("no output directory: pass --output-dir or set output_dir in the recipe")
    _check_eval_text(recipe)
    protect = [recipe.model.path] if Path(recipe.model.path).expanduser().exists() else []
    out = Path(target).expanduser().resolve()
    # The recipe's own files (model, data, the recipe itself) must survive an --overwrite.
    inputs = [*protect, *_recipe_data_paths(recipe), *(extra_inputs or ())]
    refuse_inside_inputs(out, [p for p in inputs if Path(p).expanduser().exists()])
    check_writable_parent(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is a file")
    return out, protect


@dataclass
class _RecipeRun:
    """One run of a recipe: the stages done so far, their reports, and what was reused."""

    state: PipelineState
    resume: bool
    protect: list[str]
    reference: Any | None
    reports: list[EvaluationReport] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    final_dir: Path | None = None
    gguf_file: Path | None = None

    @property
    def recipe(self) -> CompressionConfig:
        return self.state.recipe

    def cached_evaluation(
        self, name: str, evaluation: EvaluationConfig, upto: int, gguf: Path | None = None
    ) -> bool:
        """Reuse evaluations/NAME.json when it was measured with the same chain and settings,
        else measure now (the GGUF file `gguf` in llama.cpp) and write it; True when reused."""
        path = self.state.output_dir / "evaluations" / f"{name}.json"
        key = _eval_key(self.recipe, evaluation, upto)
        cached = _read_json(path)
        if self.resume and cached and cached.get("key") == key:
            self.reports.append(EvaluationReport.from_dict(cached["report"]))
            self.resumed.append(name)
            return True
        if name == "original":
            weights, reference = self.state.loaded.weights_path, None
        else:
            weights, reference = self.final_dir, self.reference
        if gguf is not None:
            report = _evaluate_gguf(self.state, evaluation, name, gguf, self.reference)
        else:
            report = _evaluate(
                self.state, evaluation, name=name, reference=reference, weights_path=weights
            )
        _write_json_atomic(path, {"key": key, "report": report.to_dict()})
        self.reports.append(report)
        return False

    def resumed_stage(self, stage: Any, name: str, stage_dir: Path, chain: Any) -> bool | None:
        """Load a stage an earlier run finished with the same chain. None when there is none;
        else whether it still needs evaluating (no cached report measured with these settings)."""
        manifest = read_manifest(stage_dir) if self.resume else None
        if manifest is None or manifest.get("chain") != chain:
            return None
        logger.info("stage %s already done; loading it from %s", name, stage_dir)
        self.state.model = load_model(
            str(stage_dir), device=self.recipe.model.device, with_tokenizer=False
        ).model
        self.steps.extend(manifest.get("steps", []))
        self.resumed.append(name)
        self.final_dir = stage_dir
        cached_report = manifest.get("evaluation")
        if manifest.get("evaluation_config") != config_to_dict(self.recipe.evaluation):
            cached_report = None  # measured with other settings: measure again
        if stage.evaluate and cached_report:
            self.reports.append(EvaluationReport.from_dict(cached_report))
            return False
        return bool(stage.evaluate)

    def run_stage(self, index: int, stage: Any, name: str, stage_dir: Path, chain: Any) -> None:
        """Run a model-changing stage and save its checkpoint (the card gains the measured
        results once the stage is evaluated)."""
        recipe = self.recipe
        # Named before it starts: a stage can run for minutes, and the log's last line should
        # say what is happening now, not what finished before it.
        logger.info("stage %d/%d: %s (%s)", index + 1, len(recipe.stages), name, stage.type)
        started = time.perf_counter()
        result = _run_model_stage(self.state, stage, name)
        seconds = round(time.perf_counter() - started, 3)
        self.steps.extend(result.steps)
        manifest = build_manifest(
            source=recipe.model.path,
            recipe=config_to_dict(recipe),
            timings={"stage": seconds},
            extra={
                "chain": chain,
                "stage": config_to_dict(stage),
                "steps": list(self.steps),
                "stage_report": {"format": result.format, **result.report},
            },
        )
        write_checkpoint(
            result,
            stage_dir,
            tokenizer=self.state.tokenizer,
            manifest=manifest,
            title=_card_title(recipe),
            source=recipe.model.path,
            tags=_card_tags(recipe),
            steps=self.steps,
            overwrite=True,
            protect=self.protect,
        )
        self.final_dir = stage_dir

    def evaluate_stage(self, name: str, stage_dir: Path) -> None:
        """Measure a saved stage and add the results to its manifest and card, atomically."""
        recipe = self.recipe
        evaluation = recipe.evaluation
        report = _evaluate(
            self.state, evaluation, name=name, reference=self.reference, weights_path=stage_dir
        )
        self.reports.append(report)
        manifest = {
            **(read_manifest(stage_dir) or {}),
            "evaluation": report.to_dict(),
            "evaluation_config": config_to_dict(evaluation),
            "metrics": report.metrics,
        }
        _write_json_atomic(stage_dir / "swiss_knife.json", manifest)
        baseline = [self.reports[0]] if recipe.evaluate_original else []
        card = _stage_card(recipe, self.steps, [*baseline, report], manifest)
        fd, tmp = tempfile.mkstemp(prefix=".README.", dir=stage_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(card)
        os.replace(tmp, stage_dir / "README.md")

    def export_source(self, name: str) -> Path:
        """The checkpoint folder an export stage reads: the last saved stage, or the original
        model when it is a local folder."""
        if self.final_dir is not None:
            return self.final_dir
        original = Path(self.recipe.model.path).expanduser()
        if original.is_dir():
            return original
        raise ConfigError(
            f"stage {name!r} exports a checkpoint folder, and no earlier stage saved one and the "
            f"model {self.recipe.model.path!r} is not a local folder: put a stage before it "
            "(e.g. cast) or point model.path at a folder"
        )

    def export_stage(self, index: int, stage: Any, name: str) -> None:
        """Write the stage's file into stages/NAME/; its manifest, written last, marks it done
        (a re-run with the same chain reuses the file)."""
        from . import registry

        stage_dir = self.state.output_dir / "stages" / name
        target = stage_dir / stage.file_name
        chain = _chain(self.recipe, index)
        manifest = read_manifest(stage_dir) if self.resume else None
        if manifest is not None and manifest.get("chain") == chain and target.is_file():
            logger.info("stage %s already done: %s", name, target)
            self.resumed.append(name)
        else:
            source = self.export_source(name)
            logger.info(
                "stage %d/%d: %s (export to %s)", index + 1, len(self.recipe.stages), name, target
            )
            started = time.perf_counter()
            stage_dir.mkdir(parents=True, exist_ok=True)
            report = registry.for_config(stage).apply(
                source, stage, target, overwrite=True, progress=self.state.progress
            )
            manifest = build_manifest(
                source=str(source),
                recipe=config_to_dict(self.recipe),
                timings={"stage": round(time.perf_counter() - started, 3)},
                extra={
                    "chain": chain,
                    "stage": config_to_dict(stage),
                    "steps": [*self.steps, f"exported to GGUF ({report['file_type']})"],
                    "stage_report": {k: v for k, v in report.items() if k != "tensors"},
                },
            )
            _write_json_atomic(stage_dir / "swiss_knife.json", manifest)
        self.gguf_file = target
        if stage.evaluate:
            self.evaluate_gguf(name, target, index)

    def evaluate_gguf(self, name: str, path: Path, index: int) -> None:
        """Measure an exported GGUF file in llama.cpp when llama-cpp-python is installed."""
        from .evaluation.llama_cpp import llama_cpp_available

        if not llama_cpp_available():
            logger.warning(
                "stage %s: %s is not measured: llama-cpp-python is not installed "
                "(pip install 'swiss-knife[llama-cpp]')",
                name,
                path.name,
            )
            return
        self.cached_evaluation(name, self.recipe.evaluation, index, gguf=path)

    def stage(self, index: int, stage: Any) -> None:
        name = stage_name(stage, index)
        if stage.type == "evaluate":
            evaluation = getattr(stage, "evaluation", None) or self.recipe.evaluation
            self.cached_evaluation(name, evaluation, index)
            return
        if stage.type == "export":
            self.export_stage(index, stage, name)
            return
        stage_dir = self.state.output_dir / "stages" / name
        chain = _chain(self.recipe, index)
        needs_evaluation = self.resumed_stage(stage, name, stage_dir, chain)
        if needs_evaluation is None:
            self.run_stage(index, stage, name, stage_dir, chain)
            needs_evaluation = bool(stage.evaluate)
        if needs_evaluation:
            self.evaluate_stage(name, stage_dir)


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
    out, protect = _prepare_output(recipe, output_dir, extra_inputs)
    clear = _check_output(recipe, out, resume, overwrite)
    torch.manual_seed(recipe.seed)
    loaded = load_model(recipe.model)  # a model that cannot load leaves the output untouched
    _start_output(recipe, out, clear)
    needs_reference = recipe.evaluation.agreement.enabled and recipe.data.eval is not None
    run = _RecipeRun(
        PipelineState(recipe, loaded, loaded.model, out, progress),
        resume,
        protect,
        copy.deepcopy(loaded.model) if needs_reference and recipe.stages else None,
    )
    if recipe.evaluate_original:
        run.cached_evaluation("original", recipe.evaluation, -1)
    for index, stage in enumerate(recipe.stages):
        run.stage(index, stage)
    if not run.reports:
        raise UserInputError("the recipe evaluated nothing and has no stages; nothing to report")
    paths = write_reports(
        out,
        run.reports,
        title=title or f"Swiss Knife run: {Path(recipe.model.path).name}",
        notes=notes,
    )
    return PipelineResult(out, run.reports, run.final_dir, paths, run.resumed, run.gguf_file)
