"""Shared fixtures: the offline assets, a character-level tokenizer, and a tiny random Llama.

Nothing here downloads anything. The real tiny model under ../shared/assets is optional: tests
that need it use `stories_dir` (or the `requires_assets` marker) and are skipped when it is absent.
"""

from __future__ import annotations

import importlib.util
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

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
