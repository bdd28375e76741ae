"""Tests for swiss_knife.evaluation metrics: perplexity, speed, memory, size, agreement, BLEU.

Tiny random Llama models are built from a config (no downloads). The stories260K checks use
the offline assets in ../shared/assets and are skipped when those are absent. No test asserts a
wall-clock value.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from swiss_knife.errors import DataError, MissingDependencyError, UserInputError
from swiss_knife.evaluation.generation import (
    AgreementResult,
    BleuResult,
    agreement,
    bleu,
    load_prompt_references,
)
from swiss_knife.evaluation.harness import harness_available, run_harness
from swiss_knife.evaluation.memory import PeakMemory, measure_memory, parameter_bytes
from swiss_knife.evaluation.perplexity import PerplexityResult, perplexity, sliding_windows
from swiss_knife.evaluation.size import model_size, weight_files
from swiss_knife.evaluation.speed import SpeedResult, measure_speed

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
STORIES_MODEL = ASSETS / "stories260K-hf"
STORIES_TEXT = ASSETS / "corpora" / "tinystories-valid-head" / "tinystories_val.txt"

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    settings: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def token_stream(n: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- perplexity


def test_sliding_windows_follow_the_guide() -> None:
    assert sliding_windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert sliding_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(3, 8, 8) == [(0, 3, 3)]


def naive_nll(model: LlamaForCausalLM, tokens: torch.Tensor, window: int, stride: int) -> float:
    """Reference straight from the guide's definition, one forward pass per scored token.

    For each window, labels outside the last target_len positions are masked (-100); the model's
    internal shift means a label at window position i is predicted from positions < i, so
    position 0 is never scored.
    """
    total, count = 0.0, 0
    n = tokens.numel()
    prev_end = 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + window, n)
            target_len = end - prev_end
            ids = tokens[begin:end]
            labels = ids.clone()
            labels[:-target_len] = -100
            for i in range(1, ids.numel()):
                if labels[i] == -100:
                    continue
                logits = model(input_ids=ids[:i].unsqueeze(0)).logits[0, -1]
                total -= torch.log_softmax(logits.double(), dim=-1)[ids[i]].item()
                count += 1
            prev_end = end
            if end == n:
                break
    return total / count


@pytest.mark.parametrize("stride", [16, 6])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_naive_reference(stride: int, batch_size: int) -> None:
    model = tiny_llama()
    tokens = token_stream(53)
    result = perplexity(model, tokens, window=16, stride=stride, batch_size=batch_size)
    expected = naive_nll(model, tokens, 16, stride)
    assert isinstance(result, PerplexityResult)
    assert result.mean_nll == pytest.approx(expected, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-4)
    assert result.bits_per_token == pytest.approx(result.mean_nll / math.log(2))
    assert result.num_windows == len(sliding_windows(53, 16, stride))
    if stride == 16:
        # Non-overlapping: every window loses its first token (no context). 53 = 16+16+16+5.
        assert result.tokens_scored == 15 * 3 + 4
    else:
        # Overlapping: every token but the very first is scored exactly once.
        assert result.tokens_scored == 52
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_perplexity_default_stride_and_clamping(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama(max_position_embeddings=8)
    tokens = token_stream(30)
    with caplog.at_level(logging.WARNING, logger="swiss_knife.evaluation.perplexity"):
        result = perplexity(model, tokens, window=64)
    assert "max_position_embeddings" in caplog.text
    assert (result.window, result.stride) == (8, 8)
    assert result.mean_nll == pytest.approx(naive_nll(model, tokens, 8, 8), rel=1e-4)


@pytest.mark.parametrize(
    ("tokens", "kwargs", "error"),
    [
        (token_stream(10), {"window": 1}, UserInputError),
        (token_stream(10), {"window": 4, "stride": 0}, UserInputError),
        (token_stream(10), {"window": 4, "stride": 5}, UserInputError),
        (token_stream(10), {"batch_size": 0}, UserInputError),
        (token_stream(1), {}, DataError),
        (token_stream(10).view(2, 5), {}, DataError),
        (torch.rand(10), {}, DataError),
        (torch.tensor([1, 2, VOCAB]), {}, DataError),
    ],
)
def test_perplexity_rejects_bad_input(
    tokens: torch.Tensor, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        perplexity(tiny_llama(), tokens, **kwargs)


@pytest.mark.integration
@pytest.mark.skipif(
    not (STORIES_MODEL.is_dir() and STORIES_TEXT.is_file()), reason="stories260K assets absent"
)
def test_stories260k_perplexity_matches_reference() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES_MODEL)
    model = AutoModelForCausalLM.from_pretrained(STORIES_MODEL)
    text = STORIES_TEXT.read_text(encoding="utf-8")
    chunks = [c.strip() for c in re.split(r"\n\s*\n", text) if c.strip()]
    # The tokenizer adds BOS to each chunk, so every chunk starts a fresh document.
    ids = tokenizer(chunks)["input_ids"]
    assert all(seq[0] == tokenizer.bos_token_id for seq in ids)
    stream = torch.tensor([t for seq in ids for t in seq])
    result = perplexity(model, stream, window=512, batch_size=8)
    # Reference measurement (assets README): 5.354.
    assert 5.2 < result.perplexity < 5.5


# --------------------------------------------------------------------------- speed


def test_measure_speed_structure() -> None:
    model = tiny_llama()
    result = measure_speed(
        model, batch_sizes=(1, 2), prompt_len=8, new_tokens=4, warmup=1, repeats=2
    )
    assert isinstance(result, SpeedResult)
    assert result.device == "cpu"
    assert result.dtype == "float32"
    assert result.threads == torch.get_num_threads()
    assert (result.warmup, result.repeats) == (1, 2)
    assert [b.batch_size for b in result.batches] == [1, 2]
    for b in result.batches:
        assert (b.prompt_len, b.new_tokens) == (8, 4)
        for timing in (b.prefill, b.decode_per_token):
            assert timing.repeats == 2
            assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms
        assert b.prefill_tokens_per_s > 0
        assert b.decode_tokens_per_s > 0
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_sizes": ()},
        {"batch_sizes": (0,)},
        {"prompt_len": 0},
        {"new_tokens": 0},
        {"repeats": 0},
        {"warmup": -1},
        {"repeats": True},
        {"prompt_len": 250, "new_tokens": 10},  # max_position_embeddings is 256
    ],
)
def test_measure_speed_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UserInputError):
        measure_speed(tiny_llama(), **kwargs)


# --------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_200mb_allocation() -> None:
    with PeakMemory("cpu") as pm:
        block = torch.ones(50 * 1024 * 1024, dtype=torch.float32)  # 200 MiB, pages touched
    assert pm.method == "rss_sampled"
    assert pm.peak_bytes - pm.baseline_bytes >= 150 * 1024 * 1024
    del block


def test_parameter_bytes_counts_tied_weights_once() -> None:
    tied = tiny_llama(tie_word_embeddings=True)
    untied = tiny_llama(tie_word_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    embedding = VOCAB * 32 * 4
    tied_params, tied_buffers = parameter_bytes(tied)
    untied_params, _ = parameter_bytes(untied)
    assert untied_params - tied_params == embedding
    assert tied_params == 4 * sum(p.numel() for p in tied.parameters())
    assert tied_buffers == sum(b.numel() * b.element_size() for b in tied.buffers())


def test_measure_memory_wraps_a_call() -> None:
    model = tiny_llama()
    value, mem = measure_memory(model, lambda: 42)
    assert value == 42
    assert mem.device == "cpu" and mem.method == "rss_sampled"
    assert mem.peak_bytes >= mem.baseline_bytes > 0
    assert (mem.parameter_bytes, mem.buffer_bytes) == parameter_bytes(model)
    assert json.loads(json.dumps(mem.to_dict())) == mem.to_dict()


# --------------------------------------------------------------------------- size


def test_model_size_on_saved_model(tmp_path: Path) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    unique = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    zeroed = model.model.layers[0].mlp.down_proj.weight.numel()

    result = model_size(model, tmp_path)
    assert result.num_params == unique
    assert result.nonzero_params == unique - zeroed
    assert result.sparsity == pytest.approx(zeroed / unique)
    assert result.weight_files == ["model.safetensors"]
    assert result.disk_bytes == (tmp_path / "model.safetensors").stat().st_size
    assert result.bits_per_weight is not None
    # fp32 weights plus a small safetensors header.
    assert 32.0 <= result.bits_per_weight < 33.0
    assert result.in_memory_bytes == sum(parameter_bytes(model))
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()

    no_path = model_size(model)
    assert no_path.disk_bytes is None and no_path.bits_per_weight is None
    assert no_path.weight_files == []


def test_weight_files(tmp_path: Path) -> None:
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    names = [p.name for p in weight_files(tmp_path)]
    # safetensors wins; counting the .bin too would double the size.
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert weight_files(gguf) == [gguf]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weight_files(empty) == []
    with pytest.raises(UserInputError):
        weight_files(tmp_path / "missing")
    with pytest.raises(UserInputError):
        model_size(tiny_llama(), empty)


# --------------------------------------------------------------------------- agreement


def test_agreement_of_a_model_with_itself() -> None:
    model = tiny_llama()
    result = agreement(model, model, token_stream(70), window=16, batch_size=2)
    assert isinstance(result, AgreementResult)
    assert result.tokens == 70
    assert result.window == 16
    assert abs(result.kl_mean) < 1e-6
    assert abs(result.kl_max_window) < 1e-6
    assert result.top1_agreement == 1.0
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_agreement_detects_a_perturbed_copy() -> None:
    reference = tiny_llama()
    perturbed = tiny_llama()
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = agreement(reference, perturbed, token_stream(70), window=16, max_windows=3)
    assert result.tokens == 48
    assert result.kl_mean > 1e-4
    assert result.kl_max_window >= result.kl_mean
    assert 0.0 <= result.top1_agreement <= 1.0


def test_agreement_handles_different_dtypes() -> None:
    reference = tiny_llama()
    half = tiny_llama().bfloat16()
    result = agreement(reference, half, token_stream(40), window=16)
    assert 0.0 <= result.kl_mean < 0.05
    assert result.tokens == 40


def test_agreement_rejects_different_vocabularies() -> None:
    with pytest.raises(UserInputError):
        agreement(tiny_llama(), tiny_llama(vocab_size=VOCAB * 2), token_stream(20), window=8)


# --------------------------------------------------------------------------- BLEU

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0..w123 plus specials, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def test_load_prompt_references(tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "a b", "reference": "c d"})
        + "\n\n"
        + json.dumps({"prompt": "e", "reference": "f", "extra": 1})
        + "\n"
    )
    assert load_prompt_references(jsonl) == [("a b", "c d"), ("e", "f")]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a b\tc d\ne\tf\tg\n")
    assert load_prompt_references(tsv) == [("a b", "c d"), ("e", "f\tg")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "a", "reference": "b"}\n{not json\n', r"bad\.jsonl:2"),
        ("missing.jsonl", '{"prompt": "a"}\n', r"missing\.jsonl:1.*reference"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl:1"),
        ("empty.jsonl", "\n\n", "empty"),
        ("notab.tsv", "a\tb\nno tab here\n", r"notab\.tsv:2"),
        ("blankref.tsv", "a\t \n", r"blankref\.tsv:1.*reference"),
    ],
)
def test_load_prompt_references_errors(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_prompt_references(path)


def test_load_prompt_references_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UserInputError):
        load_prompt_references(tmp_path / "pairs.csv")
    with pytest.raises(DataError):
        load_prompt_references(tmp_path / "absent.jsonl")


def test_bleu_against_own_greedy_outputs_is_100() -> None:
    model = tiny_llama()
    # Never stop early, so every continuation has max_new_tokens words.
    model.generation_config.eos_token_id = None
    tokenizer = word_tokenizer()
    assert tokenizer.pad_token is None
    prompts = ["w1 w2 w3", "w10", "w5 w6", "w7 w8 w9 w11 w12"]
    first = bleu(model, tokenizer, [(p, "w0") for p in prompts], max_new_tokens=6, batch_size=4)
    # Settings changed for batching are restored.
    assert tokenizer.pad_token is None
    assert tokenizer.padding_side == "right"
    assert isinstance(first, BleuResult)
    assert first.num_pairs == 4 and len(first.samples) == 3
    outputs = [s["output"] for s in first.samples]
    assert all(len(o.split()) == 6 for o in outputs)

    # Batch size 1 (no padding) makes the same greedy choices as left-padded batches.
    pairs = list(zip(prompts[:3], outputs, strict=True))
    again = bleu(model, tokenizer, pairs, max_new_tokens=6, batch_size=1)
    assert again.bleu == pytest.approx(100.0)
    assert [s["output"] for s in again.samples] == outputs
    assert json.loads(json.dumps(again.to_dict())) == again.to_dict()


@pytest.mark.integration
@pytest.mark.skipif(not STORIES_MODEL.is_dir(), reason="stories260K assets absent")
def test_bleu_with_stories260k_tokenizer() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(STORIES_MODEL)
    model = AutoModelForCausalLM.from_pretrained(STORIES_MODEL)
    prompts = ["Once upon a time", "The little dog", "Lily wanted to"]
    first = bleu(model, tokenizer, [(p, "x") for p in prompts], max_new_tokens=16, batch_size=3)
    pairs = [(s["prompt"], s["output"]) for s in first.samples]
    assert all(len(o.split()) >= 4 for _, o in pairs)
    again = bleu(model, tokenizer, pairs, max_new_tokens=16, batch_size=2)
    assert again.bleu == pytest.approx(100.0)


# --------------------------------------------------------------------------- harness


def test_run_harness_reports_missing_dependency() -> None:
    if harness_available():
        pytest.skip("lm_eval is installed")
    with pytest.raises(MissingDependencyError, match=r"swiss-knife\[lm-eval\]"):
        run_harness(tiny_llama(), word_tokenizer(), ["hellaswag"], limit=2)


def test_run_harness_missing_dependency_even_if_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes `import lm_eval` fail, whether or not it is installed.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert harness_available() is False
    with pytest.raises(MissingDependencyError):
        run_harness(tiny_llama(), word_tokenizer(), ["hellaswag"])


def test_run_harness_validates_tasks() -> None:
    with pytest.raises(UserInputError):
        run_harness(tiny_llama(), word_tokenizer(), [])
