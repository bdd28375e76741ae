"""Students: check a teacher/student pair, or make the student by removing teacher blocks.

Distillation compares the two models' logits token by token, so both must share one
vocabulary; `check_pair` refuses a mismatch before any training and warns when the "student"
has more parameters than its teacher. `student_from_teacher` is depth pruning in its plainest
form (Minitron's "depth" axis, Muralidharan et al. 2024; Gromov et al. 2024): a copy of the
teacher without some blocks, made by `swiss_knife.arch.drop_blocks`, which also rewrites the
config so the student saves and reloads as an ordinary checkpoint. Choosing *which* blocks by
measured importance is the layer-reduction stage's job; a recipe runs that stage first and
distils the model it produces.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from swiss_knife.arch import drop_blocks, get_blocks, num_layers
from swiss_knife.config import StudentFromTeacher
from swiss_knife.errors import UserInputError

logger = logging.getLogger(__name__)


def blocks_to_drop(total: int, spec: StudentFromTeacher) -> list[int]:
    """The sorted block indices `spec` removes from a model with `total` blocks."""
    if spec.drop_layers is not None:
        out_of_range = [i for i in spec.drop_layers if not -total <= i < total]
        if out_of_range:
            raise UserInputError(
                f"student_from_teacher: block(s) {out_of_range} out of range for a "
                f"{total}-block teacher"
            )
        drop = sorted({i % total for i in spec.drop_layers})
    else:
        assert spec.remove is not None  # the config allows exactly one of the two
        remove = spec.remove
        if spec.position == "middle":
            if remove > total - 1:
                raise UserInputError(
                    f"student_from_teacher: cannot remove {remove} of {total} blocks"
                )
            start = (total - remove) // 2
            drop = list(range(start, start + remove))
        elif spec.position == "last":
            # Keep the last block: it writes the representation the head reads.
            if remove > total - 1:
                raise UserInputError(
                    f"student_from_teacher: cannot remove {remove} of {total} blocks and keep "
                    "the last one"
                )
            drop = list(range(total - 1 - remove, total - 1))
        else:
            interior = total - 2  # the first and last blocks stay
            if remove > interior:
                raise UserInputError(
                    f"student_from_teacher: cannot spread {remove} removals over the {interior} "
                    f"interior blocks of a {total}-block teacher"
                )
            # The centre of each of `remove` equal slices of the interior (integer arithmetic,
            # so no rounding surprise); distinct because each slice is at least one block wide.
            drop = [1 + (2 * i + 1) * interior // (2 * remove) for i in range(remove)]
    if len(drop) >= total:
        raise UserInputError(f"student_from_teacher: cannot drop all {total} blocks")
    return drop


def student_from_teacher(
    teacher: nn.Module, spec: StudentFromTeacher
) -> tuple[nn.Module, list[int]]:
    """A copy of `teacher` without the blocks `spec` names; returns it and the kept indices."""
    total = len(get_blocks(teacher))
    drop = blocks_to_drop(total, spec)
    student = copy.deepcopy(teacher)
    drop_blocks(student, drop)
    # The teacher may come frozen (an earlier distillation freezes its teacher); the copy trains.
    student.requires_grad_(True)
    kept = [i for i in range(total) if i not in set(drop)]
    logger.info("student: teacher without blocks %s (%d of %d kept)", drop, len(kept), total)
    return student, kept


def default_layer_map(
    teacher_layers: int, student_layers: int, kept: list[int] | None = None
) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state pairs: each student block to its teacher counterpart.

    Hidden-state index 0 is the embedding output and i the output of block i. A student made by
    removing blocks maps each block to the teacher block it was copied from; any other student
    maps block s to the teacher block at the same relative depth, last to last.
    """
    if kept is not None:
        return [(s + 1, t + 1) for s, t in enumerate(kept)]
    return [
        (s, max(1, round(s * teacher_layers / student_layers)))
        for s in range(1, student_layers + 1)
    ]


def logit_width(model: nn.Module) -> int:
    """How many tokens the model's head scores (the logits' last dimension)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head: Any = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise UserInputError(f"cannot tell the vocabulary size of {type(model).__name__}")
    return vocab


def parameter_count(model: nn.Module) -> int:
    """Parameters, counting tied (shared) tensors once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_pair(
    teacher: nn.Module,
    student: nn.Module,
    teacher_tokenizer: Any | None = None,
    student_tokenizer: Any | None = None,
) -> None:
    """Refuse a student whose vocabulary differs from the teacher's; warn if it is larger."""
    t_width, s_width = logit_width(teacher), logit_width(student)
    if t_width != s_width:
        raise UserInputError(
            f"the teacher predicts {t_width} tokens and the student {s_width}: distillation "
            "compares their logits token by token, so both must share one tokenizer"
        )
    if teacher_tokenizer is not None and student_tokenizer is not None:
        t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        if t_vocab != s_vocab:
            differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
            raise UserInputError(
                f"the teacher's and the student's tokenizers differ ({len(t_vocab)} vs "
                f"{len(s_vocab)} tokens; e.g. {differing}): distillation needs one shared tokenizer"
            )
    t_params, s_params = parameter_count(teacher), parameter_count(student)
    if s_params > t_params:
        logger.warning(
            "the student (%s parameters) is larger than the teacher (%s): distillation usually "
            "goes from a larger model to a smaller one",
            f"{s_params:,}",
            f"{t_params:,}",
        )


def check_layer_map(
    layer_map: list[tuple[int, int]], teacher: nn.Module, student: nn.Module
) -> None:
    """Every pair must index an existing hidden state (0..layers) of its model."""
    t_layers, s_layers = num_layers(teacher), num_layers(student)
    bad = [(s, t) for s, t in layer_map if not (0 <= s <= s_layers and 0 <= t <= t_layers)]
    if bad:
        raise UserInputError(
            f"loss.layer_map pairs {bad} are out of range: student hidden states are 0..{s_layers},"
            f" teacher 0..{t_layers}"
        )
