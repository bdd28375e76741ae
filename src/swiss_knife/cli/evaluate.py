"""swiss-knife evaluate and compare: measure one model, or an original beside its compressed ones.

A .gguf file runs in llama.cpp (llama-cpp-python, the `llama-cpp` extra) when `--runtime` is
`auto` and the package is installed, or when `--runtime llama.cpp` asks for it; otherwise
transformers loads it, dequantized. Every model reads the same token stream, made by the
original's tokenizer; agreement is always measured against the original in transformers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..errors import UserInputError
from .common import (
    _check_eval_tokens,
    _data_config,
    _eval_config,
    _load,
    _print_json,
    _progress,
    _refuse_output_inside,
    _warn,
)

logger = logging.getLogger("swiss_knife")

TRANSFORMERS = "transformers"
LLAMA_CPP = "llama.cpp"


def _gguf_path(args: argparse.Namespace, path: str) -> Path | None:
    """The GGUF file a model argument names (a .gguf file, or a folder with --gguf-file)."""
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return local
    if args.gguf_file and local.is_dir() and (local / args.gguf_file).is_file():
        return local / args.gguf_file
    return None


def _runtimes(args: argparse.Namespace, paths: list[str]) -> list[str]:
    """Which runtime measures each model: llama.cpp for GGUF files when --runtime allows it and
    llama-cpp-python is installed, transformers for everything else."""
    from ..evaluation.llama_cpp import INSTALL_HINT, import_llama_cpp, llama_cpp_available

    choice = getattr(args, "runtime", "auto")
    ggufs = [_gguf_path(args, path) is not None for path in paths]
    if choice == TRANSFORMERS or (choice == "auto" and not any(ggufs)):
        return [TRANSFORMERS] * len(paths)
    if choice == LLAMA_CPP:
        if not any(ggufs):
            names = ", ".join(paths)
            raise UserInputError(f"--runtime llama.cpp runs .gguf files, and {names} is not one")
        import_llama_cpp()  # a one-line error naming the extra when it is missing
    elif not llama_cpp_available():
        _warn(
            "llama-cpp-python is not installed, so .gguf files are measured in transformers "
            f"(dequantized); to run them in llama.cpp: {INSTALL_HINT}"
        )
        return [TRANSFORMERS] * len(paths)
    return [LLAMA_CPP if gguf else TRANSFORMERS for gguf in ggufs]


def _measure(
    args: argparse.Namespace,
    path: str,
    config: Any,
    tokens: Any,
    reference: Any,
    progress: bool,
    loaded: Any = None,
) -> Any:
    """Measure the model at `path`: the model transformers holds (`loaded`), or else the
    GGUF file in llama.cpp."""
    from ..evaluation import evaluate
    from ..evaluation.llama_cpp import evaluate_gguf

    if loaded is not None:
        return evaluate(
            loaded.model,
            loaded.tokenizer,
            config,
            tokens=tokens,
            reference=reference,
            weights_path=loaded.weights_path,
            name=Path(path).name or path,
            source=path,
            eval_data=args.eval_data,
            progress=progress,
        )
    file = _gguf_path(args, path)
    assert file is not None
    return evaluate_gguf(
        file,
        None,
        config,
        tokens=tokens,
        reference=reference,
        name=Path(path).name or path,
        source=path,
        eval_data=args.eval_data,
        progress=progress,
    )


def _gguf_side(args: argparse.Namespace, path: str, with_tokenizer: bool) -> tuple[Any, Any]:
    """A GGUF file run in llama.cpp: the tokenizer transformers builds from it (or None) and
    its context and vocabulary, for the checks the text must pass."""
    from ..evaluation.llama_cpp import gguf_info, load_gguf_tokenizer

    file = _gguf_path(args, path)
    assert file is not None
    info = gguf_info(file)
    tokenizer = (
        load_gguf_tokenizer(file, trust_remote_code=args.trust_remote_code)
        if with_tokenizer
        else None
    )
    return tokenizer, info


# Stream a model (auto) when loading it whole would take more than this share of the free memory.
STREAM_WHEN_OVER = 0.8


def _stream_evaluation(args: argparse.Namespace, config: Any) -> bool:
    """Whether `evaluate` streams the model from disk block by block (`--stream`): `on` always
    (refused in one line where it cannot), `auto` only when the whole model would not fit in
    the free memory of the compute device, `off` never."""
    from ..device import resolve_device
    from ..evaluation.evaluate import streamed_unsupported
    from ..models import DTYPES
    from ..streaming import available_bytes, loaded_bytes, source_refusal

    mode = getattr(args, "stream", "off")
    if mode == "off":
        return False
    directory = Path(args.model).expanduser()
    reason = source_refusal(directory if directory.is_dir() else None, args.gguf_file)
    if reason is None:
        # Speed is left out of a streamed evaluation (with a note); these are asked for.
        wanted = [w for w in streamed_unsupported(config, args.reference) if w != "speed"]
        if wanted:
            reason = f"{', '.join(wanted)} needs the whole model in memory"
    if mode == "on":
        if reason is not None:
            raise UserInputError(f"cannot stream this model from disk: {reason}")
        return True
    if reason is not None:
        return False
    need = loaded_bytes(directory, DTYPES.get(args.dtype))
    free = available_bytes(resolve_device(args.device))
    if need <= STREAM_WHEN_OVER * free:
        return False
    logger.info(
        "the model takes %.1f GB loaded and %.1f GB is free: streaming it one block at a time",
        need / 1e9,
        free / 1e9,
    )
    return True


def _open_streamed(args: argparse.Namespace) -> Any:
    from ..device import resolve_device
    from ..models import open_streamed_model

    loaded = open_streamed_model(
        args.model,
        dtype=args.dtype,
        device=resolve_device(args.device),
        trust_remote_code=args.trust_remote_code,
    )
    logger.info("streaming %s one block at a time", args.model)
    return loaded


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..calibration import spilled_to
    from ..data import read_documents, tokenize_documents
    from ..evaluation import write_reports
    from ..evaluation.compare import comparison_rows
    from ..evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    _refuse_output_inside(args.output, "--output", [args.model, args.reference])
    (runtime,) = _runtimes(args, [args.model])
    # Read the text before loading the model: a bad path fails in a second, not a minute.
    docs = read_documents(data_cfg) if data_cfg else None
    progress = _progress(args)
    if runtime == LLAMA_CPP:
        tokenizer, info = _gguf_side(args, args.model, with_tokenizer=docs is not None)
        tokens = tokenize_documents(docs, tokenizer, add_bos=data_cfg.add_bos) if docs else None
        _check_eval_tokens(tokens, config, info, args.eval_data)
        reference = (
            _load(args, args.reference, with_tokenizer=False).model if args.reference else None
        )
        report = _measure(args, args.model, config, tokens, reference, progress)
    else:
        streamed = _stream_evaluation(args, config)
        loaded = _open_streamed(args) if streamed else _load(args, args.model)
        if streamed and config.speed.enabled:
            _warn("speed is not measured for a model streamed from disk (it needs the whole "
                  "model in memory); perplexity, size and memory are")  # fmt: skip
            config = config.model_copy(
                update={"speed": config.speed.model_copy(update={"enabled": False})}
            )
        tokens = (
            tokenize_documents(docs, loaded.tokenizer, add_bos=data_cfg.add_bos) if docs else None
        )
        _check_eval_tokens(tokens, config, loaded.model, args.eval_data)
        reference = (
            _load(args, args.reference, with_tokenizer=False).model if args.reference else None
        )
        with spilled_to(args.spill_activations):
            report = _measure(args, args.model, config, tokens, reference, progress, loaded)
    if args.output:
        write_reports(args.output, [report], title=f"Evaluation of {args.model}")
    if args.json:
        _print_json(report.to_dict())
    else:
        print(terminal_table(comparison_rows([report])))
        if args.output:
            print(f"\nreports written to {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..data import read_documents, tokenize_documents
    from ..evaluation import evaluate, write_reports
    from ..evaluation.compare import comparison_rows
    from ..evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    _refuse_output_inside(args.report_dir, "--report-dir", [args.original, *args.compressed])
    runtimes = _runtimes(args, [args.original, *args.compressed])
    docs = read_documents(data_cfg) if data_cfg else None
    progress = _progress(args)
    if runtimes[0] == LLAMA_CPP:
        # The original runs in llama.cpp; transformers still gives the tokens and, when
        # agreement is measured, the reference every other model is compared with.
        tokenizer, checked = _gguf_side(args, args.original, with_tokenizer=True)
        wants_reference = config.agreement.enabled
        reference = (
            _load(args, args.original, with_tokenizer=False).model if wants_reference else None
        )
        weights_path = None
    else:
        original = _load(args, args.original)
        tokenizer, checked, reference = original.tokenizer, original.model, original.model
        weights_path = original.weights_path
    tokens = tokenize_documents(docs, tokenizer, add_bos=data_cfg.add_bos) if docs else None
    _check_eval_tokens(tokens, config, checked, args.eval_data)
    if runtimes[0] == LLAMA_CPP:
        first = _measure(args, args.original, config, tokens, None, progress)
    else:
        first = evaluate(
            reference,
            tokenizer,
            config,
            tokens=tokens,
            weights_path=weights_path,
            name=Path(args.original).name or args.original,
            source=args.original,
            eval_data=args.eval_data,
            progress=progress,
        )
    reports = [first]
    for path, runtime in zip(args.compressed, runtimes[1:], strict=True):
        if runtime == LLAMA_CPP:
            reports.append(_measure(args, path, config, tokens, reference, progress))
            continue
        loaded = _load(args, path)
        reports.append(_measure(args, path, config, tokens, reference, progress, loaded))
        del loaded
    rows = comparison_rows(reports)
    paths = write_reports(args.report_dir, reports) if args.report_dir else {}
    if args.json:
        _print_json({"rows": rows, "reports": [r.to_dict() for r in reports]})
    else:
        print(terminal_table(rows))
        for kind, path in paths.items():
            print(f"{kind}: {path}")
    return 0
