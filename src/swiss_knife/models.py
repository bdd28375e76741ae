"""Load models (hub id, local directory, GGUF file), cast them, and save them atomically.

Loading is conservative: `trust_remote_code` stays off unless asked, safetensors weights are
preferred, and every failure is turned into one line that says what to do. Saving writes into a
hidden temporary directory beside the target and renames it into place only when everything,
the manifest last of all, is on disk: an interrupted save never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CastConfig, ModelSpec
from .device import library_versions, resolve_device
from .errors import ModelLoadError, UserInputError
from .paths import MANIFEST_NAME, replace_dir, work_dir
from .paths import check_output_dir as check_output_dir
from .sources import (
    PICKLE_SUFFIXES,
    WEIGHT_SUFFIXES,
    hub_cached,
    hub_host,
    hub_offline,
    hub_reachable,
)
from .sources import looks_like_local_path as _looks_like_local_path

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any | None
    source: str  # what the user passed: hub id, directory or .gguf file
    directory: Path | None  # local directory holding the weights, None for a hub download
    gguf_file: str | None
    device: torch.device

    @property
    def weights_path(self) -> Path | None:
        """The file or directory whose bytes on disk are this model's size."""
        if self.directory is None:
            return None
        return self.directory / self.gguf_file if self.gguf_file else self.directory


def open_streamed_model(
    source: str, *, dtype: str, device: torch.device, trust_remote_code: bool
) -> LoadedModel:
    """The model in the local safetensors folder `source`, streamed from disk for reading only
    (`streaming.open_streamed`: nothing but the config is read now), with its tokenizer.
    Raises `UserInputError` naming why it cannot be streamed."""
    from .streaming import StreamRefused, open_streamed, source_refusal

    directory = Path(source).expanduser()
    reason = source_refusal(directory if directory.is_dir() else None, None)
    try:
        if reason is not None:
            raise StreamRefused(reason)
        network = open_streamed(
            directory,
            None,
            dtype=DTYPES.get(dtype),
            device=device,
            trust_remote_code=trust_remote_code,
        )
    except StreamRefused as exc:
        raise UserInputError(f"cannot stream {source} from disk: {exc}") from exc
    tokenizer = load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
    return LoadedModel(network, tokenizer, source, directory, None, device)


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def _has_weights(directory: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in directory.iterdir() if p.is_file())


def _explain_load_failure(source: str, exc: BaseException) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in lowered:
        return ModelLoadError(
            f"{source} needs modelling code shipped with the checkpoint; rerun with "
            "--trust-remote-code only if you trust its author"
        )
    if "safetensor" in lowered or "header" in lowered or "deserializ" in lowered:
        return ModelLoadError(f"the weights of {source} are corrupt or truncated ({first})")
    if any(
        word in lowered
        for word in ("offline", "connection", "resolve", "couldn't connect", "huggingface.co")
    ):
        return ModelLoadError(
            f"could not fetch {source!r} from the Hugging Face hub (this machine looks offline); "
            "download the model elsewhere and pass its local directory or .gguf file"
        )
    if "unrecognized configuration" in lowered or "model type" in lowered:
        return ModelLoadError(
            f"{source} is not a causal language model transformers knows ({first})"
        )
    return ModelLoadError(f"could not load {source}: {first}")


def _locate(source: str, gguf_file: str | None) -> tuple[Path | None, str | None]:
    """The local directory holding the model (None for a hub id) and its GGUF file name, if
    any; refuses a path that is not a model directory or a .gguf file."""
    path = Path(source).expanduser()
    directory: Path | None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{source} is a file, not a model: pass a model directory (with config.json) "
                "or a .gguf file"
            )
        directory, gguf_file = path.parent, path.name
    elif path.is_dir():
        directory = path
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {source}")
        elif not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model directory (no config.json in it)")
        elif not _has_weights(path):
            raise ModelLoadError(f"{source} has a config.json but no weight files")
    elif _looks_like_local_path(source):
        raise ModelLoadError(f"model path not found: {source}")
    else:
        directory = None  # a hub id
    return directory, gguf_file


def _model_kwargs(
    spec: ModelSpec, source: str, directory: Path | None, gguf_file: str | None
) -> dict[str, Any]:
    """The `from_pretrained` arguments: dtype, revision, GGUF dequantisation, safetensors (or a
    warning about pickles), and hub-free loading of a cached hub model that cannot be fetched."""
    kwargs: dict[str, Any] = {
        "trust_remote_code": spec.trust_remote_code,
        "dtype": DTYPES.get(spec.dtype, "auto"),
        # Pickle checkpoints may only hold tensors; safetensors is preferred below anyway.
        "weights_only": True,
    }
    if spec.revision:
        kwargs["revision"] = spec.revision
    if gguf_file:
        from transformers.utils.quantization_config import GgufConfig

        kwargs["gguf_file"] = gguf_file
        # Unpack every GGUF block to plain float weights: compression starts from dense tensors.
        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
    elif directory is not None and any(directory.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    elif directory is not None:
        _warn_pickle(directory, source)
    if directory is None and _hub_unavailable(source, gguf_file, spec.revision):
        kwargs["local_files_only"] = True  # cached: load it without asking the hub
    return kwargs


def _load_weights(
    source: str, target: str, directory: Path | None, gguf_file: str | None, kwargs: dict[str, Any]
) -> Any:
    """The model, through the loader its checkpoint format needs; any failure becomes a
    `ModelLoadError` that says what went wrong."""
    from transformers import AutoModelForCausalLM

    try:
        if directory is not None and not gguf_file and _is_sparse_bitmask(directory):
            # transformers 5.x cannot decompress this layout itself (see sparse_format).
            from .compression.pruning.sparse_format import load_sparse_bitmask

            return load_sparse_bitmask(directory, **kwargs)
        if directory is not None and not gguf_file and _has_asymmetric_grid(directory):
            # compressed-tensors 0.18-0.20 cannot load asymmetric zero points on transformers'
            # plain path; its dequantize-on-load path can (see compressed_tensors_format).
            from .compression.quantization.compressed_tensors_format import load_compressed

            return load_compressed(directory, **kwargs)
        return AutoModelForCausalLM.from_pretrained(target, **kwargs)
    except Exception as exc:  # OSError, ValueError, safetensors' own error type, ...
        raise _explain_load_failure(source, exc) from exc


def _load_tokenizer(
    spec: ModelSpec, source: str, target: str, gguf_file: str | None, local_files_only: bool
) -> Any | None:
    """The model's tokenizer, or None (with a warning) when there is none to load."""
    from transformers import AutoTokenizer

    tok_kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if gguf_file:
        tok_kwargs["gguf_file"] = gguf_file
    if spec.revision:
        tok_kwargs["revision"] = spec.revision
    if local_files_only:
        tok_kwargs["local_files_only"] = True
    try:
        return AutoTokenizer.from_pretrained(target, **tok_kwargs)
    except Exception as exc:
        logger.warning("no tokenizer loaded for %s: %s", source, str(exc).splitlines()[0])
        return None


def load_model(
    spec: ModelSpec | str,
    *,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

    `overrides` replace fields of the spec, e.g. `load_model("dir", dtype="bf16")`.
    """
    if isinstance(spec, str):
        spec = ModelSpec(path=spec, **overrides)
    elif overrides:
        spec = spec.model_copy(update=overrides)
    source = spec.path
    directory, gguf_file = _locate(source, spec.gguf_file)
    target = str(directory) if directory is not None else source
    kwargs = _model_kwargs(spec, source, directory, gguf_file)
    device = resolve_device(spec.device)
    model = _load_weights(source, target, directory, gguf_file, kwargs)
    if gguf_file:
        _detach_gguf_quantizer(model, source)
    model.eval()
    model = model.to(device)

    tokenizer = None
    if with_tokenizer:
        local_files_only = bool(kwargs.get("local_files_only"))
        tokenizer = _load_tokenizer(spec, source, target, gguf_file, local_files_only)
    return LoadedModel(model, tokenizer, source, directory, gguf_file, device)


def load_tokenizer(directory: str, *, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer of a local model folder, or None (with a warning) when it has none."""
    spec = ModelSpec(path=directory, trust_remote_code=trust_remote_code)
    return _load_tokenizer(spec, directory, directory, None, local_files_only=True)


def _warn_pickle(directory: Path, source: str) -> None:
    """Say so when a model's weights are a Python pickle rather than safetensors."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return
    logger.warning(
        "%s holds its weights as a pickle file (%s), not safetensors; it is loaded with "
        "torch.load(weights_only=True), which reads tensors only and runs no code from it. "
        "Save a safetensors copy once: swiss-knife quantize %s --method bf16 --output-dir NEW "
        "(or, keeping the precision, AutoModelForCausalLM.from_pretrained(%r)"
        ".save_pretrained(NEW) in Python)",
        source,
        ", ".join(pickles),
        source,
        source,
    )


def _hub_unavailable(repo_id: str, gguf_file: str | None, revision: str | None) -> bool:
    """Fail at once when a hub id cannot be fetched: offline (HF_HUB_OFFLINE) or unreachable,
    and not in the local cache. True when the hub is unreachable but the model is cached."""
    offline = hub_offline()
    if not offline and hub_reachable():
        return False
    filename = gguf_file or "config.json"
    if hub_cached(repo_id, filename=filename, revision=revision):
        return True
    why = (
        "offline mode is on (HF_HUB_OFFLINE)"
        if offline
        else f"{hub_host()[0]} cannot be reached (this machine looks offline)"
    )
    raise ModelLoadError(
        f"cannot fetch {repo_id!r} from the Hugging Face hub: {why}, and it is not in the local "
        "Hugging Face cache; download the model elsewhere and pass its local directory or "
        ".gguf file"
    )


def _has_asymmetric_grid(directory: Path) -> bool:
    """Whether config.json describes a compressed-tensors checkpoint with an asymmetric grid."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "compressed-tensors":
        return False
    groups = (qconfig.get("config_groups") or {}).values()
    return any((group.get("weights") or {}).get("symmetric") is False for group in groups)


def _is_sparse_bitmask(directory: Path) -> bool:
    from .compression.pruning.sparse_format import is_sparse_bitmask_checkpoint

    return is_sparse_bitmask_checkpoint(directory)


def _detach_gguf_quantizer(model: Any, source: str) -> None:
    """Turn a dequantised GGUF model into an ordinary dense model that saves like any other.

    transformers keeps its GGUF quantizer attached after unpacking the weights, and that
    quantizer refuses `save_pretrained`; the weights themselves are plain float tensors.
    """
    packed = [
        name
        for name, module in model.named_modules()
        if type(module).__name__.lower().startswith("gguf")
    ]
    if packed:
        raise ModelLoadError(
            f"{source}: transformers kept {len(packed)} GGUF layers packed; cannot compress them"
        )
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def is_quantized(model: nn.Module) -> str | None:
    """The quantization method a model already carries, or None for a float model.

    Quantizing it again, or pruning it, would rewrite integers as if they were float weights.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        return str(getattr(model, "quantization_method", None) or "quantized")
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
        return str(method or getattr(qconfig, "quant_method", "quantized"))
    return None


def cast_model(model: nn.Module, config: CastConfig | str) -> nn.Module:
    """Cast every floating-point parameter and saved buffer to fp16, bf16 or fp32, in place.

    Non-persistent buffers (RoPE's `inv_freq`, ...) keep their dtype: they are not saved, so a
    reload recomputes them in fp32, and the cast model must compute what its checkpoint will.
    """
    name = config if isinstance(config, str) else config.dtype
    if name not in DTYPES:
        raise UserInputError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    device = next(model.parameters()).device
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("fp16 on CPU runs through slow kernels; bf16 is usually faster there")
    kept = [
        (module, key, buffer)
        for module in model.modules()
        for key, buffer in module._buffers.items()
        if buffer is not None and key in module._non_persistent_buffers_set
    ]
    model = model.to(dtype=dtype)
    for module, key, buffer in kept:
        module._buffers[key] = buffer
    from .streaming import stream_of, walk_unchanged

    stream = stream_of(model)
    if stream is not None:  # every block is read in the new dtype and written as it is
        stream.dtype = dtype
        walk_unchanged(model)
    return model


# --------------------------------------------------------------------------- saving


def _finalize_tree(root: Path) -> None:
    """Give files the permissions the user's umask asks for, and flush them to disk.

    mkdtemp creates the folder owner-only; a saved model should be as readable as any file.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            os.chmod(path, 0o777 & ~umask)
    os.chmod(root, 0o777 & ~umask)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_manifest(
    *,
    source: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The facts saved next to the weights: what was done, with what, and what it measured."""
    return {
        "swiss_knife_manifest": 1,
        "created_unix": time.time(),
        "source_model": source,
        "recipe": dict(recipe or {}),
        "versions": library_versions(),
        "timings_s": dict(timings or {}),
        "metrics": dict(metrics or {}),
        **dict(extra or {}),
    }


def save_model(
    model: nn.Module,
    output_dir: str | Path,
    *,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    protect: Iterable[str | Path] = (),
    manifest: Mapping[str, Any] | None = None,
    model_card: str | None = None,
    writer: Callable[[Path], None] | None = None,
    staging: Path | None = None,
) -> Path:
    """Save an ordinary Hugging Face checkpoint atomically, with manifest and model card.

    The checkpoint is written to `.NAME.partial-PID-*` beside the target, the manifest last, then
    renamed into place. `protect` lists input paths that must never be overwritten. `writer`
    replaces `model.save_pretrained` for formats that write their own weights and config.
    `staging` is that work folder when it exists already (a streamed run wrote its blocks there).
    """
    out = check_output_dir(output_dir, overwrite=overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging if staging is not None else work_dir(out, "partial")
    try:
        if writer is not None:
            writer(tmp)
        else:
            from .compression.checkpoint import save_dense

            save_dense(model, tmp)  # save_pretrained, or the rest of a streamed model
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
        manifest_data = dict(manifest) if manifest is not None else build_manifest()
        # Written last: its presence means the directory is complete.
        (tmp / MANIFEST_NAME).write_text(
            json.dumps(manifest_data, indent=2, default=str) + "\n", encoding="utf-8"
        )
        _finalize_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data


def render_model_card(
    *,
    title: str,
    source: str | None,
    tags: Iterable[str],
    steps: Iterable[str],
    metrics_table: str | None = None,
    plain_transformers: bool = True,
) -> str:
    """A model card with Hugging Face metadata (base_model, tags) and the measured results.

    `plain_transformers=False` (the sparse-bitmask layout) tells readers to load the folder with
    Swiss Knife, since transformers cannot decompress it.
    """
    import yaml

    meta: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["swiss-knife", "compressed", *tags],
    }
    # base_model must be a hub id; a local path or file says nothing to the hub.
    if source and not _looks_like_local_path(source) and not Path(source).exists():
        meta["base_model"] = source
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines.append(
        f"Compressed with Swiss Knife from `{source}`." if source else "Made by Swiss Knife."
    )
    lines += ["", "## What was done", ""]
    lines += [f"- {step}" for step in steps] or ["- nothing (a copy)"]
    if metrics_table:
        lines += ["", "## Measured results", "", metrics_table]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        *(
            [
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            ]
            if plain_transformers
            else [
                "import swiss_knife  # the sparse-bitmask weights are decompressed on load",
                'loaded = swiss_knife.load_model("path/to/this/folder")',
                "model, tokenizer = loaded.model, loaded.tokenizer",
            ]
        ),
        "```",
        "",
        f"The full recipe and library versions are in `{MANIFEST_NAME}`.",
        "",
    ]
    return "\n".join(lines)
