"""Export a local model folder to one GGUF file that llama.cpp runs on its own.

`export_gguf` writes the architecture metadata, the tokenizer (with its chat template) and every
tensor, in one of these types (``type``):

- ``f32``, ``f16``, ``bf16``: plain floats;
- ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``: llama.cpp's 32-weight blocks, re-quantized from
  the float weights with llama.cpp's reference rounding (the `gguf` package's port of it);
- ``q4_k``, ``q5_k``, ``q6_k``: its 256-weight K-quant super-blocks (`kquants`);
- ``auto``: keep what the model has. A Swiss Knife GPTQ/AWQ/RTN/HQQ checkpoint whose grid is a
  block type (4- or 5-bit, symmetric or not, or 8-bit symmetric, in groups of 32) is written
  with the very integers the method chose, only the scales rounded to fp16 (`gguf_blocks`); a
  grid that is no block type is refused; dense weights keep their dtype (f32/f16/bf16). A
  checkpoint quantized on a llama.cpp K grid (``grid: gguf:q4_k``) has its Q4_K/Q5_K/Q6_K blocks
  copied byte for byte from its ``gguf-grid.safetensors`` (also under an explicit ``type`` equal
  to theirs).

Tensor by tensor, the choices follow llama.cpp (``llama-quant.cpp`` and ``convert_hf_to_gguf.py``):
1-D tensors (norms, biases) are always f32; with a quantized type the output head, or the token
embeddings when they are tied to it, become Q6_K (Q8_0 for ``q8_0``, or when their rows do not
fit the type's blocks), and untied token embeddings take the type itself; a row length that is
not a multiple of the block size falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, then F16). ``overrides`` (``[("re:.*down_proj", "q6_k"), ...]``, patterns as in
quantize's ``--bits-override``, matched against module names, the first match winning) replace
the choice for the weights they select, before the shape fallback.

The file is written beside the target under a hidden temporary name, flushed to disk, and
renamed into place only when complete: an interrupted or refused export leaves no file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFValueType, GGUFWriter, LlamaFileType
from numpy.typing import NDArray

from swiss_knife.export.errors import (
    GGUFExportError,
    GridNotRepresentableError,
    OutputFileExistsError,
)
from swiss_knife.export.gguf_arch import read_hparams, resolve_arch, rope_type, write_hparams
from swiss_knife.export.gguf_blocks import QTYPES, encode_float, encode_levels, encoded_nbytes
from swiss_knife.export.gguf_plan import (
    Overrides,
    PlannedTensor,
    check_type,
    dominant_type,
    parse_overrides,
    plan_tensors,
)
from swiss_knife.export.gguf_source import Checkpoint, open_checkpoint, read_config
from swiss_knife.export.gguf_tokenizer import read_vocab, write_vocab

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]

_FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0,
    "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q5_k": LlamaFileType.MOSTLY_Q5_K_S,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}


class GGUFFileWriter(GGUFWriter):
    """`gguf.GGUFWriter` that also stores empty metadata arrays (with their element type).

    GGUF allows them and llama.cpp reads them, but gguf-py refuses to write one; llama.cpp
    needs ``tokenizer.ggml.merges`` even for a BPE vocabulary that has no merge.
    """

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _storage(item: PlannedTensor) -> tuple[tuple[int, ...], np.dtype[Any], int, Any]:
    """(shape, dtype, nbytes, raw type) as `GGUFWriter.add_tensor_info` takes them."""
    shape = item.shape
    nbytes = encoded_nbytes(item.kind, shape)
    if item.kind == "f32":
        return shape, np.dtype(np.float32), nbytes, None
    if item.kind == "f16":
        return shape, np.dtype(np.float16), nbytes, None
    block, type_size = GGML_QUANT_SIZES[QTYPES[item.kind]]
    byte_shape = (*shape[:-1], shape[-1] // block * type_size)
    return byte_shape, np.dtype(np.uint8), nbytes, QTYPES[item.kind]


def _encode(checkpoint: Checkpoint, item: PlannedTensor) -> NDArray[Any]:
    if item.computed is not None:
        return item.computed
    assert item.source is not None
    name = item.source.name
    order = item.row_order
    if item.exact and item.source.gguf_type is not None:
        blocks = checkpoint.gguf_blocks(name)
        return blocks if order is None else blocks[order]
    if item.exact:
        qw = checkpoint.quantized(name)
        q = qw.q.numpy()
        scale = qw.scale.float().numpy()
        zero = None if qw.zero is None else qw.zero.numpy()
        if order is not None:
            q, scale = q[order], scale[order]
            zero = None if zero is None else zero[order]
        try:
            return encode_levels(q, scale, zero, item.kind)
        except OverflowError as exc:
            raise GridNotRepresentableError(f"{name}: {exc}") from None
    data = checkpoint.dense(name)
    if order is not None:
        data = data[order]
    return encode_float(data, item.kind)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temporary file into place; without ``overwrite`` never clobber."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    if overwrite:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)  # fails if `out` appeared meanwhile, unlike a rename
        except FileExistsError:
            raise OutputFileExistsError(
                f"output file {out} exists; pass overwrite=True to replace it"
            ) from None
        except OSError:  # no hard links on this file system
            if out.exists():
                raise OutputFileExistsError(
                    f"output file {out} exists; pass overwrite=True to replace it"
                ) from None
            os.replace(tmp, out)
        else:
            tmp.unlink()
    _fsync_dir(out.parent)


# Written into every file we make: `overwrite` replaces only a file that carries it.
WRITER_NAME = "Swiss Knife"


def written_by_us(path: Path) -> bool:
    """Whether `path` is a GGUF file this exporter wrote (its general.quantized_by says so)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).get_field(gguf.Keys.General.QUANTIZED_BY)
    except Exception:  # not a GGUF file, or an unreadable one
        return False
    return field is not None and field.contents() == WRITER_NAME


def _check_output(
    output_file: str | os.PathLike[str], overwrite: bool, source: Path | None = None
) -> Path:
    out = Path(output_file).expanduser().resolve()
    if out.is_dir():
        raise OutputFileExistsError(f"output path {out} is a folder; give a .gguf file path")
    if source is not None and out.is_relative_to(source):
        raise GGUFExportError(
            f"output file {out} is inside the model folder {source}, which is never modified; "
            "write the GGUF file elsewhere"
        )
    if out.exists() and not overwrite:
        raise OutputFileExistsError(f"output file {out} exists; pass overwrite=True to replace it")
    if out.exists() and not written_by_us(out):
        raise OutputFileExistsError(
            f"output file {out} is not a GGUF file Swiss Knife wrote; overwrite replaces only "
            "those, so choose another file name"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise GGUFExportError(f"cannot create {out}: {parent} is not a writable folder")
    return out


def _progress(progress: ProgressCallback | bool | None, total: int) -> tuple[Any, Any]:
    """(callback(done, total, name), closer) for the requested kind of progress report."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda done, all_, name: None), lambda: None
    from swiss_knife.progress import Progress

    bar = Progress("export gguf", total=total, unit="tensor")
    return (lambda done, all_, name: bar.update()), bar.close


def export_gguf(
    source: str | os.PathLike[str],
    output_file: str | os.PathLike[str],
    type: str = "q8_0",
    overrides: Overrides | None = None,
    *,
    overwrite: bool = False,
    progress: ProgressCallback | bool | None = None,
) -> dict[str, Any]:
    """Write the model in the folder ``source`` to the GGUF file ``output_file``.

    Args:
        source: a local model folder: a plain Hugging Face checkpoint, or a Swiss Knife output
            (compressed-tensors pack-quantized or sparse-bitmask, pruned, layer-reduced).
        output_file: the ``.gguf`` path to write (its folder is created if needed).
        type: ``f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k`` or ``auto`` (module
            docstring).
        overrides: per-weight types, ``[(pattern, type), ...]``, ``["pattern=type", ...]`` or a
            mapping; a pattern is a module name or a ``re:`` regex matching the whole name.
        overwrite: replace an existing ``output_file``.
        progress: a callback ``(done, total, gguf_name)`` after each tensor, True for the
            toolkit's progress bar/log lines, or None/False for silence.

    Returns:
        A report: ``output_file``, ``file_size`` (bytes), ``type``, ``architecture``,
        ``source_layout``, ``parameters``, ``bits_per_weight``, ``tensor_types`` (type -> count),
        ``exact_tensors`` (GGUF names whose integers were copied from the source grid),
        ``fallbacks`` (name -> "wanted -> written"), ``tensors`` (per-tensor rows), ``tokenizer``
        and ``seconds``.

    Raises:
        GGUFExportError (a `UserInputError` and a `ValueError`; subclasses
        `GridNotRepresentableError`, `ArchitectureNotExportableError`, `OutputFileExistsError`)
        with a one-line message; no file is left behind.
    """
    start = time.monotonic()
    base = check_type(str(type).lower(), "the export")
    parsed = parse_overrides(overrides)
    directory = Path(source).expanduser().resolve()
    config = read_config(directory)  # "not a model folder" before any complaint about the output
    out = _check_output(output_file, overwrite, directory)
    arch = resolve_arch(config)
    hp = read_hparams(config)
    rope_type(hp)  # refuse an unsupported RoPE scaling before any work

    with open_checkpoint(directory) as checkpoint:
        if hp.tied is None:  # transformers ties by default; a checkpoint without a head is tied
            hp = replace(hp, tied="lm_head.weight" not in checkpoint.tensors)
        plan = plan_tensors(checkpoint, arch, hp, base, parsed)
        vocab = read_vocab(directory, hp.vocab)
        file_kind = base if base != "auto" else dominant_type(plan)

        writer = _header(config, directory, arch, hp, file_kind)
        tokenizer_summary = write_vocab(writer, vocab, directory)
        _write_file(writer, checkpoint, plan, out, overwrite, progress)

    report = _report(plan, out, base, file_kind, arch, hp, directory, checkpoint.layout)
    report["tokenizer"] = tokenizer_summary
    report["seconds"] = round(time.monotonic() - start, 3)
    logger.info(
        "wrote %s: %s, %d tensors, %.2f bits/weight",
        out,
        base,
        len(plan),
        report["bits_per_weight"],
    )
    return report


def _header(
    config: dict[str, Any], directory: Path, arch: Any, hp: Any, file_kind: str
) -> GGUFFileWriter:
    """A writer holding the file's metadata: name, writer mark, hyperparameters, file type."""
    writer = GGUFFileWriter(path=None, arch=arch.gguf_name)
    writer.add_type("model")
    writer.add_name(str(config.get("_name_or_path") or directory.name))
    writer.add_string(gguf.Keys.General.QUANTIZED_BY, WRITER_NAME)
    write_hparams(writer, hp, config.get("original_max_position_embeddings"))
    writer.add_file_type(int(_FILE_TYPES[file_kind]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    return writer


def _write_file(
    writer: GGUFFileWriter,
    checkpoint: Checkpoint,
    plan: list[PlannedTensor],
    out: Path,
    overwrite: bool,
    progress: ProgressCallback | bool | None,
) -> None:
    """Encode every planned tensor into a temporary file beside `out`, then publish it; a
    failure or an interruption leaves neither the output nor the temporary file."""
    for item in plan:
        shape, dtype, nbytes, raw = _storage(item)
        writer.add_tensor_info(item.gguf_name, shape, dtype, nbytes, raw_dtype=raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    report_progress, close_progress = _progress(progress, len(plan))
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, item in enumerate(plan, start=1):
            data = _encode(checkpoint, item)
            if data.nbytes != _storage(item)[2]:
                raise GGUFExportError(f"{item.gguf_name}: encoded size does not match")
            writer.write_tensor_data(np.ascontiguousarray(data))
            report_progress(done, len(plan), item.gguf_name)
        writer.close()
        _publish(tmp, out, overwrite)
    finally:
        writer.close()
        close_progress()
        tmp.unlink(missing_ok=True)


def _report(
    plan: list[PlannedTensor],
    out: Path,
    base: str,
    file_kind: str,
    arch: Any,
    hp: Any,
    directory: Path,
    layout: str,
) -> dict[str, Any]:
    """What was written: sizes, types per tensor, which tensors kept the source's integers."""
    params = sum(int(np.prod(item.shape)) for item in plan)
    size = out.stat().st_size
    fallbacks = {
        item.gguf_name: f"{item.wanted} -> {item.kind}" for item in plan if item.wanted != item.kind
    }
    report: dict[str, Any] = {
        "output_file": str(out),
        "file_size": size,
        "type": base,
        "file_type": file_kind,
        "architecture": arch.gguf_name,
        "model_type": arch.model_type,
        "source": str(directory),
        "source_layout": layout,
        "parameters": params,
        "bits_per_weight": 8 * size / params if params else 0.0,
        "tied_embeddings": bool(hp.tied),
        "tensor_types": dict(Counter(item.kind for item in plan)),
        "exact_tensors": [item.gguf_name for item in plan if item.exact],
        "fallbacks": fallbacks,
        "tensors": [
            {
                "name": item.gguf_name,
                "source": item.source.name if item.source is not None else None,
                "type": item.kind,
                "shape": list(item.shape),
                "exact": item.exact,
            }
            for item in plan
        ],
    }
    return report


__all__ = ["GGUFFileWriter", "ProgressCallback", "export_gguf"]
