"""What llama.cpp needs to know about a Llama-family model: its GGUF architecture, the
hyper-parameters under their GGUF keys, the tensor names, and the Q/K row order.

Covered (``model_type`` in ``config.json`` -> GGUF architecture): ``llama`` (also SmolLM and
SmolLM2, which are Llama models) and ``mistral`` -> ``llama``; ``qwen2`` -> ``qwen2`` (with its
q/k/v biases); ``qwen3`` -> ``qwen3`` (with its per-head q/k RMSNorms). These are the classes
llama.cpp's ``convert_hf_to_gguf.py`` maps the same way (``LlamaModel`` serves Mistral too).

The Q/K row order: Hugging Face Llama checkpoints apply RoPE in the "rotate half" form (the
first and second half of each head's dimensions form the rotated pairs), while llama.cpp's
``llama`` architecture rotates adjacent pairs ``(2i, 2i + 1)``. ``convert_hf_to_gguf.py``
therefore permutes the rows of ``q_proj`` (per query head) and ``k_proj`` (per key/value head):
within a head of ``hd`` rows, new row ``2i`` is old row ``i`` and new row ``2i + 1`` is old row
``hd / 2 + i`` (its ``LlamaModel.permute``: reshape ``(heads, 2, hd / 2, cols)``, swap axes 1 and
2). transformers' GGUF loader undoes exactly this (``LlamaTensorProcessor``). Qwen2/Qwen3 files
keep the Hugging Face order: llama.cpp runs them with the "neox" RoPE layout. A permutation only
reorders whole rows, so grouped integer weights (whose groups run along a row) move with their
scales and stay exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType, get_tensor_name_map
from numpy.typing import NDArray

from swiss_knife.export.errors import ArchitectureNotExportableError, GGUFExportError


@dataclass(frozen=True)
class ExportArch:
    """How one Hugging Face ``model_type`` is written: GGUF architecture and Q/K row order."""

    model_type: str
    gguf_arch: MODEL_ARCH
    permute_qk: bool

    @property
    def gguf_name(self) -> str:
        return MODEL_ARCH_NAMES[self.gguf_arch]


ARCHS: dict[str, ExportArch] = {
    "llama": ExportArch("llama", MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ExportArch("mistral", MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ExportArch("qwen2", MODEL_ARCH.QWEN2, permute_qk=False),
    "qwen3": ExportArch("qwen3", MODEL_ARCH.QWEN3, permute_qk=False),
}
SUPPORTED_TEXT = "llama (incl. SmolLM/SmolLM2), mistral, qwen2, qwen3"


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters llama.cpp reads, from ``config.json``."""

    n_layers: int
    hidden: int
    ff: int
    n_head: int
    n_kv: int
    head_dim: int
    head_dim_explicit: bool
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]
    tied: bool | None  # None: config.json does not say (then the checkpoint decides)


def resolve_arch(config: dict[str, Any]) -> ExportArch:
    """The export entry for this config, or a one-line refusal naming what is supported."""
    model_type = config.get("model_type")
    arch = ARCHS.get(str(model_type))
    if arch is None:
        raise ArchitectureNotExportableError(
            f"cannot export model_type {model_type!r} to GGUF; supported: {SUPPORTED_TEXT}"
        )
    return arch


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFExportError(f"config.json has no positive integer {key!r} (got {value!r})")
    return value


def read_hparams(config: dict[str, Any]) -> HParams:
    """Read (and sanity-check) the hyper-parameters of a supported config."""
    n_head = _int(config, "num_attention_heads")
    kv = config.get("num_key_value_heads")
    n_kv = n_head if kv is None else _int(config, "num_key_value_heads")
    hidden = _int(config, "hidden_size")
    explicit = config.get("head_dim") is not None
    head_dim = _int(config, "head_dim") if explicit else hidden // n_head
    if n_head % n_kv:
        raise GGUFExportError(f"{n_head} attention heads are not a multiple of {n_kv} kv heads")
    if head_dim % 2:
        raise GGUFExportError(f"head_dim {head_dim} is odd; RoPE needs an even head size")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    tie = config.get("tie_word_embeddings")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return HParams(
        n_layers=_int(config, "num_hidden_layers"),
        hidden=hidden,
        ff=_int(config, "intermediate_size"),
        n_head=n_head,
        n_kv=n_kv,
        head_dim=head_dim,
        head_dim_explicit=explicit,
        vocab=_int(config, "vocab_size"),
        context=_int(config, "max_position_embeddings"),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope=rope,
        tied=None if tie is None else bool(tie),
    )


def rope_type(hp: HParams) -> str:
    """The RoPE scaling kind (``default`` when none), refusing what GGUF cannot express."""
    kind = str(hp.rope.get("rope_type", hp.rope.get("type", "default")) or "default").lower()
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise ArchitectureNotExportableError(
            f"RoPE scaling {kind!r} has no GGUF form here; supported: default, linear, yarn, llama3"
        )
    return kind


def write_hparams(writer: GGUFWriter, hp: HParams, original_context: int | None) -> None:
    """The ``{arch}.*`` keys llama.cpp reads for this family."""
    writer.add_block_count(hp.n_layers)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_feed_forward_length(hp.ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim_explicit or hp.head_dim * hp.n_head != hp.hidden:
        # llama.cpp assumes hidden / heads otherwise (wrong after head pruning, and for Qwen3).
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    kind = rope_type(hp)
    factor = hp.rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        orig = hp.rope.get("original_max_position_embeddings", original_context)
        if orig is None:
            raise GGUFExportError("yarn RoPE scaling without original_max_position_embeddings")
        writer.add_rope_scaling_orig_ctx_len(int(orig))
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if hp.rope.get(key) is not None:
                add(float(hp.rope[key]))


def llama3_rope_factors(hp: HParams) -> NDArray[np.float32]:
    """Per-frequency divisors of Llama 3.1-style RoPE (``rope_type: llama3``), ``(head_dim/2,)``.

    llama.cpp reads them as the ``rope_freqs.weight`` tensor. Frequencies whose wavelength is
    shorter than ``original_context / high_freq_factor`` keep 1, longer than
    ``original_context / low_freq_factor`` get ``factor``, and the band between blends the two.
    """
    factor = float(hp.rope.get("factor", 8.0))
    low = float(hp.rope.get("low_freq_factor", 1.0))
    high = float(hp.rope.get("high_freq_factor", 4.0))
    original = float(hp.rope.get("original_max_position_embeddings", 8192))
    exponents = np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim
    wavelengths = 2 * math.pi * hp.rope_theta**exponents  # (head_dim / 2,)
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelengths > original / low, factor, blended)
    out = np.where(wavelengths < original / high, 1.0, out)
    return out.astype(np.float32)


def qk_row_order(rows: int, heads: int) -> NDArray[np.int64]:
    """Source row of each output row for llama.cpp's Q/K layout (see the module docstring)."""
    if rows % (2 * heads):
        raise GGUFExportError(f"{rows} rows cannot be split into {heads} heads of even size")
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


class TensorNames:
    """Hugging Face tensor names -> GGUF names, for one architecture and block count."""

    def __init__(self, arch: ExportArch, n_layers: int) -> None:
        self._map = get_tensor_name_map(arch.gguf_arch, n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """``blk.N.attn_q.weight`` for ``model.layers.N.self_attn.q_proj.weight``; None when the
        architecture has no such tensor."""
        mapped = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        return None if mapped is None else str(mapped)


def expected_shape(gguf_name: str, hp: HParams) -> tuple[int, ...] | None:
    """The torch shape llama.cpp expects for a tensor of this family, None if not checked."""
    kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    suffix = gguf_name.rsplit(".", 1)[-1]
    q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_kv * hp.head_dim
    weights: dict[str, tuple[int, ...]] = {
        "token_embd": (hp.vocab, hp.hidden),
        "output": (hp.vocab, hp.hidden),
        "output_norm": (hp.hidden,),
        "attn_norm": (hp.hidden,),
        "ffn_norm": (hp.hidden,),
        "attn_q": (q_rows, hp.hidden),
        "attn_k": (kv_rows, hp.hidden),
        "attn_v": (kv_rows, hp.hidden),
        "attn_output": (hp.hidden, q_rows),
        "ffn_gate": (hp.ff, hp.hidden),
        "ffn_up": (hp.ff, hp.hidden),
        "ffn_down": (hp.hidden, hp.ff),
        "attn_q_norm": (hp.head_dim,),
        "attn_k_norm": (hp.head_dim,),
    }
    biases = {"attn_q": (q_rows,), "attn_k": (kv_rows,), "attn_v": (kv_rows,)}
    table = weights if suffix == "weight" else biases
    return table.get(kind)


REQUIRED_PER_BLOCK = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)


def check_complete(names: set[str], hp: HParams, arch: ExportArch) -> None:
    """Refuse a checkpoint that lacks a tensor llama.cpp will ask for."""
    required = {"token_embd.weight", "output_norm.weight"}
    required.update(f"blk.{i}.{part}" for i in range(hp.n_layers) for part in REQUIRED_PER_BLOCK)
    if arch.gguf_arch == MODEL_ARCH.QWEN3:
        required.update(
            f"blk.{i}.attn_{p}_norm.weight" for i in range(hp.n_layers) for p in ("q", "k")
        )
    if not hp.tied:
        required.add("output.weight")
    missing = sorted(required - names)
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise GGUFExportError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config.json implies ({shown})"
        )


__all__ = [
    "ARCHS",
    "SUPPORTED_TEXT",
    "ExportArch",
    "HParams",
    "TensorNames",
    "check_complete",
    "expected_shape",
    "llama3_rope_factors",
    "qk_row_order",
    "read_hparams",
    "resolve_arch",
    "rope_type",
    "write_hparams",
]
