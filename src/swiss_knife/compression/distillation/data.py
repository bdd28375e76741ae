"""Training text for distillation: packed sequences, a held-out split, and the batch order.

Text comes from `swiss_knife.data` (local files or Hugging Face datasets, BOS before each
document) as one token stream, which is packed into consecutive sequences of ``seq_len`` tokens:
no padding, so every position trains. Unless separate held-out text is given, the *tail* of the
stream is held out (a contiguous block, so no held-out sentence was half seen in training).

The batch order is a pure function of ``(seed, micro-batch number, process index)``
(`BatchOrder`): epoch e visits the sequences in a permutation seeded by ``(seed, e)``, and global
micro-batch m gives process r the r-th slice of ``batch_size`` sequences. The data position of a
run is therefore just the number of micro-batches it has consumed, which makes resuming exact
without replaying or skipping a data loader, and gives a run on n processes with ``batch_size`` b
the same global batches as one process with ``batch_size`` n * b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from swiss_knife.errors import DataError


@dataclass(frozen=True)
class PackedData:
    """Packed training sequences and held-out sequences (possibly none)."""

    train: Tensor  # (num_train, seq_len)
    eval: Tensor  # (num_eval, seq_len); num_eval may be 0

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def pack(stream: Tensor, seq_len: int) -> Tensor:
    """Consecutive non-overlapping sequences of ``seq_len`` tokens; the remainder is dropped."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len)  # (count, seq_len)


def prepare_data(
    train_stream: Tensor,
    seq_len: int,
    *,
    min_train_sequences: int,
    eval_stream: Tensor | None = None,
    eval_fraction: float = 0.0,
    eval_windows: int | None = None,
    min_eval_sequences: int = 1,
) -> PackedData:
    """Pack the training stream and hold out evaluation sequences; DataError if too short.

    ``min_train_sequences`` is one global micro-batch (batch size x processes). Held-out text is
    ``eval_stream`` when given, else the last ``eval_fraction`` of the training stream rounded up
    to whole sequences (none when the fraction is 0).
    """
    if train_stream.dim() != 1:
        raise DataError(f"expected a 1-D token stream, got shape {tuple(train_stream.shape)}")
    total = train_stream.numel()
    if eval_stream is None and eval_fraction > 0:
        held_out = math.ceil(eval_fraction * total / seq_len) * seq_len
        eval_stream, train_stream = (
            train_stream[total - held_out :],
            train_stream[: total - held_out],
        )
    train = pack(train_stream, seq_len)
    if train.shape[0] < min_train_sequences:
        needed = min_train_sequences * seq_len
        split = (
            f" after holding out {total - train_stream.numel()}" if eval_stream is not None else ""
        )
        raise DataError(
            f"the training text has {total} tokens{split}, fewer than one batch of "
            f"{min_train_sequences} sequences x {seq_len} tokens = {needed} training tokens; "
            "give more text or lower --batch-size / --seq-len"
        )
    if eval_stream is None:
        return PackedData(train, train.new_zeros((0, seq_len)))
    held = pack(eval_stream, seq_len)
    if eval_windows is not None:
        held = held[:eval_windows]
    if held.shape[0] < min_eval_sequences:
        raise DataError(
            f"the held-out text has {eval_stream.numel()} tokens, fewer than "
            f"{min_eval_sequences} sequence(s) of {seq_len} tokens; give more text, a larger "
            "eval fraction, or no held-out evaluation"
        )
    return PackedData(train, held)


class BatchOrder:
    """The training sequences of each micro-batch, for each process, for any number of epochs."""

    def __init__(self, num_sequences: int, batch_size: int, num_processes: int, seed: int) -> None:
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.seed = seed
        # Global micro-batches per epoch; the few sequences left over differ from epoch to epoch.
        self.per_epoch = num_sequences // (batch_size * num_processes)
        if self.per_epoch < 1:
            raise DataError(
                f"{num_sequences} training sequences are fewer than one batch of "
                f"{batch_size} x {num_processes} process(es)"
            )
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The order of the sequences in ``epoch``; its own generator leaves global RNG alone."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_sequences, generator=generator)
            self._epoch = epoch
        return self._order

    def indices(self, micro_batch: int, process: int) -> Tensor:
        """Rows of the packed data for global micro-batch ``micro_batch`` on ``process``."""
        epoch, within = divmod(micro_batch, self.per_epoch)
        start = (within * self.num_processes + process) * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size]  # (batch_size,)

    def micro_batches(self, epochs: float) -> int:
        """Global micro-batches in ``epochs`` passes (fractions of an epoch allowed)."""
        return int(epochs * self.per_epoch)
