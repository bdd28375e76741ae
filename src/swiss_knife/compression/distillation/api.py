"""`distill(teacher, student, config, train_data=...)`: check everything, then run the loop.

Every check that can fail does so before the first training step, with a one-line error: a
student whose vocabulary differs from the teacher's, a layer map out of range, training text
shorter than one batch, held-out text shorter than one sequence per process, an output folder
holding another run, a `resume` checkpoint made by a different run (its fingerprint, the hashes
of the weights, data and settings, differs). Only then is the loop started (`loop.train`).

Output folder::

    run.json                  the resolved config and the run's fingerprint
    metrics.jsonl             one line per `log_every` steps and per evaluation
    checkpoints/step-N/       accelerate state + loop counters, to resume (the last few kept)
    best/                     the student with the lowest held-out perplexity (a normal checkpoint)
    final/                    the student after the last step
    teacher-cache/            the teacher's top-k logits (with `teacher_topk`, unless moved)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from swiss_knife import registry
from swiss_knife.arch import hidden_size, num_layers
from swiss_knife.config import DataConfig, DistillConfig, config_to_dict
from swiss_knife.data import load_token_stream
from swiss_knife.errors import DataError, OutputExistsError, UserInputError
from swiss_knife.models import LoadedModel, load_model

from .cache import cache_path, compute_topk, load_or_compute_topk, model_digest, tensor_digest
from .data import BatchOrder, PackedData, prepare_data
from .loop import (
    CHECKPOINTS,
    FSDP_ON_CPU,
    METRICS,
    DistillResult,
    TrainingJob,
    check_resume,
    checkpoint_dirs,
    create_accelerator,
    fingerprint_mismatch,
    read_checkpoint_state,
    total_steps,
    train,
)
from .losses import DistillationLoss, ForwardKL, HiddenStateLoss, ReverseKL, TopKLogits
from .student import (
    check_layer_map,
    check_pair,
    default_layer_map,
    logit_width,
    student_from_teacher,
)

logger = logging.getLogger(__name__)

ModelLike = nn.Module | LoadedModel | str
DataLike = DataConfig | str | Tensor
Resume = bool | Literal["auto"] | str | Path

RUN_FILE = "run.json"
# Settings that change where and how often things are written, not what is computed.
_BOOKKEEPING = (
    "name",
    "evaluate",
    "teacher",
    "student",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "teacher_cache",
    "train_data",
    "eval_data",
)


def _model_and_tokenizer(model: ModelLike, role: str) -> tuple[nn.Module, Any | None, str | None]:
    if isinstance(model, str):
        loaded = load_model(model, device="cpu")
        return loaded.model, loaded.tokenizer, model
    if isinstance(model, LoadedModel):
        return model.model, model.tokenizer, model.source
    if not isinstance(model, nn.Module):
        raise UserInputError(f"the {role} must be a model, a LoadedModel or a path")
    return model, None, getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _token_stream(data: DataLike, tokenizer: Any | None, what: str) -> Tensor:
    if isinstance(data, Tensor):
        if data.dim() != 1 or data.dtype.is_floating_point:
            raise DataError(f"{what}: expected a 1-D tensor of token ids")
        return data.long()
    if tokenizer is None:
        raise DataError(f"{what} is text, but no tokenizer was given or found with the teacher")
    return load_token_stream(data, tokenizer)


def _build_loss(
    config: DistillConfig, teacher: nn.Module, student: nn.Module, kept: list[int] | None
) -> DistillationLoss:
    spec = config.loss
    kd: ForwardKL | ReverseKL | None = None
    if spec.alpha < 1.0:
        kd = ForwardKL(spec.temperature) if spec.kd == "forward_kl" else ReverseKL(spec.temperature)
    hidden = None
    if spec.hidden_weight > 0:
        layer_map = spec.layer_map or default_layer_map(
            num_layers(teacher), num_layers(student), kept
        )
        check_layer_map(layer_map, teacher, student)
        hidden = HiddenStateLoss(
            layer_map, hidden_size(student), hidden_size(teacher), spec.hidden_loss
        )
    return DistillationLoss(
        kd=kd, alpha=spec.alpha, hidden=hidden, hidden_weight=spec.hidden_weight
    )


# What an MPI launcher puts in the environment of each process it starts (Open MPI, MPICH /
# Intel MPI, MVAPICH): with one of them, `accelerate launch --cpu` does start several processes.
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
MULTI_PROCESS_HINT = (
    "for N CPU processes run `accelerate launch --multi_gpu --num_processes N -m swiss_knife.cli "
    "distill ... --device cpu` (gloo); on N GPUs, `accelerate launch --multi_gpu --num_processes N`"
)


def check_launch(processes: int, env: Mapping[str, str] | None = None) -> None:
    """Refuse a launch that runs fewer processes than were asked for.

    `accelerate launch --cpu --num_processes 2` (and `--num_processes 2` with no flag on a machine
    without GPUs) starts ONE process with its "simple" launcher unless MPI is installed; the
    count is not passed on, but that launcher sets MASTER_ADDR / MASTER_PORT only when more than
    one process (or machine) was asked for, and sets no WORLD_SIZE (torchrun does). So: accelerate
    launched us (its ACCELERATE_DYNAMO_BACKEND is set), a rendezvous address is set, yet neither
    torchrun nor MPI says how many processes there are, and this run has one. The number asked
    for cannot be read back, only that it was more than one. Also refused: a WORLD_SIZE (or MPI
    size) larger than the processes the accelerator joined.
    """
    env = os.environ if env is None else env
    sizes = [env[name] for name in ("WORLD_SIZE", *_MPI_SIZE) if env.get(name, "").isdigit()]
    asked = max((int(size) for size in sizes), default=None)
    if asked is not None and asked > processes:
        raise UserInputError(
            f"the launcher asked for {asked} processes but this run joined {processes}; "
            f"{MULTI_PROCESS_HINT}"
        )
    accelerate_simple = "ACCELERATE_DYNAMO_BACKEND" in env and "MASTER_ADDR" in env
    if processes == 1 and accelerate_simple and "MASTER_PORT" in env and asked is None:
        raise UserInputError(
            "accelerate launch started 1 process although more were asked for (--cpu, or no "
            f"--multi_gpu without GPUs, runs one process unless MPI is installed); "
            f"{MULTI_PROCESS_HINT} (unset MASTER_ADDR to run one process on purpose)"
        )


def check_backend(distributed_type: str, env: Mapping[str, str] | None = None) -> None:
    """Refuse a run that would silently not use the sharding the launch asked for.

    `accelerate launch --use_fsdp` (or `--use_deepspeed`) with `--device cpu` or on CPU
    processes: accelerate (1.16) picks FSDP or DeepSpeed only for accelerator devices
    (`AcceleratorState` sets `DistributedType.FSDP` in its GPU/NPU/XPU branch; DeepSpeed is skipped
    with `cpu=True`), so CPU processes would run as MULTI_CPU (DDP), each holding the whole
    student, with no error.
    """
    env = os.environ if env is None else env
    for flag, wanted in (
        ("ACCELERATE_USE_FSDP", "FSDP"),
        ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"),
    ):
        if env.get(flag, "").lower() in ("true", "1") and distributed_type != wanted:
            if wanted == "FSDP":
                raise UserInputError(
                    f"the launch asked for FSDP but accelerate set up {distributed_type}: "
                    f"{FSDP_ON_CPU}"
                )
            raise UserInputError(
                f"the launch asked for DeepSpeed but accelerate set up {distributed_type} "
                "(DeepSpeed needs GPUs; drop --device cpu or launch with --multi_gpu)"
            )


_RUN_ENTRIES = (RUN_FILE, METRICS, CHECKPOINTS, "best", "final")


def _looks_like_run(directory: Path) -> bool:
    return any((directory / name).exists() for name in _RUN_ENTRIES)


def _clear_run(directory: Path) -> None:
    """Delete an earlier run's files; the teacher cache stays (its name is its content hash)."""
    for name in _RUN_ENTRIES:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _check_output(out: Path, resume: Resume, overwrite: bool) -> tuple[Path | None, bool]:
    """Refuse to mix runs in one folder.

    Returns an explicitly named checkpoint (if any) and whether an earlier run must be cleared;
    the caller clears it only once every other check has passed.
    """
    if resume not in (False, True, "auto"):
        path = Path(str(resume)).expanduser()
        read_checkpoint_state(path)  # raises unless it is a checkpoint
        return path, False
    if resume is True and not checkpoint_dirs(out):
        raise UserInputError(f"nothing to resume: {out} holds no checkpoint")
    if resume is False and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"output directory {out} is not empty; pass --resume to continue its run or "
                "--overwrite to start again"
            )
        if not _looks_like_run(out):
            raise OutputExistsError(
                f"{out} is not empty and holds no distillation run; refusing to delete it"
            )
        return None, True
    return None, False


def _fingerprint(
    config: DistillConfig,
    teacher: nn.Module,
    student: nn.Module,
    data: PackedData,
    processes: int,
    steps: int,
) -> dict[str, Any]:
    """What determines the run's result: a checkpoint resumes only a run with the same values."""
    settings = {k: v for k, v in config_to_dict(config).items() if k not in _BOOKKEEPING}
    return {
        "settings": settings,
        "teacher": model_digest(teacher),
        "student": model_digest(student),
        "train_data": tensor_digest(data.train),
        "eval_data": tensor_digest(data.eval),
        "processes": processes,
        "total_steps": steps,
    }


def _student_model(
    config: DistillConfig, student: ModelLike | None, teacher_model: nn.Module
) -> tuple[nn.Module, Any | None, list[int] | None]:
    """The student, its tokenizer (if it brought one) and the teacher blocks it kept (if made
    from the teacher with `config.student_from_teacher`)."""
    if student is None:
        if config.student_from_teacher is None:
            raise UserInputError("give a student model, or student_from_teacher in the config")
        student_model, kept = student_from_teacher(teacher_model, config.student_from_teacher)
        return student_model, None, kept
    if config.student_from_teacher is not None:
        raise UserInputError("give a student model or student_from_teacher, not both")
    student_model, student_tok, _ = _model_and_tokenizer(student, "student")
    if student_model is teacher_model:
        raise UserInputError("the teacher and the student are the same model object")
    return student_model, student_tok, None


def _checked_student(
    config: DistillConfig,
    student: ModelLike | None,
    teacher_model: nn.Module,
    tokenizer: Any | None,
) -> tuple[nn.Module, list[int] | None]:
    """The student (see `_student_model`) and the teacher blocks it kept, once checked to
    pair with the teacher and to have something to train."""
    student_model, student_tok, kept = _student_model(config, student, teacher_model)
    check_pair(teacher_model, student_model, tokenizer, student_tok)
    if not any(p.requires_grad for p in student_model.parameters()):
        raise UserInputError("the student has no trainable parameters (all requires_grad=False)")
    return student_model, kept


def _token_streams(
    config: DistillConfig,
    train_data: DataLike | None,
    eval_data: DataLike | None,
    tokenizer: Any | None,
    teacher_model: nn.Module,
) -> tuple[Tensor, Tensor | None]:
    """The training and held-out token streams (the arguments', else the config's), checked
    against the teacher's vocabulary."""
    train_source = train_data if train_data is not None else config.train_data
    if train_source is None:
        raise UserInputError("no training text: pass train_data (--train-data)")
    eval_source = eval_data if eval_data is not None else config.eval_data
    train_stream = _token_stream(train_source, tokenizer, "training text")
    eval_stream = (
        _token_stream(eval_source, tokenizer, "held-out text") if eval_source is not None else None
    )
    vocab = logit_width(teacher_model)
    for stream, what in ((train_stream, "training"), (eval_stream, "held-out")):
        if stream is not None and stream.numel() and int(stream.max()) >= vocab:
            raise DataError(
                f"{what} token ids reach {int(stream.max())}, beyond the vocabulary of {vocab}"
            )
    return train_stream, eval_stream


def _prepare_run_data(
    config: DistillConfig, accelerator: Any, train_stream: Tensor, eval_stream: Tensor | None
) -> tuple[PackedData, int]:
    """Pack the streams into sequences for this many processes; returns them and the step
    count."""
    processes = accelerator.num_processes
    wants_eval = eval_stream is not None or config.eval_fraction > 0
    if config.early_stopping_patience is not None and not wants_eval:
        raise UserInputError("early stopping needs held-out text: eval_data or eval_fraction > 0")
    data = prepare_data(
        train_stream,
        config.seq_len,
        min_train_sequences=config.batch_size * processes,
        eval_stream=eval_stream,
        eval_fraction=config.eval_fraction,
        eval_windows=config.eval_windows,
        min_eval_sequences=processes,
    )
    steps = total_steps(
        config, BatchOrder(data.train.shape[0], config.batch_size, processes, config.seed)
    )
    return data, steps


def _resume_point(
    out: Path,
    resume: Resume,
    named_checkpoint: Path | None,
    clear: bool,
    fingerprint: dict[str, Any],
    accelerator: Any,
) -> Path | None:
    """The checkpoint to resume from (checked against `fingerprint`), if any; clears the
    folder's earlier run when it must go (with "auto", also when it is a different run)."""
    resume_from = named_checkpoint
    if resume is True or resume == "auto":
        latest = checkpoint_dirs(out)
        if latest:
            saved = read_checkpoint_state(latest[-1]).get("fingerprint", {})
            if resume == "auto" and fingerprint_mismatch(saved, fingerprint):
                logger.info("%s holds a different run; starting again", out)
                clear = True
            else:
                resume_from = latest[-1]
    if resume_from is not None:
        check_resume(resume_from, fingerprint)
    if clear:
        if accelerator.is_main_process:
            _clear_run(out)
        accelerator.wait_for_everyone()
    return resume_from


def _teacher_topk(
    config: DistillConfig,
    out: Path,
    fingerprint: dict[str, Any],
    data: PackedData,
    teacher_model: nn.Module,
    accelerator: Any,
    progress: bool,
) -> TopKLogits | None:
    """The teacher's cached top-k logits on the training data (with `config.teacher_topk`),
    computed and stored on first use; None without `teacher_topk`."""
    if config.teacher_topk is None:
        return None
    cache_dir = (
        Path(config.teacher_cache).expanduser() if config.teacher_cache else out / "teacher-cache"
    )
    path = cache_path(cache_dir, fingerprint["teacher"], data.train, config.teacher_topk)
    k = config.teacher_topk

    def compute() -> TopKLogits:
        # Only the main process runs the teacher, and only for this pass: it goes back where it
        # was afterwards, so no process keeps a copy on its device while the student trains.
        home = next(teacher_model.parameters()).device
        try:
            return compute_topk(
                teacher_model.to(accelerator.device),
                data.train,
                k,
                batch_size=config.batch_size,
                device=accelerator.device,
                autocast=accelerator.autocast,
                progress=progress,
            )
        finally:
            teacher_model.to(home)

    return load_or_compute_topk(
        path,
        compute,
        is_main_process=accelerator.is_main_process,
        wait_for_everyone=accelerator.wait_for_everyone,
    )


def _write_run_file(
    accelerator: Any,
    out: Path,
    config: DistillConfig,
    fingerprint: dict[str, Any],
    source: str | None,
) -> None:
    """Write run.json (config, fingerprint, source) from the main process; all processes wait."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        run = {"config": config_to_dict(config), "fingerprint": fingerprint, "source": source}
        (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()


def _checked_accelerator(config: DistillConfig, cpu: bool) -> Any:
    """The accelerator of this process, refused when the launch started fewer processes than
    asked or a distributed backend accelerate did not set up (see check_launch)."""
    accelerator = create_accelerator(config, cpu=cpu)
    check_launch(accelerator.num_processes)
    check_backend(accelerator.distributed_type.value)
    return accelerator


def distill(
    teacher: ModelLike,
    student: ModelLike | None,
    config: DistillConfig | None = None,
    *,
    train_data: DataLike | None = None,
    eval_data: DataLike | None = None,
    tokenizer: Any | None = None,
    output_dir: str | Path,
    resume: Resume = False,
    overwrite: bool = False,
    cpu: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Distil `teacher` into `student` (or into the teacher minus some blocks) and save it.

    `student=None` makes the student from the teacher with `config.student_from_teacher`.
    `train_data` / `eval_data` are a text source (tokenised with `tokenizer`, or the teacher's)
    or a 1-D token tensor; they default to the config's. `resume`: False starts a new run (the
    output folder must be empty, or `overwrite`), True continues from the latest checkpoint in
    `output_dir`, a path continues from that checkpoint, "auto" continues when a checkpoint of
    this very run exists and otherwise discards the folder's earlier run (for recipes, whose
    output folders Swiss Knife owns). `cpu` forces the CPU even when a GPU is present.
    """
    config = config or DistillConfig()
    out = Path(output_dir).expanduser().resolve()
    named_checkpoint, clear = _check_output(out, resume, overwrite)

    teacher_model, teacher_tok, source = _model_and_tokenizer(teacher, "teacher")
    tokenizer = tokenizer if tokenizer is not None else teacher_tok
    student_model, kept = _checked_student(config, student, teacher_model, tokenizer)
    train_stream, eval_stream = _token_streams(
        config, train_data, eval_data, tokenizer, teacher_model
    )

    accelerator = _checked_accelerator(config, cpu)
    processes = accelerator.num_processes
    data, steps = _prepare_run_data(config, accelerator, train_stream, eval_stream)

    # Seed before anything random is created (the hidden-state projections).
    from accelerate.utils import set_seed

    set_seed(config.seed)
    loss = _build_loss(config, teacher_model, student_model, kept)
    fingerprint = _fingerprint(config, teacher_model, student_model, data, processes, steps)
    resume_from = _resume_point(out, resume, named_checkpoint, clear, fingerprint, accelerator)
    topk = _teacher_topk(config, out, fingerprint, data, teacher_model, accelerator, progress)
    _write_run_file(accelerator, out, config, fingerprint, source)

    job = TrainingJob(
        config=config,
        student=student_model,
        teacher=teacher_model if config.needs_teacher and topk is None else None,
        loss=loss,
        data=data,
        total_steps=steps,
        output_dir=out,
        fingerprint=fingerprint,
        teacher_topk=topk,
        tokenizer=tokenizer,
        resume_from=resume_from,
        source=source,
        progress=progress,
        callback=callback,
    )
    logger.info(
        "distilling for %d steps: %d training sequences of %d tokens, %d held out, "
        "%d process(es), %s",
        steps,
        data.train.shape[0],
        config.seq_len,
        data.eval.shape[0],
        processes,
        accelerator.distributed_type.value,
    )
    result = train(accelerator, job)
    result.kept_blocks = kept
    return result


registry.register("distill", "distill", DistillConfig, needs_calibration=False)(distill)
