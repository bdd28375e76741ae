"""The distillation training loop: one plain loop on `accelerate`, no Trainer.

The same code runs on a CPU, one GPU, or several GPUs and machines with DDP, FSDP or DeepSpeed,
as `accelerate launch` and its config decide. One optimizer step is::

    for each of grad_accum micro-batches:              (BatchOrder: this process's sequences)
        teacher forward (no grad), or its cached top-k logits
        with accelerator.accumulate(model):            (gradients sync on the last one only)
            loss = DistillationLoss(student(x), teacher, labels=x)
            accelerator.backward(loss)
    clip gradients; optimizer.step(); scheduler.step(); optimizer.zero_grad()

(`optimizer_step`, which gradual pruning's fine-tuning runs too), then, every N steps: a metrics line, held-out perplexity (early stopping, the best student
saved), a checkpoint. The student and the learned hidden-state projections train together as
one module (`StudentWithLoss`) so that DDP/FSDP wrap and synchronise both.

Decisions that make resuming exact
----------------------------------
- A checkpoint is `accelerator.save_state` (model, optimizer, RNG states of every process) plus
  the LR scheduler and the loop's own counters (`LoopState`) registered with
  `register_for_checkpointing`, plus a fingerprint of everything that determines the run (configs,
  hashes of the weights and data, process count). It is written to a hidden folder and renamed
  into place, so a run killed while saving leaves the previous checkpoint intact.
- The data position is the step: `BatchOrder` derives every micro-batch from (seed, index), so a
  resumed run neither replays nor skips a data loader (`skip_first_batches` is for loaders whose
  order lives in iterator state), and consumes no global random numbers for data.
- The scheduler is stepped once per optimizer step by this loop, not handed to
  `accelerator.prepare`, which would step it once per process and tie the schedule to the
  process count.

Evaluation splits the held-out sequences across processes and sums the token log-likelihoods
with `accelerator.reduce`; every process runs the same number of forward passes (the held-out
set is cut to a multiple of the process count), as FSDP needs. It scores positions 1..seq_len-1
of each sequence, exactly as `swiss_knife.evaluation.perplexity` does with `window = seq_len`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from swiss_knife.config import DistillConfig, config_to_dict
from swiss_knife.errors import UserInputError
from swiss_knife.models import build_manifest, render_model_card, save_model
from swiss_knife.progress import Progress

from .data import BatchOrder, PackedData
from .losses import DistillationLoss, TopKLogits

logger = logging.getLogger(__name__)

Batch = TypeVar("Batch")

CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "swiss_knife_distill.json"
METRICS = "metrics.jsonl"


class StudentWithLoss(nn.Module):
    """The student and the loss (with its learned projections): the module that trains."""

    def __init__(self, student: nn.Module, loss: DistillationLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(
        self,
        input_ids: Tensor,
        teacher_logits: Tensor | TopKLogits | None = None,
        teacher_hidden: tuple[Tensor, ...] | None = None,
        lm_only: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        hidden = self.loss.needs_hidden_states and not lm_only
        out = self.student(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        if lm_only:  # held-out evaluation: next-token cross-entropy only
            return self.loss.ce(out.logits[:, :-1], input_ids[:, 1:]), {}
        # Packed sequences have no padding: the labels are the inputs.
        return self.loss(
            out.logits,
            input_ids,
            teacher_logits=teacher_logits,
            student_hidden=out.hidden_states if hidden else None,
            teacher_hidden=teacher_hidden,
        )


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint (accelerate calls state_dict/load)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_eval_loss: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_eval_perplexity: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Evaluation:
    step: int
    loss: float
    perplexity: float
    tokens: int


@dataclass
class DistillResult:
    """What a training run did; `student` holds the best weights when evaluation ran.

    Under FSDP the in-memory `student` is sharded; use the saved `best_dir` / `final_dir`.
    """

    student: nn.Module
    output_dir: Path
    final_dir: Path
    best_dir: Path | None
    steps: int
    total_steps: int
    tokens: int
    train_seconds: float
    stopped_early: bool
    resumed_from: Path | None
    evaluations: list[Evaluation] = field(default_factory=list)
    best_step: int | None = None
    best_perplexity: float | None = None
    kept_blocks: list[int] | None = None  # set when the student was made from the teacher

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


@dataclass
class TrainingJob:
    """Everything `train` needs, checked and prepared by `api.distill`."""

    config: DistillConfig
    student: nn.Module
    teacher: nn.Module | None  # None when the loss needs no teacher or its top-k is cached
    loss: DistillationLoss
    data: PackedData
    total_steps: int
    output_dir: Path
    fingerprint: dict[str, Any]
    teacher_topk: TopKLogits | None = None
    tokenizer: Any | None = None
    resume_from: Path | None = None
    source: str | None = None  # for the saved model card
    progress: bool = True
    callback: Callable[[dict[str, Any]], None] | None = None


# --------------------------------------------------------------------------- accelerate setup


FSDP_ON_CPU = (
    "accelerate runs FSDP only on GPUs (or other accelerators): CPU processes get plain DDP; for "
    "CPU processes run `accelerate launch --multi_gpu --num_processes N ... --device cpu`"
)


def create_accelerator(config: DistillConfig, *, cpu: bool = False) -> Any:
    """An Accelerator for this run's mixed precision and gradient accumulation."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    single = not PartialState._shared_state or PartialState().num_processes == 1
    if shared and single and shared.get("_mixed_precision") != config.mixed_precision:
        # accelerate keeps one global state per process and refuses to change its precision; a
        # second run in the same process (a recipe with two distill stages, tests) may need to.
        AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            cpu=cpu,
        )
    except (ValueError, RuntimeError) as exc:
        message = str(exc).splitlines()[0].rstrip(".")
        if "sync_module_states" in message and "not supported on cpu" in message:
            # Turning sync_module_states off would not help: see api.check_backend.
            raise UserInputError(f"accelerate: {message}; {FSDP_ON_CPU}") from None
        raise UserInputError(f"accelerate: {message}") from None
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        # DeepSpeed sizes its batches from a prepared data loader, which this loop does not use.
        ds_config = plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
    return accelerator


def total_steps(config: DistillConfig, order: BatchOrder) -> int:
    """Optimizer steps of the run: max_steps, or the epochs' micro-batches / grad_accum."""
    if config.max_steps is not None:
        return config.max_steps
    epochs = config.epochs if config.epochs is not None else 1.0
    steps = order.micro_batches(epochs) // config.grad_accum
    if steps < 1:
        raise UserInputError(
            f"{epochs} epoch(s) of {order.per_epoch} batch(es) give no optimizer step with "
            f"grad_accum {config.grad_accum}; give more text, more epochs or --max-steps"
        )
    return steps


def lr_factor(config: DistillConfig, steps: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at optimizer step s: linear warm-up, then the decay."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        shape = (
            0.5 * (1 + math.cos(math.pi * progress))
            if config.lr_schedule == "cosine"
            else 1 - progress
        )
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return factor


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: decaying norm gains and biases pulls them towards 0, not towards
    # anything useful.
    matrices = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": matrices, "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / CHECKPOINT_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    state_file = path / CHECKPOINT_STATE
    if not state_file.is_file():
        raise UserInputError(
            f"{path} is not a distillation checkpoint (no {CHECKPOINT_STATE}); give a folder "
            f"under OUTPUT/{CHECKPOINTS}/"
        )
    try:
        data: dict[str, Any] = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{state_file} is unreadable ({exc})") from None
    return data


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The top-level fingerprint keys whose values differ (empty: the same run)."""
    keys = sorted(set(saved) | set(current))
    return [key for key in keys if saved.get(key) != current.get(key)]


def check_resume(path: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a checkpoint made by a different run, naming what differs."""
    saved = read_checkpoint_state(path).get("fingerprint", {})
    differing = fingerprint_mismatch(saved, fingerprint)
    if differing:
        raise UserInputError(
            f"{path} is a checkpoint of another run ({', '.join(differing)} differ); resume with "
            "the same models, data and settings, or start a new output directory"
        )


def _save_checkpoint(accelerator: Any, job: TrainingJob, state: LoopState) -> Path:
    root = job.output_dir / CHECKPOINTS
    final = root / f"step-{state.step:08d}"
    partial = root / f".step-{state.step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / CHECKPOINT_STATE).write_text(
            json.dumps({"fingerprint": job.fingerprint, "step": state.step}, indent=2) + "\n",
            encoding="utf-8",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in checkpoint_dirs(job.output_dir)[: -job.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_student(
    accelerator: Any, module: nn.Module, job: TrainingJob, directory: Path, info: dict[str, Any]
) -> None:
    """Save the student alone as an ordinary checkpoint (the projections stay behind)."""
    state_dict = accelerator.get_state_dict(module)  # every process: FSDP gathers shards here
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(module).student
        weights = {
            key.removeprefix("student."): value
            for key, value in state_dict.items()
            if key.startswith("student.")
        }
        steps = [
            f"distilled for {info['step']} steps ({info['tokens']:,} tokens) with "
            f"{job.config.loss.kd} (alpha {job.config.loss.alpha}, T {job.config.loss.temperature})"
        ]
        manifest = build_manifest(
            source=job.source,
            metrics={k: v for k, v in info.items() if k not in ("step", "tokens")},
            extra={"distill": config_to_dict(job.config), "distill_progress": info},
        )
        card = render_model_card(
            title=f"{directory.name} student (Swiss Knife distillation)",
            source=job.source,
            tags=["distillation"],
            steps=steps,
        )
        save_model(
            student,
            directory,
            tokenizer=job.tokenizer,
            overwrite=True,
            manifest=manifest,
            model_card=card,
            writer=lambda tmp: student.save_pretrained(tmp, state_dict=weights),
        )
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the loop


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after its last checkpoint: those steps run again."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _read_evaluations(path: Path) -> list[Evaluation]:
    """The evaluations a resumed run made before its checkpoint, from its metrics file."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [
        Evaluation(r["step"], r["eval_loss"], r["eval_perplexity"], r["eval_tokens"])
        for r in records
        if r.get("event") == "eval"
    ]


def _load_saved_weights(model: nn.Module, directory: Path) -> None:
    """Load a saved checkpoint's safetensors into `model`; only tied copies may be absent."""
    from safetensors.torch import load_file

    weights: dict[str, Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in weights if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(
            f"{directory} does not match the student (missing {untied[:3]}, unexpected "
            f"{unexpected[:3]})"
        )


@torch.no_grad()
def evaluate_heldout(
    accelerator: Any, module: nn.Module, sequences: Tensor, batch_size: int
) -> tuple[float, int]:
    """(mean NLL per scored token, tokens scored) of the student on held-out sequences."""
    world, rank = accelerator.num_processes, accelerator.process_index
    usable = sequences[: (sequences.shape[0] // world) * world]
    shard = usable[rank::world]  # (per_process, seq)
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = module.training
    module.eval()
    try:
        for start in range(0, shard.shape[0], batch_size):
            input_ids = shard[start : start + batch_size].to(accelerator.device)  # (b, seq)
            mean_nll, _ = module(input_ids, lm_only=True)
            scored = input_ids.shape[0] * (input_ids.shape[1] - 1)
            totals[0] += mean_nll.double() * scored
            totals[1] += scored
    finally:
        module.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]), int(totals[1])


def _teacher_forward(
    accelerator: Any,
    teacher: nn.Module,
    input_ids: Tensor,
    hidden: bool,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    with torch.no_grad(), accelerator.autocast():
        out = teacher(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
    return out.logits, (tuple(out.hidden_states) if hidden else None)  # (batch, seq, vocab)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[Batch],
    loss_fn: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]],
    *,
    backward: Callable[[Tensor], Any] = Tensor.backward,
    accumulate: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    clip_grad_norm: Callable[[], Tensor] | None = None,
    after_backward: Callable[[], None] | None = None,
    after_update: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Tensor]], float | None]:
    """One optimizer step: forward, loss and backward on every micro-batch (their gradients add
    up), then clip, update, and clear the gradients (to None).

    `loss_fn(batch)` runs the forward pass and returns the loss and its named terms. `backward`
    is `loss.backward()` unless given (the distillation loop passes `accelerator.backward`, which
    scales for accumulation and mixed precision); each micro-batch runs inside `accumulate()`
    (`accelerator.accumulate(module)`: gradients sync on the last one only). `after_backward`
    runs once the gradients are complete (gradual pruning zeroes those of pruned weights),
    `clip_grad_norm()` clips them and returns their norm, `after_update` runs after
    `optimizer.step()` (the LR scheduler; gradual pruning re-applies its masks). Gradients must
    be clear on entry. Returns each micro-batch's loss and terms, detached, and the gradient norm
    (None without clipping).
    """
    records: list[dict[str, Tensor]] = []
    for batch in micro_batches:
        with accumulate():
            loss, parts = loss_fn(batch)
            backward(loss)
        records.append({"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}})
    if after_backward is not None:
        after_backward()
    grad_norm = float(clip_grad_norm()) if clip_grad_norm is not None else None
    optimizer.step()
    if after_update is not None:
        after_update()
    optimizer.zero_grad(set_to_none=True)
    return records, grad_norm


_MicroBatch = tuple[Tensor, Tensor | TopKLogits | None, tuple[Tensor, ...] | None]


@dataclass
class _Window:
    """The loss terms summed over the optimizer steps since the last log line, and their time."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0

    def add_terms(self, records: list[dict[str, Tensor]], grad_accum: int) -> None:
        """Fold one optimizer step's micro-batch losses and terms into the sums."""
        # Kept as tensors: reading them every micro-batch would stall a GPU each time.
        for terms in records:
            for name, value in terms.items():
                term = value.float() / grad_accum
                self.sums[name] = self.sums[name] + term if name in self.sums else term


def _prepare_training(
    accelerator: Any, job: TrainingJob
) -> tuple[nn.Module, torch.optim.Optimizer, Any, LoopState]:
    """The prepared student-with-loss module, its optimizer, its LR scheduler and the loop
    counters (both registered for checkpointing); the teacher, if any, goes to the device
    frozen."""
    cfg = job.config
    module = StudentWithLoss(job.student, job.loss)
    module.train()
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with inputs that need no grad.
        student: Any = job.student  # a transformers PreTrainedModel
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    optimizer = torch.optim.AdamW(_param_groups(module, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, job.total_steps))
    module, optimizer = accelerator.prepare(module, optimizer)
    state = LoopState()
    accelerator.register_for_checkpointing(scheduler, state)

    teacher = job.teacher
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    return module, optimizer, scheduler, state


def _resume_or_start(accelerator: Any, job: TrainingJob, state: LoopState) -> list[Evaluation]:
    """Load the checkpoint to resume (restoring `state`, dropping the metrics written after it)
    or start a new metrics file; returns the evaluations made before the checkpoint."""
    metrics_path = job.output_dir / METRICS
    if job.resume_from is not None:
        logger.info("resuming from %s", job.resume_from)
        accelerator.load_state(str(job.resume_from))
        if accelerator.is_main_process:
            _truncate_metrics(metrics_path, state.step)
    elif accelerator.is_main_process:
        metrics_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return _read_evaluations(metrics_path) if job.resume_from is not None else []


def _run_eval(
    accelerator: Any,
    module: nn.Module,
    job: TrainingJob,
    state: LoopState,
    evaluations: list[Evaluation],
) -> None:
    """Evaluate on the held-out sequences and log it; save the student to best/ when it
    improved, and otherwise count towards early stopping."""
    cfg = job.config
    loss, count = evaluate_heldout(accelerator, module, job.data.eval, cfg.batch_size)
    ppl = math.exp(loss)
    evaluations.append(Evaluation(state.step, loss, ppl, count))
    state.last_eval_perplexity = ppl
    improved = loss < state.best_eval_loss
    if improved:
        state.best_eval_loss, state.best_step = loss, state.step
        state.evals_without_improvement = 0
        _save_student(
            accelerator,
            module,
            job,
            job.output_dir / "best",
            {"step": state.step, "tokens": state.tokens, "eval_perplexity": ppl},
        )
    else:
        state.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            state.stopped_early = True
    if accelerator.is_main_process:
        _append_metrics(
            job.output_dir / METRICS,
            {
                "event": "eval",
                "step": state.step,
                "tokens": state.tokens,
                "eval_loss": loss,
                "eval_perplexity": ppl,
                "eval_tokens": count,
                "best": improved,
            },
        )


def _micro_batches(
    accelerator: Any, job: TrainingJob, order: BatchOrder, step: int
) -> Iterator[_MicroBatch]:
    """This process's micro-batches of optimizer step `step`, with the teacher's outputs."""
    cfg = job.config
    device = accelerator.device
    rank = accelerator.process_index
    teacher, topk = job.teacher, job.teacher_topk
    needs_hidden = job.loss.needs_hidden_states
    for micro in range(cfg.grad_accum):
        rows = order.indices(step * cfg.grad_accum + micro, rank)
        input_ids = job.data.train[rows].to(device)  # (batch, seq)
        teacher_logits: Tensor | TopKLogits | None = None
        teacher_hidden = None
        if topk is not None:
            teacher_logits = TopKLogits(topk.values[rows].to(device), topk.indices[rows].to(device))
        elif teacher is not None:
            teacher_logits, teacher_hidden = _teacher_forward(
                accelerator, teacher, input_ids, needs_hidden
            )
        yield input_ids, teacher_logits, teacher_hidden


def _log_window(
    accelerator: Any,
    job: TrainingJob,
    scheduler: Any,
    state: LoopState,
    window: _Window,
    grad_norm: float | None,
    bar: Progress,
) -> None:
    """Write the train record of the steps since the last one (their mean loss terms over all
    processes, LR, throughput) to the metrics file and the progress bar."""
    sums = window.sums
    tokens_per_step = _tokens_per_step(accelerator, job.config)
    means = torch.stack([sums[k] for k in sorted(sums)]) / window.steps
    means = accelerator.reduce(means, reduction="mean")
    record: dict[str, Any] = {"event": "train", "step": state.step}
    record.update({k: float(v) for k, v in zip(sorted(sums), means.tolist(), strict=True)})
    record.update(
        {
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": state.tokens,
            "tokens_per_s": tokens_per_step * window.steps / window.seconds,
            "elapsed_s": state.train_seconds,
        }
    )
    if accelerator.is_main_process:
        _append_metrics(job.output_dir / METRICS, record)
    postfix = {
        "loss": f"{record['loss']:.4f}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
    }
    if state.last_eval_perplexity is not None:
        postfix["eval_ppl"] = f"{state.last_eval_perplexity:.3f}"
    bar.set_postfix(postfix)


def _tokens_per_step(accelerator: Any, cfg: DistillConfig) -> int:
    """Training tokens per optimizer step, over all processes."""
    return cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes


def _finish(
    accelerator: Any,
    module: nn.Module,
    job: TrainingJob,
    state: LoopState,
    evaluations: list[Evaluation],
) -> DistillResult:
    """Save the final student, then return the best one (when evaluation ran and saved one)."""
    out = job.output_dir
    final_dir = out / "final"
    _save_student(
        accelerator,
        module,
        job,
        final_dir,
        {"step": state.step, "tokens": state.tokens, "eval_perplexity": state.last_eval_perplexity},
    )
    if job.callback is not None:
        job.callback({"step": state.step, "tokens": state.tokens, "finished": True})

    student = accelerator.unwrap_model(module, keep_fp32_wrapper=False).student
    if job.config.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    best_dir = out / "best"
    has_eval = job.data.eval.shape[0] > 0
    has_best = has_eval and state.best_step >= 0 and (best_dir / "swiss_knife.json").is_file()
    if has_best and state.best_step != state.step:
        _load_saved_weights(student, best_dir)  # return the best student, not the last step's
    student.eval()
    return DistillResult(
        student=student,
        output_dir=out,
        final_dir=final_dir,
        best_dir=best_dir if has_best else None,
        steps=state.step,
        total_steps=job.total_steps,
        tokens=state.tokens,
        train_seconds=state.train_seconds,
        stopped_early=state.stopped_early,
        resumed_from=job.resume_from,
        evaluations=evaluations,
        best_step=state.best_step if has_best else None,
        best_perplexity=math.exp(state.best_eval_loss) if has_best else None,
    )


def train(accelerator: Any, job: TrainingJob) -> DistillResult:
    """Run (or resume) the loop; returns the student with its best (or final) weights."""
    cfg = job.config
    module, optimizer, scheduler, state = _prepare_training(accelerator, job)
    evaluations = _resume_or_start(accelerator, job, state)
    order = BatchOrder(job.data.train.shape[0], cfg.batch_size, accelerator.num_processes, cfg.seed)
    tokens_per_step = _tokens_per_step(accelerator, cfg)
    has_eval = job.data.eval.shape[0] > 0
    if has_eval and state.step == 0:
        # The starting point: the best checkpoint is never worse than no training.
        _run_eval(accelerator, module, job, state, evaluations)

    bar = Progress(
        "distill",
        total=job.total_steps,
        initial=state.step,
        unit="step",
        enabled=job.progress and accelerator.is_main_process,
    )

    def loss_fn(batch: _MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        result: tuple[Tensor, dict[str, Tensor]] = module(*batch)
        return result

    def clip() -> Tensor:
        # accumulate() synchronised the gradients on the last micro-batch of the step.
        norm: Tensor = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        return norm

    window = _Window()
    last_checkpoint_step = state.step if job.resume_from is not None else -1
    try:
        while state.step < job.total_steps and not state.stopped_early:
            started = time.perf_counter()
            records, grad_norm = optimizer_step(
                optimizer,
                _micro_batches(accelerator, job, order, state.step),
                loss_fn,
                backward=accelerator.backward,
                accumulate=lambda: accelerator.accumulate(module),
                clip_grad_norm=clip if cfg.max_grad_norm is not None else None,
                after_update=scheduler.step,
            )
            window.add_terms(records, cfg.grad_accum)
            elapsed = time.perf_counter() - started
            state.step += 1
            state.tokens += tokens_per_step
            state.train_seconds += elapsed
            window.steps += 1
            window.seconds += elapsed

            done = state.step >= job.total_steps
            if state.step % cfg.log_every == 0 or done:
                _log_window(accelerator, job, scheduler, state, window, grad_norm, bar)
                window = _Window()
            bar.update(1)

            if has_eval and ((cfg.eval_every and state.step % cfg.eval_every == 0) or done):
                _run_eval(accelerator, module, job, state, evaluations)
            if cfg.save_every and state.step % cfg.save_every == 0 and not done:
                _save_checkpoint(accelerator, job, state)
                last_checkpoint_step = state.step
            if job.callback is not None:
                job.callback({"step": state.step, "tokens": state.tokens})
    finally:
        bar.close()

    if last_checkpoint_step != state.step:
        _save_checkpoint(accelerator, job, state)
    return _finish(accelerator, module, job, state, evaluations)
