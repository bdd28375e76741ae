"""Typed, validated configs shared by every part: models, data, evaluation, calibration, and the
bases that method configs extend. Each method's own config lives in its module beside its math and
registration; `swiss_knife.recipe` builds the recipe (`CompressionConfig`) from the registry.

Every config is a frozen pydantic model that rejects unknown keys, so a typo in a recipe is an
error that names the closest valid key instead of a silently ignored setting. YAML and JSON are two
serialised forms of the same tree; `CompressionConfig.model_json_schema()` is the recipe schema.

Validation collects every problem before reporting, each with its path in the file
(`stages[1].dtype: ...`), so a user fixes a recipe in one pass.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

DTypeName = Literal["auto", "fp32", "fp16", "bf16"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DocumentSplit = Literal["none", "paragraph", "line"]


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line: a marker in its `Annotated` metadata.

    Options are derived from config fields (swiss_knife.cli_flags); a marker only refines one.
    """

    name: str | None = None  # the option, if not --field-name
    none: tuple[str, ...] = ()  # words that mean None, e.g. ("0", "-1") for a group size
    metavar: str | None = None
    aliases: tuple[
        tuple[str, Any], ...
    ] = ()  # extra switches setting a value: ("--asymmetric", False)
    skip: bool = False  # not an option (set from another flag)
    switch: str | None = None  # on a nested config: the field whose option turns it on
    # Options naming the same group: exactly one of them must be given (argparse checks it).
    one_of: str | None = None


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSpec(StrictModel):
    """Where a model comes from and how to load it."""

    path: str = Field(description="Hugging Face hub id, local directory, or a .gguf file.")
    gguf_file: str | None = Field(
        default=None, description="GGUF file name inside `path` (dequantised on load)."
    )
    dtype: DTypeName = Field(default="auto", description="Load dtype; auto keeps the checkpoint's.")
    device: DeviceName = Field(default="auto", description="auto picks CUDA, then MPS, then CPU.")
    trust_remote_code: bool = Field(
        default=False,
        description="Run modelling code shipped with the checkpoint (off by default).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")


class DataConfig(StrictModel):
    """A text source: a local file or folder, or a Hugging Face dataset `name:config:split`."""

    source: str = Field(
        description=(
            "Local .txt/.jsonl/.json/.parquet/.csv file, a folder of .txt files, or a Hugging Face "
            "dataset as name[:config[:split]]."
        )
    )
    field: str = Field(default="text", description="Text field of .jsonl/.json/.parquet/.csv rows.")
    split_documents: DocumentSplit = Field(
        default="none",
        description=(
            "How to cut plain text into documents (each starts with BOS): none = one document per "
            "file, paragraph = at blank lines, line = every line."
        ),
    )
    add_bos: bool = Field(default=True, description="Prepend the tokenizer's BOS to each document.")
    encoding: str = Field(default="utf-8", description="Encoding of local text files.")
    max_documents: int | None = Field(default=None, ge=1, description="Read at most this many.")


class PerplexityConfig(StrictModel):
    enabled: bool = True
    window: int = Field(default=512, ge=2, description="Tokens per window (the context length).")
    stride: int | None = Field(
        default=None, ge=1, description="Step between windows; defaults to the window (no overlap)."
    )
    batch_size: int = Field(default=4, ge=1)
    max_windows: int | None = Field(
        default=40, ge=1, description="Score at most this many windows (None: the whole text)."
    )

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexityConfig:
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


class SpeedConfig(StrictModel):
    enabled: bool = True
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1], min_length=1
    )
    prompt_len: int = Field(default=128, ge=1)
    new_tokens: int = Field(default=32, ge=1)
    warmup: int = Field(default=1, ge=0, description="Untimed runs before the timed ones.")
    repeats: int = Field(
        default=3,
        ge=1,
        description="Timed runs; reports show their median [min–max], and a ratio needs at "
        "least 2 on both sides to be judged against the noise (3 or more recommended).",
    )


class AgreementConfig(StrictModel):
    enabled: bool = Field(default=True, description="KL and top-1 agreement with the original.")
    window: int = Field(default=512, ge=2)
    max_windows: int | None = Field(default=8, ge=1)
    batch_size: int = Field(default=4, ge=1)


class BleuConfig(StrictModel):
    references: str | None = Field(
        default=None, description="A .jsonl (prompt, reference) or .tsv file; None skips BLEU."
    )
    max_new_tokens: int = Field(default=32, ge=1)
    batch_size: int = Field(default=4, ge=1)


class HarnessConfig(StrictModel):
    tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks; empty skips the harness."
    )
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1, ge=1)


class EvaluationConfig(StrictModel):
    """What `evaluate` measures. Every part can be switched off."""

    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    memory: bool = True
    size: bool = True
    agreement: AgreementConfig = Field(default_factory=AgreementConfig)
    bleu: BleuConfig = Field(default_factory=BleuConfig)
    harness: HarnessConfig = Field(default_factory=HarnessConfig)
    seed: int = 0


class StageBase(StrictModel):
    """Fields every recipe stage shares."""

    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Stage name (defaults to the type); names the stage's output folder.",
    )
    evaluate: bool = Field(default=True, description="Evaluate the model after this stage.")


class CastConfig(StageBase):
    """Half-precision casting: the first and simplest compression."""

    type: Literal["cast"] = "cast"
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"


class EvaluateStageConfig(StageBase):
    """An explicit evaluation at a point in the recipe, optionally with its own settings."""

    type: Literal["evaluate"] = "evaluate"
    evaluation: EvaluationConfig | None = Field(
        default=None, description="Overrides the recipe's evaluation settings for this stage."
    )


# ----------------------------------------------------------------------- quantization stages


# Calibration forwards take this many tokens when the batch size is not given.
TOKENS_PER_FORWARD = 1024


def default_batch_size(seq_len: int) -> int:
    """Windows of `seq_len` tokens per calibration forward when none is given."""
    return max(1, TOKENS_PER_FORWARD // max(1, seq_len))


class CalibrationSettings(StrictModel):
    """How many token windows of the calibration text a data-driven method sees."""

    num_samples: int = Field(default=128, ge=1, description="Calibration windows.")
    seq_len: int = Field(default=512, ge=8, description="Tokens per calibration window.")
    seed: int = Field(default=0, description="Seed of the window sampler.")
    # Unset, 1024 tokens per forward (2 windows of 512): a forward's temporaries (and the heap
    # fragments they leave) grow with its tokens; on SmolLM2 with 64 x 512 tokens a streamed
    # GPTQ peaked at 926 MiB with 8 windows per pass and 709 MiB with 2; on 8 of its blocks,
    # 2, 4 and 8 windows took 88, 84 and 91 s (benchmarks/RESULTS.md, samples). Short windows
    # get more per pass.
    batch_size: int = Field(
        default=2,
        ge=1,
        description="Windows per forward pass; default: as many as make 1024 tokens (at least 1).",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        default="fp32",
        description="Precision of the block forward passes that gather statistics: bf16 runs "
        "them under autocast (about 2x faster where bf16 matmuls are native); statistics, "
        "solves and weights stay in the model's dtype. auto: bf16 for float32 models on GPUs "
        "with bf16 tensor cores and CPUs with AVX-512 BF16 or AMX, fp32 elsewhere. The "
        "activations' bf16 rounding moves pruning and quantization results by about 1 %, either "
        "way (benchmarks/RESULTS.md).",
    )
    spill_dir: str | None = Field(
        default=None,
        description="Keep the calibration activations (samples x seq x hidden) in files in a "
        "fresh folder inside this one, one mini-batch in memory at a time, instead of in "
        "memory; the folder is deleted when the walk ends. null: in memory.",
    )

    @model_validator(mode="before")
    @classmethod
    def _batch_by_tokens(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("batch_size") is None:
            seq_len = data.get("seq_len", 512)
            if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0:
                data = {**data, "batch_size": default_batch_size(seq_len)}
        return data


class QuantizeBase(StrictModel):
    """Fields every quantization method shares: which modules it touches."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1D"],
        description="Module names, class names or 're:<regex>' (full match) to quantize.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Patterns to leave alone (same syntax)."
    )


class IntWeightConfig(QuantizeBase):
    bits: int = Field(default=4, ge=2, le=8, description="Bits per weight.")
    group_size: Annotated[int | None, Flag(none=("0", "-1", "none"))] = Field(
        default=128, ge=2, description="Input channels sharing a scale; null: one per row."
    )
    symmetric: Annotated[bool, Flag(aliases=(("--asymmetric", False),))] = Field(
        default=True, description="No zero point (symmetric grid)."
    )
    bits_overrides: Annotated[
        dict[str, Annotated[int, Field(ge=2, le=8)]],
        Flag(name="--bits-override", metavar="PATTERN=BITS"),
    ] = Field(
        default_factory=dict,
        description="Per-pattern bits for mixed precision, e.g. 're:.*down_proj=8' (repeatable; "
        "the first matching pattern wins).",
    )


# ---------------------------------------------------------------------------- pruning stages


class PruneBase(StrictModel):
    """Fields every pruning method shares: which linears it touches."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1D"],
        description="Module names, class names or 're:<regex>' (full match) to prune.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"], description="Patterns to leave alone (same syntax)."
    )


class GradualSchedule(StrictModel):
    """Raise sparsity in steps, fine-tuning on text between steps with the masks held fixed."""

    steps: Annotated[int, Flag(name="--gradual-steps", metavar="N")] = Field(
        default=4, ge=1, description="Pruning steps up to the final sparsity."
    )
    kind: Annotated[Literal["cubic", "linear"], Flag(name="--schedule")] = Field(
        default="cubic", description="Sparsity curve (cubic: Zhu & Gupta 2017)."
    )
    finetune_steps: int = Field(default=50, ge=0, description="Optimizer steps after each step.")
    learning_rate: float = Field(default=5e-5, gt=0.0, description="Fine-tuning learning rate.")
    batch_size: Annotated[int, Flag(name="--train-batch-size")] = Field(
        default=4, ge=1, description="Windows per fine-tuning step."
    )
    seq_len: Annotated[int, Flag(name="--train-seq-len")] = Field(
        default=256, ge=8, description="Tokens per fine-tuning window."
    )
    teacher: Literal["none", "original"] = Field(
        default="none",
        description="'original': distil from the unpruned model (KL on logits) while fine-tuning; "
        "'none': plain language-model loss.",
    )
    temperature: float = Field(default=2.0, gt=0.0, description="Distillation temperature.")
    seed: Annotated[int, Flag(skip=True)] = 0  # on the command line: --seed


class UnstructuredPruneConfig(PruneBase):
    sparsity: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="Fraction of each targeted weight set to zero."
    )
    pattern: str | None = Field(
        default=None,
        description="N:M semi-structured pattern such as '2:4' (N weights kept in every group of "
        "M consecutive inputs); sets the sparsity to 1 - N/M.",
    )
    allocation: Literal["uniform", "owl"] = Field(
        default="uniform",
        description="Per-layer sparsity: uniform, or OWL (outlier-weighted, Yin et al. 2023) "
        "keeping the overall sparsity.",
    )
    owl_lambda: float = Field(
        default=0.08, ge=0.0, lt=1.0, description="OWL: max deviation from the mean sparsity."
    )
    owl_threshold: float = Field(
        default=5.0, gt=0.0, description="OWL: outlier if score > threshold x layer mean."
    )
    save_format: Literal["dense", "sparse-bitmask"] = Field(
        default="dense",
        description="dense: zeros in a normal checkpoint; sparse-bitmask: compressed-tensors "
        "sparse bitmask (smaller on disk; loads with swiss_knife.load_model, not a plain "
        "from_pretrained).",
    )
    schedule: Annotated[GradualSchedule | None, Flag(switch="steps")] = Field(
        default=None, description="Gradual pruning with fine-tuning (needs training text)."
    )
    # On the base class because OWL's outlier pre-pass needs activations for every method,
    # magnitude included; wanda and sparsegpt also calibrate on these windows.
    calibration: CalibrationSettings = Field(
        default_factory=CalibrationSettings,
        description="Calibration windows (wanda, sparsegpt, and the OWL allocation of any method).",
    )

    @model_validator(mode="before")
    @classmethod
    def _sparsity_from_pattern(cls, data: Any) -> Any:
        # An N:M pattern fixes the sparsity at 1 - N/M: a different sparsity beside it is a
        # contradiction, not a setting to ignore, and the resolved config records the real one.
        if not isinstance(data, dict) or not isinstance(data.get("pattern"), str):
            return data
        parts = data["pattern"].split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            return data  # the field validator explains the format
        n, m = (int(p) for p in parts)
        if not 0 < n < m:
            return data
        implied = 1.0 - n / m
        given = data.get("sparsity")
        if isinstance(given, int | float) and not isinstance(given, bool):
            if abs(given - implied) > 1e-3:
                raise ValueError(
                    f"sparsity {given:g} contradicts pattern '{n}:{m}', which zeroes {m - n} of "
                    f"every {m} weights (sparsity {implied:.4g}); drop sparsity or set it to "
                    f"{implied:.4g}"
                )
        elif given is not None:
            return data  # not a number: the field reports it
        return {**data, "sparsity": implied}

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {value!r}")
        n, m = (int(p) for p in parts)
        if not 0 < n < m:
            raise ValueError(f"pattern {value!r} needs 0 < N < M (N weights kept of every M)")
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _owl_needs_free_sparsity(self) -> UnstructuredPruneConfig:
        if self.allocation == "owl" and self.pattern is not None:
            raise ValueError(
                f"allocation 'owl' varies the sparsity per layer, but pattern {self.pattern!r} "
                "fixes it at 1 - N/M in every layer; use one or the other"
            )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(kept, group) of the N:M pattern, or None."""
        if self.pattern is None:
            return None
        n, m = (int(p) for p in self.pattern.split(":"))
        return n, m

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros asked for (1 - N/M with a pattern)."""
        nm = self.nm
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]


class CalibratedPruneConfig(UnstructuredPruneConfig):
    """Methods that prune each block from its calibration activations, block after block."""

    true_sequential: bool = Field(
        default=False,
        description="Observe q/k/v, o, MLP-in and MLP-out in turn, each group seeing the pruned "
        "groups before it (4 passes per block instead of 1).",
    )


class LayerReductionConfig(StrictModel):
    """Drop whole transformer blocks, chosen by importance, index or position."""

    num_layers_to_remove: Annotated[int | None, Flag(metavar="K", one_of="target")] = Field(
        default=None, ge=1, description="Remove K blocks."
    )
    num_layers_to_keep: Annotated[int | None, Flag(metavar="N", one_of="target")] = Field(
        default=None, ge=1, description="Keep N blocks."
    )
    layers: Annotated[list[int] | None, Flag(metavar="I,J", one_of="target")] = Field(
        default=None, description="Remove exactly these block indices (negative counts from end)."
    )
    selection: Literal["importance", "last", "first", "evenly"] = Field(
        default="importance",
        description="Which blocks K/N remove: importance, the lowest ShortGPT block influence "
        "on the calibration text; last/first/evenly, by position (data-free).",
    )
    keep_first: Annotated[int, Flag(metavar="N")] = Field(
        default=1, ge=0, description="Never remove the first N blocks."
    )
    keep_last: Annotated[int, Flag(metavar="N")] = Field(
        default=1, ge=0, description="Never remove the last N blocks."
    )
    calibration: CalibrationSettings = Field(
        default_factory=lambda: CalibrationSettings(num_samples=32)
    )

    @model_validator(mode="after")
    def _one_target(self) -> LayerReductionConfig:
        given = [
            key
            for key in ("num_layers_to_remove", "num_layers_to_keep", "layers")
            if getattr(self, key) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of num_layers_to_remove, num_layers_to_keep, layers "
                f"(got {', '.join(given) or 'none'})"
            )
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; list the block indices to remove")
        return self


# --------------------------------------------------------------------------- distillation


class StudentFromTeacher(StrictModel):
    """Make the student from the teacher by removing whole transformer blocks (depth pruning).

    Give either the block indices to drop, or how many to remove and where from: `middle` removes
    a contiguous run centred in the model, `last` the run just before the last block (which is
    kept), `evenly` blocks spread evenly over the interior (the first and last stay); the names
    follow the reduce_layers stage's `selection`. Which works best depends on the model: removing
    10 of SmolLM2-135M's 30 blocks leaves a perplexity of about 1.5e3 (middle), 3e4 (evenly) or
    2e10 (last) before any training, while Gromov et al. 2024 find the late blocks of larger
    Llamas the most redundant. The reduce_layers stage chooses blocks by measured importance.
    """

    drop_layers: list[int] | None = Field(
        default=None, min_length=1, description="Block indices to drop (negative: from the end)."
    )
    remove: int | None = Field(default=None, ge=1, description="How many blocks to remove.")
    position: Literal["middle", "last", "evenly"] = Field(
        default="middle", description="Where `remove` takes the blocks from (see above)."
    )

    @model_validator(mode="after")
    def _one_way(self) -> StudentFromTeacher:
        if (self.drop_layers is None) == (self.remove is None):
            raise ValueError("give exactly one of drop_layers and remove")
        return self


class DistillLossConfig(StrictModel):
    """What the student learns from: the teacher's logits, the labels, the teacher's hidden states.

    loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(logits at temperature T)
           + hidden_weight * hidden-state distance
    """

    kd: Literal["forward_kl", "reverse_kl"] = Field(
        default="forward_kl",
        description="forward_kl = KL(teacher || student) (Hinton et al. 2015, Minitron); "
        "reverse_kl = KL(student || teacher), mode-seeking.",
    )
    temperature: float = Field(default=1.0, gt=0.0, description="Softens both distributions.")
    alpha: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Weight of cross-entropy on the labels; the logit KL gets 1 - alpha. "
        "1 is plain language-model fine-tuning (no teacher needed).",
    )
    hidden_weight: float = Field(
        default=0.0, ge=0.0, description="Weight of hidden-state matching; 0 switches it off."
    )
    hidden_loss: Literal["mse", "cosine"] = Field(
        default="cosine", description="Distance between (projected) student and teacher states."
    )
    layer_map: list[tuple[int, int]] | None = Field(
        default=None,
        description="(student, teacher) hidden-state indices to match: 0 is the embedding "
        "output, i the output of block i. Default: each student block to the teacher block it "
        "came from (student_from_teacher) or to the proportional one.",
    )


class DistillConfig(StrictModel):
    """Knowledge distillation: train a student to match a teacher, in one loop on accelerate.

    In a recipe the teacher is the recipe's original model (`teacher: original`, default) or the
    model entering the stage (`current`) or a path; the student is the model entering the stage
    (`student: current`, e.g. the output of a layer-reduction or pruning stage), a path, or the
    teacher with blocks removed (`student_from_teacher`). `distill()` in the Python API and the
    `distill` command take the models directly and ignore `teacher` and `student`.
    """

    teacher: str = Field(
        default="original",
        description="Recipes: 'original' (the recipe's model), 'current' (the model entering "
        "this stage) or a model path.",
    )
    student: str = Field(
        default="current",
        description="Recipes: 'current' (the model entering this stage) or a model path.",
    )
    student_from_teacher: StudentFromTeacher | None = Field(
        default=None, description="Make the student by removing blocks from the teacher."
    )
    train_data: DataConfig | None = Field(default=None, description="Training text.")
    eval_data: DataConfig | None = Field(
        default=None, description="Held-out text; default: the last eval_fraction of train_data."
    )
    eval_fraction: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="Tail of the training text held out (no eval_data).",
    )
    loss: DistillLossConfig = Field(default_factory=DistillLossConfig)

    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps.")
    epochs: float | None = Field(
        default=None, gt=0.0, description="Passes over the training text (default 1)."
    )
    learning_rate: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Decay after warm-up (to min_lr_ratio * learning_rate)."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up from zero.")
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1, description="Sequences per micro-batch per process.")
    seq_len: int = Field(default=256, ge=2, description="Tokens per packed training sequence.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="null: no clipping.")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward: less memory, more time."
    )
    seed: int = 0

    eval_every: int = Field(
        default=100, ge=0, description="Held-out perplexity every N steps (0: start and end only)."
    )
    eval_windows: int | None = Field(
        default=64, ge=1, description="Held-out sequences scored per evaluation (null: all)."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after N evaluations without improvement."
    )
    save_every: int = Field(
        default=500, ge=0, description="Checkpoint every N steps (0: only at the end)."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Most recent checkpoints kept.")
    log_every: int = Field(default=10, ge=1, description="Steps per metrics.jsonl line.")
    teacher_topk: int | None = Field(
        default=None,
        ge=1,
        description="Cache the teacher's top-k logits per token on disk once and train from "
        "them: repeated runs need no teacher forward passes (forward_kl, no hidden states).",
    )
    teacher_cache: str | None = Field(
        default=None, description="Folder of the top-k cache (default: OUTPUT/teacher-cache)."
    )

    @field_validator("train_data", "eval_data", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        problems = []
        if self.max_steps is not None and self.epochs is not None:
            problems.append("give max_steps or epochs, not both")
        if self.student_from_teacher is not None and self.student != "current":
            problems.append("student_from_teacher makes the student; do not also give student")
        if self.teacher_topk is not None:
            if self.loss.kd != "forward_kl":
                problems.append(
                    "teacher_topk needs loss.kd: forward_kl (reverse KL needs every logit)"
                )
            if self.loss.hidden_weight > 0:
                problems.append("teacher_topk caches logits only; set loss.hidden_weight: 0")
        if self.early_stopping_patience is not None and self.eval_every == 0:
            problems.append("early_stopping_patience needs eval_every > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def needs_teacher(self) -> bool:
        """False for plain fine-tuning (alpha 1, no hidden-state term): no teacher passes."""
        return self.loss.alpha < 1.0 or self.loss.hidden_weight > 0.0


# --------------------------------------------------------------------------- loading and saving

T = TypeVar("T", bound=BaseModel)


def _tags(cls: type[BaseModel]) -> set[Any]:
    """The discriminator values a config class answers to (its `type` and `method`)."""
    return {
        cls.model_fields[key].default for key in ("type", "method") if key in cls.model_fields
    } | {
        arg
        for key in ("method",)
        if key in cls.model_fields
        for arg in typing.get_args(cls.model_fields[key].annotation)
    }


def _stage_classes() -> list[Any]:
    from .recipe import StageConfig  # built from the method registry

    return _unwrap(StageConfig)


def _stage_tags() -> set[Any]:
    return set().union(*(_tags(cls) for cls in _stage_classes()))


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    tags = _stage_tags()
    after_index = True  # a bare union at the root also starts with its tags
    for part in loc:
        # pydantic puts a discriminated union's tags after the list index; users never wrote them.
        if after_index and part in tags:
            continue
        after_index = isinstance(part, int)
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _unwrap(annotation: Any) -> list[Any]:
    """The BaseModel classes an annotation can hold (through Optional, list, Annotated, unions)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, tuple, dict):
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found.extend(_unwrap(arg))
        return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _model_at(root: Any, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Walk an error location down the config classes to the model that owns its last key.

    `root` is a config class or a (discriminated) union of them, such as `QuantizeConfig`.
    """
    current: list[type[BaseModel]] = _unwrap(root)
    for part in loc:
        if isinstance(part, int):
            continue
        # A discriminated union puts the tag in the location: ('stages', 0, 'cast', ...);
        # it selects the union member whose `type` default is that tag.
        tagged = [cls for cls in current if part in _tags(cls)]
        if len(current) > 1 and tagged:
            current = tagged
            continue
        nxt: list[type[BaseModel]] = []
        for cls in current:
            field = cls.model_fields.get(str(part))
            if field is not None:
                nxt.extend(_unwrap(field.annotation))
        if not nxt:
            return current[0] if current else None
        current = nxt
    return current[0] if current else None


def format_validation_error(error: ValidationError, root: Any, source: str) -> str:
    lines = [f"{source}: {error.error_count()} problem(s):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        message = item["msg"]
        if item["type"] == "extra_forbidden" and loc:
            owner = _model_at(root, loc[:-1])
            key = str(loc[-1])
            if owner is not None:
                valid = sorted(owner.model_fields)
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
                message = f"unknown key {key!r}"
                message += f" (did you mean {close[0]!r}?)" if close else ""
                message += f"; valid keys: {', '.join(valid)}"
        if item["type"] == "union_tag_not_found":
            key = str(item.get("ctx", {}).get("discriminator", "")).strip("'")
            tags = sorted(
                str(tag)
                for cls in _stage_classes()
                if loc and loc[-1] in _tags(cls) and key in cls.model_fields
                for tag in _tags(cls) - {loc[-1]}
                if isinstance(tag, str)
            )
            message = f"missing key {key!r}" + (f"; one of: {', '.join(tags)}" if tags else "")
        message = message.removeprefix("Value error, ")
        lines.append(f"  - {_format_loc(loc)}: {message}")
    if len(lines) == 2:  # one problem: one line
        return f"{source}: {lines[1].removeprefix('  - ')}"
    return "\n".join(lines)


def validate_dict(cls: type[T], data: Any, source: str = "config") -> T:
    """Validate a plain dict into `cls`, raising ConfigError that lists every problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls, source)) from None


def read_config_file(path: str | Path) -> Any:
    """Parse a .yaml/.yml/.json file into plain data (YAML loaded safely)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if p.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where, and what the parser expected."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = f"{context}, {problem}" if context else problem
    if "could not determine a constructor" in what:
        what = f"{what} (tags that build Python objects are refused: YAML is loaded safely)"
    return f"not valid YAML: {where}{what}"


def load_config(path: str | Path, cls: type[T]) -> T:
    return validate_dict(cls, read_config_file(path), str(path))


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write a config as YAML or JSON (by extension)."""
    p = Path(path)
    data = config_to_dict(config)
    if p.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False)
    p.write_text(text, encoding="utf-8")


# Names that moved: the recipe types live in swiss_knife.recipe (built from the registry), and each
# method's config in its own module. Old imports from here keep working.
_RECIPE_NAMES = {
    "CompressionConfig",
    "DataSources",
    "PruneConfig",
    "QuantizeConfig",
    "StageConfig",
    "load_recipe",
    "recipe_schema",
    "stage_name",
}


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system probes __path__ and friends
        raise AttributeError(name)
    if name in _RECIPE_NAMES:
        from . import recipe

        return getattr(recipe, name)
    from . import registry

    registry.load_builtins()
    for kind in registry.KINDS:
        for cls in registry.config_classes(kind):
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
