"""The recipe, `CompressionConfig`: a model, its data, and stages, built from the method registry.

A method's config carries only the method's own settings (`GPTQConfig(bits=4)`); in a recipe each
becomes a stage class that adds what every stage has: `type` (the kind), `name` (its output folder)
and `evaluate`. The stage classes, the union a recipe's `stages:` list validates against and the
JSON Schema are all derived from the registry, so a method registered in its own module is a valid
recipe stage with no edit here. Stages subclass their method config, so a stage is passed to its
method as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from . import registry
from .config import (
    CastConfig,
    DataConfig,
    EvaluateStageConfig,
    EvaluationConfig,
    ModelSpec,
    StageBase,
    StrictModel,
    load_config,
)

_STAGES: dict[type, type] = {}


def stage_class(kind: str, config_class: type) -> type:
    """The recipe stage of a method config: the config plus `type`, `name` and `evaluate`."""
    if config_class not in _STAGES:
        name = config_class.__name__.removesuffix("Config") + "Stage"
        _STAGES[config_class] = create_model(
            name,
            __base__=(config_class, StageBase),
            __module__=__name__,
            __doc__=config_class.__doc__,
            type=(Literal[kind], kind),
        )
    return _STAGES[config_class]


def kind_union(kind: str) -> Any:
    """The stage classes of one kind: a union discriminated by `method` where there are several."""
    classes = [stage_class(kind, cls) for cls in registry.config_classes(kind)]
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="method")]  # noqa: UP007


registry.load_builtins()
if TYPE_CHECKING:  # built at run time from the registry; to a type checker, any stage
    QuantizeConfig = Any
    PruneConfig = Any
    StageConfig = Any
else:
    QuantizeConfig = kind_union("quantize")
    PruneConfig = kind_union("prune")
    # Stages are a union discriminated by `type`; quantize and prune nest one on `method`.
    StageConfig = Annotated[
        Union[(CastConfig, EvaluateStageConfig, *(kind_union(k) for k in registry.KINDS))],
        Field(discriminator="type"),
    ]


class DataSources(StrictModel):
    eval: DataConfig | None = Field(default=None, description="Text for perplexity and agreement.")
    calibration: DataConfig | None = Field(
        default=None, description="Text for calibration-based methods (defaults to eval data)."
    )

    @field_validator("eval", "calibration", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value


class CompressionConfig(StrictModel):
    """A recipe: a model, its data, and an ordered list of stages, evaluated after each."""

    version: Literal[1] = 1
    model: ModelSpec
    data: DataSources = Field(default_factory=DataSources)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    evaluate_original: bool = Field(
        default=True, description="Evaluate the input model first, as the baseline."
    )
    stages: list[StageConfig] = Field(default_factory=list)
    output_dir: str | None = Field(default=None, description="Where stage outputs and reports go.")
    seed: int = 0

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique_stage_names(self) -> CompressionConfig:
        seen: set[str] = set()
        for index, stage in enumerate(self.stages):
            name = stage_name(stage, index)
            if name in seen:
                raise ValueError(f"stage name {name!r} is used twice; names must be unique")
            seen.add(name)
        return self


def stage_name(stage: Any, index: int) -> str:
    """The folder name of a stage: its explicit name, or NN-type."""
    return str(stage.name or f"{index:02d}-{getattr(stage, 'type', 'stage')}")


def load_recipe(path: str | Path) -> CompressionConfig:
    """Load and validate a recipe file without touching any weights."""
    return load_config(path, CompressionConfig)


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, for editor autocompletion."""
    schema = CompressionConfig.model_json_schema()
    # The shorthands the validators accept (`model: PATH`, `data: {eval: FILE}`) are valid too,
    # so an editor must not flag the shipped samples that use them.
    schema["properties"]["model"] = {
        "anyOf": [schema["properties"]["model"], {"type": "string"}],
        "description": "A ModelSpec, or just its path.",
    }
    for field in schema["$defs"]["DataSources"]["properties"].values():
        field["anyOf"].insert(1, {"type": "string"})
    for key in ("train_data", "eval_data"):
        schema["$defs"]["DistillStage"]["properties"][key]["anyOf"].insert(1, {"type": "string"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Swiss Knife recipe"
    return schema
