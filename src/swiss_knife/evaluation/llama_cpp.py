"""Measure a GGUF file where it is deployed: in llama.cpp, through llama-cpp-python.

``evaluate_gguf(path, tokenizer, config, tokens=..., reference=...)`` returns the same
:class:`~swiss_knife.evaluation.evaluate.EvaluationReport` as ``evaluate`` does for a transformers
model, with ``metrics["runtime"] == "llama.cpp"``, so comparison tables and reports show both
side by side. llama-cpp-python is an optional extra (``pip install 'swiss-knife[llama-cpp]'``);
it is imported only when a GGUF file is run here.

Method
------
* **Tokens.** llama.cpp is fed token ids, never text: the stream comes from the Hugging Face
  tokenizer the transformers path uses (the original model's in a comparison), so both runtimes
  score exactly the same tokens and llama.cpp's own tokenizer plays no part.
* **Perplexity.** The windows are those of :func:`~swiss_knife.evaluation.perplexity.perplexity`:
  the same ``max_windows`` cut of the stream, the same ``sliding_windows`` (window clamped to the
  file's trained context, as transformers clamps to ``max_position_embeddings``), the same scored
  positions. Each window runs from an empty KV cache with logits kept for every position, and the
  negative log-likelihood is computed here from those logits exactly as there (``log_softmax`` in
  float32, sums in float64). A difference between the two perplexities is therefore the
  runtime's arithmetic (its quantized kernels, which also round activations to 8 bits, and its
  fp16 KV cache), not a different measurement.
* **Agreement.** ``KL(reference || model)`` and top-1 agreement on the non-overlapping windows of
  :func:`~swiss_knife.evaluation.generation.agreement`, the reference's logits from transformers.
* **Speed.** Batch size 1 only: llama-cpp-python's ``Llama`` decodes one sequence, so other batch
  sizes are listed as not measured, with the reason. Each repeat is a prefill of a random prompt
  (drawn as ``speed.measure_speed`` draws it) and ``new_tokens`` greedy steps on its cache, with
  logits kept for the last position only, as a generating application would run it.
* **Memory.** Process RSS sampled every 5 ms (``memory.PeakMemory``) from just before the file is
  loaded until its measurements end; the agreement pass also runs the reference model and is left
  out. llama.cpp maps the weights from the file and touches them as it runs, so the RSS rise
  already holds them: a model's peak is the larger of its weights' bytes and that rise.
* **Size.** The file's bytes on disk; parameters as llama.cpp counts them. Zeros are not counted
  (that would mean dequantizing every tensor), so sparsity is left empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from swiss_knife.config import EvaluationConfig
from swiss_knife.errors import MissingDependencyError, ModelLoadError, UserInputError
from swiss_knife.evaluation.evaluate import EvaluationReport, perplexity_stream
from swiss_knife.evaluation.generation import (
    AgreementResult,
    AgreementTally,
    _checked_window,
    _window_kl,
)
from swiss_knife.evaluation.memory import PeakMemory
from swiss_knife.evaluation.perplexity import (
    PerplexityResult,
    _scored_span,
    check_token_stream,
    eval_mode,
    max_positions,
    model_device,
    sliding_windows,
)
from swiss_knife.evaluation.speed import BatchSpeed, SpeedResult, Timing, load_average
from swiss_knife.progress import Progress, track

logger = logging.getLogger(__name__)

#: The value of ``metrics["runtime"]`` for reports measured here.
RUNTIME = "llama.cpp"
#: How to get the optional package.
INSTALL_HINT = "pip install 'swiss-knife[llama-cpp]'"
#: Why only batch size 1 is timed.
NO_BATCHING = (
    "llama-cpp-python's Llama runs one sequence at a time; only batch size 1 is measured in "
    "llama.cpp"
)
#: How a llama.cpp report's memory numbers are measured, stored with them.
MEMORY_NOTE = (
    "llama.cpp: peak memory = the larger of the weights' bytes and the largest rise of process "
    "RSS (sampled every 5 ms) over its value just before the GGUF file was loaded, through "
    "loading, perplexity and speed (agreement also runs the reference model and is left out); "
    "the weights are mapped from the file and count as their pages are touched"
)
#: Log lines that say why llama.cpp refused a file (its log levels moved between ggml versions,
#: so the text is what is matched).
_FAILURE = re.compile(r"error|invalid|failed|unknown|not supported|unsupported", re.IGNORECASE)


# --------------------------------------------------------------------------- the optional package


def import_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module, or a one-line MissingDependencyError that says how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(
            f"running GGUF files in llama.cpp needs llama-cpp-python, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    except OSError as exc:  # the package is there but its shared library does not load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingDependencyError(
            f"llama-cpp-python is installed but its library does not load ({first}); "
            f"reinstall it: {INSTALL_HINT}"
        ) from None
    return llama_cpp


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python can be imported here."""
    try:
        import_llama_cpp()
    except MissingDependencyError:
        return False
    return True


# Callbacks that had to stay installed: ctypes would free them while llama.cpp still calls them.
_PINNED_CALLBACKS: list[Any] = []


class _LlamaLog(contextlib.AbstractContextManager["_LlamaLog"]):
    """While active, llama.cpp's log lines go to this module's DEBUG log instead of stderr, and
    the last error line is kept to explain a failed load in one line."""

    def __init__(self, lib: ModuleType) -> None:
        self._lib = lib
        self.failures: list[str] = []

        @lib.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", errors="replace").strip() if text else ""
            if line:
                logger.debug("llama.cpp: %s", line)
                if _FAILURE.search(line) and len(self.failures) < 16:
                    self.failures.append(line)

        self._callback = callback

    def __enter__(self) -> _LlamaLog:
        self._lib.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        # Give logging back to llama-cpp-python's own handler (it honours verbose=).
        previous = getattr(getattr(self._lib, "_logger", None), "llama_log_callback", None)
        if previous is not None:
            self._lib.llama_log_set(previous, ctypes.c_void_p(0))
        else:
            _PINNED_CALLBACKS.append(self._callback)

    def reason(self) -> str:
        """The first failure llama.cpp logged (the cause; later lines only repeat that loading
        failed), without its function-name prefix, or a generic reason."""
        if not self.failures:
            return "not a GGUF model llama.cpp can run"
        return re.sub(r"^[A-Za-z_][\w:]*: ", "", self.failures[0])


# --------------------------------------------------------------------------- the file


def _file_type_name(value: str | None) -> str:
    """``general.file_type`` as a short name (``q8_0``, ``f32``), via the gguf package's enum."""
    if value is None:
        return "gguf"
    try:
        import gguf

        name = gguf.LlamaFileType(int(value)).name
    except (ImportError, ValueError):
        return f"gguf type {value}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


@dataclass(frozen=True)
class GGUFInfo:
    """What the evaluation needs to know about a GGUF file before running it."""

    path: Path
    architecture: str | None
    context_length: int | None  # the trained context (``<arch>.context_length``)
    vocab_size: int
    file_type: str  # short name of general.file_type: "f32", "q8_0", "q4_k_m", ...

    @property
    def config(self) -> SimpleNamespace:
        """The two fields of a transformers config that the shared window checks read."""
        return SimpleNamespace(
            vocab_size=self.vocab_size, max_position_embeddings=self.context_length
        )


def _meta(lib: ModuleType, model: Any, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    size = lib.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode("utf-8", errors="replace") if size >= 0 else None


def _gguf_file(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    if file.suffix != ".gguf":
        raise ModelLoadError(f"{path} is not a .gguf file; llama.cpp runs GGUF files only")
    return file


def gguf_info(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's context length, vocabulary and type with llama.cpp (vocabulary only,
    no weights), refusing in one line a file llama.cpp cannot load."""
    lib = import_llama_cpp()
    file = _gguf_file(path)
    with _LlamaLog(lib) as log:
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        model = lib.llama_model_load_from_file(str(file).encode(), params)
        if not model:
            raise ModelLoadError(f"llama.cpp cannot load {file}: {log.reason()}")
        try:
            vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
            architecture = _meta(lib, model, "general.architecture")
            # A vocabulary-only load skips the hyperparameters, so read the key itself.
            trained = _meta(lib, model, f"{architecture}.context_length") if architecture else None
            context = int(trained) if trained and trained.isdigit() else 0
            file_type = _file_type_name(_meta(lib, model, "general.file_type"))
        finally:
            lib.llama_model_free(model)
    return GGUFInfo(file, architecture, context if context > 0 else None, vocab, file_type)


def load_gguf_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The Hugging Face tokenizer transformers builds from a GGUF file (as ``load_model`` does)."""
    from transformers import AutoTokenizer

    file = _gguf_file(path)
    try:
        return AutoTokenizer.from_pretrained(
            file.parent, gguf_file=file.name, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"transformers cannot build a tokenizer from {file}: {first}") from exc


def default_threads() -> int:
    """Threads for llama.cpp: as many as torch uses here, so both runtimes get the same cores."""
    return torch.get_num_threads() or os.cpu_count() or 1


class LlamaCppModel:
    """One llama.cpp context on a GGUF file, on the CPU.

    ``logits_all=True`` keeps the logits of every position (scoring); ``False`` keeps only the
    last one (generation, and what the speed measurement times). ``config`` carries the file's
    vocabulary size and trained context for the window checks shared with transformers models.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int,
        logits_all: bool,
        n_threads: int | None = None,
        info: GGUFInfo | None = None,
    ) -> None:
        self._lib = import_llama_cpp()
        self.info = info or gguf_info(path)
        self.n_threads = n_threads or default_threads()
        self.n_ctx = n_ctx
        with _LlamaLog(self._lib) as log:
            try:
                self.llm = self._lib.Llama(
                    model_path=str(self.info.path),
                    n_ctx=n_ctx,
                    # One decode call per window: no split of a window into several batches.
                    n_batch=n_ctx,
                    n_ubatch=n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=0,
                    logits_all=logits_all,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(
                    f"llama.cpp cannot load {self.info.path}: {log.reason()}"
                ) from exc
        self.vocab = int(self.llm.n_vocab())
        self.config = self.info.config

    # The facts llama.cpp knows once the weights are loaded.
    def num_params(self) -> int:
        return int(self._lib.llama_model_n_params(self.llm.model))

    def weight_bytes(self) -> int:
        return int(self._lib.llama_model_size(self.llm.model))

    def window_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits of every position of one window, run from an empty cache: (seq, vocab)."""
        if len(ids) > self.n_ctx:
            raise UserInputError(f"a window of {len(ids)} tokens exceeds the context {self.n_ctx}")
        self.llm.reset()  # the next eval() drops the whole KV cache
        self.llm.eval([int(i) for i in ids])
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def greedy_next(self) -> int:
        """The argmax of the last evaluated position's logits."""
        pointer = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(self.vocab,)).argmax())

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- measurements


def gguf_perplexity(
    model: LlamaCppModel,
    tokens: torch.Tensor,
    *,
    window: int = 512,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a llama.cpp model on the windows ``perplexity.perplexity`` would use."""
    if window < 2:
        raise UserInputError(f"window must be at least 2 tokens, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise UserInputError(f"stride must be between 1 and window ({window}), got {stride}")
    shim: Any = model  # the shared checks read only `.config`
    check_token_stream(tokens, shim, min_tokens=2)
    limit = max_positions(shim)
    if limit is not None and window > limit:
        logger.warning("window %d exceeds the file's context %d; using %d", window, limit, limit)
        window = limit
        stride = min(stride, window)

    stream = tokens.detach().to(device="cpu", dtype=torch.long)  # (num_tokens,)
    windows = sliding_windows(stream.numel(), window, stride)
    to_run = [w for w in windows if _scored_span(*w)[0] < _scored_span(*w)[1]]
    nll_sum = 0.0
    count = 0
    for begin, end, target_len in track(
        to_run, "perplexity (llama.cpp)", unit="window", enabled=progress
    ):
        ids = stream[begin:end]  # (seq,)
        logits = model.window_logits(ids.tolist())  # (seq, vocab)
        first, last = _scored_span(begin, end, target_len)
        # As in the transformers path: position i predicts token i + 1.
        log_probs = torch.log_softmax(
            logits[first - 1 : last - 1].float(), dim=-1
        )  # (scored, vocab)
        targets = ids[first:last].unsqueeze(-1)  # (scored, 1)
        nll_sum += float(-log_probs.gather(-1, targets).squeeze(-1).double().sum())
        count += last - first

    return PerplexityResult.from_sums(nll_sum, count, window, stride, len(windows))


def gguf_agreement(
    reference: torch.nn.Module,
    model: LlamaCppModel,
    tokens: torch.Tensor,
    *,
    window: int = 512,
    max_windows: int | None = None,
    progress: bool = False,
) -> AgreementResult:
    """KL and top-1 agreement of a llama.cpp model with a transformers reference, on the windows
    and with the definitions of ``generation.agreement``."""
    shim: Any = model
    window = _checked_window(reference, shim, tokens, window, 1, max_windows)
    ref_device = model_device(reference)
    stream = tokens.detach().to(dtype=torch.long, device="cpu")  # (num_tokens,)
    spans = [(b, min(b + window, stream.numel())) for b in range(0, stream.numel(), window)]
    if max_windows is not None:
        spans = spans[:max_windows]

    tally = AgreementTally()
    with eval_mode(reference):
        for begin, end in track(spans, "agreement (llama.cpp)", unit="window", enabled=progress):
            ids = stream[begin:end]  # (seq,)
            ref_logits = reference(input_ids=ids[None].to(ref_device), use_cache=False).logits[0]
            model_logits = model.window_logits(ids.tolist())  # (seq, vocab)
            if ref_logits.shape[-1] != model_logits.shape[-1]:
                raise UserInputError(
                    f"logit widths differ (reference {ref_logits.shape[-1]}, "
                    f"llama.cpp {model_logits.shape[-1]}); agreement needs the same vocabulary"
                )
            tally.add(*_window_kl(ref_logits, model_logits, ref_device))  # (seq,), (seq,)

    return tally.result(window)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _one_run(model: LlamaCppModel, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill and of ``new_tokens`` greedy steps on its cache."""
    model.llm.reset()
    start = time.perf_counter()
    model.llm.eval(prompt)
    token = model.greedy_next()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        # No EOS check: every run does exactly `new_tokens` steps.
        model.llm.eval([token])
        token = model.greedy_next()
    return prefill_s, time.perf_counter() - start


def gguf_speed(
    model: LlamaCppModel,
    *,
    batch_sizes: Sequence[int] = (1,),
    prompt_len: int = 128,
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Prefill and decode speed of a llama.cpp model at batch size 1, as ``speed.measure_speed``
    reports it; other requested batch sizes are listed under ``not_measured`` with the reason."""
    if isinstance(batch_sizes, int) or len(batch_sizes) == 0:
        raise UserInputError(f"batch_sizes must be a non-empty sequence, got {batch_sizes!r}")
    sizes = [_check_int("batch size", b, 1) for b in batch_sizes]
    _check_int("prompt_len", prompt_len, 1)
    _check_int("new_tokens", new_tokens, 1)
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    limit = model.info.context_length
    if limit is not None and prompt_len + new_tokens > limit:
        raise UserInputError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the file's context "
            f"({limit})"
        )
    if prompt_len + new_tokens > model.n_ctx:
        raise UserInputError(f"the llama.cpp context ({model.n_ctx}) is too short for this run")

    # The prompts speed.measure_speed would draw, in the same order, so batch 1 reads the same.
    generator = torch.Generator().manual_seed(seed)
    prompts = {
        b: torch.randint(0, model.vocab, (b, prompt_len), generator=generator) for b in sizes
    }
    batches: list[BatchSpeed] = []
    load_before = load_average()
    if 1 in prompts:
        prompt = [int(t) for t in prompts[1][0]]
        runs = Progress("speed (llama.cpp)", total=warmup + repeats, unit="run", enabled=progress)
        with runs:
            for _ in range(warmup):
                _one_run(model, prompt, new_tokens)
                runs.update()
            prefill_ms: list[float] = []
            decode_ms: list[float] = []
            for _ in range(repeats):
                prefill_s, decode_s = _one_run(model, prompt, new_tokens)
                prefill_ms.append(prefill_s * 1e3)
                decode_ms.append(decode_s * 1e3 / new_tokens)
                runs.update()
        prefill, decode = Timing.from_samples(prefill_ms), Timing.from_samples(decode_ms)
        batches.append(
            BatchSpeed(
                batch_size=1,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                prefill=prefill,
                decode_per_token=decode,
                prefill_tokens_per_s=prompt_len / (prefill.median_ms / 1e3),
                decode_tokens_per_s=1 / (decode.median_ms / 1e3),
            )
        )
    else:
        logger.warning(
            "llama.cpp: speed not measured: add 1 to the speed batch sizes (%s)", NO_BATCHING
        )
    result = SpeedResult(
        device="cpu",
        dtype=model.info.file_type,
        threads=model.n_threads,
        warmup=warmup,
        repeats=repeats,
        batches=batches,
        load_avg_before=load_before,
        load_avg_after=load_average(),
        cpu_count=os.cpu_count(),
    ).to_dict()
    result["runtime"] = RUNTIME
    result["not_measured"] = [{"batch_size": b, "reason": NO_BATCHING} for b in sizes if b != 1]
    return result


# --------------------------------------------------------------------------- one report


def _eval_context(info: GGUFInfo, config: EvaluationConfig, with_agreement: bool) -> int:
    """The smallest context that holds every scoring window: the perplexity window and, when
    agreement runs, its window, each clamped to the file's trained context."""
    wanted = [config.perplexity.window] if config.perplexity.enabled else []
    if with_agreement:
        wanted.append(config.agreement.window)
    n_ctx = max(wanted, default=8)
    if info.context_length is not None:
        n_ctx = min(n_ctx, info.context_length)
    return n_ctx


@dataclass
class _Run:
    """Timings and memory rises of one GGUF evaluation, and what llama.cpp says about its
    weights once they are loaded."""

    memory: bool
    report: EvaluationReport
    rises: dict[str, int]
    process: dict[str, int]
    facts: dict[str, int]

    @contextlib.contextmanager
    def measured(self, key: str) -> Iterator[None]:
        """Memory from a baseline read before anything of ``key`` is loaded, to its end."""
        if not self.memory:
            yield
            return
        with PeakMemory("cpu") as peak:
            yield
        self.rises[key] = peak.increase_bytes
        self.process.setdefault("baseline_bytes", peak.baseline_bytes)
        self.process["peak_bytes"] = max(self.process.get("peak_bytes", 0), peak.peak_bytes)

    def load(
        self, key: str, path: Path, info: GGUFInfo, n_ctx: int, **kwargs: Any
    ) -> LlamaCppModel:
        start = time.perf_counter()
        model = LlamaCppModel(path, n_ctx=n_ctx, info=info, **kwargs)
        self.report.seconds[f"load_{key}"] = round(time.perf_counter() - start, 4)
        self.facts.setdefault("num_params", model.num_params())
        self.facts.setdefault("weight_bytes", model.weight_bytes())
        return model

    def timed(self, key: str, fn: Any) -> Any:
        logger.info("%s: measuring %s in llama.cpp", self.report.name, key)
        start = time.perf_counter()
        result = fn()
        self.report.seconds[key] = round(time.perf_counter() - start, 4)
        return result


def _memory_metrics(run: _Run) -> dict[str, Any]:
    weights = run.facts.get("weight_bytes", 0)
    rise = max(run.rises.values(), default=0)
    return {
        "device": "cpu",
        "method": "rss_sampled",
        "runtime": RUNTIME,
        "model_peak_bytes": max(weights, rise),
        "parameter_bytes": weights,
        "buffer_bytes": 0,
        # What came on top of the weights (zero when the rise stayed below them).
        "increase_bytes": max(0, rise - weights),
        "rss_rise_bytes": rise,
        "rss_rise_bytes_by_metric": dict(run.rises),
        "peak_bytes": run.process.get("peak_bytes", 0),
        "baseline_bytes": run.process.get("baseline_bytes", 0),
        "note": MEMORY_NOTE,
    }


def _size_metrics(info: GGUFInfo, facts: dict[str, int]) -> dict[str, Any]:
    disk = info.path.stat().st_size
    params = facts.get("num_params")
    return {
        "num_params": params,
        "nonzero_params": None,
        "sparsity": None,  # not counted: it would mean dequantizing every tensor
        "disk_bytes": disk,
        "weight_files": [info.path.name],
        "bits_per_weight": 8 * disk / params if params else None,
        "in_memory_bytes": facts.get("weight_bytes"),
    }


def _score(
    run: _Run,
    info: GGUFInfo,
    config: EvaluationConfig,
    tokens: torch.Tensor | None,
    reference: torch.nn.Module | None,
    threads: int,
    progress: bool,
) -> None:
    """Perplexity and agreement in one context that keeps every position's logits (also loaded
    when nothing else runs, for the memory and size llama.cpp reports); closed before speed
    loads its own."""
    metrics = run.report.metrics
    ppl_cfg = config.perplexity
    with_agreement = config.agreement.enabled and reference is not None
    n_ctx = _eval_context(info, config, with_agreement)
    with contextlib.ExitStack() as stack:
        with run.measured("perplexity" if ppl_cfg.enabled else "load"):
            scoring = stack.enter_context(
                run.load("scoring", info.path, info, n_ctx, logits_all=True, n_threads=threads)
            )
            if ppl_cfg.enabled and tokens is not None:
                stream = perplexity_stream(tokens, ppl_cfg, info.context_length)
                metrics["perplexity"] = run.timed(
                    "perplexity",
                    lambda: gguf_perplexity(
                        scoring,
                        stream,
                        window=ppl_cfg.window,
                        stride=ppl_cfg.stride,
                        progress=progress,
                    ).to_dict(),
                )
        if with_agreement and reference is not None and tokens is not None:
            agr = config.agreement
            metrics["agreement"] = run.timed(
                "agreement",
                lambda: gguf_agreement(
                    reference,
                    scoring,
                    tokens,
                    window=agr.window,
                    max_windows=agr.max_windows,
                    progress=progress,
                ).to_dict(),
            )


def _speed(
    run: _Run, info: GGUFInfo, config: EvaluationConfig, threads: int, progress: bool
) -> None:
    """Batch-1 prefill and decode speed in a context of its own, without all-position logits."""
    sp = config.speed
    with run.measured("speed"):
        n_ctx = sp.prompt_len + sp.new_tokens
        if info.context_length is not None:
            n_ctx = min(n_ctx, info.context_length)
        with run.load("speed", info.path, info, n_ctx, logits_all=False, n_threads=threads) as fast:
            run.report.metrics["speed"] = run.timed(
                "speed",
                lambda: gguf_speed(
                    fast,
                    batch_sizes=tuple(sp.batch_sizes),
                    prompt_len=sp.prompt_len,
                    new_tokens=sp.new_tokens,
                    warmup=sp.warmup,
                    repeats=sp.repeats,
                    seed=config.seed,
                    progress=progress,
                ),
            )


def _not_measured(config: EvaluationConfig, name: str) -> dict[str, str]:
    """What the config asks for that llama.cpp does not measure here, each said once."""
    skipped: dict[str, str] = {}
    if config.bleu.references:
        skipped["bleu"] = "BLEU runs through transformers' generate(); not in llama.cpp"
    if config.harness.tasks:
        skipped["harness"] = "lm-evaluation-harness is not wired to llama.cpp here"
    for key, why in skipped.items():
        logger.warning("%s: %s not measured: %s", name, key, why)
    return skipped


def evaluate_gguf(
    path: str | Path,
    tokenizer: Any | None = None,
    config: EvaluationConfig | None = None,
    *,
    tokens: torch.Tensor | None = None,
    reference: torch.nn.Module | None = None,
    name: str | None = None,
    source: str | None = None,
    eval_data: str | None = None,
    n_threads: int | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Measure a GGUF file in llama.cpp as ``evaluate`` measures a transformers model.

    tokens: the evaluation text as one 1-D stream, tokenized by the Hugging Face tokenizer
        (the original model's, in a comparison); perplexity and agreement need it.
    reference: the original model in transformers, for KL divergence and top-1 agreement.
    tokenizer: kept for symmetry with ``evaluate``; BLEU and the harness are not run here.
    n_threads: llama.cpp threads (default: ``torch.get_num_threads()``).
    """
    lib = import_llama_cpp()
    config = config or EvaluationConfig()
    torch.manual_seed(config.seed)
    info = gguf_info(path)
    report = EvaluationReport(
        name=name or info.path.name, source=source or str(path), eval_data=eval_data
    )
    metrics = report.metrics
    threads = n_threads or default_threads()
    run = _Run(config.memory, report, {}, {}, {})
    with_agreement = config.agreement.enabled and reference is not None
    ppl_cfg = config.perplexity
    if (ppl_cfg.enabled or with_agreement) and tokens is None:
        what = "perplexity" if ppl_cfg.enabled else "agreement with the original"
        raise UserInputError(f"{what} needs evaluation text: pass --eval-data")
    if ppl_cfg.enabled or with_agreement or not config.speed.enabled:
        _score(run, info, config, tokens, reference, threads, progress)
    not_measured = _not_measured(config, report.name)
    if config.speed.enabled:
        _speed(run, info, config, threads, progress)
    if config.size:
        metrics["size"] = _size_metrics(info, run.facts)
    if config.memory:
        metrics["memory"] = _memory_metrics(run)
    metrics["dtype"] = info.file_type
    metrics["device"] = "cpu"
    metrics["runtime"] = RUNTIME
    metrics["llama_cpp"] = {
        "version": getattr(lib, "__version__", None),
        "file": str(info.path),
        "architecture": info.architecture,
        "context_length": info.context_length,
        "threads": threads,
        "kv_cache": "f16 (llama.cpp's default)",
        "not_measured": not_measured,
    }
    return report
