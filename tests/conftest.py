"""Shared fixtures: the offline assets, a character-level tokenizer, and a tiny random Llama.

Nothing here downloads anything. The real tiny model under ../shared/assets is optional: tests
that need it use `stories_dir` (or the `requires_assets` marker) and are skipped when it is absent.
"""

from __future__ import annotations

import importlib.util
import os
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
STORIES = ASSETS / "stories260K-hf"

requires_ct = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None,
    reason="compressed-tensors is not installed",
)

requires_assets = pytest.mark.skipif(
    not (STORIES / "config.json").is_file(),
    reason=f"offline assets not found at {ASSETS}",
)

TINY_VOCAB = 128
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Every printable ASCII character except the other whitespace, plus newline.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]


def make_char_tokenizer() -> Any:
    """A character-level fast tokenizer with <s> as BOS, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARS))}
    assert len(vocab) <= TINY_VOCAB
    # BPE without merges splits every word into single characters; no pre-tokenizer keeps spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def make_tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A seeded, randomly initialised two-layer Llama (GQA: 4 query heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def save_tiny_llama(directory: Path, **overrides: Any) -> Path:
    """Save `make_tiny_llama(seed=0, **overrides)` with the character tokenizer; the folder."""
    make_tiny_llama(seed=0, **overrides).save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module of tiny-tensor tests: on a shared 2-core machine intra-op
    threads only add hand-off cost (a 64x64 linear takes ~10 ms with 2 threads, microseconds
    with 1). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The shared offline assets folder (it may not exist; use `stories_dir` to require it)."""
    return ASSETS


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real tiny stories260K checkpoint; skips the test when the assets are absent."""
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"offline assets not found at {ASSETS}")
    return STORIES


@pytest.fixture
def tiny_tokenizer() -> Any:
    return make_char_tokenizer()


@pytest.fixture
def tiny_llama() -> Any:
    """A fresh tiny random Llama, seeded: the same weights `tiny_llama_dir` holds."""
    return make_tiny_llama(seed=0)


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, tiny_tokenizer: Any) -> Path:
    """A saved tiny random Llama (fp32 safetensors) with its tokenizer, in a fresh folder."""
    directory = tmp_path / "tiny-llama"
    make_tiny_llama(seed=0).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- shared by test modules
# Import these with `from conftest import ...`: test modules never import each other.

VOCAB = 128

# Llama-style tiny config: GQA (4 query heads, 2 kv heads), explicit head_dim.
_LLAMA_LIKE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# One tiny config per supported model_type. head_dim * heads != hidden where the architecture
# allows it (Gemma, Qwen3), so attention_geometry must read head_dim rather than derive it.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": 8},
    "ministral": {**_LLAMA_LIKE, "sliding_window": 8},
    "qwen2": {
        **_LLAMA_LIKE,
        "use_sliding_window": True,
        "sliding_window": 8,
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "qwen3": {**_LLAMA_LIKE, "head_dim": 24},
    "granite": _LLAMA_LIKE,
    "smollm3": {**_LLAMA_LIKE, "no_rope_layer_interval": 2},
    "gemma": {**_LLAMA_LIKE, "head_dim": 24},
    "gemma2": {**_LLAMA_LIKE, "head_dim": 24, "sliding_window": 8, "query_pre_attn_scalar": 24},
    "gemma3_text": {
        **_LLAMA_LIKE,
        "head_dim": 24,
        "sliding_window": 8,
        "query_pre_attn_scalar": 24,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
    "gpt2": {
        "vocab_size": VOCAB,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "opt": {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "word_embed_proj_dim": 64,
        "ffn_dim": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt_neox": {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def build(model_type: str, **overrides: Any) -> Any:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def sk(
    *args: Any, cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run the real command line, offline, and capture its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "swiss_knife.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *, quiet: bool = True) -> str:
    """Exit code 2, no traceback, and exactly one `error:` line (the whole stderr when quiet)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    if quiet:
        assert lines == errors, result.stderr
    return errors[0]


def corpus(sentences: int = 400) -> str:
    animals = ["cat", "dog", "fox", "owl", "bee"]
    return " ".join(
        f"the {animals[i % 5]} saw {i % 7} {animals[(i * 3) % 5]}s and ran home."
        for i in range(sentences)
    )


# Small enough for a two-layer random model with a 128-token context.
SMALL_EVALUATION: dict[str, Any] = {
    "perplexity": {"window": 32, "max_windows": 2},
    "speed": {"batch_sizes": [1], "prompt_len": 8, "new_tokens": 4, "repeats": 1, "warmup": 0},
    "agreement": {"window": 32, "max_windows": 2},
}


@pytest.fixture
def eval_text(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    paragraphs = [
        f"Story {i}: the quick brown fox jumps over {i % 7} lazy dogs, and the cat sat on a mat."
        for i in range(40)
    ]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def factorisations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the inverse-Hessian factorisations GPTQ and SparseGPT run during the test,
    in order."""
    from swiss_knife.compression.pruning import sparsegpt
    from swiss_knife.compression.quantization import gptq

    calls: list[int] = []
    factorise = gptq.inverse_cholesky_upper

    def counting(H: Any, damp: float, *, label: str) -> Any:
        calls.append(H.shape[0])
        return factorise(H, damp, label=label)

    monkeypatch.setattr(gptq, "inverse_cholesky_upper", counting)
    monkeypatch.setattr(sparsegpt, "inverse_cholesky_upper", counting)
    return calls
