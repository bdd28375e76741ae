"""swiss-knife evaluate and compare: measure one model, or an original beside its compressed ones."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import (
    _check_eval_tokens,
    _data_config,
    _eval_config,
    _load,
    _print_json,
    _progress,
    _refuse_output_inside,
)

logger = logging.getLogger("swiss_knife")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data import read_documents, tokenize_documents
    from ..evaluation import evaluate, write_reports
    from ..evaluation.compare import comparison_rows
    from ..evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    _refuse_output_inside(args.output, "--output", [args.model, args.reference])
    # Read the text before loading the model: a bad path fails in a second, not a minute.
    docs = read_documents(data_cfg) if data_cfg else None
    loaded = _load(args, args.model)
    tokens = tokenize_documents(docs, loaded.tokenizer, add_bos=data_cfg.add_bos) if docs else None
    _check_eval_tokens(tokens, config, loaded.model, args.eval_data)
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
    from ..data import read_documents, tokenize_documents
    from ..evaluation import evaluate, write_reports
    from ..evaluation.compare import comparison_rows
    from ..evaluation.report import terminal_table

    config = _eval_config(args)
    data_cfg = _data_config(args)
    _refuse_output_inside(args.report_dir, "--report-dir", [args.original, *args.compressed])
    docs = read_documents(data_cfg) if data_cfg else None
    original = _load(args, args.original)
    tokens = (
        tokenize_documents(docs, original.tokenizer, add_bos=data_cfg.add_bos) if docs else None
    )
    _check_eval_tokens(tokens, config, original.model, args.eval_data)
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
