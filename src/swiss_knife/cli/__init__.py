"""The `swiss-knife` command: parsing (cli.parser), one thin function per subcommand, printing.

Exit codes: 0 success, 2 bad input (one-line error), 1 any other failure. `-v` shows tracebacks.
The compression verbs live in cli.compress, distillation in cli.distill, measurement in
cli.evaluate; all of them hand their configs to the library (swiss_knife.stages for the
model-changing stages).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import SwissKnifeError, UserInputError
from .common import _library_progress, _print_json, _progress, _warn
from .compress import _prune_config, _quant_config, cmd_prune, cmd_quantize, cmd_reduce_layers
from .distill import cmd_distill
from .evaluate import cmd_compare, cmd_evaluate
from .export import cmd_export
from .parser import build_parser

logger = logging.getLogger("swiss_knife")

__all__ = [
    "_prune_config",
    "_quant_config",
    "build_parser",
    "cmd_compare",
    "cmd_create_configs",
    "cmd_demo",
    "cmd_device_info",
    "cmd_distill",
    "cmd_evaluate",
    "cmd_export",
    "cmd_prune",
    "cmd_quantize",
    "cmd_reduce_layers",
    "cmd_run",
    "cmd_validate",
    "main",
]


def cmd_run(args: argparse.Namespace) -> int:
    from ..evaluation.compare import comparison_rows
    from ..evaluation.report import terminal_table
    from ..pipeline import run_recipe
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe)
    _library_progress(args)
    result = run_recipe(
        recipe,
        args.output_dir,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        progress=_progress(args),
        extra_inputs=[args.recipe],
    )
    if args.json:
        _print_json(
            {
                "output_dir": str(result.output_dir),
                "final_model": str(result.final_model_dir) if result.final_model_dir else None,
                "gguf_file": str(result.gguf_file) if result.gguf_file else None,
                "resumed": result.resumed_stages,
                "rows": comparison_rows(result.reports),
            }
        )
        return 0
    print(terminal_table(comparison_rows(result.reports)))
    if result.resumed_stages:
        print(f"\nreused from an earlier run: {', '.join(result.resumed_stages)}")
    if result.final_model_dir:
        print(f"final model: {result.final_model_dir}")
    if result.gguf_file:
        print(f"gguf file: {result.gguf_file}")
    print(f"report: {result.report_paths['markdown']}")
    return 0


def cmd_create_configs(args: argparse.Namespace) -> int:
    from ..samples import write_samples

    written = write_samples(args.output_dir, overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe, recipe_schema

    if args.schema:
        _print_json(recipe_schema())
        return 0
    if not args.recipe:
        raise UserInputError("give a recipe file to validate, or --schema")
    recipe = load_recipe(args.recipe)
    missing = _missing_inputs(recipe)
    if missing and args.strict:
        raise UserInputError(f"{args.recipe}: " + "; ".join(missing))
    for problem in missing:
        _warn(f"{args.recipe}: {problem}")
    if args.json:
        stages = [s.type for s in recipe.stages]
        _print_json({"valid": True, "stages": stages, "missing_inputs": missing})
    else:
        stages_text = " -> ".join(s.type for s in recipe.stages) or "no stages"
        print(f"{args.recipe}: valid ({recipe.model.path}; {stages_text})")
    return 0


def _missing_model(path: str, gguf_file: str | None, revision: str | None) -> str | None:
    """Why a recipe's model cannot be found from here, or None (found, or a hub id to fetch)."""
    from ..sources import hub_cached, hub_offline, looks_like_local_path

    local = Path(path).expanduser()
    if local.exists():
        if gguf_file and not (local / gguf_file).is_file():
            return f"GGUF file {gguf_file!r} not found in {path}"
        return None
    if looks_like_local_path(path):
        return f"model path {path} does not exist"
    if hub_offline() and not hub_cached(
        path, filename=gguf_file or "config.json", revision=revision
    ):
        return f"model {path!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    return None


def _missing_inputs(recipe: Any) -> list[str]:
    """The model and local data files a recipe names that do not exist (no weights are read)."""
    from ..sources import is_local_data_source

    model = recipe.model
    problems = [_missing_model(model.path, model.gguf_file, model.revision)]
    sources = [("data.eval", recipe.data.eval), ("data.calibration", recipe.data.calibration)]
    references = [("evaluation.bleu.references", recipe.evaluation.bleu.references)]
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}]"
        for key in ("train_data", "eval_data"):
            sources.append((f"{where}.{key}", getattr(stage, key, None)))
        for key in ("teacher", "student"):
            other = getattr(stage, key, None)
            if isinstance(other, str) and other not in ("original", "current"):
                problem = _missing_model(other, None, None)
                problems.append(f"{where}.{key}: {problem}" if problem else None)
        evaluation = getattr(stage, "evaluation", None)
        if evaluation is not None:
            references.append((f"{where}.evaluation.bleu.references", evaluation.bleu.references))
    for where, data in sources:
        source = getattr(data, "source", None)
        if source and is_local_data_source(source) and not Path(source).expanduser().exists():
            problems.append(f"{where}: data file {source} does not exist")
    for where, reference in references:
        if reference and not Path(reference).expanduser().exists():
            problems.append(f"{where}: file {reference} does not exist")
    return [problem for problem in problems if problem]


def cmd_device_info(args: argparse.Namespace) -> int:
    from ..device import device_info

    info = device_info()
    if args.json:
        _print_json(info)
        return 0
    cpu = info["cpu"]
    print(f"platform        {info['platform']}")
    print(f"default device  {info['default_device']}")
    print(
        f"cpu             {cpu['cores_logical']} logical cores, {cpu['torch_threads']} torch "
        f"threads, {cpu['memory_total_bytes'] / 2**30:.1f} GiB, native bf16: {cpu['bf16_native']}"
    )
    for gpu in info["cuda"]:
        print(
            f"cuda:{gpu['index']}          {gpu['name']}, {gpu['memory_total_bytes'] / 2**30:.1f} "
            f"GiB, capability {gpu['capability']}, bf16: {gpu['bf16']}"
        )
    if not info["cuda"]:
        print("cuda            not available")
    print(f"mps             {'available' if info['mps'] else 'not available'}")
    for name, version in info["versions"].items():
        print(f"{name:<16}{version or 'not installed'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    _library_progress(args)
    result = run_demo(
        args.output_dir, overwrite=args.overwrite, quick=args.quick, progress=_progress(args)
    )
    print(result)
    return 0


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if not verbose:
        # transformers and friends are chatty at INFO; keep their warnings.
        for name in ("transformers", "accelerate", "urllib3", "filelock", "httpx", "gguf"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Imported by transformers on CPU-only machines, torchao reports its CUDA-only
        # extensions and torch's pytree deprecations: noise for a user, not a problem.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


# Operating-system errors that mean the user named a path we cannot use: bad input, not a crash.
_PATH_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EEXIST: "it already exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def _path_error(exc: OSError) -> str | None:
    """One sentence for an OSError about a user's path, or None for any other OSError."""
    reason = _PATH_ERRNOS.get(exc.errno or -1)
    if reason is None or not exc.filename:
        return None
    path = exc.filename if isinstance(exc.filename, str) else os.fsdecode(exc.filename)
    return f"cannot use {path}: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error: already printed
        return exc.code if isinstance(exc.code, int) else 2
    verbose = getattr(args, "verbose", False)
    _setup_logging(verbose, getattr(args, "quiet", False))
    try:
        command: Callable[[argparse.Namespace], int] = globals()[args.command_function]
        code = command(args)
        return code
    except SwissKnifeError as exc:
        if verbose:
            logger.exception("failed")
        message = str(exc) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if verbose:
            logger.exception("failed")
        path_message = _path_error(exc)
        if path_message is None:
            print(
                f"error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
                file=sys.stderr,
            )
            return 1
        print(f"error: {path_message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if verbose:
            logger.exception("unexpected failure")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: {type(exc).__name__}: {first} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1
