"""The Python API reads like the command line and cannot save the wrong thing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import swiss_knife as sk
from conftest import make_char_tokenizer, make_tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny"
    make_tiny_llama(seed=0).save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(
        "\n\n".join(f"Story {i}: a fox jumps over {i % 7} lazy dogs." for i in range(80)),
        encoding="utf-8",
    )
    return path


IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def plain_logits(directory: Path) -> torch.Tensor:
    """Logits of the checkpoint in a fresh process that imports transformers only."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(directory)!r}).eval()\n"
        "assert 'swiss_knife' not in sys.modules\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids).logits, {str(directory / 'plain.pt')!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(directory / "plain.pt")
    (directory / "plain.pt").unlink()
    return out


def test_the_readme_example(model_dir: Path, text: Path, tmp_path: Path) -> None:
    model = sk.load(str(model_dir))
    result = sk.quantize(
        model,
        sk.GPTQConfig(bits=4, group_size=16, calibration={"num_samples": 4, "seq_len": 32}),
        calibration=str(text),
    )
    assert result.format.startswith("compressed-tensors")
    expected = logits(model.model)
    out = sk.save(model, tmp_path / "out")
    assert (out / "swiss_knife.json").is_file() and (out / "README.md").is_file()
    reloaded = sk.load(str(out))
    assert torch.allclose(logits(reloaded.model), expected, atol=1e-4)
    assert torch.allclose(plain_logits(out), expected, atol=1e-4)


def test_save_pretrained_writes_the_compressed_format_too(model_dir: Path, tmp_path: Path) -> None:
    model = sk.load(str(model_dir))
    sk.quantize(model, sk.RTNConfig(bits=4, group_size=16))
    expected = logits(model.model)
    model.model.save_pretrained(tmp_path / "plain-save")
    config = (tmp_path / "plain-save" / "config.json").read_text(encoding="utf-8")
    assert "compressed-tensors" in config  # integers and scales, not fake-quantized floats
    assert torch.allclose(plain_logits(tmp_path / "plain-save"), expected, atol=1e-4)


def test_verbs_refuse_another_verbs_config(model_dir: Path) -> None:
    model = sk.load(str(model_dir))
    with pytest.raises(sk.UserInputError, match="configures prune, not quantize"):
        sk.quantize(model, sk.WandaPruneConfig())


def test_prune_then_quantize_records_both(model_dir: Path, text: Path, tmp_path: Path) -> None:
    model = sk.load(str(model_dir))
    cal = {"num_samples": 4, "seq_len": 32}
    sk.prune(model, sk.WandaPruneConfig(sparsity=0.5, calibration=cal), calibration=text)
    result = sk.quantize(model, sk.RTNConfig(bits=8, group_size=16))
    assert len(result.history) == 2
    out = sk.save(model, tmp_path / "out")
    manifest = (out / "swiss_knife.json").read_text(encoding="utf-8")
    assert '"prune"' in manifest and '"quantize"' in manifest


def test_a_bare_module_and_an_uncompressed_model_save_as_ordinary_checkpoints(
    model_dir: Path, tmp_path: Path
) -> None:
    network = make_tiny_llama(seed=0)
    out = sk.save(network, tmp_path / "dense", tokenizer=make_char_tokenizer())
    assert torch.allclose(plain_logits(out), logits(network), atol=1e-5)


def test_every_method_config_is_exported() -> None:
    from swiss_knife import registry

    for kind in ("quantize", "prune"):
        for cls in registry.config_classes(kind):
            assert getattr(sk, cls.__name__) is cls
