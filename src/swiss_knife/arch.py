"""Where each supported decoder-only architecture keeps its parts.

Every compression method needs to find the same few things inside a Hugging Face causal LM: the
list of transformer blocks, the linears inside a block and the order they run in, the norms that
feed them, the embeddings and head, and the config attributes that describe the shapes. Module
names differ between families (``self_attn.q_proj`` vs ``attn.c_attn`` vs
``attention.query_key_value``), so instead of each method guessing, this module keeps ONE table of
`ArchSpec` entries and small helpers that read it:

- the calibration engine (GPTQ/AWQ) walks `get_blocks` and quantizes `block_linears` in order;
- AWQ folds scales into `attn_norm` / `mlp_norm` (mind `norm_weight_offset`) or the previous linear;
- structured pruning uses `attention_geometry`, `qkv_layout`, `fused_gate_up` and `config_head_dim`
  to cut whole heads (respecting grouped-query attention) and MLP channels;
- layer reduction uses `drop_blocks`, which also rewrites the config so the model saves and reloads.

Every path was checked against the modeling files of transformers 5.24; a model type is listed only
where its module layout AND the meaning of each norm (which linears it feeds) match the entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from swiss_knife.errors import UnsupportedArchitectureError, UserInputError

LinearKind = Literal["linear", "conv1d"]
QkvLayout = Literal["separate", "blocked", "per_head"]


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture family keeps its modules and config values.

    Paths are dotted attribute paths: ``blocks``, ``embeddings``, ``final_norm`` and ``lm_head`` are
    relative to the top-level ``*ForCausalLM`` model; every other module path is relative to one
    block. Config fields hold the *attribute name* on the model config, not a value.
    """

    name: str
    model_types: tuple[str, ...]

    # Top-level modules.
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str

    # Attention, relative to a block. Either q/k/v are separate or `qkv_proj` is one fused linear.
    attn: str
    q_proj: str | None
    k_proj: str | None
    v_proj: str | None
    qkv_proj: str | None
    o_proj: str
    # How a fused qkv output is laid out: "blocked" = [all q | all k | all v] (sizes follow the
    # head counts, so GQA gives smaller k/v blocks); "per_head" = for each head [q | k | v]
    # (GPT-NeoX views the output as (..., heads, 3 * head_dim)). "separate" when not fused.
    qkv_layout: QkvLayout

    # MLP, relative to a block, in execution order.
    mlp_up: tuple[str, ...]
    mlp_down: str
    mlp_act: str
    # gate * act(...) style MLP (SwiGLU/GeGLU): the channel of gate and up must be pruned together.
    mlp_gated: bool
    # One linear holds [gate | up] (Phi-3 `gate_up_proj`, split with chunk(2) on the last dim).
    fused_gate_up: bool

    # Norms whose output is the input of the attention / MLP linears (AWQ folds scales into them).
    attn_norm: str
    mlp_norm: str | None
    norm_kind: Literal["rmsnorm", "layernorm"]
    # Gemma's RMSNorm multiplies by (1 + weight): folding a scale s needs w' = (1 + w) / s - 1.
    norm_weight_offset: float

    # Config attribute names.
    config_num_layers: str
    config_num_heads: str
    config_num_kv_heads: str | None
    config_hidden: str
    config_intermediate: str | None
    # Attribute that pins head_dim independently of hidden / heads. None means the modeling code
    # always derives head_dim = hidden // heads, so removing heads cannot be expressed in the config.
    config_head_dim: str | None
    # When `config_intermediate` is absent or None the MLP width is this multiple of hidden (GPT-2).
    intermediate_multiple: int | None
    # Config attributes that hold one entry per layer and must be sliced when layers are dropped.
    per_layer_config_lists: tuple[str, ...]
    # Boolean config attributes that, when true, make a block's math depend on its index; dropping
    # a block before such a block would silently change it after save and reload.
    index_dependent_flags: tuple[str, ...]

    linear_kind: LinearKind
    # Attention and MLP read the same block input (GPT-J/NeoX style) instead of running in sequence.
    parallel_residual: bool
    # Config attribute that overrides `parallel_residual` per checkpoint, if any.
    parallel_residual_attr: str | None
    # Config attribute that, when False, moves the norms after the residual add (OPT-350m); then
    # `attn_norm` / `mlp_norm` do not feed the linears and must not receive folded scales.
    pre_norm_attr: str | None


# Pre-norm decoder with separate q/k/v and a SwiGLU MLP. Qwen3 adds per-head q_norm/k_norm
# (shared over heads, so head pruning and block walking are unaffected); Granite adds scalar
# multipliers and Mistral/Ministral/Qwen/SmolLM3 sliding windows, none of which move modules.
# Helium is left out: its o_proj is declared (hidden, hidden), not (heads * head_dim, hidden).
_LLAMA = ArchSpec(
    name="llama",
    model_types=("granite", "llama", "ministral", "mistral", "qwen2", "qwen3", "smollm3"),
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    qkv_proj=None,
    o_proj="self_attn.o_proj",
    qkv_layout="separate",
    mlp_up=("mlp.gate_proj", "mlp.up_proj"),
    mlp_down="mlp.down_proj",
    mlp_act="mlp.act_fn",
    mlp_gated=True,
    fused_gate_up=False,
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    norm_kind="rmsnorm",
    norm_weight_offset=0.0,
    config_num_layers="num_hidden_layers",
    config_num_heads="num_attention_heads",
    config_num_kv_heads="num_key_value_heads",
    config_hidden="hidden_size",
    config_intermediate="intermediate_size",
    config_head_dim="head_dim",
    intermediate_multiple=None,
    # Only the attributes a given config actually has are sliced: Llama has none, Qwen2/3,
    # Ministral and Gemma2/3 have `layer_types`, SmolLM3 also has `no_rope_layers`.
    per_layer_config_lists=("layer_types", "no_rope_layers"),
    index_dependent_flags=(),
    linear_kind="linear",
    parallel_residual=False,
    parallel_residual_attr=None,
    pre_norm_attr=None,
)

ARCH_SPECS: tuple[ArchSpec, ...] = (
    _LLAMA,
    # Same layout as Llama, but the RMSNorm scales by (1 + weight).
    replace(_LLAMA, name="gemma", model_types=("gemma",), norm_weight_offset=1.0),
    # "Sandwich" norms: `post_attention_layernorm` normalizes the attention OUTPUT, and the MLP is
    # fed by `pre_feedforward_layernorm`. Only the text-only Gemma3 (gemma3_text) has this tree;
    # the multimodal "gemma3" nests the decoder under model.language_model.
    replace(
        _LLAMA,
        name="gemma2",
        model_types=("gemma2", "gemma3_text"),
        norm_weight_offset=1.0,
        mlp_norm="pre_feedforward_layernorm",
    ),
    # Phi-3 fuses q/k/v into `qkv_proj` ([q | k | v], GQA-sized) and gate/up into `gate_up_proj`.
    # It has no `head_dim` attribute by default, but its modeling code reads one when present.
    replace(
        _LLAMA,
        name="phi3",
        model_types=("phi3",),
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="self_attn.qkv_proj",
        qkv_layout="blocked",
        mlp_up=("mlp.gate_up_proj",),
        mlp_act="mlp.activation_fn",
        fused_gate_up=True,
    ),
    # GPT-2 uses Conv1D (weight stored as (in, out)) and one c_attn producing [q | k | v].
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="attn.c_attn",
        o_proj="attn.c_proj",
        qkv_layout="blocked",
        mlp_up=("mlp.c_fc",),
        mlp_down="mlp.c_proj",
        mlp_act="mlp.act",
        mlp_gated=False,
        fused_gate_up=False,
        attn_norm="ln_1",
        mlp_norm="ln_2",
        norm_kind="layernorm",
        norm_weight_offset=0.0,
        config_num_layers="n_layer",
        config_num_heads="n_head",
        config_num_kv_heads=None,
        config_hidden="n_embd",
        config_intermediate="n_inner",
        config_head_dim=None,
        intermediate_multiple=4,
        per_layer_config_lists=(),
        # Attention scaling is divided by (layer_idx + 1) at construction time.
        index_dependent_flags=("scale_attn_by_inverse_layer_idx",),
        linear_kind="conv1d",
        parallel_residual=False,
        parallel_residual_attr=None,
        pre_norm_attr=None,
    ),
    # OPT: the final norm is absent when do_layer_norm_before is False (OPT-350m), which also
    # turns the block norms into post-norms. project_in/project_out live outside the blocks.
    ArchSpec(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        attn="self_attn",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
        qkv_proj=None,
        o_proj="self_attn.out_proj",
        qkv_layout="separate",
        mlp_up=("fc1",),
        mlp_down="fc2",
        mlp_act="activation_fn",
        mlp_gated=False,
        fused_gate_up=False,
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        norm_kind="layernorm",
        norm_weight_offset=0.0,
        config_num_layers="num_hidden_layers",
        config_num_heads="num_attention_heads",
        config_num_kv_heads=None,
        config_hidden="hidden_size",
        config_intermediate="ffn_dim",
        config_head_dim=None,
        intermediate_multiple=None,
        per_layer_config_lists=(),
        index_dependent_flags=(),
        linear_kind="linear",
        parallel_residual=False,
        parallel_residual_attr=None,
        pre_norm_attr="do_layer_norm_before",
    ),
    # GPT-NeoX (Pythia): fused query_key_value viewed as (..., heads, 3 * head_dim), i.e. per head.
    # With use_parallel_residual both norms read the block input; they still feed attention / MLP.
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        attn="attention",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="attention.query_key_value",
        o_proj="attention.dense",
        qkv_layout="per_head",
        mlp_up=("mlp.dense_h_to_4h",),
        mlp_down="mlp.dense_4h_to_h",
        mlp_act="mlp.act",
        mlp_gated=False,
        fused_gate_up=False,
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        norm_kind="layernorm",
        norm_weight_offset=0.0,
        config_num_layers="num_hidden_layers",
        config_num_heads="num_attention_heads",
        config_num_kv_heads=None,
        config_hidden="hidden_size",
        config_intermediate="intermediate_size",
        config_head_dim=None,
        intermediate_multiple=None,
        per_layer_config_lists=(),
        index_dependent_flags=(),
        linear_kind="linear",
        parallel_residual=True,
        parallel_residual_attr="use_parallel_residual",
        pre_norm_attr=None,
    ),
)

_BY_MODEL_TYPE: dict[str, ArchSpec] = {mt: spec for spec in ARCH_SPECS for mt in spec.model_types}


def supported_model_types() -> list[str]:
    """Every `config.model_type` that has an entry in the table, sorted."""
    return sorted(_BY_MODEL_TYPE)


def _config_of(model_or_config: Any) -> Any:
    # A PreTrainedModel carries its config; a PretrainedConfig is used as is.
    config = getattr(model_or_config, "config", None)
    return config if config is not None else model_or_config


def get_arch(model_or_config: Any) -> ArchSpec:
    """Return the table entry for a model or config, keyed by ``config.model_type``.

    Raises `UnsupportedArchitectureError` naming the model type and listing every supported one.
    """
    model_type = getattr(_config_of(model_or_config), "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    return spec


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """Resolve a dotted attribute path ("" means `root` itself); digits index into ModuleLists.

    A path that does not resolve to a module means the model does not have the layout of its
    table entry (for example a bare ``LlamaModel`` instead of ``LlamaForCausalLM``), so this raises
    `UnsupportedArchitectureError` rather than a bare AttributeError.
    """
    module: Any = root
    for part in dotted.split(".") if dotted else ():
        module = getattr(module, part, None)
        if module is None:
            break
    if not isinstance(module, nn.Module):
        raise UnsupportedArchitectureError(
            f"{type(root).__name__} has no module at {dotted!r}; load the model as a causal LM "
            "(AutoModelForCausalLM) of a supported architecture"
        )
    return module


def find_module(root: nn.Module, dotted: str | None) -> nn.Module | None:
    """Like `get_module`, but None when the path is None or the module is absent.

    For parts that some checkpoints legitimately lack, such as OPT-350m's final norm.
    """
    if dotted is None:
        return None
    try:
        return get_module(root, dotted)
    except UnsupportedArchitectureError:
        return None


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The ModuleList of transformer blocks."""
    spec = spec or get_arch(model)
    blocks = get_module(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}.{spec.blocks} is a {type(blocks).__name__}, not a ModuleList"
        )
    return blocks


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Linear (or Conv1D) layers of one block, keyed by path relative to the block.

    Insertion order is execution order: q, k, v (or the fused qkv), o, MLP input(s), MLP output,
    which is the order GPTQ must quantize them in so each sees already-quantized predecessors.
    """
    names = [
        name for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj) if name is not None
    ]
    names += [spec.o_proj, *spec.mlp_up, spec.mlp_down]
    linears: dict[str, nn.Module] = {}
    for name in names:
        module = get_module(block, name)
        if not isinstance(module, nn.Linear | Conv1D):
            raise UnsupportedArchitectureError(
                f"expected a Linear or Conv1D at {name!r} in {type(block).__name__}, "
                f"found {type(module).__name__}"
            )
        linears[name] = module
    return linears


def iter_target_linears(
    model: nn.Module, spec: ArchSpec | None = None, include_lm_head: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """Yield (full module name, module) for every linear inside the blocks, block by block.

    Embeddings, OPT's project_in/out and (unless asked) the LM head are not targets: they are
    usually tied to the embeddings or too sensitive to compress with the block linears.
    """
    spec = spec or get_arch(model)
    for index, block in enumerate(get_blocks(model, spec)):
        for name, module in block_linears(block, spec).items():
            yield f"{spec.blocks}.{index}.{name}", module
    if include_lm_head:
        yield spec.lm_head, get_module(model, spec.lm_head)


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D (whose weight is stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def _config_int(config: Any, attr: str) -> int:
    value = getattr(config, attr, None)
    if not isinstance(value, int):
        raise UnsupportedArchitectureError(
            f"config of model_type {getattr(config, 'model_type', None)!r} has no integer {attr!r}"
        )
    return value


def num_layers(config: Any, spec: ArchSpec | None = None) -> int:
    """Number of transformer blocks according to the config."""
    config = _config_of(config)
    spec = spec or get_arch(config)
    return _config_int(config, spec.config_num_layers)


def hidden_size(config: Any, spec: ArchSpec | None = None) -> int:
    """Width of the residual stream."""
    config = _config_of(config)
    spec = spec or get_arch(config)
    return _config_int(config, spec.config_hidden)


def intermediate_size(config: Any, spec: ArchSpec | None = None) -> int:
    """Width of the MLP hidden layer (GPT-2's n_inner=None means 4 * n_embd)."""
    config = _config_of(config)
    spec = spec or get_arch(config)
    value = getattr(config, spec.config_intermediate, None) if spec.config_intermediate else None
    if value is None and spec.intermediate_multiple is not None:
        return spec.intermediate_multiple * hidden_size(config, spec)
    if not isinstance(value, int):
        raise UnsupportedArchitectureError(
            f"config of model_type {config.model_type!r} has no integer {spec.config_intermediate!r}"
        )
    return value


def attention_geometry(config: Any, spec: ArchSpec | None = None) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim); num_kv_heads == num_heads without grouped-query attn.

    head_dim follows the modeling code: an explicit config value when the architecture has one
    (Gemma and Qwen3 use head_dim * heads != hidden), otherwise hidden // heads.
    """
    config = _config_of(config)
    spec = spec or get_arch(config)
    heads = _config_int(config, spec.config_num_heads)
    kv_heads = heads
    if spec.config_num_kv_heads is not None:
        kv_value = getattr(config, spec.config_num_kv_heads, None)
        # Llama-style configs fill None with num_attention_heads in __post_init__; keep that rule.
        kv_heads = kv_value if isinstance(kv_value, int) else heads
    head_dim = getattr(config, spec.config_head_dim, None) if spec.config_head_dim else None
    if not isinstance(head_dim, int):
        head_dim = hidden_size(config, spec) // heads
    return heads, kv_heads, head_dim


def is_parallel_residual(config: Any, spec: ArchSpec | None = None) -> bool:
    """Whether attention and MLP both read the block input (checkpoint-specific for GPT-NeoX)."""
    config = _config_of(config)
    spec = spec or get_arch(config)
    if spec.parallel_residual_attr is None:
        return spec.parallel_residual
    return bool(getattr(config, spec.parallel_residual_attr, spec.parallel_residual))


def is_pre_norm(config: Any, spec: ArchSpec | None = None) -> bool:
    """Whether `attn_norm` / `mlp_norm` feed the linears (False for post-norm OPT-350m)."""
    config = _config_of(config)
    spec = spec or get_arch(config)
    if spec.pre_norm_attr is None:
        return True
    return bool(getattr(config, spec.pre_norm_attr, True))


def drop_blocks(model: nn.Module, indices: Sequence[int]) -> None:
    """Remove the blocks at `indices` in place and rewrite the config to match.

    Besides deleting from the ModuleList this sets the layer count, slices per-layer config lists
    (e.g. ``layer_types``: the cache and the attention masks are built from it), and renumbers every
    ``layer_idx`` attribute inside the surviving blocks: attention modules pass it to
    ``cache.update``, and the cache holds exactly one entry per remaining layer, so a stale index
    would read another layer's keys/values or fall off the end during ``generate``.
    Negative indices count from the end; duplicates are ignored.
    """
    spec = get_arch(model)
    config = _config_of(model)
    blocks = get_blocks(model, spec)
    total = len(blocks)
    drop: set[int] = set()
    for index in indices:
        if not -total <= index < total:
            raise UserInputError(f"layer index {index} is out of range for a {total}-layer model")
        drop.add(index % total)
    if len(drop) >= total:
        raise UserInputError(f"cannot drop all {total} layers; at least one must remain")
    if not drop:
        return
    keep = [i for i in range(total) if i not in drop]

    for flag in spec.index_dependent_flags:
        moved = any(new != old for new, old in enumerate(keep))
        if getattr(config, flag, False) and moved:
            raise UnsupportedArchitectureError(
                f"cannot drop layers {sorted(drop)}: this {spec.name} model sets {flag}=True, so "
                "the surviving layers would compute differently once their indices change"
            )

    # ModuleList.__delitem__ renumbers its keys to 0..n-1, so state_dict names match what
    # from_pretrained expects for the new layer count; deleting in place keeps the list object
    # that other references (hooks, wrappers) may hold.
    for index in sorted(drop, reverse=True):
        del blocks[index]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                # nn.Module's attribute typing only knows tensors and modules; this is a plain int.
                cast(Any, module).layer_idx = new_index

    setattr(config, spec.config_num_layers, len(keep))
    for attr in spec.per_layer_config_lists:
        values = getattr(config, attr, None)
        if isinstance(values, list | tuple) and len(values) == total:
            setattr(config, attr, [values[i] for i in keep])
