"""swiss-knife distill: flags to a DistillConfig, then the training loop on accelerate."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from ..cli_flags import (
    comma_strings,
)
from ..errors import UserInputError
from .common import (
    _config_file,
    _fit_seq_len,
    _load,
    _local_hf_config,
    _max_positions,
    _print_json,
    _progress,
    _refuse_output_inside,
)
from .validation import _validate_stage, flags_into

logger = logging.getLogger("swiss_knife")

# Distillation flags and the config keys they set.
_DISTILL_FLAGS = (
    ("max_steps", ("max_steps",)),
    ("epochs", ("epochs",)),
    ("learning_rate", ("learning_rate",)),
    ("weight_decay", ("weight_decay",)),
    ("lr_schedule", ("lr_schedule",)),
    ("warmup_steps", ("warmup_steps",)),
    ("batch_size", ("batch_size",)),
    ("seq_len", ("seq_len",)),
    ("grad_accum", ("grad_accum",)),
    ("max_grad_norm", ("max_grad_norm",), lambda norm: norm or None),  # 0: no clipping
    ("gradient_checkpointing", ("gradient_checkpointing",)),
    ("mixed_precision", ("mixed_precision",)),
    ("seed", ("seed",)),
    ("eval_fraction", ("eval_fraction",)),
    ("eval_every", ("eval_every",)),
    ("eval_windows", ("eval_windows",)),
    ("early_stopping", ("early_stopping_patience",)),
    ("save_every", ("save_every",)),
    ("keep_checkpoints", ("keep_checkpoints",)),
    ("log_every", ("log_every",)),
    ("teacher_topk", ("teacher_topk",)),
    ("teacher_cache", ("teacher_cache",)),
    ("loss", ("loss", "kd")),
    ("temperature", ("loss", "temperature")),
    ("alpha", ("loss", "alpha")),
    ("hidden_weight", ("loss", "hidden_weight")),
    ("hidden_loss", ("loss", "hidden_loss")),
    ("layer_map", ("loss", "layer_map"), lambda text: _layer_map(text)),
    ("student_from_teacher", ("student_from_teacher",), lambda text: _student_spec(text)),
)


def _student_spec(text: str) -> dict[str, Any]:
    """'remove:N[:middle|last|evenly]' or 'drop:I,J,...' as a StudentFromTeacher mapping."""
    kind, _, rest = text.partition(":")
    try:
        if kind == "drop" and rest:
            return {"drop_layers": [int(part) for part in rest.split(",") if part.strip()]}
        if kind == "remove" and rest:
            count, _, position = rest.partition(":")
            return {"remove": int(count), **({"position": position} if position else {})}
    except ValueError:
        pass
    raise UserInputError(
        f"--student-from-teacher {text!r}: expected remove:N[:middle|last|evenly] or drop:I,J,..."
    )


def _layer_map(text: str) -> list[list[int]]:
    try:
        return [[int(s), int(t)] for s, t in (pair.split(":") for pair in comma_strings(text))]
    except ValueError:
        raise UserInputError(
            f"--layer-map {text!r}: expected STUDENT:TEACHER pairs, e.g. 1:2,2:4"
        ) from None


def _distill_config(args: argparse.Namespace) -> Any:
    from ..config import DistillConfig
    from ..recipe import stage_class

    data = _config_file(args)
    data["type"] = "distill"
    given = flags_into(args, _DISTILL_FLAGS, data)
    for flag, key in (("train_data", "train_data"), ("eval_data", "eval_data")):
        source = getattr(args, flag)
        if source:
            data[key] = {
                "source": source,
                "field": args.field,
                "split_documents": args.split_documents,
                "add_bos": not args.no_bos,
            }
            given[(key,)] = "--" + flag.replace("_", "-")
    # The distill stage class: a --config file may be written as a recipe stage (type: distill).
    return _validate_stage(
        stage_class("distill", DistillConfig), data, args, given, where="distill options"
    )


def cmd_distill(args: argparse.Namespace) -> int:

    from ..compression.distillation.api import distill
    from ..data import read_documents, tokenize_documents

    if os.environ.get("RANK", "0") != "0":
        # Under `accelerate launch` every process runs this; one of them reports.
        logging.getLogger("swiss_knife").setLevel(logging.WARNING)
    if not args.student and not args.student_from_teacher:
        raise UserInputError("give --student MODEL or --student-from-teacher SPEC")
    config = _distill_config(args)
    if config.train_data is None:
        raise UserInputError("give --train-data (or train_data: in --config)")
    _refuse_output_inside(args.output_dir, "--output-dir", [args.teacher, args.student])
    # Sequences longer than the models' positions: refused from config.json before any loading.
    for path, gguf in ((args.teacher, args.gguf_file), (args.student, None)):
        if path:
            limit = _max_positions(_local_hf_config(args, path, gguf))
            config = _fit_seq_len(args, config, limit, path)
    # Read the text before loading any model: a bad path fails in a second, not a minute.
    train_docs = read_documents(config.train_data)
    eval_docs = read_documents(config.eval_data) if config.eval_data else None
    # Load on the CPU: accelerate moves the models to this process's device.
    on_cpu = argparse.Namespace(**{**vars(args), "device": "cpu"})
    teacher = _load(on_cpu, args.teacher)
    if teacher.tokenizer is None:
        raise UserInputError(f"{args.teacher} has no tokenizer to tokenise the training text")
    student = None
    if args.student:
        # --gguf-file names the teacher's file, not the student's.
        student = _load(argparse.Namespace(**{**vars(on_cpu), "gguf_file": None}), args.student)
    for path, loaded in ((args.teacher, teacher), (args.student, student)):
        if loaded is not None:
            config = _fit_seq_len(args, config, _max_positions(loaded.model.config), path)

    def tokens(docs: list[str], add_bos: bool) -> Any:
        return tokenize_documents(docs, teacher.tokenizer, add_bos=add_bos)

    result = distill(
        teacher,
        student,
        config,
        train_data=tokens(train_docs, config.train_data.add_bos),
        eval_data=tokens(eval_docs, config.eval_data.add_bos)
        if eval_docs and config.eval_data
        else None,
        output_dir=args.output_dir,
        resume=args.resume or False,
        overwrite=args.overwrite,
        cpu=args.device == "cpu",
        progress=_progress(args),
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    if args.json:
        _print_json(_distill_summary(result))
    else:
        _print_distill(result)
    return 0


def _distill_summary(result: Any) -> dict[str, Any]:
    """The --json summary of a distillation run."""
    evals = result.evaluations
    return {
        "output_dir": str(result.output_dir),
        "best_dir": str(result.best_dir) if result.best_dir else None,
        "final_dir": str(result.final_dir),
        "steps": result.steps,
        "total_steps": result.total_steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_seconds": round(result.train_seconds, 2),
        "stopped_early": result.stopped_early,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "kept_blocks": result.kept_blocks,
        "eval_perplexity_start": evals[0].perplexity if evals else None,
        "eval_perplexity_best": result.best_perplexity,
        "best_step": result.best_step,
    }


def _print_distill(result: Any) -> None:
    """The human-readable summary of a distillation run."""
    evals = result.evaluations
    print(
        f"distilled {result.steps} steps, {result.tokens:,} tokens, "
        f"{result.tokens_per_s:,.0f} tokens/s"
        + (" (stopped early)" if result.stopped_early else "")
    )
    if result.kept_blocks is not None:
        print(f"student: the teacher's blocks {result.kept_blocks}")
    if evals and result.best_perplexity is not None:
        print(
            f"held-out perplexity {evals[0].perplexity:.4g} at step {evals[0].step} -> "
            f"{result.best_perplexity:.4g} at step {result.best_step} (best)"
        )
    if result.best_dir:
        print(f"best: {result.best_dir}")
    print(f"final: {result.final_dir}")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
