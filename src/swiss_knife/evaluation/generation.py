"""How closely a compressed model follows its reference: distribution agreement and BLEU.

Agreement (teacher-forced)
--------------------------
Both models read the same non-overlapping windows of one token stream. At every position the
next-token distributions are compared with

* ``KL(reference || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))`` in float32 over
  the full vocabulary, averaged over all positions (``kl_mean``), and also averaged per window with
  the worst window reported (``kl_max_window``) to expose localised damage; and
* top-1 agreement: the fraction of positions where both argmaxes coincide.

Per-token KL to the uncompressed model is a more sensitive fidelity measure than perplexity, whose
changes can cancel out across tokens (Dettmers et al. 2022, "LLM.int8()"; the llama.cpp
``--kl-divergence`` statistics report the same quantities for quantized GGUF models). Every
position is compared, including the last of a window: it has no label, but both distributions
are well defined.

BLEU (free-running)
-------------------
Each prompt is completed greedily (``do_sample=False``) for up to ``max_new_tokens`` tokens; the
new tokens are decoded and scored against the references with ``sacrebleu.corpus_bleu``
(Post 2018, "A Call for Clarity in Reporting BLEU Scores"), using sacrebleu's default 13a
tokenisation. Prompts are batched with left padding so that every continuation starts right after
its own prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from swiss_knife.errors import DataError, UserInputError
from swiss_knife.evaluation.perplexity import (
    check_token_stream,
    eval_mode,
    max_positions,
    model_device,
    vocab_size,
)
from swiss_knife.progress import track

#: How many (prompt, reference, output) triples BleuResult keeps for inspection.
NUM_SAMPLES = 3


@dataclass(frozen=True)
class AgreementResult:
    """Teacher-forced agreement of ``model`` with ``reference`` on a token stream."""

    kl_mean: float  # nats per position
    kl_max_window: float  # largest per-window mean KL
    top1_agreement: float  # in [0, 1]
    tokens: int  # positions compared
    window: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AgreementTally:
    """Running sums of per-position KL and top-1 matches over windows, for AgreementResult."""

    kl_total: float = 0.0
    agree_total: int = 0
    positions: int = 0
    kl_max_window: float = 0.0

    def add(self, kl: torch.Tensor, same: torch.Tensor) -> None:
        """One window's per-position KL (seq,) and top-1 matches (seq,)."""
        window_kl = float(kl.double().sum())
        self.kl_total += window_kl
        self.agree_total += int(same.sum())
        self.positions += kl.numel()
        self.kl_max_window = max(self.kl_max_window, window_kl / kl.numel())

    def result(self, window: int) -> AgreementResult:
        return AgreementResult(
            kl_mean=self.kl_total / self.positions,
            kl_max_window=self.kl_max_window,
            top1_agreement=self.agree_total / self.positions,
            tokens=self.positions,
            window=window,
        )


@dataclass(frozen=True)
class BleuResult:
    """Corpus BLEU of greedy continuations against references."""

    bleu: float
    num_pairs: int
    max_new_tokens: int
    samples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _window_batches(num_tokens: int, window: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Non-overlapping ``[begin, end)`` windows, batched; the shorter last window goes alone."""
    spans = [(b, min(b + window, num_tokens)) for b in range(0, num_tokens, window)]
    batches: list[list[tuple[int, int]]] = []
    for span in spans:
        last = batches[-1] if batches else None
        same_len = last is not None and last[0][1] - last[0][0] == span[1] - span[0]
        if last is not None and same_len and len(last) < batch_size:
            last.append(span)
        else:
            batches.append([span])
    return batches


def _checked_window(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    tokens: torch.Tensor,
    window: int,
    batch_size: int,
    max_windows: int | None,
) -> int:
    """Refuse bad sizes, differing vocabularies and an unusable token stream; returns
    `window` clamped to the smaller context of the two models."""
    if window < 1:
        raise UserInputError(f"window must be at least 1 token, got {window}")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise UserInputError(f"max_windows must be at least 1, got {max_windows}")
    ref_vocab, model_vocab = vocab_size(reference), vocab_size(model)
    if ref_vocab is not None and model_vocab is not None and ref_vocab != model_vocab:
        raise UserInputError(
            f"vocabulary sizes differ (reference {ref_vocab}, model {model_vocab}); "
            "agreement needs the same tokenizer"
        )
    check_token_stream(tokens, reference, min_tokens=1)
    check_token_stream(tokens, model, min_tokens=1)
    for limit in (max_positions(reference), max_positions(model)):
        if limit is not None:
            window = min(window, limit)
    return window


def _first_windows(
    batches: list[list[tuple[int, int]]], max_windows: int
) -> list[list[tuple[int, int]]]:
    """Cut the batch list so that exactly `max_windows` windows remain."""
    kept: list[list[tuple[int, int]]] = []
    remaining = max_windows
    for batch in batches:
        if remaining == 0:
            break
        kept.append(batch[:remaining])
        remaining -= len(kept[-1])
    return kept


def _window_kl(
    ref_logits: torch.Tensor, model_logits: torch.Tensor, ref_device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``KL(reference || model)`` in float32 and whether the argmaxes agree, both
    (seq,), for one window's (seq, vocab) logits (`model_logits` moved to `ref_device`)."""
    log_p_ref = torch.log_softmax(ref_logits.float(), dim=-1)  # (seq, vocab)
    log_p_model = torch.log_softmax(model_logits.to(ref_device).float(), dim=-1)  # (seq, vocab)
    p_ref = log_p_ref.exp()  # (seq, vocab)
    terms = p_ref * (log_p_ref - log_p_model)  # (seq, vocab)
    # 0 * log(0 / q) is 0 by convention; without this, -inf - -inf gives NaN.
    terms = torch.where(p_ref > 0, terms, torch.zeros_like(terms))
    kl = terms.sum(dim=-1)  # (seq,)
    same = log_p_ref.argmax(dim=-1) == log_p_model.argmax(dim=-1)  # (seq,)
    return kl, same


def agreement(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    window: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    progress: bool = False,
) -> AgreementResult:
    """KL divergence and top-1 agreement of ``model`` against ``reference`` on ``tokens``.

    The models may live on different devices and in different dtypes; logits are compared in
    float32 on the reference's device. ``window`` is clamped to the smaller
    ``max_position_embeddings`` of the two models; ``max_windows`` caps the work.
    """
    window = _checked_window(reference, model, tokens, window, batch_size, max_windows)
    ref_device, model_device_ = model_device(reference), model_device(model)
    stream = tokens.detach().to(dtype=torch.long, device="cpu")  # (num_tokens,)
    batches = _window_batches(stream.numel(), window, batch_size)
    if max_windows is not None:
        batches = _first_windows(batches, max_windows)

    tally = AgreementTally()
    with eval_mode(reference), eval_mode(model):
        for batch in track(batches, "agreement", unit="batch", enabled=progress):
            input_ids = torch.stack([stream[b:e] for b, e in batch])  # (batch, seq)
            ref_logits = reference(input_ids=input_ids.to(ref_device), use_cache=False).logits
            model_logits = model(input_ids=input_ids.to(model_device_), use_cache=False).logits
            if ref_logits.shape[-1] != model_logits.shape[-1]:
                raise UserInputError(
                    f"logit widths differ (reference {ref_logits.shape[-1]}, "
                    f"model {model_logits.shape[-1]}); agreement needs the same vocabulary"
                )
            # One row at a time keeps the float32 (seq, vocab) temporaries small for big vocabs.
            for row in range(len(batch)):
                tally.add(*_window_kl(ref_logits[row], model_logits[row], ref_device))

    return tally.result(window)


def _check_pair(prompt: object, reference: object, where: str) -> tuple[str, str]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(reference, str) or not reference.strip():
        raise DataError(f"{where}: 'reference' must be a non-empty string")
    return prompt, reference


def load_prompt_references(path: str | Path) -> list[tuple[str, str]]:
    """Read ``(prompt, reference)`` pairs from a ``.jsonl`` or ``.tsv`` file.

    JSONL: one object per line with string fields ``"prompt"`` and ``"reference"``. TSV: one
    ``prompt<TAB>reference`` per line (split at the first tab). Blank lines are skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise UserInputError(f"{path}: expected a .jsonl or .tsv file of prompt/reference pairs")
    if not path.is_file():
        raise DataError(f"prompt/reference file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with 'prompt' and 'reference'")
            missing = [k for k in ("prompt", "reference") if k not in record]
            if missing:
                raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
            pairs.append(_check_pair(record["prompt"], record["reference"], where))
        else:
            if "\t" not in line:
                raise DataError(f"{where}: expected 'prompt<TAB>reference'")
            prompt, reference = line.split("\t", 1)
            pairs.append(_check_pair(prompt, reference, where))
    if not pairs:
        raise DataError(f"{path}: no prompt/reference pairs (file is empty)")
    return pairs


def bleu(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Iterable[tuple[str, str]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    progress: bool = False,
) -> BleuResult:
    """Corpus BLEU of ``model``'s greedy continuations of each prompt against its reference."""
    pair_list: Sequence[tuple[str, str]] = list(pairs)
    if not pair_list:
        raise DataError("no prompt/reference pairs to score")
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")

    device = model_device(model)
    saved_side = tokenizer.padding_side
    saved_pad = tokenizer.pad_token
    outputs: list[str] = []
    try:
        # Left padding keeps every prompt's last token at the final position, which is where
        # generate() appends new tokens for the whole batch.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserInputError("the tokenizer has neither a pad token nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        with eval_mode(model):
            starts = range(0, len(pair_list), batch_size)
            for start in track(starts, "bleu", unit="batch", enabled=progress):
                prompts = [p for p, _ in pair_list[start : start + batch_size]]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True)
                input_ids = encoded["input_ids"].to(device)  # (batch, prompt_len)
                attention_mask = encoded["attention_mask"].to(device)  # (batch, prompt_len)
                generated = model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )  # (batch, prompt_len + new)
                new_tokens = generated[:, input_ids.shape[1] :]  # (batch, new)
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                outputs.extend(text.strip() for text in texts)
    finally:
        tokenizer.padding_side = saved_side
        tokenizer.pad_token = saved_pad

    references = [r for _, r in pair_list]
    score = sacrebleu.corpus_bleu(outputs, [references]).score
    samples = [
        {"prompt": p, "reference": r, "output": o}
        for (p, r), o in zip(pair_list[:NUM_SAMPLES], outputs[:NUM_SAMPLES], strict=True)
    ]
    return BleuResult(
        bleu=float(score),
        num_pairs=len(pair_list),
        max_new_tokens=max_new_tokens,
        samples=samples,
    )
