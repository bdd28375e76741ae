"""Sliding-window perplexity of a causal language model over one token stream.

Method
------
This follows the Hugging Face guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity). The whole evaluation text is one 1-D
stream of token ids (the data layer has already inserted BOS where documents start). A model
with a bounded context cannot condition on the whole stream, so the stream is cut into windows
of at most ``window`` tokens whose starts are ``stride`` tokens apart:

* ``stride == window`` gives non-overlapping windows (fast; tokens near the start of each window
  see little context, so perplexity is somewhat higher).
* ``stride < window`` gives overlapping windows; only the last ``target_len`` tokens of each window
  (the ones not scored by a previous window) are scored, so every scored token gets at least
  ``window - stride`` tokens of context. This approximates the fully factorised likelihood better.

Inside a window, the logits at position ``i`` predict the token at ``i + 1`` (the usual causal
shift), so the token at window position 0 is never scored: it has no context in that window. In
the guide this happens implicitly because ``labels`` are shifted inside the model. Consequently the
first window (and every window when they do not overlap) scores ``target_len - 1`` tokens, and an
overlapping window scores all ``target_len`` of its targets.

One deliberate difference from the guide's snippet: the guide weights each window's *mean* loss by
``target_len - 1`` even for overlapping windows, where the mean is actually over ``target_len``
tokens. Here the negative log-likelihood is summed token by token and divided by the exact number
of scored tokens, so the result equals the average over tokens of ``-log p(token | context)``.

Log-probabilities are computed with ``log_softmax`` in float32 regardless of the model dtype, so
half-precision models are not penalised (or flattered) by a low-precision softmax.

``perplexity = exp(mean_nll)`` and ``bits_per_token = mean_nll / ln 2``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from swiss_knife.errors import DataError, UserInputError
from swiss_knife.progress import track

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a token stream, with the windowing that produced it."""

    perplexity: float
    mean_nll: float  # nats per scored token
    tokens_scored: int
    window: int
    stride: int
    num_windows: int
    bits_per_token: float  # mean_nll / ln 2

    @classmethod
    def from_sums(
        cls, nll_sum: float, count: int, window: int, stride: int, num_windows: int
    ) -> PerplexityResult:
        """The result of `count` scored tokens whose negative log-likelihoods sum to `nll_sum`."""
        mean_nll = nll_sum / count
        return cls(
            perplexity=math.exp(mean_nll),
            mean_nll=mean_nll,
            tokens_scored=count,
            window=window,
            stride=stride,
            num_windows=num_windows,
            bits_per_token=mean_nll / math.log(2),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where inputs must be sent)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise UserInputError("the model has no parameters; cannot tell its device") from None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode under ``torch.inference_mode``; restore its train flag after.

    Restoring matters because evaluation is also run in the middle of distillation or
    calibration loops, where silently leaving dropout off would change training.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def max_positions(model: torch.nn.Module) -> int | None:
    """``config.max_position_embeddings`` when the model declares one, else None."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def vocab_size(model: torch.nn.Module) -> int | None:
    """``config.vocab_size`` when the model declares one, else None."""
    config = getattr(model, "config", None)
    value = getattr(config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def check_token_stream(tokens: torch.Tensor, model: torch.nn.Module, *, min_tokens: int) -> None:
    """Raise DataError unless ``tokens`` is a 1-D integer stream the model can embed."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise DataError(f"expected a 1-D tensor of token ids, got shape {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise DataError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.numel() < min_tokens:
        raise DataError(f"need at least {min_tokens} tokens, got {tokens.numel()}")
    vocab = vocab_size(model)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise DataError(
            f"token ids span [{lo}, {hi}] but the model vocabulary is [0, {vocab}); "
            "was the text tokenized with this model's tokenizer?"
        )


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, target_len)`` for each window, exactly as in the transformers guide.

    ``target_len = end - prev_end``: the tokens of ``[begin, end)`` not covered by the previous
    window. The loop stops once a window reaches the end of the stream.
    """
    if window < 1 or stride < 1:
        raise UserInputError(f"window and stride must be positive, got {window} and {stride}")
    windows: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def _scored_span(begin: int, end: int, target_len: int) -> tuple[int, int]:
    """Window-local ``[first, end)`` of positions whose token is scored.

    The targets are the last ``target_len`` positions; position 0 has no context, so it is
    dropped when the targets cover the whole window.
    """
    length = end - begin
    return max(length - target_len, 1), length


def _batches(
    windows: list[tuple[int, int, int]], batch_size: int
) -> list[list[tuple[int, int, int]]]:
    """Group consecutive equal-length windows into batches of at most ``batch_size``.

    Only the final window can be shorter than the others, so it ends up in a batch of its own
    and no padding (with its attention-mask subtleties) is ever needed.
    """
    batches: list[list[tuple[int, int, int]]] = []
    for win in windows:
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < batch_size
            and (last[0][1] - last[0][0]) == (win[1] - win[0])
        ):
            last.append(win)
        else:
            batches.append([win])
    return batches


def plan_windows(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    window: int,
    stride: int | None,
    batch_size: int,
) -> tuple[int, int, list[tuple[int, int, int]], list[list[tuple[int, int, int]]]]:
    """Check the arguments and cut the stream: ``(window, stride, windows, batches)``, where
    ``batches`` groups the windows that have something to score (see `perplexity`)."""
    if window < 2:
        raise UserInputError(f"window must be at least 2 tokens, got {window}")
    if stride is None:
        stride = window
    if not 1 <= stride <= window:
        raise UserInputError(f"stride must be between 1 and window ({window}), got {stride}")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}")
    check_token_stream(tokens, model, min_tokens=2)

    limit = max_positions(model)
    if limit is not None and window > limit:
        logger.warning(
            "window %d exceeds the model's max_position_embeddings %d; using %d",
            window,
            limit,
            limit,
        )
        window = limit
        stride = min(stride, window)
    windows = sliding_windows(tokens.numel(), window, stride)
    # A trailing one-token window has nothing to score; skip its forward pass.
    to_run = [w for w in windows if _scored_span(*w)[0] < _scored_span(*w)[1]]
    return window, stride, windows, _batches(to_run, batch_size)


def window_inputs(stream: torch.Tensor, batch: list[tuple[int, int, int]]) -> torch.Tensor:
    """The (batch, seq) input ids of one batch of windows."""
    return torch.stack([stream[b:e] for b, e, _ in batch])


def score_batch(
    logits: torch.Tensor, input_ids: torch.Tensor, batch: list[tuple[int, int, int]]
) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens of one batch of windows,
    from the model's (batch, seq, vocab) logits."""
    nll_sum = 0.0
    count = 0
    for row, (begin, end, target_len) in enumerate(batch):
        first, last = _scored_span(begin, end, target_len)
        # Logits at position i predict token i + 1, hence the shift by one.
        row_logits = logits[row, first - 1 : last - 1].float()  # (scored, vocab)
        log_probs = torch.log_softmax(row_logits, dim=-1)  # (scored, vocab)
        targets = input_ids[row, first:last].unsqueeze(-1)  # (scored, 1)
        token_nll = -log_probs.gather(-1, targets).squeeze(-1)  # (scored,)
        # Accumulate in float64 on the host: hundreds of thousands of float32 terms would
        # otherwise lose digits in the sum.
        nll_sum += float(token_nll.double().sum())
        count += last - first
    return nll_sum, count


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on the 1-D token stream ``tokens``.

    ``stride`` defaults to ``window`` (non-overlapping windows). ``window`` is clamped to
    ``model.config.max_position_embeddings`` when that is smaller, with a warning. A model
    streamed from disk (`swiss_knife.streaming`) is measured block by block over all windows
    (`swiss_knife.evaluation.streamed`), to the same result.
    """
    from ..streaming import stream_of

    if stream_of(model) is not None:
        from .streamed import streamed_perplexity

        return streamed_perplexity(
            model, tokens, window=window, stride=stride, batch_size=batch_size, progress=progress
        )
    window, stride, windows, batches = plan_windows(
        model, tokens, window=window, stride=stride, batch_size=batch_size
    )
    device = model_device(model)
    stream = tokens.detach().to(device=device, dtype=torch.long)  # (num_tokens,)
    nll_sum = 0.0
    count = 0
    with eval_mode(model):
        for batch in track(batches, "perplexity", unit="batch", enabled=progress):
            input_ids = window_inputs(stream, batch)  # (batch, seq)
            logits = model(input_ids=input_ids, use_cache=False).logits  # (batch, seq, vocab)
            batch_nll, batch_count = score_batch(logits, input_ids, batch)
            nll_sum += batch_nll
            count += batch_count

    return PerplexityResult.from_sums(nll_sum, count, window, stride, len(windows))
