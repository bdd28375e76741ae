"""The teacher's top-k logits for every training token, computed once and kept on disk.

Running the teacher is most of the cost of a distillation step when the student is much
smaller, and it is the same work on every run over the same text. With ``teacher_topk: k`` the
teacher runs once over the packed training sequences; its k largest logits per position (float16)
and their token ids (int32) go to one safetensors file, named by a hash of the teacher's weights,
the sequences and k. Later runs, with any student, loss weights or schedule, read the file and
never run the teacher (`ForwardKL` renormalises the teacher over its top k).

Size: ``sequences x seq_len x k x 6`` bytes, e.g. 20 MB for 1,000 x 128 tokens at k = 32, against
``vocab / k`` times more for full logits. Forward KL on the top 32-64 logits keeps nearly all of
the teacher's probability mass for a trained LM, which is why sparse logit caches are the usual
way to distil large teachers offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ...progress import track
from .losses import TopKLogits

logger = logging.getLogger(__name__)


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(flat.shape)}{flat.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters (names, shapes, bytes): the same weights, the same digest."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor_digest(param).encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, teacher_digest: str, train: Tensor, k: int) -> Path:
    key = hashlib.sha256(f"{teacher_digest}:{tensor_digest(train)}:{k}".encode()).hexdigest()
    return cache_dir / f"teacher-top{k}-{key[:20]}.safetensors"


@torch.no_grad()
def compute_topk(
    teacher: nn.Module,
    train: Tensor,
    k: int,
    *,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]],
    progress: bool = False,
) -> TopKLogits:
    """The teacher's top-k logits for each position of each training sequence, on the CPU."""
    values, indices = [], []
    was_training = teacher.training
    teacher.eval()
    try:
        for start in track(
            range(0, train.shape[0], batch_size), "teacher top-k", unit="batch", enabled=progress
        ):
            input_ids = train[start : start + batch_size].to(device)  # (batch, seq)
            with autocast():
                logits = teacher(input_ids=input_ids, use_cache=False).logits  # (batch, seq, vocab)
            top = logits.float().topk(k, dim=-1)  # (batch, seq, k) each
            values.append(top.values.to(torch.float16).cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    finally:
        teacher.train(was_training)
    return TopKLogits(torch.cat(values), torch.cat(indices))  # (sequences, seq, k)


def load_or_compute_topk(
    path: Path,
    compute: Callable[[], TopKLogits],
    *,
    is_main_process: bool,
    wait_for_everyone: Callable[[], None],
) -> TopKLogits:
    """Read the cache file, or compute it on the main process, write it atomically, then read.

    Every process reaches the barrier whether or not it found the file, so a process that looks
    after the main one has written it cannot skip a collective the others wait in.
    """
    if is_main_process and not path.is_file():
        logger.info("computing the teacher's top-k logits once into %s", path)
        topk = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file({"values": topk.values, "indices": topk.indices}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    wait_for_everyone()
    stored = load_file(str(path))
    return TopKLogits(stored["values"], stored["indices"])
