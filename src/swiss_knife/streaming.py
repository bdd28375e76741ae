"""Models larger than memory: the block engine on a checkpoint streamed from disk.

A streamed model is the model's skeleton built on the meta device (shapes, no memory; rotary
tables, computed at build time, are real). What runs before the first block (the embeddings) is
read only for the calibration capture and freed after it. The engine asks for one block at a
time:

* `BlockStream.enter` reads that block's tensors from the safetensors files (plain reads, by
  tensor name, sharded checkpoints included) onto the compute device;
* `BlockStream.leave` hands the finished block to the output: its tensors in the method's saved
  form (a method that saves another form than the dense state, e.g. packed integers, says so
  with `save_as`) are written as one shard into the output's work folder; then the block's
  tensors go back to the meta device, so they are freed.

At the end the method's writer calls `write_remaining`, which adds what is left: the tensors
outside the blocks (embeddings, final norm and LM head, unchanged, copied from the source one at
a time), the shard index and the config; `save_model` then adds tokenizer, card and manifest
and renames the folder into place, as for any output. A run killed on the way leaves only its
work folder (``.NAME.partial-PID-*``, no manifest), which the next run deletes: it starts clean.

Peak memory is one block in its compute dtype plus what the method holds for it (Hessians,
scales) and the calibration activations (the embeddings during the capture, the largest outside
tensor during the final write): it does not grow with the number of blocks.

Which methods stream is decided before anything is loaded (`stream_refusal`): cast, RTN, GPTQ
and AWQ on integer grids (not the K grids), static int8, magnitude, Wanda and SparseGPT in one
shot (unstructured or N:M, saved dense, uniform or OWL allocation: OWL's pre-pass is a walk
that writes nothing, `BlockStream.writes`), and layer reduction (the kept blocks copied from the
source, renumbered). The others need the whole model at once (HQQ and the bitsandbytes/torchao
methods quantize the model through transformers or a library, gradual schedules fine-tune the
whole model between steps, structured pruning rewrites shapes, distillation trains) and keep
the in-memory path.

`evaluate` streams too: perplexity over all windows, one block at a time
(`evaluation.streamed`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserInputError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# The attribute a streamed model carries.
_STREAM = "_swiss_knife_stream"


class StreamRefused(UserInputError):
    """The checkpoint cannot be streamed; the message says why (a phrase)."""


# ---------------------------------------------------------------------------------------------
# The source checkpoint.
# ---------------------------------------------------------------------------------------------


class CheckpointTensors:
    """The tensors of a safetensors checkpoint folder (one file, or shards with an index), read
    one at a time by name; nothing is read until asked for.

    Each tensor is read with plain file reads into fresh memory, not through a memory map: the
    pages of a mapped file stay in the process's resident set for as long as the map is open, so
    reading every block through maps makes the resident size grow with the model.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = _safetensors_files(directory)
        if not self.files:
            raise UserInputError(f"{directory} holds no .safetensors weights to stream")
        # name -> (file, dtype, shape, first byte, end byte)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for path in self.files:
            self._read_header(path)

    def _read_header(self, path: Path) -> None:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise StreamRefused(f"{name} has dtype {info['dtype']}, which cannot be streamed")
            begin, end = info["data_offsets"]
            self.entries[name] = (path, dtype, tuple(info["shape"]), base + begin, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor ``name``, read from disk into memory of its own; converted to `dtype`
        (when given) a slice of rows at a time, so the stored and the converted copies of a
        large tensor (an embedding matrix) are never both whole in memory."""
        _, stored, shape, begin, end = self.entries[name]
        if dtype is None or dtype == stored or len(shape) == 0 or end - begin <= _CHUNK_BYTES:
            raw = self._read(name, begin, end)
            value = raw.view(stored).reshape(shape)
            return value if dtype is None else value.to(dtype)
        out = torch.empty(shape, dtype=dtype)
        row_bytes = (end - begin) // shape[0]
        step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
        for first in range(0, shape[0], step):
            rows = min(step, shape[0] - first)
            start = begin + first * row_bytes
            chunk = self._read(name, start, start + rows * row_bytes)
            out[first : first + rows].copy_(chunk.view(stored).reshape(rows, *shape[1:]))
        return out

    def _read(self, name: str, begin: int, end: int) -> Tensor:
        path = self.entries[name][0]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as handle:
            handle.seek(begin)
            got = handle.readinto(raw.numpy().data)
        if got != end - begin:
            raise UserInputError(f"{path} ends inside tensor {name}: the file is truncated")
        return raw


# Converting reads go a slice of rows of at most this many stored bytes at a time.
_CHUNK_BYTES = 64 * 2**20


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


Lazy = tuple[Tensor, Callable[[], Tensor]]  # (meta tensor of the right shape and dtype, reader)


def write_safetensors(path: Path, tensors: Mapping[str, Tensor | Lazy]) -> int:
    """Write a safetensors file one tensor at a time, each straight from its memory (no
    serialised copy of the whole file, as ``safetensors.torch.save_file`` makes); a value may be
    a `Lazy` pair whose reader is called just before the tensor is written (so a tensor read
    from the source lives only while it is copied). Returns the bytes of tensor data written."""
    names = sorted(tensors)
    meta: dict[str, Tensor] = {}
    for name in names:
        value = tensors[name]
        meta[name] = value if isinstance(value, Tensor) else value[0]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = meta[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for name in names:
            value = tensors[name]
            tensor = value if isinstance(value, Tensor) else value[1]()
            if tensor.dtype != meta[name].dtype or tensor.shape != meta[name].shape:
                raise RuntimeError(f"{name} changed shape or dtype while it was written")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            handle.write(data.numpy().data)
            del tensor, data
    return offset


# ---------------------------------------------------------------------------------------------
# Which stages stream.
# ---------------------------------------------------------------------------------------------


def stream_refusal(stage: Any) -> str | None:
    """Why `stage` cannot run streamed (a short phrase), or None when it can."""
    from .config import CastConfig, LayerReductionConfig

    method = getattr(stage, "method", None)
    if isinstance(stage, CastConfig) or method in ("fp16", "bf16"):
        return None
    grid = str(getattr(stage, "grid", None))
    if method in ("rtn", "gptq", "awq", "static"):
        from .compression.quantization.gguf_grid import is_k_grid, uses_sidecar

        if uses_sidecar(stage):
            how = "on a K grid" if is_k_grid(grid) else "with grid overrides"
            return f"{method} {how} writes a GGUF block sidecar for the whole model"
        return None
    if method in ("magnitude", "wanda", "sparsegpt"):
        if getattr(stage, "schedule", None) is not None:
            return "a gradual schedule fine-tunes the whole model between steps"
        if getattr(stage, "scope", "layer") == "global":
            return "a global scope ranks all layers' weights together"
        if getattr(stage, "save_format", "dense") != "dense":
            return "the sparse-bitmask layout is written in one file"
        return None
    if method == "structured":
        if getattr(stage, "hidden_ratio", 0.0) > 0:
            return "removing hidden channels rewrites the embeddings and LM head"
        return None
    if isinstance(stage, LayerReductionConfig):
        return None
    if method is None:
        return "only quantize, prune, cast and layer-reduction stages stream"
    return f"{method} needs the whole model in memory"


def source_refusal(directory: Path | None, gguf_file: str | None) -> str | None:
    """Why the model at `directory` cannot be streamed from disk, or None."""
    if directory is None:
        return "the model is not a local folder"
    if gguf_file:
        return "a GGUF file is dequantized whole by transformers"
    if not _safetensors_files(directory):
        return "the folder holds no safetensors weights"
    config = directory / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its config.json cannot be read"
    if data.get("quantization_config"):
        return "the checkpoint is already quantized"
    return None


# ---------------------------------------------------------------------------------------------
# The stream.
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockStream:
    """One streamed model: where its blocks come from and where finished blocks go."""

    model: nn.Module
    source: CheckpointTensors
    blocks_prefix: str
    num_blocks: int
    dtype: torch.dtype
    device: torch.device
    staging: Path | None  # the output's work folder; None when nothing is written
    # The method's saved form of the whole model (meta tensors for what is not in memory);
    # by default the dense state.
    state: Callable[[], Mapping[str, Tensor]] | None = None
    # Called with a block's prefix after it is written: the method drops what it kept for it.
    released: list[Callable[[str], None]] = field(default_factory=list)
    # Called with (index, block) before a block is written: the method measures it.
    inspectors: list[Callable[[int, nn.Module], None]] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file
    nonzero: dict[str, int] = field(default_factory=dict)  # parameter name -> non-zeros
    sizes: dict[str, int] = field(default_factory=dict)  # shard file -> bytes
    done: set[int] = field(default_factory=set)
    # What runs before block 0 (embeddings): read only for the calibration capture.
    outside: list[str] = field(default_factory=list)
    # False: finished blocks are freed without being written (a walk that only measures).
    writes: bool = True
    # The source blocks the output keeps, in order, when blocks were dropped (layer reduction):
    # they are copied from the source, renumbered, by `write_remaining`.
    kept: list[int] | None = None

    def load_outside(self, device: torch.device) -> None:
        """Read the tensors that run before the first block (the embeddings) onto `device`."""
        self.load(self.outside, device)

    def release_outside(self) -> None:
        """Free them again: they are unchanged, and written from the source at the end."""
        self.release(self.outside)

    def load(self, names: Iterable[str], device: torch.device) -> None:
        """Read the named tensors (outside the blocks) from the source onto `device`."""
        for name in names:
            current = _get(self.model, name)
            if current.is_meta:
                on_host = device.type == "cpu"
                value = self.source.get(name, _dtype_for(current, self.dtype) if on_host else None)
                if current.is_floating_point():
                    self.nonzero.setdefault(name, int(torch.count_nonzero(value)))
                _set(
                    self.model, name, value.to(device=device, dtype=_dtype_for(current, self.dtype))
                )
        self._retie()

    def release(self, names: Iterable[str]) -> None:
        """Free the named tensors again (back to the meta device)."""
        for name in names:
            _set(self.model, name, _get(self.model, name).to("meta"))
        self._retie()
        _return_freed_memory()

    def after_blocks(self) -> list[str]:
        """The tensors the model's output needs besides the last block's: everything outside
        the blocks but the input embeddings (unless the LM head is tied to them)."""
        embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        skip = set()
        if not _tied(self.model):
            skip = {
                f"{name}.{leaf}" if name else leaf
                for name, module in self.model.named_modules()
                if module is embeddings
                for leaf in module._parameters
            }
        names, seen = [], set()
        for name, tensor in _tensors(self.model):
            if id(tensor) in seen or name in skip or name.startswith(self.blocks_prefix + "."):
                continue
            seen.add(id(tensor))  # a tied head is the embeddings' tensor under another name
            names.append(name)
        return names

    def _retie(self) -> None:
        if _tied_config(self.model):
            self.model.tie_weights()  # type: ignore[operator]

    def block(self, index: int) -> nn.Module:
        return self.model.get_submodule(f"{self.blocks_prefix}.{index}")

    def prefix(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}."

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.num_blocks + 1:05d}.safetensors"

    def enter(self, index: int, device: torch.device | None = None) -> nn.Module:
        """Read block `index`'s tensors from the source onto `device`; the block."""
        if index in self.done:
            raise RuntimeError(f"block {index} was already streamed out")
        block = self.block(index)
        target = device or self.device
        prefix = self.prefix(index)
        for name, tensor in _tensors(block):
            if not tensor.is_meta:
                continue
            full = prefix + name
            if full not in self.source:
                raise UserInputError(
                    f"{full} is missing from the checkpoint in {self.source.directory}"
                )
            on_host = target.type == "cpu"
            value = self.source.get(full, _dtype_for(tensor, self.dtype) if on_host else None)
            if tuple(value.shape) != tuple(tensor.shape):
                raise UserInputError(
                    f"{full} has shape {tuple(value.shape)} in the checkpoint, "
                    f"{tuple(tensor.shape)} in the model's config"
                )
            _set(block, name, value.to(device=target, dtype=_dtype_for(tensor, self.dtype)))
        return block

    def leave(self, index: int, *, write: bool = True) -> None:
        """Write block `index` in its saved form (unless `write` is False: the walk failed)
        and free its tensors."""
        block = self.block(index)
        write = write and self.writes
        try:
            if write:
                for inspect in self.inspectors:
                    inspect(index, block)
                self._write_block(index, block)
        finally:
            block.to("meta")
        if write:
            self.done.add(index)
            for release in self.released:
                release(self.prefix(index))
        _return_freed_memory()

    def _write_block(self, index: int, block: nn.Module) -> None:
        prefix = self.prefix(index)
        for name, param in block.named_parameters():
            self.nonzero[prefix + name] = int(torch.count_nonzero(param))
        state = self.state() if self.state is not None else self.model.state_dict()
        tensors = {
            name: tensor
            for name, tensor in state.items()
            if name.startswith(prefix) and not tensor.is_meta
        }
        if self.staging is None:
            raise RuntimeError("this stream only reads: it has no folder to write blocks into")
        shard = self.shard_name(index + 1)
        self.sizes[shard] = write_safetensors(self.staging / shard, tensors)
        for name in tensors:
            self.written[name] = shard

    def write_remaining(self, directory: Path, state: Mapping[str, Tensor]) -> None:
        """Write the tensors of `state` not yet written (the ones outside the blocks), as the
        last shard, and the index of all shards, into `directory`."""
        if self.kept is not None:
            self._copy_kept(directory)
        missing_blocks = sorted(set(range(self.num_blocks)) - self.done)
        if missing_blocks:
            raise RuntimeError(f"blocks {missing_blocks} were never streamed through")
        from .compression.checkpoint import tied_duplicates

        rest: dict[str, Tensor | Lazy] = {}
        tied = tied_duplicates(self.model, state)
        for name, tensor in state.items():
            if name in self.written or name in tied:
                continue
            if name.startswith(self.blocks_prefix + "."):
                raise RuntimeError(f"{name} of a streamed block was not written")
            if tensor.is_meta:  # not in memory (embeddings, final norm, head): from the source
                if name not in self.source:
                    if name in self._tied_names():
                        continue  # a tied head: transformers ties it again on load
                    raise UserInputError(f"{name} is missing from the source checkpoint")
                dtype = _dtype_for(tensor, self.dtype)
                rest[name] = (tensor.to(dtype), self._reader(name, dtype))
            else:
                rest[name] = tensor
        last = self.shard_name(self.num_blocks + 1)
        self.sizes[last] = write_safetensors(directory / last, rest)
        weight_map = {**self.written, **dict.fromkeys(rest, last)}
        if self.staging is not None and directory != self.staging:
            for shard in dict.fromkeys(self.written.values()):
                if not (directory / shard).exists():
                    os.replace(self.staging / shard, directory / shard)
        index = {
            "metadata": {"total_size": sum(self.sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def keep_blocks(self, kept: list[int]) -> None:
        """The skeleton's blocks were cut down to the source blocks `kept` (in order): the
        output copies them from the source under their new numbers (see `write_remaining`)."""
        if self.done:
            raise RuntimeError("blocks were written already; they cannot be dropped now")
        self.kept = list(kept)
        self.num_blocks = len(self.kept)

    def _copy_kept(self, directory: Path) -> None:
        """Copy the kept blocks' tensors from the source, one tensor at a time, renumbered: one
        shard per block, as for a walked model."""
        assert self.kept is not None
        for new, old in enumerate(self.kept):
            if new in self.done:
                continue
            tensors: dict[str, Tensor | Lazy] = {}
            for name, tensor in _tensors(self.block(new)):
                dtype = _dtype_for(tensor, self.dtype)
                source_name = f"{self.blocks_prefix}.{old}.{name}"
                if source_name not in self.source:
                    raise UserInputError(f"{source_name} is missing from the source checkpoint")
                tensors[self.prefix(new) + name] = (
                    tensor.to("meta", dtype),
                    self._reader(source_name, dtype),
                )
            shard = self.shard_name(new + 1)
            self.sizes[shard] = write_safetensors(directory / shard, tensors)
            for name in tensors:
                self.written[name] = shard
            self.done.add(new)

    def _tied_names(self) -> set[str]:
        names = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        spec_head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if _tied_config(self.model) and spec_head is not None:
            names |= {n for n, p in self.model.named_parameters(remove_duplicate=False)
                      if p is spec_head.weight}  # fmt: skip
        return names

    def _reader(self, name: str, dtype: torch.dtype) -> Callable[[], Tensor]:
        return lambda: self.source.get(name, dtype)


def _return_freed_memory() -> None:
    """Give the freed heap back to the operating system (glibc): after glibc frees a large
    block it raises its threshold for serving allocations by mmap, so the next block's tensors
    come from the heap, whose freed pages it otherwise keeps; then the resident size grows with
    every block although nothing is held (measured: +172 MB over 10 blocks of 17 MB, 0 with
    this)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of `module`'s parameters and persistent buffers."""
    yield from module.named_parameters(remove_duplicate=False)
    for name, buffer in module.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        if leaf not in holder._non_persistent_buffers_set:
            yield name, buffer


def _dtype_for(tensor: Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors take the stream's compute dtype; others keep theirs."""
    return dtype if tensor.is_floating_point() else tensor.dtype


def _get(module: nn.Module, name: str) -> Tensor:
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    value = holder._parameters.get(leaf)
    return value if value is not None else holder._buffers[leaf]  # type: ignore[return-value]


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    if leaf in holder._parameters:
        old = holder._parameters[leaf]
        assert old is not None
        holder._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        holder._buffers[leaf] = value


def stream_of(model: nn.Module) -> BlockStream | None:
    """The stream a streamed model reads its blocks from, or None for a model in memory."""
    stream = model.__dict__.get(_STREAM)
    return stream if isinstance(stream, BlockStream) else None


def save_as(
    model: nn.Module,
    state: Callable[[], Mapping[str, Tensor]],
    release: Callable[[str], None] | None = None,
) -> None:
    """For a method about to walk a streamed model: `state` is its saved form of the model
    (called once per finished block, and may return meta tensors for what is not in memory);
    `release(prefix)` drops what it holds for a written block. Nothing for a model in memory."""
    stream = stream_of(model)
    if stream is None:
        return
    stream.state = state
    if release is not None:
        stream.released.append(release)


def inspect_blocks(model: nn.Module, inspect: Callable[[int, nn.Module], None]) -> None:
    """For a method about to walk a streamed model: call `inspect(index, block)` on each
    finished block before it is freed. Nothing for a model in memory."""
    stream = stream_of(model)
    if stream is not None:
        stream.inspectors.append(inspect)


def nonzero_count(model: nn.Module, name: str, tensor: Tensor) -> int:
    """Non-zero count of parameter `name`, also once a streamed block is gone (counted as it
    was written) or when it was never read (the final norm and LM head: read from the source)."""
    if tensor.is_meta:
        stream = stream_of(model)
        if stream is None:
            raise RuntimeError(f"{name} is not in memory")
        if name not in stream.nonzero:
            if name not in stream.source:
                raise RuntimeError(f"{name} is neither in memory nor in the checkpoint")
            stream.nonzero[name] = int(torch.count_nonzero(stream.source.get(name)))
        return stream.nonzero[name]
    return int(torch.count_nonzero(tensor))


def for_each_block(
    model: nn.Module, names: Iterable[str], work: Callable[[list[str]], None]
) -> None:
    """Call `work` on the targeted module names, one block at a time for a streamed model
    (every block streams through, targeted or not), all at once for a model in memory."""
    names = list(names)
    stream = stream_of(model)
    if stream is None:
        work(names)
        return
    by_block: dict[int, list[str]] = {}
    outside = []
    for name in names:
        if name.startswith(stream.blocks_prefix + "."):
            index = int(name[len(stream.blocks_prefix) + 1 :].split(".", 1)[0])
            by_block.setdefault(index, []).append(name)
        else:
            outside.append(name)
    if outside:
        raise UserInputError(
            f"{outside[0]} is outside the transformer blocks; a streamed run changes only "
            "block weights (pass --stream off to load the whole model)"
        )
    walk_blocks(model, lambda index, block: work(by_block.get(index, [])))


@contextlib.contextmanager
def reading_only(model: nn.Module) -> Iterator[None]:
    """A walk of a streamed model that only measures (a pre-pass): the blocks it reads are
    freed without being written, so a later walk can read and write them. Nothing for a model
    in memory."""
    stream = stream_of(model)
    if stream is None:
        yield
        return
    stream.writes = False
    try:
        yield
    finally:
        stream.writes = True


def walk_blocks(model: nn.Module, work: Callable[[int, nn.Module], None]) -> None:
    """Call `work(index, block)` on every block in order; a streamed model reads each block
    before and writes and frees it after (nothing is written when `work` fails)."""
    from .arch import get_arch, get_blocks

    stream = stream_of(model)
    if stream is None:
        for index, block in enumerate(get_blocks(model, get_arch(model))):
            work(index, block)
        return
    for index in range(stream.num_blocks):
        block = stream.enter(index)
        try:
            work(index, block)
        except BaseException:
            stream.leave(index, write=False)
            raise
        stream.leave(index)


def walk_unchanged(model: nn.Module) -> None:
    """Stream every block through unchanged (casting: the skeleton's dtype is the new one)."""
    for_each_block(model, [], lambda names: None)


# ---------------------------------------------------------------------------------------------
# Building a streamed model.
# ---------------------------------------------------------------------------------------------


def open_streamed(
    directory: Path,
    staging: Path | None,
    *,
    dtype: torch.dtype | None,
    device: torch.device,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The skeleton of the model in `directory` on the meta device (only its non-persistent
    buffers, e.g. rotary tables, are real, on `device`), with a `BlockStream` that reads its
    tensors when asked and writes finished blocks into `staging` (None: a stream that only
    reads, for evaluation).

    `dtype` None keeps the checkpoint's dtype. Raises `UserInputError` when the checkpoint's
    tensors do not match the model its config builds.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import get_arch, get_blocks

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if dtype is None:
        dtype = _checkpoint_dtype(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=trust_remote_code, dtype=dtype
        )
    model.eval()
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    source = CheckpointTensors(directory)
    stream = BlockStream(
        model=model,
        source=source,
        blocks_prefix=spec.blocks,
        num_blocks=len(blocks),
        dtype=dtype,
        device=device,
        staging=staging,
    )
    _check_names(model, source, spec)
    skip = (spec.blocks, spec.lm_head, *([spec.final_norm] if spec.final_norm else []))
    stream.outside = [
        name
        for name, _ in _tensors(model)
        if not any(name == s or name.startswith(s + ".") for s in skip)
    ]
    for name, buffer in model.named_buffers():
        if not buffer.is_meta and buffer.device != device:
            _set(model, name, buffer.to(device))
    model.__dict__[_STREAM] = stream
    stream._retie()  # the skeleton shares a tied head with the embeddings, as the model does
    return model


def loaded_bytes(directory: Path, dtype: torch.dtype | None) -> int:
    """Bytes the checkpoint's tensors take once loaded whole (floating ones in `dtype`; None:
    as stored)."""
    total = 0
    for _, stored, shape, _, _ in CheckpointTensors(directory).entries.values():
        target = dtype if dtype is not None and stored.is_floating_point else stored
        numel = 1
        for size in shape:
            numel *= size
        total += numel * torch.empty((), dtype=target).element_size()
    return total


def available_bytes(device: torch.device) -> int:
    """Memory free for a model on `device`: the GPU's free memory, or the host's available
    memory (what the kernel could give without swapping)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _checkpoint_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    return torch.float32


def _check_names(model: nn.Module, source: CheckpointTensors, spec: Any) -> None:
    """Every tensor the model needs is in the checkpoint under the model's own name (a tied
    LM head may be absent)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if _tied_config(model) or _tied(model):
        tied.add(spec.lm_head + ".weight")
    missing = [n for n, _ in _tensors(model) if n not in source and n not in tied]
    if missing:
        raise StreamRefused(
            f"the checkpoint names its tensors unlike the model transformers builds (e.g. "
            f"{missing[0]} is not in it; transformers renames such keys when it loads)"
        )


def _tied_config(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    return bool(getattr(text, "tie_word_embeddings", False))


def _tied(model: nn.Module) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    get_input = getattr(model, "get_input_embeddings", None)
    if get_output is None or get_input is None:
        return False
    out, inp = get_output(), get_input()
    return out is not None and inp is not None and out.weight is inp.weight
