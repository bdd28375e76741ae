"""The one layer-by-layer calibration engine: capture block inputs, then walk the blocks.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), SparseGPT (Frantar & Alistarh 2023), Wanda (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models"), AWQ (Lin et al. 2023) and static
activation scales all need the same thing: the inputs each linear layer sees on calibration text,
*given that the blocks before it have already been compressed*. Their reference repositories
each copy a `Catcher` module and a replay loop per method and per architecture; here it is
written once, and methods plug in as a `BlockCalibrator`.

The walk (`run_calibration`):

1. Capture. The model runs on each mini-batch of token ids with every block's ``forward``
   temporarily replaced by a recorder that stores its arguments and passes the hidden states
   through unchanged, then stops the forward after the last block (so the final norm and the LM
   head never run). Block 0's hidden states become the first activations; every block's other
   arguments (masks, position ids, rotary ``position_embeddings``, ``cache=None``...) are kept
   per block and per batch, because in transformers 5.24 they are NOT the same for all blocks:
   Gemma-2/Gemma-3/Qwen-2 pass a sliding-window mask to some layers and a full causal mask to
   others, and Gemma-3 also passes different rotary tables to local and global layers. Masks
   also depend on the batch shape (eager attention gives (batch, 1, seq, seq)), so arguments are
   captured per batch and stored once when equal to an already stored set.
   Only the modules outside the blocks (embeddings, rotary tables, positional embeddings) visit
   the compute device during capture.
2. For each block, one at a time on the compute device (its original device is restored after):
   for each group of linears from `BlockCalibrator.groups` (e.g. ``[[q, k, v], [o], [gate, up],
   [down]]``, "true sequential" order), run the block on all samples with forward hooks on the
   group's linears feeding `observe`, then call `solve` for each linear of the group, so later
   groups see the outputs of already-compressed earlier ones.
3. Replay the block on all samples: its outputs are the next block's inputs, so every block is
   calibrated on the activations of the compressed model before it.

Peak memory is one block plus the activations, (samples, seq, hidden) in the model dtype, held
twice while a block is replayed (its inputs and outputs) and once more when `measure_error`
keeps the original block outputs to report the block's error. ``offload_activations=True`` keeps
the activations on the CPU and moves one mini-batch at a time; the captured block arguments
(masks, rotary tables) stay on the compute device. Compute per block: one forward pass over the
calibration set per group (a calibrator with ``stop_after_group`` ends each pass as soon as the
group's linears have run, so the [q, k, v] pass costs little more than the attention
projections) plus one for the replay. Relative errors are measured on the leading mini-batches
only (`ERROR_MAX_TOKENS` tokens). ``precision="bf16"`` runs every block pass under bf16
autocast (about 2.4x faster block forwards on CPUs with native bf16 and on recent GPUs, as GPU
users of llm-compressor get by loading the model in bf16); calibrators still receive inputs in
the model's dtype, statistics are accumulated and solved in float32, and the weights are never
cast, so only the activations the statistics come from carry bf16 rounding. A linear's error
goes through the weight difference (one matmul), so bf16 rounding does not swamp small
rewrites. ``CalibrationSettings.precision`` defaults to "fp32"; "auto" means bf16 where bf16
matmuls are native (`resolve_precision`). There is no KV cache (``use_cache=False``),
the model is in eval mode under `torch.no_grad` (a calibrator needing gradients enables them
itself), and its training flag is restored afterwards. Nothing is random: the same inputs give
the same statistics.

`block_io_scores` runs the same walk without compressing anything and scores each block by
ShortGPT's Block Influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect"): BI = 1 - mean over tokens of cos(block input, block output).

Reusable statistics are free functions on tensors (`accumulate_hessian`,
`accumulate_channel_sq_norm`, `accumulate_channel_abs_mean`) wrapped by small observers
(`HessianObserver`, `ChannelNormObserver`) that a calibrator keeps per linear.

Public API::

    inputs = capture_block_inputs(model, samples, device="cuda", batch_size=8)
    report = run_calibration(model, samples, calibrator, device=None, batch_size=8,
                             precision="fp32",
                             offload_activations=False, progress=False, measure_error=True)
    scores = block_io_scores(model, samples, batch_size=8)   # one float in [0, 2] per block

`samples` is a LongTensor of token ids, shape (num_samples, seq_len), without padding (the
windows `data.token_windows` produces); no attention mask is passed, so every token attends to
all the tokens before it in its window.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers.pytorch_utils import Conv1D

from swiss_knife.arch import (
    ArchSpec,
    block_linears,
    get_arch,
    get_blocks,
    linear_in_out,
)
from swiss_knife.config import default_batch_size
from swiss_knife.device import fast_bf16_matmul
from swiss_knife.errors import UnsupportedArchitectureError, UserInputError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Tensor math: running statistics of a linear layer's inputs. No modules, no hooks.
# ---------------------------------------------------------------------------------------------


def accumulate_hessian(hessian: Tensor, count: int, inp: Tensor) -> tuple[Tensor, int]:
    """Fold a chunk of inputs into the running GPTQ/SparseGPT Hessian H = 2/n * sum x x^T.

    `hessian` (in_features, in_features) float32 is updated in place and returned with the new
    token count. Keeping a running mean rather than a sum (as the GPTQ reference code does) keeps
    the magnitudes independent of the number of calibration tokens, so a fixed dampening
    fraction means the same thing for any calibration set. Float32 even for half-precision
    models: the Cholesky factorisation that follows is sensitive to rounding.
    """
    tokens = inp.shape[0]
    if tokens == 0:
        return hessian, count
    total = count + tokens
    hessian.mul_(count / total)
    scaled = inp.float() * math.sqrt(2.0 / total)  # (tokens, in_features)
    hessian.addmm_(scaled.t(), scaled)  # (in_features, in_features)
    return hessian, total


def accumulate_channel_sq_norm(sq_norm: Tensor, count: int, inp: Tensor) -> tuple[Tensor, int]:
    """Add each input channel's squared L2 norm over the chunk's tokens: sum_t x[t, j]^2.

    Wanda scores a weight by |W_ij| * ||X_j||_2, the norm of input channel j over all
    calibration tokens; ``sq_norm.sqrt()`` is that norm. `sq_norm` (in_features,) float32 is
    updated in place.
    """
    sq_norm.add_(inp.float().square().sum(dim=0))  # (in_features,)
    return sq_norm, count + inp.shape[0]


def accumulate_channel_abs_mean(abs_mean: Tensor, count: int, inp: Tensor) -> tuple[Tensor, int]:
    """Running mean over tokens of |x[t, j]| per input channel, as AWQ's activation salience.

    `abs_mean` (in_features,) float32 is updated in place.
    """
    tokens = inp.shape[0]
    if tokens == 0:
        return abs_mean, count
    total = count + tokens
    abs_mean.mul_(count / total).add_(inp.float().abs().sum(dim=0) / total)  # (in_features,)
    return abs_mean, total


class HessianObserver:
    """Accumulates H = 2/n * sum x x^T of one linear's inputs (GPTQ, SparseGPT).

    Storage is in_features^2 float32 on the inputs' device, allocated at the first update.
    """

    def __init__(self) -> None:
        self._hessian: Tensor | None = None
        self.count = 0

    def update(self, inp: Tensor) -> None:
        """Fold in inputs of shape (tokens, in_features)."""
        if self._hessian is None:
            features = inp.shape[-1]
            self._hessian = torch.zeros(features, features, dtype=torch.float32, device=inp.device)
        self._hessian, self.count = accumulate_hessian(self._hessian, self.count, inp)

    @property
    def hessian(self) -> Tensor:
        if self._hessian is None:
            raise RuntimeError("HessianObserver has seen no inputs")
        return self._hessian


class ChannelNormObserver:
    """Per-input-channel activation statistics of one linear: Wanda's norms, AWQ's |x| means.

    ``abs_mean=False`` keeps the squared norms alone (Wanda, OWL), skipping a pass over the
    inputs and an (in_features,) buffer that those never read.
    """

    def __init__(self, *, abs_mean: bool = True) -> None:
        self._sq_norm: Tensor | None = None
        self._abs_mean: Tensor | None = None
        self._track_abs_mean = abs_mean
        self.count = 0

    def update(self, inp: Tensor) -> None:
        """Fold in inputs of shape (tokens, in_features)."""
        if self._sq_norm is None:
            features = inp.shape[-1]
            self._sq_norm = torch.zeros(features, dtype=torch.float32, device=inp.device)
            if self._track_abs_mean:
                self._abs_mean = torch.zeros(features, dtype=torch.float32, device=inp.device)
        count = self.count
        self._sq_norm, self.count = accumulate_channel_sq_norm(self._sq_norm, count, inp)
        if self._abs_mean is not None:
            self._abs_mean, _ = accumulate_channel_abs_mean(self._abs_mean, count, inp)

    @property
    def sq_norm(self) -> Tensor:
        """sum over tokens of x^2 per channel, (in_features,)."""
        if self._sq_norm is None:
            raise RuntimeError("ChannelNormObserver has seen no inputs")
        return self._sq_norm

    @property
    def l2_norm(self) -> Tensor:
        """Wanda's ||X_j||_2 per input channel, (in_features,)."""
        return self.sq_norm.sqrt()

    @property
    def abs_mean(self) -> Tensor:
        """AWQ's mean |x| per input channel, (in_features,)."""
        if self._abs_mean is None:
            if not self._track_abs_mean:
                raise RuntimeError("this ChannelNormObserver keeps no |x| means (abs_mean=False)")
            raise RuntimeError("ChannelNormObserver has seen no inputs")
        return self._abs_mean


# ---------------------------------------------------------------------------------------------
# The calibrator interface.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockContext:
    """What a calibrator may know about the block being processed.

    Linear names are FULL dotted module names (``model.layers.3.self_attn.q_proj``) everywhere
    (groups, observe, solve, records), so per-pattern settings from `targeting` apply directly.
    """

    index: int
    num_blocks: int
    # Full name of the block, e.g. "model.layers.3".
    prefix: str
    block: nn.Module
    # Full name -> module for the block's linears, in execution order (arch.block_linears).
    linears: Mapping[str, nn.Module]
    spec: ArchSpec
    config: Any
    device: torch.device

    def full_name(self, relative: str) -> str:
        """Full name of a module given its path inside the block (e.g. ``spec.o_proj``)."""
        return f"{self.prefix}.{relative}"


def sequential_groups(
    ctx: BlockContext, targets: Container[str] | None = None, *, true_sequential: bool = True
) -> list[list[str]]:
    """The block's linears grouped by what they read, in execution order.

    With `true_sequential`: [q, k, v] (or the fused qkv), [o], the MLP input(s), [MLP output];
    linears in a group read the same input, so they can be observed in one pass, and every group
    sees the outputs of the already-solved groups before it (GPTQ's "true sequential" option).
    Otherwise one group holds everything and all linears are observed on the block's original
    computation. Names not in `targets` (e.g. the dict from `targeting.resolve_targets`) are left
    out, and empty groups dropped.
    """
    spec = ctx.spec
    stages: list[list[str | None]] = [
        [spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj],
        [spec.o_proj],
        list(spec.mlp_up),
        [spec.mlp_down],
    ]
    groups = []
    for stage in stages:
        names = [ctx.full_name(rel) for rel in stage if rel is not None]
        names = [name for name in names if targets is None or name in targets]
        if names:
            groups.append(names)
    if not true_sequential and groups:
        return [[name for group in groups for name in group]]
    return groups


class BlockCalibrator:
    """Base class of a method plugged into the walk; every hook has a do-nothing default.

    Per block the engine calls: `start_block`, then for each group from `groups` one forward
    pass feeding `observe` for the group's linears, then `solve` for each of them; then the
    replay pass feeding `observe_block`; then `end_block`. The default `groups` observes every
    linear of the block in true-sequential order.
    """

    # Whether a group's pass over a mini-batch may stop as soon as every linear of the group
    # has run. Saves most of a block's forward for early groups ([q, k, v] runs first), but a
    # calibrator that hooks modules after the group (AWQ records the attention module's call)
    # needs the whole forward and keeps this False.
    stop_after_group: bool = False

    # Whether each linear may be solved from its own inputs the moment it is about to run
    # (true-sequential order at the finest grain: a linear's inputs come from the
    # already-solved linears before it). When all calibration samples fit one mini-batch the
    # engine then walks each block in ONE pass: a pre-forward hook observes the linear's
    # inputs, solves it, and the linear computes with its new weights, so the block's output is
    # already the next block's input (no replay pass). `observe` then gets an empty
    # (0, out_features) `out`, and the block's own error is not measured (it would need the
    # original block's output, one more pass). With several mini-batches the usual group passes
    # run instead, giving the same statistics.
    solve_during_pass: bool = False

    def start_block(self, ctx: BlockContext) -> None:
        """Called once the block is on the compute device, before any pass over it."""

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        """Sequential groups of full linear names to observe and solve; [] to only replay."""
        return sequential_groups(ctx)

    def observe(self, name: str, module: nn.Module, inp: Tensor, out: Tensor) -> None:
        """One mini-batch of a linear's inputs (tokens, in_features) and outputs (tokens, out)."""

    def solve(self, name: str, module: nn.Module) -> Mapping[str, float] | None:
        """Rewrite the linear in place from its statistics; may return metrics to record."""
        return None

    def observe_block(self, ctx: BlockContext, inp: Tensor, out: Tensor) -> None:
        """One mini-batch of the block's input and (compressed) output, (batch, seq, hidden)."""

    def end_block(self, ctx: BlockContext) -> None:
        """Called after the replay, before the block returns to its original device."""


# ---------------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearRecord:
    """What happened to one linear during calibration."""

    name: str
    block: int
    in_features: int
    out_features: int
    # Calibration tokens its statistics were gathered on.
    tokens: int
    # Time spent in `solve`.
    seconds: float
    # ||y_new - y_old|| / ||y_old|| over the replay of the leading mini-batches (up to
    # ERROR_MAX_TOKENS tokens), where y_old uses the weights from before
    # `solve` on the same inputs: the error this linear's own rewrite adds. None when not
    # measured. (For methods that also rescale the linear's input, e.g. AWQ folding scales into
    # a norm, read the block's error instead.)
    rel_error: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockRecord:
    """One block's walk: its time and how far its outputs moved."""

    index: int
    seconds: float
    groups: int
    # ||out_new - out_orig|| / ||out_orig|| on this block's (already compressed) inputs, where
    # out_orig is the block before any solve. None when not measured or nothing was solved.
    rel_error: float | None


@dataclass(frozen=True)
class CalibrationReport:
    """Summary of a `run_calibration` call; `to_dict` gives plain JSON-ready data."""

    device: str
    batch_size: int
    num_samples: int
    seq_len: int
    capture_seconds: float
    seconds: float
    blocks: list[BlockRecord]
    linears: list[LinearRecord]
    # How the block passes ran: "bf16-autocast" or the model's dtype ("float32", ...).
    precision: str = "float32"

    @property
    def tokens(self) -> int:
        return self.num_samples * self.seq_len

    def linear(self, name: str) -> LinearRecord:
        for record in self.linears:
            if record.name == name:
                return record
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens}


# ---------------------------------------------------------------------------------------------
# Capture.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockCall:
    """Everything a block is called with besides the hidden states."""

    # Positional arguments after the hidden states (GPT-2 passes cache and mask positionally).
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # Whether the hidden states were passed as ``hidden_states=`` rather than first positional.
    hidden_as_kwarg: bool


@dataclass
class BlockInputs:
    """Activations entering the next block, per mini-batch, and every block's call arguments."""

    # Per mini-batch, (batch, seq, hidden): block 0's input after capture, then updated in place
    # by the walk to the input of the next block. In memory, or in files (`SpilledActivations`).
    hidden: list[Tensor] | SpilledActivations
    # calls[block][batch]; equal argument sets are stored once and shared.
    calls: list[list[BlockCall]]
    device: torch.device
    # Where `hidden` lives: the compute device, or the CPU with offloading.
    storage: torch.device

    @property
    def num_batches(self) -> int:
        return len(self.hidden)

    @property
    def num_samples(self) -> int:
        return sum(shape[0] for shape in self.shapes())

    def shapes(self) -> list[tuple[int, ...]]:
        """Each mini-batch's (batch, seq, hidden) shape, without reading spilled ones."""
        if isinstance(self.hidden, SpilledActivations):
            return [shape for _, shape, _ in self.hidden.entries]
        return [tuple(h.shape) for h in self.hidden]

    def distinct_calls(self) -> int:
        """Number of argument sets actually stored (after sharing equal ones)."""
        return len({id(call) for per_block in self.calls for call in per_block})


class SpilledActivations:
    """The activations of every mini-batch in files of a work folder instead of memory: item b
    is read from its file when asked for and written back when set, so one mini-batch at a time
    is in memory. The folder is deleted by `close`.

    Plain reads and writes, not memory maps: the pages of a mapped file count in the process's
    resident set until the kernel needs them back, so a memory-mapped buffer would look (and,
    to other processes' limits, be) as large as the one in memory.
    """

    def __init__(self, parent: Path) -> None:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="swiss-knife-activations-", dir=parent))
        except OSError as exc:
            raise UserInputError(
                f"cannot keep the activations in {parent} (--spill-activations / "
                f"calibration.spill_dir): {exc.strerror or exc}"
            ) from exc
        # Per mini-batch: its file, shape and dtype.
        self.entries: list[tuple[Path, tuple[int, ...], torch.dtype]] = []

    def _write(self, path: Path, tensor: Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous()
        with open(path, "wb") as handle:
            handle.write(data.view(torch.uint8).reshape(-1).numpy().data)

    def append(self, tensor: Tensor) -> None:
        path = self.directory / f"{len(self.entries):06d}.bin"
        self._write(path, tensor)
        self.entries.append((path, tuple(tensor.shape), tensor.dtype))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Tensor:
        path, shape, dtype = self.entries[index]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raw = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb") as handle:
            if handle.readinto(raw.numpy().data) != size:
                raise RuntimeError(f"{path} was cut short: the activations buffer is damaged")
        return raw.view(dtype).reshape(shape)

    def __setitem__(self, index: int, tensor: Tensor) -> None:
        path, shape, dtype = self.entries[index]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"mini-batch {index} changed shape or dtype in the buffer")
        self._write(path, tensor)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# Where `run_calibration` spills activations (None: keep them in memory); see `spilled_to`.
_SPILL_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "swiss_knife_spill_dir", default=None
)


@contextlib.contextmanager
def spilled_to(directory: str | Path | None) -> Iterator[None]:
    """Within the block, every calibration walk keeps its activations in files in a fresh
    folder inside `directory` (`SpilledActivations`), deleted when the walk ends; None keeps
    them in memory."""
    token = _SPILL_DIR.set(Path(directory).expanduser() if directory is not None else None)
    try:
        yield
    finally:
        _SPILL_DIR.reset(token)


# Tokens (leading mini-batches) on which `run_calibration` measures relative output errors.
ERROR_MAX_TOKENS = 2048


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks needs to run."""


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured block arguments (tensors by value)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or b is None or isinstance(a, bool | int | float | str):
        return type(a) is type(b) and a == b
    # Anything else (a cache object, a config) is only "the same" when it is the same object.
    return False


def _same_call(a: BlockCall, b: BlockCall) -> bool:
    return a is b or (
        a.hidden_as_kwarg == b.hidden_as_kwarg
        and _same(a.args, b.args)
        and _same(a.kwargs, b.kwargs)
    )


def _check_samples(config: Any, samples: Any) -> None:
    expected = "a torch.LongTensor of token ids with shape (num_samples, seq_len)"
    if not isinstance(samples, Tensor):
        raise UserInputError(
            f"calibration samples must be {expected}, got {type(samples).__name__}"
        )
    if samples.dtype != torch.long:
        raise UserInputError(f"calibration samples must be {expected}, got dtype {samples.dtype}")
    if samples.dim() != 2:
        raise UserInputError(
            f"calibration samples must be {expected}, got shape {tuple(samples.shape)}"
        )
    if samples.numel() == 0:
        raise UserInputError(
            f"calibration samples are empty (shape {tuple(samples.shape)}); "
            "need at least one sample of at least one token"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and samples.shape[1] > max_positions:
        raise UserInputError(
            f"calibration sequences have {samples.shape[1]} tokens but the model handles at most "
            f"{max_positions} positions; use shorter windows"
        )
    vocab = getattr(config, "vocab_size", None)
    low, high = int(samples.min()), int(samples.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise UserInputError(
            f"calibration token ids span [{low}, {high}] but the vocabulary has {vocab} entries; "
            "were the samples tokenized with this model's tokenizer?"
        )


def _check_batch_size(batch_size: Any, samples: Tensor) -> int:
    """The mini-batch size: as given, or (None) the config's default for these windows."""
    if batch_size is None:
        return default_batch_size(int(samples.shape[-1]))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _module_device(module: nn.Module) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _resolve_compute_device(
    device: torch.device | str | None, blocks: nn.ModuleList
) -> torch.device:
    if device is None:
        # Default: compute where the model already is; nothing moves.
        return _module_device(blocks[0])
    if isinstance(device, torch.device):
        return device
    from swiss_knife.device import resolve_device

    return resolve_device(device)


def _check_not_meta(model: nn.Module) -> None:
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise UserInputError(
            f"parameters such as {meta[0]!r} are on the meta device (offloaded by a device_map); "
            "load the model without offloading: the calibration engine moves one block at a "
            "time to the compute device itself"
        )


def _within(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, spec: ArchSpec, device: torch.device) -> Iterator[None]:
    """Temporarily move every tensor outside the blocks, final norm and LM head to `device`.

    That is what runs before block 0 (embeddings, positional embeddings, rotary tables, OPT's
    project_in), found generically instead of per architecture. Tensors move one by one through
    ``.data`` / the buffer dict, like `nn.Module.to` does, so tied weights stay tied.
    """
    skip = [spec.blocks, spec.lm_head, *([spec.final_norm] if spec.final_norm else [])]
    moved: list[tuple[nn.Module, str, bool, torch.device]] = []
    try:
        for name, module in model.named_modules():
            if _within(name, skip):
                continue
            for key, param in module._parameters.items():
                if param is not None and param.device != device:
                    moved.append((module, key, True, param.device))
                    param.data = param.data.to(device)
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    moved.append((module, key, False, buffer.device))
                    module._buffers[key] = buffer.to(device)
        yield
    finally:
        for module, key, is_param, original in reversed(moved):
            if is_param:
                param = module._parameters[key]
                if param is not None:
                    param.data = param.data.to(original)
            else:
                buffer = module._buffers[key]
                if buffer is not None:
                    module._buffers[key] = buffer.to(original)


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _Capture:
    """Replaces each block's forward by a recorder for the duration of the capture run."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        storage: torch.device,
        spill: SpilledActivations | None = None,
    ) -> None:
        self.blocks = blocks
        self.storage = storage
        self.hidden: list[Tensor] | SpilledActivations = spill if spill is not None else []
        self.calls: list[list[BlockCall]] = [[] for _ in blocks]
        self.distinct: list[BlockCall] = []
        self.expected = 0
        self.passed: Tensor | None = None

    def recorder(self, index: int) -> Callable[..., Tensor]:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            if index != self.expected:
                raise UnsupportedArchitectureError(
                    f"the model called block {index} when block {self.expected} was expected; "
                    "the calibration engine needs each block called once, in order"
                )
            if args:
                hidden, rest, as_kwarg = args[0], tuple(args[1:]), False
            else:
                hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
            if index == 0:
                self.hidden.append(hidden.detach().to(self.storage))
            elif hidden is not self.passed:
                # The recorders pass the hidden states through; receiving anything else means the
                # model transforms a block's output before the next block (e.g. indexes a tuple
                # output), which replaying blocks one by one would not reproduce.
                raise UnsupportedArchitectureError(
                    f"{type(self.blocks[index]).__name__} {index} did not receive the previous "
                    "block's output unchanged; this model cannot be calibrated block by block"
                )
            self.calls[index].append(self._shared(BlockCall(rest, kwargs, as_kwarg)))
            self.passed = hidden
            self.expected = index + 1
            if index == len(self.blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    def _shared(self, call: BlockCall) -> BlockCall:
        # Arguments equal to an already stored set (same block in an earlier batch, or another
        # block of the same layer type) are stored once; identity makes most checks free.
        for known in self.distinct:
            if _same_call(call, known):
                return known
        self.distinct.append(call)
        return call

    def installed(self) -> contextlib.AbstractContextManager[None]:
        return replaced_forwards(self.blocks, [self.recorder(i) for i in range(len(self.blocks))])


@contextlib.contextmanager
def replaced_forwards(
    blocks: nn.ModuleList, forwards: Sequence[Callable[..., Tensor]]
) -> Iterator[None]:
    """Call `forwards[i]` instead of block i's forward for the duration. An instance attribute
    shadows the class's forward; one set by a wrapper (accelerate) is put back afterwards."""
    previous = [block.__dict__.get("forward") for block in blocks]
    try:
        for block, forward in zip(blocks, forwards, strict=True):
            block.forward = forward
        yield
    finally:
        for block, old in zip(blocks, previous, strict=True):
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


def _capture(
    model: nn.Module,
    spec: ArchSpec,
    blocks: nn.ModuleList,
    samples: Tensor,
    device: torch.device,
    batch_size: int,
    storage: torch.device,
    spill: SpilledActivations | None = None,
) -> BlockInputs:
    capture = _Capture(blocks, storage, spill)
    with capture.installed(), _outside_blocks_on(model, spec, device):
        for batch in samples.split(batch_size):
            capture.expected = 0
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                continue
            raise UnsupportedArchitectureError(
                f"the model's forward returned after block {capture.expected - 1} of "
                f"{len(blocks)}; the calibration engine needs every block to run"
            )
    return BlockInputs(hidden=capture.hidden, calls=capture.calls, device=device, storage=storage)


def capture_block_inputs(
    model: nn.Module,
    samples: Tensor,
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    offload_activations: bool = False,
) -> BlockInputs:
    """Block 0's input hidden states and every block's call arguments, per mini-batch.

    Only the modules before the blocks (embeddings, positional/rotary tables) run, on `device`
    (default: where block 0 is), and are moved back afterwards. See the module docstring.
    """
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    _check_samples(model.config, samples)
    batch_size = _check_batch_size(batch_size, samples)
    _check_not_meta(model)
    compute = _resolve_compute_device(device, blocks)
    storage = torch.device("cpu") if offload_activations else compute
    with _calibration_mode(model):
        return _capture(model, spec, blocks, samples, compute, batch_size, storage)


# ---------------------------------------------------------------------------------------------
# The walk.
# ---------------------------------------------------------------------------------------------


def _run_block(block: nn.Module, hidden: Tensor, call: BlockCall) -> Tensor:
    if call.hidden_as_kwarg:
        out = block(*call.args, hidden_states=hidden, **call.kwargs)
    else:
        out = block(hidden, *call.args, **call.kwargs)
    # transformers 5.x blocks return the hidden states; older layers returned (hidden, ...).
    return out if isinstance(out, Tensor) else out[0]


def _apply_linear(module: nn.Module, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """The linear's function with given weights, for comparing old and new outputs."""
    if isinstance(module, Conv1D):
        out = x @ weight  # (..., out_features): Conv1D stores its weight as (in, out)
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


class _ErrorMeter:
    """Accumulates ||new - old||^2 and ||old||^2 in float64 for a relative Frobenius error."""

    def __init__(self) -> None:
        self.diff = 0.0
        self.ref = 0.0

    def add(self, new: Tensor, old: Tensor) -> None:
        self.add_difference(new.float() - old.float(), old)

    def add_difference(self, diff: Tensor, old: Tensor) -> None:
        self.diff += float(diff.float().square().sum())
        self.ref += float(old.float().square().sum())

    def value(self) -> float:
        if self.ref == 0.0:
            return 0.0 if self.diff == 0.0 else math.inf
        return math.sqrt(self.diff / self.ref)


def _validated_groups(groups: Any, ctx: BlockContext) -> list[list[str]]:
    result: list[list[str]] = []
    seen: set[str] = set()
    for group in groups:
        names = [group] if isinstance(group, str) else list(group)
        for name in names:
            if name not in ctx.linears:
                raise ValueError(
                    f"calibrator group names {name!r}, which is not a linear of block "
                    f"{ctx.index}; use full names such as {next(iter(ctx.linears))!r}"
                )
            if name in seen:
                raise ValueError(f"calibrator lists {name!r} in more than one group")
            seen.add(name)
        if names:
            result.append(names)
    return result


class _Caster:
    """Casts a linear's input to its weight dtype, once per distinct input tensor.

    Linears fed the same tensor (q/k/v) must receive the same cast tensor, so that calibrators
    recognise the shared input (`_SharedObservers`) as they do without autocast.
    """

    def __init__(self) -> None:
        self._last: tuple[Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, dtype: torch.dtype | None) -> Tensor:
        if dtype is None or x.dtype == dtype:
            return x
        last = self._last
        if last is not None and same_tensor(last[0], x) and last[1].dtype == dtype:
            return last[1]
        cast = x.to(dtype)
        self._last = (x, cast)  # holding x keeps its memory from being reused meanwhile
        return cast

    def input_of(self, module: nn.Module, inp: Tensor) -> Tensor:
        """A linear's input as (tokens, in_features) in its weight's dtype."""
        return self(inp.reshape(-1, inp.shape[-1]), _weight_dtype(module))


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are views of the same memory with the same layout and dtype: how
    calibrators recognise the one input that several linears (q/k/v, gate/up) read."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _observe_hook(
    calibrator: BlockCalibrator,
    name: str,
    tokens: dict[str, int],
    caster: _Caster,
) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        # Under bf16 autocast the activations arrive in bf16: calibrators always get the
        # model's dtype, so their statistics and searches run as without autocast.
        inp2d = caster.input_of(module, args[0])  # (tokens, in_features)
        out2d = output.reshape(-1, output.shape[-1]).to(inp2d.dtype)  # (tokens, out_features)
        tokens[name] = tokens.get(name, 0) + inp2d.shape[0]
        calibrator.observe(name, module, inp2d, out2d)

    return hook


class _StopBlock(Exception):
    """Raised once every linear of the group being observed has run on the mini-batch."""


class _GroupStop:
    """Ends a mini-batch's pass once every linear of the group has run (when armed)."""

    def __init__(self) -> None:
        self.pending: set[str] = set()

    def arm(self, group: Sequence[str]) -> None:
        self.pending = set(group)

    def disarm(self) -> None:
        self.pending = set()

    def hook(self, name: str) -> Any:
        def fire(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if self.pending:
                self.pending.discard(name)
                if not self.pending:
                    raise _StopBlock

        return fire


def _error_batches(inputs: BlockInputs, max_tokens: int) -> int:
    """How many leading mini-batches the error measurements use: enough for `max_tokens`."""
    tokens = 0
    for count, shape in enumerate(inputs.shapes(), start=1):
        tokens += shape[0] * shape[1]
        if tokens >= max_tokens:
            return count
    return inputs.num_batches


def _error_hook(weight: Tensor, bias: Tensor | None, meter: _ErrorMeter, max_tokens: int) -> Any:
    """Adds ||x (W_new - W_old)^T|| and ||x W_old^T + b_old|| for the first `max_tokens` tokens.

    The difference goes through the linear once with the weight difference, so its relative
    accuracy is that of the matmul even under bf16 autocast (subtracting two bf16 outputs would
    leave mostly rounding noise for small rewrites such as int8); the cost is two linears over
    at most `max_tokens` tokens.
    """
    seen = [0]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        x = args[0]
        x = x.reshape(-1, x.shape[-1])[: max_tokens - seen[0]]  # (tokens, in_features)
        if x.shape[0] == 0:
            return
        seen[0] += x.shape[0]
        new_bias = getattr(module, "bias", None)
        new_bias = new_bias if isinstance(new_bias, Tensor) else None
        delta_bias = _bias_difference(new_bias, bias)
        new_weight = module.weight
        assert isinstance(new_weight, Tensor)
        delta = _apply_linear(module, new_weight - weight, delta_bias, x)
        old = _apply_linear(module, weight, bias, x)
        meter.add_difference(delta, old)

    return hook


def _bias_difference(new: Tensor | None, old: Tensor | None) -> Tensor | None:
    if new is None and old is None:
        return None
    if new is None:
        assert old is not None
        return -old
    return new if old is None else new - old


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    """What a calibration `precision` means for blocks of `dtype` computed on `device`.

    Returns "bf16-autocast" (block passes under bf16 autocast) or the name of `dtype` (passes in
    the model's own dtype). "auto" picks bf16 autocast for float32 models on devices with native
    bf16 matmuls (`device.fast_bf16_matmul`) and the model's dtype elsewhere; "bf16" asks for
    autocast anyway; either way a model already in 16 bits runs in its own dtype.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"calibration precision must be one of {PRECISIONS}, not {precision!r}")
    model_dtype = str(dtype).removeprefix("torch.")
    if dtype != torch.float32 or precision == "fp32":
        return model_dtype
    if precision == "auto" and not fast_bf16_matmul(device):
        return model_dtype
    if not torch.amp.is_autocast_available(device.type):
        if precision == "auto":
            return model_dtype
        raise UserInputError(
            f"calibration precision 'bf16' needs autocast, which torch does not offer on "
            f"{device.type}; use precision 'fp32'"
        )
    return "bf16-autocast"


def _pass_context(resolved: str, device: torch.device) -> Callable[[], Any]:
    """A context factory for the block passes: bf16 autocast, or nothing."""
    if resolved == "bf16-autocast":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _blocks_dtype(blocks: nn.ModuleList) -> torch.dtype:
    """The floating-point dtype of the blocks' parameters (float32 when they have none)."""
    for parameter in blocks.parameters():
        if parameter.dtype.is_floating_point:
            return parameter.dtype
    return torch.float32


def _weight_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a linear's floating-point weight (None for anything else)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dtype.is_floating_point:
        return weight.dtype
    return None


def _snapshot(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Copies of a linear's weight and bias before its solve, for its error."""
    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, Tensor)
    return weight.detach().clone(), bias.detach().clone() if isinstance(bias, Tensor) else None


def _timed_solve(
    calibrator: BlockCalibrator, name: str, module: nn.Module
) -> tuple[float, Mapping[str, float] | None]:
    started = time.perf_counter()
    metrics = calibrator.solve(name, module)
    return time.perf_counter() - started, metrics


def _single_pass_block(
    ctx: BlockContext,
    inputs: BlockInputs,
    calibrator: BlockCalibrator,
    groups: list[list[str]],
    measure_error: bool,
    precision: Callable[[], Any],
) -> tuple[dict[str, int], dict[str, tuple[float, Mapping[str, float] | None]], dict[str, Any]]:
    """Observe and solve every linear of the block in one pass over its single mini-batch."""
    tokens: dict[str, int] = {}
    solved: dict[str, tuple[float, Mapping[str, float] | None]] = {}
    meters: dict[str, _ErrorMeter] = {}
    caster = _Caster()
    names = [name for group in groups for name in group]
    handles: list[Any] = []

    def pre_hook(name: str) -> Any:
        def fire(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in solved:
                return  # a linear called twice is solved once, on its first call
            inp2d = caster.input_of(module, args[0])  # (tokens, in_features)
            _, out_features = linear_in_out(module)
            tokens[name] = inp2d.shape[0]
            calibrator.observe(name, module, inp2d, inp2d.new_empty(0, out_features))
            if measure_error:
                meters[name] = _ErrorMeter()
                hook = _error_hook(*_snapshot(module), meters[name], ERROR_MAX_TOKENS)
                handles.append(module.register_forward_hook(hook))
            solved[name] = _timed_solve(calibrator, name, module)

        return fire

    handles += [ctx.linears[name].register_forward_pre_hook(pre_hook(name)) for name in names]
    try:
        hidden = inputs.hidden[0].to(inputs.device)  # (batch, seq, hidden)
        with precision():
            out = _run_block(ctx.block, hidden, inputs.calls[ctx.index][0])
        out = out.to(hidden.dtype)  # (batch, seq, hidden)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in solved]
    if missing:
        raise UnsupportedArchitectureError(
            f"block {ctx.index}'s forward never called {missing}; the calibration engine needs "
            "every grouped linear to run"
        )
    calibrator.observe_block(ctx, hidden, out)
    _store_output(inputs, 0, out)
    return tokens, solved, meters


def _store_output(inputs: BlockInputs, batch: int, out: Tensor) -> None:
    """Make a block's output on mini-batch `batch` the next block's input.

    In memory, it is copied into the input's own buffer when the shapes and dtypes agree (a
    block keeps them): allocating a new tensor per mini-batch while the old one is freed
    interleaves long-lived activations with each forward's temporaries, and the heap then
    grows by about the size of the activations during every replay (measured on SmolLM2 with
    64 x 512 calibration tokens: 140 MB above the block's start by the end of its replay).
    """
    hidden = inputs.hidden
    if isinstance(hidden, list):
        held = hidden[batch]
        if (
            held.shape == out.shape
            and held.dtype == out.dtype
            and held.device == inputs.storage
            and held.is_contiguous()
            and not held.requires_grad
        ):
            held.copy_(out)
            return
    hidden[batch] = out.to(inputs.storage)


def _block_context(
    index: int, model: nn.Module, spec: ArchSpec, inputs: BlockInputs
) -> BlockContext:
    """The `BlockContext` of block `index`: its module, its linears by full name, its config."""
    blocks = get_blocks(model, spec)
    block = blocks[index]
    prefix = f"{spec.blocks}.{index}"
    relative = block_linears(block, spec)
    return BlockContext(
        index=index,
        num_blocks=len(blocks),
        prefix=prefix,
        block=block,
        linears={f"{prefix}.{rel}": module for rel, module in relative.items()},
        spec=spec,
        config=getattr(model, "config", None),
        device=inputs.device,
    )


def _solve_groups(
    ctx: BlockContext,
    inputs: BlockInputs,
    calibrator: BlockCalibrator,
    groups: list[list[str]],
    measure_error: bool,
    measured: int,
    reference: list[Tensor] | None,
    precision: Callable[[], Any],
) -> tuple[
    dict[str, int],
    dict[str, tuple[float, Mapping[str, float] | None]],
    dict[str, tuple[Tensor, Tensor | None]],
]:
    """Observe and solve the block's linears group by group, one pass over the batches each.

    The first group's pass also appends the original block output of the leading `measured`
    batches to `reference` (when given). Returns the tokens each linear observed, its solve
    time and metrics, and (with `measure_error`) a snapshot of its weights before the solve.
    """
    tokens: dict[str, int] = {}
    solved: dict[str, tuple[float, Mapping[str, float] | None]] = {}
    snapshots: dict[str, tuple[Tensor, Tensor | None]] = {}
    stop = _GroupStop()

    for group_index, group in enumerate(groups):
        caster = _Caster()
        handles = [
            ctx.linears[name].register_forward_hook(_observe_hook(calibrator, name, tokens, caster))
            for name in group
        ]
        if calibrator.stop_after_group:
            handles += [ctx.linears[name].register_forward_hook(stop.hook(name)) for name in group]
        try:
            for batch, call in enumerate(inputs.calls[ctx.index]):
                hidden = inputs.hidden[batch].to(inputs.device)  # (batch, seq, hidden)
                keep = group_index == 0 and batch < measured
                # The pass that records the original block output runs to the end.
                if calibrator.stop_after_group and not keep:
                    stop.arm(group)
                else:
                    stop.disarm()
                try:
                    with precision():
                        out = _run_block(ctx.block, hidden, call)
                except _StopBlock:
                    continue
                if keep and reference is not None:
                    # Before any solve: the original block's output, for the block's error.
                    reference.append(out.to(inputs.storage))
        finally:
            for handle in handles:
                handle.remove()
        for name in group:
            module = ctx.linears[name]
            if measure_error:
                snapshots[name] = _snapshot(module)
            solved[name] = _timed_solve(calibrator, name, module)
    return tokens, solved, snapshots


def _replay_block(
    ctx: BlockContext,
    inputs: BlockInputs,
    calibrator: BlockCalibrator,
    snapshots: Mapping[str, tuple[Tensor, Tensor | None]],
    measured: int,
    reference: list[Tensor] | None,
    precision: Callable[[], Any],
) -> tuple[dict[str, _ErrorMeter], _ErrorMeter]:
    """Run the (compressed) block on every batch: its outputs become the next block's inputs.

    Over the leading `measured` batches, error hooks compare each snapshotted linear with its
    original weights, and the block output is compared with `reference`. Returns the linears'
    error meters and the block's.
    """
    meters = {name: _ErrorMeter() for name in snapshots}
    error_handles: list[Any] = []
    block_meter = _ErrorMeter()
    try:
        for batch, call in enumerate(inputs.calls[ctx.index]):
            if batch == 0 and measured:
                error_handles = [
                    ctx.linears[name].register_forward_hook(
                        _error_hook(*snapshots[name], meters[name], ERROR_MAX_TOKENS)
                    )
                    for name in snapshots
                ]
            if batch == measured:
                for handle in error_handles:
                    handle.remove()
                error_handles = []
            hidden = inputs.hidden[batch].to(inputs.device)  # (batch, seq, hidden)
            with precision():
                out = _run_block(ctx.block, hidden, call)  # (batch, seq, hidden)
            out = out.to(hidden.dtype)
            calibrator.observe_block(ctx, hidden, out)
            if reference is not None and batch < measured:
                block_meter.add(out, reference[batch].to(inputs.device))
            _store_output(inputs, batch, out)
    finally:
        for handle in error_handles:
            handle.remove()
    return meters, block_meter


def _process_block(
    index: int,
    model: nn.Module,
    spec: ArchSpec,
    inputs: BlockInputs,
    calibrator: BlockCalibrator,
    measure_error: bool,
    precision: Callable[[], Any],
) -> tuple[BlockRecord, list[LinearRecord]]:
    """Calibrate block `index`: solve its linears group by group, then replay it.

    A calibrator that solves during the pass, on a single mini-batch, gets one pass instead.
    Returns the block's record and its linears' records.
    """
    started = time.perf_counter()
    ctx = _block_context(index, model, spec, inputs)
    calibrator.start_block(ctx)
    groups = _validated_groups(calibrator.groups(ctx), ctx)
    if calibrator.solve_during_pass and inputs.num_batches == 1 and groups:
        counts, timings, single_meters = _single_pass_block(
            ctx, inputs, calibrator, groups, measure_error, precision
        )
        calibrator.end_block(ctx)
        return _records(ctx, groups, counts, timings, single_meters, started, None)
    reference: list[Tensor] | None = [] if measure_error and groups else None
    # Errors are measured on the leading mini-batches only (ERROR_MAX_TOKENS tokens): a relative
    # error needs far fewer tokens than the statistics, and measuring it on every token would
    # cost one more pass of every solved linear over the whole calibration set.
    measured = _error_batches(inputs, ERROR_MAX_TOKENS) if reference is not None else 0
    tokens, solved, snapshots = _solve_groups(
        ctx, inputs, calibrator, groups, measure_error, measured, reference, precision
    )
    meters, block_meter = _replay_block(
        ctx, inputs, calibrator, snapshots, measured, reference, precision
    )
    calibrator.end_block(ctx)
    return _records(
        ctx,
        groups,
        tokens,
        solved,
        meters,
        started,
        block_meter.value() if reference is not None else None,
    )


def _records(
    ctx: BlockContext,
    groups: list[list[str]],
    tokens: dict[str, int],
    solved: dict[str, tuple[float, Mapping[str, float] | None]],
    meters: Mapping[str, _ErrorMeter],
    started: float,
    block_error: float | None,
) -> tuple[BlockRecord, list[LinearRecord]]:
    records = []
    for group in groups:
        for name in group:
            in_features, out_features = linear_in_out(ctx.linears[name])
            seconds, metrics = solved[name]
            records.append(
                LinearRecord(
                    name=name,
                    block=ctx.index,
                    in_features=in_features,
                    out_features=out_features,
                    tokens=tokens.get(name, 0),
                    seconds=seconds,
                    rel_error=meters[name].value() if name in meters else None,
                    metrics={key: float(value) for key, value in (metrics or {}).items()},
                )
            )
    block_record = BlockRecord(
        index=ctx.index,
        seconds=time.perf_counter() - started,
        groups=len(groups),
        rel_error=block_error,
    )
    return block_record, records


def _report_activations(
    model: nn.Module,
    spec: ArchSpec,
    samples: Tensor,
    blocks: nn.ModuleList,
    storage: torch.device,
    measure_error: bool,
    spill_dir: Path | None = None,
) -> None:
    """Log how much memory the calibration activations take, before the walk starts."""
    from .arch import hidden_size

    dtype = _blocks_dtype(blocks)
    dtype = dtype if dtype.is_floating_point else torch.float32
    one = samples.numel() * hidden_size(model.config, spec) * dtype.itemsize
    copies = 3 if measure_error else 2  # inputs and outputs while a block replays (+ reference)
    where = f"in files under {spill_dir}" if spill_dir is not None else f"on {storage}"
    logger.info(
        "calibration activations: %d x %d tokens x %d hidden in %s = %.1f MB %s (up to "
        "%d copies while a block replays)",
        samples.shape[0],
        samples.shape[1],
        hidden_size(model.config, spec),
        str(dtype).replace("torch.", ""),
        one / 1e6,
        where,
        copies,
    )
    if spill_dir is None:
        from .streaming import available_bytes

        free = available_bytes(storage)
        if one * copies > ACTIVATIONS_WARN_SHARE * free:
            logger.warning(
                "the calibration activations (%.1f GB, up to %d copies) may not fit in the %.1f "
                "GB free on %s; --spill-activations DIR keeps them in files there instead",
                one / 1e9,
                copies,
                free / 1e9,
                storage,
            )


# `run_calibration` warns when the activations' copies would take more than this share of the
# free memory where they are kept.
ACTIVATIONS_WARN_SHARE = 0.5


def run_calibration(
    model: nn.Module,
    samples: Tensor,
    calibrator: BlockCalibrator,
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    offload_activations: bool = False,
    progress: bool = False,
    measure_error: bool = True,
    precision: str = "fp32",
) -> CalibrationReport:
    """Walk the model block by block, letting `calibrator` observe and rewrite each block.

    `device` is where each block is computed (default: where block 0 already is); a block is
    moved there for its turn and back to its own device afterwards, so a model kept on the CPU
    is calibrated on a GPU one block at a time. `measure_error` keeps a copy of the solved
    linears' weights and of the original block outputs to report relative output errors; turn
    it off to save that memory. `precision` "bf16" runs the block passes under bf16 autocast
    (see the module docstring). Raises `UserInputError` for bad samples (see the module
    docstring) or a precision the device cannot run, and `UnsupportedArchitectureError` for a
    model outside the `arch` table.
    """
    from .streaming import stream_of

    started = time.perf_counter()
    spec = get_arch(model)
    blocks = get_blocks(model, spec)
    _check_samples(model.config, samples)
    batch_size = _check_batch_size(batch_size, samples)
    stream = stream_of(model)
    if stream is None:
        _check_not_meta(model)
    compute = _resolve_compute_device(
        device if device is not None or stream is None else stream.device, blocks
    )
    spill_dir = _SPILL_DIR.get()
    storage = torch.device("cpu") if offload_activations or spill_dir else compute
    resolved = resolve_precision(precision, compute, _blocks_dtype(blocks))
    pass_precision = _pass_context(resolved, compute)
    _report_activations(model, spec, samples, blocks, storage, measure_error, spill_dir)

    spill = SpilledActivations(spill_dir) if spill_dir is not None else None
    with contextlib.ExitStack() as cleanup:
        if spill is not None:
            cleanup.callback(spill.close)
        return _walk(
            model,
            spec,
            blocks,
            samples,
            calibrator,
            stream,
            compute,
            batch_size,
            storage,
            spill,
            measure_error,
            resolved,
            pass_precision,
            progress,
            started,
        )


def _walk(
    model: nn.Module,
    spec: ArchSpec,
    blocks: nn.ModuleList,
    samples: Tensor,
    calibrator: BlockCalibrator,
    stream: Any,
    compute: torch.device,
    batch_size: int,
    storage: torch.device,
    spill: SpilledActivations | None,
    measure_error: bool,
    resolved: str,
    pass_precision: Callable[[], Any],
    progress: bool,
    started: float,
) -> CalibrationReport:
    """`run_calibration`'s capture and walk, once its arguments are checked."""
    from .progress import track

    block_records: list[BlockRecord] = []
    linear_records: list[LinearRecord] = []
    with _calibration_mode(model):
        if stream is not None:
            stream.load_outside(compute)  # the embeddings, for the capture only
        try:
            inputs = _capture(model, spec, blocks, samples, compute, batch_size, storage, spill)
        finally:
            if stream is not None:
                stream.release_outside()
        capture_seconds = time.perf_counter() - started
        for index in track(range(len(blocks)), "calibrating", unit="block", enabled=progress):
            block = blocks[index]
            original = _module_device(block)
            if stream is not None:
                stream.enter(index, compute)
            else:
                block.to(compute)
            try:
                block_record, records = _process_block(
                    index,
                    model,
                    spec,
                    inputs,
                    calibrator,
                    measure_error,
                    pass_precision,
                )
            except BaseException:
                if stream is not None:
                    stream.leave(index, write=False)
                raise
            finally:
                if stream is None:
                    block.to(original)
            if stream is not None:
                stream.leave(index)  # written in its saved form, then freed
            block_records.append(block_record)
            linear_records.extend(records)
    return CalibrationReport(
        device=str(compute),
        batch_size=batch_size,
        num_samples=int(samples.shape[0]),
        seq_len=int(samples.shape[1]),
        capture_seconds=capture_seconds,
        seconds=time.perf_counter() - started,
        blocks=block_records,
        linears=linear_records,
        precision=resolved,
    )


class _BlockInfluence(BlockCalibrator):
    """ShortGPT's Block Influence: 1 - mean over tokens of cos(block input, block output)."""

    def __init__(self, num_blocks: int) -> None:
        self.cos_sum = [0.0] * num_blocks
        self.count = [0] * num_blocks

    def groups(self, ctx: BlockContext) -> list[list[str]]:
        return []

    def observe_block(self, ctx: BlockContext, inp: Tensor, out: Tensor) -> None:
        cos = F.cosine_similarity(inp.float(), out.float(), dim=-1)  # (batch, seq)
        self.cos_sum[ctx.index] += float(cos.sum())
        self.count[ctx.index] += cos.numel()

    def scores(self) -> list[float]:
        return [1.0 - total / count for total, count in zip(self.cos_sum, self.count, strict=True)]


def block_io_scores(
    model: nn.Module,
    samples: Tensor,
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    offload_activations: bool = False,
    progress: bool = False,
    precision: str = "fp32",
) -> list[float]:
    """ShortGPT Block Influence of every block, in [0, 2]: low means the block barely changes
    the residual stream and is the first candidate for removal.

    Same walk and arguments as `run_calibration`, with nothing compressed.
    """
    scorer = _BlockInfluence(len(get_blocks(model)))
    run_calibration(
        model,
        samples,
        scorer,
        device=device,
        batch_size=batch_size,
        offload_activations=offload_activations,
        progress=progress,
        measure_error=False,
        precision=precision,
    )
    return scorer.scores()


__all__ = [
    "PRECISIONS",
    "BlockCalibrator",
    "BlockCall",
    "BlockContext",
    "BlockInputs",
    "BlockRecord",
    "CalibrationReport",
    "ChannelNormObserver",
    "HessianObserver",
    "LinearRecord",
    "accumulate_channel_abs_mean",
    "accumulate_channel_sq_norm",
    "accumulate_hessian",
    "block_io_scores",
    "capture_block_inputs",
    "run_calibration",
    "same_tensor",
    "sequential_groups",
]
