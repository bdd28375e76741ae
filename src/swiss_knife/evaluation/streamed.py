"""Perplexity of a model streamed from disk, computed block by block over all windows.

A model larger than memory cannot run one window at a time through all its blocks, but it can
run all windows through one block at a time, as the calibration engine does:

1. the embeddings are read, and every batch of windows runs up to block 0, whose input hidden
   states and call arguments (attention mask, rotary tables) are kept (`calibration._Capture`);
   the embeddings are freed;
2. each block in turn is read from disk, every batch's hidden states pass through it, and it is
   freed (`BlockStream.enter` / `leave` without writing anything);
3. the tensors after the blocks (final norm, LM head, and e.g. GPT-2's position table) are read,
   and the model's own forward runs once more per batch with every block replaced by a function
   that hands over the last block's output: so whatever the architecture does after its blocks
   (final norm, logit soft-capping) is the model's own code. The input embeddings are not
   needed for this (the forward gets zero `inputs_embeds`, which the replaced blocks ignore),
   so they are not read again unless the head is tied to them.

Peak memory is one block, the embeddings (during step 1) or the LM head (step 3), one batch's
logits, and the hidden states of all windows (windows x window length x hidden size in the
compute dtype: 40 windows of 512 tokens of an 8B model, hidden 4096, in bf16, are 168 MB).
Every window is scored exactly as `perplexity` scores it, from the same logits up to rounding:
the same block code runs on the same inputs, in another order.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..arch import get_arch, get_blocks
from ..calibration import (
    _SPILL_DIR,
    SpilledActivations,
    _Capture,
    _run_block,
    _StopForward,
    replaced_forwards,
)
from ..errors import UnsupportedArchitectureError
from ..progress import track
from ..streaming import BlockStream, stream_of
from .perplexity import (
    PerplexityResult,
    eval_mode,
    plan_windows,
    score_batch,
    window_inputs,
)

logger = logging.getLogger(__name__)


def streamed_perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """`perplexity.perplexity` of a streamed model (see the module docstring)."""
    stream = stream_of(model)
    if stream is None:
        raise ValueError("streamed_perplexity needs a model opened by streaming.open_streamed")
    window, stride, windows, batches = plan_windows(
        model, tokens, window=window, stride=stride, batch_size=batch_size
    )
    device = stream.device
    ids = tokens.detach().to(device=device, dtype=torch.long)
    inputs = [window_inputs(ids, batch) for batch in batches]
    blocks = get_blocks(model, get_arch(model))
    hidden_dtype = stream.dtype
    _report_hidden(model, inputs, stream.dtype)
    spill_dir = _SPILL_DIR.get()
    spill = SpilledActivations(spill_dir) if spill_dir is not None else None
    with eval_mode(model), contextlib.ExitStack() as cleanup:
        if spill is not None:
            cleanup.callback(spill.close)
        hidden, calls = _capture(model, stream, blocks, inputs, spill)
        for index in track(range(len(blocks)), "perplexity", unit="block", enabled=progress):
            block = stream.enter(index, device)
            try:
                prefix = stream.prefix(index)
                for name, param in block.named_parameters():
                    stream.nonzero[prefix + name] = int(torch.count_nonzero(param))
                for b, call in enumerate(calls[index]):
                    hidden[b] = _run_block(block, hidden[b].to(device), call).to(hidden_dtype)
            finally:
                stream.leave(index, write=False)  # nothing to write: just free it
        nll_sum, count = _score(model, stream, blocks, hidden, inputs, batches)
    return PerplexityResult.from_sums(nll_sum, count, window, stride, len(windows))


def _report_hidden(model: nn.Module, inputs: list[Tensor], dtype: torch.dtype) -> None:
    tokens = sum(batch.numel() for batch in inputs)
    hidden_size = int(getattr(model.config, "hidden_size", 0) or 0)
    size = tokens * hidden_size * torch.empty((), dtype=dtype).element_size()
    logger.info(
        "streamed perplexity: %d windows, %d tokens; their hidden states take %.1f MB",
        sum(batch.shape[0] for batch in inputs),
        tokens,
        size / 1e6,
    )


def _capture(
    model: nn.Module,
    stream: BlockStream,
    blocks: nn.ModuleList,
    inputs: list[Tensor],
    spill: SpilledActivations | None,
) -> tuple[list[Tensor] | SpilledActivations, list[list[Any]]]:
    """Block 0's input hidden states and every block's call arguments, per batch."""
    capture = _Capture(blocks, stream.device, spill)
    stream.load_outside(stream.device)
    try:
        with capture.installed():
            for input_ids in inputs:
                capture.expected = 0
                try:
                    model(input_ids=input_ids, use_cache=False)
                except _StopForward:
                    continue
                raise UnsupportedArchitectureError(
                    f"the model's forward returned after block {capture.expected - 1} of "
                    f"{len(blocks)}; it cannot be measured block by block"
                )
    finally:
        stream.release_outside()
    return capture.hidden, capture.calls


def _handing_over(
    blocks: nn.ModuleList, holder: list[Tensor]
) -> contextlib.AbstractContextManager[None]:
    """Replace block 0 by a function returning ``holder[0]`` and the other blocks by the
    identity, for the duration."""

    def first(*args: Any, **kwargs: Any) -> Tensor:
        return holder[0]

    def passing(*args: Any, **kwargs: Any) -> Tensor:
        return args[0] if args else kwargs["hidden_states"]

    return replaced_forwards(blocks, [first, *[passing] * (len(blocks) - 1)])


def _score(
    model: nn.Module,
    stream: BlockStream,
    blocks: nn.ModuleList,
    hidden: list[Tensor] | SpilledActivations,
    inputs: list[Tensor],
    batches: list[list[tuple[int, int, int]]],
) -> tuple[float, int]:
    """Run the model's tail on the last block's outputs and score every batch."""
    names = stream.after_blocks()
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    width = int(embeddings.weight.shape[1])
    holder: list[Tensor] = []
    nll_sum = 0.0
    count = 0
    stream.load(names, stream.device)
    try:
        with _handing_over(blocks, holder):
            for b, (input_ids, batch) in enumerate(zip(inputs, batches, strict=True)):
                holder[:] = [hidden[b].to(stream.device)]
                zeros = torch.zeros(
                    (*input_ids.shape, width), dtype=stream.dtype, device=stream.device
                )
                logits = model(inputs_embeds=zeros, use_cache=False).logits
                batch_nll, batch_count = score_batch(logits, input_ids, batch)
                nll_sum += batch_nll
                count += batch_count
                if isinstance(hidden, list):
                    hidden[b] = hidden[b][:0]  # done with it
    finally:
        stream.release(names)
    return nll_sum, count
