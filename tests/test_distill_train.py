"""The distillation loop on tiny random Llamas: learning, exact resume, early stopping, caches, errors."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import corpus, make_char_tokenizer, make_tiny_llama
from swiss_knife.compression.distillation.api import distill
from swiss_knife.compression.distillation.student import blocks_to_drop
from swiss_knife.config import DistillConfig, StudentFromTeacher, validate_dict
from swiss_knife.errors import ConfigError, DataError, OutputExistsError, UserInputError
from swiss_knife.evaluation.perplexity import perplexity

SEQ = 32
# Small, fast settings; tests override what they exercise.
BASE: dict[str, Any] = {
    "seq_len": SEQ,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "eval_every": 0,
    "eval_windows": 8,
    "save_every": 0,
    "log_every": 1,
}


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny matmuls, one thread


def config(**changes: Any) -> DistillConfig:
    return validate_dict(DistillConfig, {**BASE, **changes}, "test config")


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    tokenizer = make_char_tokenizer()
    return torch.tensor([1, *tokenizer(corpus(), add_special_tokens=False)["input_ids"]])


@pytest.fixture(scope="module")
def teacher(stream: torch.Tensor, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 4-block tiny Llama that has learnt the corpus a little (plain LM fine-tuning)."""
    model = make_tiny_llama(seed=0, num_hidden_layers=4)
    result = distill(
        model,
        make_tiny_llama(seed=0, num_hidden_layers=4),
        config(loss={"alpha": 1.0}, max_steps=30, learning_rate=1e-2, eval_every=30),
        train_data=stream,
        output_dir=tmp_path_factory.mktemp("teacher"),
        progress=False,
    )
    first, last = result.evaluations[0], result.evaluations[-1]
    # Fine-tuning alone (alpha = 1, no teacher pass) taught it the corpus.
    assert last.perplexity < 0.5 * first.perplexity, (first, last)
    return result.student


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def metrics(directory: Path) -> list[dict[str, Any]]:
    lines = (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_distillation_lowers_the_loss_and_reports_true_perplexity(
    teacher: Any, stream: torch.Tensor, tmp_path: Path
) -> None:
    cfg = config(student_from_teacher={"remove": 2}, max_steps=25, eval_every=25)
    result = distill(teacher, None, cfg, train_data=stream, output_dir=tmp_path, progress=False)
    assert result.kept_blocks == [0, 3]
    assert len(result.student.model.layers) == 2 and result.student.config.num_hidden_layers == 2
    train = [m for m in metrics(tmp_path) if m["event"] == "train"]
    assert [m["step"] for m in train] == list(range(1, 26))
    assert train[-1]["kd"] < 0.5 * train[0]["kd"], (train[0], train[-1])
    assert result.evaluations[-1].perplexity < result.evaluations[0].perplexity
    assert result.tokens == 25 * 4 * SEQ and result.tokens_per_s > 0
    # The loop's held-out perplexity is the evaluation module's, on the same held-out tail.
    held_out = stream[-math.ceil(0.05 * stream.numel() / SEQ) * SEQ :][: 8 * SEQ]
    reference = perplexity(result.student, held_out, window=SEQ)
    assert result.best_perplexity == pytest.approx(reference.perplexity, rel=1e-5)
    assert result.evaluations[-1].tokens == reference.tokens_scored
    # best/ and final/ are ordinary checkpoints of the 2-block student.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert reloaded.config.num_hidden_layers == 2
    for key, value in weights(result.student).items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    manifest = json.loads((result.final_dir / "swiss_knife.json").read_text(encoding="utf-8"))
    assert manifest["distill"]["student_from_teacher"]["remove"] == 2
    assert (tmp_path / "checkpoints" / "step-00000025").is_dir()


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(
    teacher: Any, stream: torch.Tensor, tmp_path: Path
) -> None:
    # Dropout makes every step consume random numbers, so the RNG state must resume exactly too;
    # gradient accumulation makes the data position two micro-batches per step.
    def student() -> Any:
        return make_tiny_llama(seed=1, num_hidden_layers=2, attention_dropout=0.2)

    cfg = config(max_steps=6, save_every=2, grad_accum=2, eval_every=3, keep_checkpoints=2)
    whole = distill(
        teacher, student(), cfg, train_data=stream, output_dir=tmp_path / "a", progress=False
    )

    class Killed(Exception):
        pass

    def kill_at_4(info: dict[str, Any]) -> None:
        if info["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        distill(
            teacher,
            student(),
            cfg,
            train_data=stream,
            output_dir=tmp_path / "b",
            progress=False,
            callback=kill_at_4,
        )
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]

    # Another run's settings, or a student with other weights, cannot resume this checkpoint.
    steps_run: list[int] = []
    for other_cfg, other_student, what in (
        (config(**{**cfg.model_dump(), "learning_rate": 1e-3}), student(), "settings"),
        (cfg, make_tiny_llama(seed=2, num_hidden_layers=2, attention_dropout=0.2), "student"),
    ):
        with pytest.raises(UserInputError, match=f"another run \\({what} differ"):
            distill(
                teacher,
                other_student,
                other_cfg,
                train_data=stream,
                output_dir=tmp_path / "b",
                resume=True,
                progress=False,
                callback=lambda info: steps_run.append(info["step"]),
            )
    assert steps_run == []  # refused before any training

    # "auto" (what recipes use) resumes a checkpoint of this very run.
    resumed = distill(
        teacher,
        student(),
        cfg,
        train_data=stream,
        output_dir=tmp_path / "b",
        resume="auto",
        progress=False,
    )
    assert resumed.resumed_from == tmp_path / "b" / "checkpoints" / "step-00000004"
    for key, value in weights(whole.student).items():
        assert torch.equal(weights(resumed.student)[key], value), key
    assert [(e.step, e.loss) for e in resumed.evaluations] == [
        (e.step, e.loss) for e in whole.evaluations
    ]

    def losses(directory: Path) -> list[tuple[int, float]]:
        return [(m["step"], m["loss"]) for m in metrics(directory) if m["event"] == "train"]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # no step logged twice
    # Only the most recent checkpoints are kept; a new run there needs --overwrite.
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000006",
    ]
    with pytest.raises(OutputExistsError, match="--resume"):
        distill(
            teacher, student(), cfg, train_data=stream, output_dir=tmp_path / "b", progress=False
        )
    # "auto" with other settings discards the earlier run and starts again from step 0.
    other = config(**{**cfg.model_dump(), "max_steps": 2, "save_every": 0})
    fresh = distill(
        teacher,
        student(),
        other,
        train_data=stream,
        output_dir=tmp_path / "b",
        resume="auto",
        progress=False,
    )
    assert fresh.resumed_from is None and fresh.steps == 2
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000002"]
    with pytest.raises(UserInputError, match="not a distillation checkpoint"):
        distill(
            teacher,
            student(),
            cfg,
            train_data=stream,
            output_dir=tmp_path / "c",
            resume=tmp_path / "b",
            progress=False,
        )


def test_early_stopping_keeps_the_best_student(
    teacher: Any, stream: torch.Tensor, tmp_path: Path
) -> None:
    start = make_tiny_llama(seed=1, num_hidden_layers=2)
    before = weights(start)
    # A learning rate this large makes every step worse than not training at all.
    cfg = config(
        max_steps=30,
        learning_rate=3.0,
        warmup_steps=0,
        max_grad_norm=None,
        lr_schedule="constant",
        eval_every=1,
        early_stopping_patience=2,
    )
    result = distill(teacher, start, cfg, train_data=stream, output_dir=tmp_path, progress=False)
    assert result.stopped_early and result.steps == 2
    assert result.best_step == 0 and result.best_dir == tmp_path / "best"
    for key, value in weights(result.student).items():
        assert torch.equal(value, before[key]), key
    evals = [m for m in metrics(tmp_path) if m["event"] == "eval"]
    assert [m["best"] for m in evals] == [True, False, False]


def test_teacher_top_k_cache_is_reused_without_teacher_passes(
    teacher: Any, stream: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(max_steps=5, teacher_topk=16, teacher_cache=str(tmp_path / "cache"))
    first = distill(
        teacher,
        make_tiny_llama(seed=1, num_hidden_layers=2),
        cfg,
        train_data=stream,
        output_dir=tmp_path / "one",
        progress=False,
    )
    cached = list((tmp_path / "cache").glob("teacher-top16-*.safetensors"))
    assert len(cached) == 1

    def no_forward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the teacher ran although its top-k logits are cached")

    monkeypatch.setattr(teacher, "forward", no_forward)
    second = distill(
        teacher,
        make_tiny_llama(seed=1, num_hidden_layers=2),
        cfg,
        train_data=stream,
        output_dir=tmp_path / "two",
        progress=False,
    )
    for key, value in weights(first.student).items():
        assert torch.equal(weights(second.student)[key], value), key
    train = [m for m in metrics(tmp_path / "two") if m["event"] == "train"]
    assert train[-1]["kd"] < train[0]["kd"]


def test_hidden_state_matching_trains_projections(
    teacher: Any, stream: torch.Tensor, tmp_path: Path
) -> None:
    narrow = make_tiny_llama(seed=3, num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    cfg = config(max_steps=12, loss={"alpha": 0.5, "hidden_weight": 1.0, "hidden_loss": "mse"})
    result = distill(teacher, narrow, cfg, train_data=stream, output_dir=tmp_path, progress=False)
    train = [m for m in metrics(tmp_path) if m["event"] == "train"]
    assert set(train[0]) >= {"ce", "kd", "hidden"}
    assert train[-1]["hidden"] < train[0]["hidden"]
    # The saved student is the student alone: no projection weights in it.
    from safetensors import safe_open

    with safe_open(str(result.final_dir / "model.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if "projection" in k]  # noqa: SIM118


def test_bf16_autocast_gradient_checkpointing_and_epochs(
    teacher: Any, stream: torch.Tensor, tmp_path: Path
) -> None:
    cfg = config(
        epochs=0.05,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        student_from_teacher={"drop_layers": [1, -2]},
        eval_every=0,
    )
    teacher.requires_grad_(False)  # a frozen teacher still gives a trainable copy
    result = distill(teacher, None, cfg, train_data=stream, output_dir=tmp_path, progress=False)
    per_epoch = (stream.numel() - math.ceil(0.05 * stream.numel() / SEQ) * SEQ) // SEQ // 4
    assert result.steps == int(0.05 * per_epoch) >= 1
    assert not result.student.is_gradient_checkpointing
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path) if m["event"] == "train")
    assert result.student.dtype == torch.float32  # autocast, not a cast of the weights


# --------------------------------------------------------------------------- bad input


REMOVE_ONE = {"max_steps": 1, "student_from_teacher": {"remove": 1}}


@pytest.mark.parametrize(
    ("student_seed_layers_vocab", "changes", "data", "error", "message"),
    [
        (
            (1, 1, 100),
            {"max_steps": 1},
            {},
            UserInputError,
            "predicts 128 tokens and the student 100",
        ),
        (None, REMOVE_ONE, {"train_data": 100}, DataError, "fewer than one batch"),
        (None, REMOVE_ONE, {"eval_data": 10}, DataError, "held-out text"),
        (
            None,
            {**REMOVE_ONE, "loss": {"hidden_weight": 1.0, "layer_map": [[4, 1]]}},
            {},
            UserInputError,
            "layer_map",
        ),
        (
            None,
            {"max_steps": 1, "student_from_teacher": {"drop_layers": [4]}},
            {},
            UserInputError,
            "out of range",
        ),
    ],
)
def test_bad_input_fails_before_training(
    teacher: Any,
    stream: torch.Tensor,
    tmp_path: Path,
    student_seed_layers_vocab: tuple[int, int, int] | None,
    changes: dict[str, Any],
    data: dict[str, int],
    error: type[Exception],
    message: str,
) -> None:
    student = None
    if student_seed_layers_vocab is not None:
        seed, layers, vocab = student_seed_layers_vocab
        student = make_tiny_llama(seed=seed, num_hidden_layers=layers, vocab_size=vocab)
    train = stream[: data["train_data"]] if "train_data" in data else stream
    held_out = stream[: data["eval_data"]] if "eval_data" in data else None
    with pytest.raises(error, match=message):
        distill(
            teacher,
            student,
            config(**changes),
            train_data=train,
            eval_data=held_out,
            output_dir=tmp_path / "out",
            progress=False,
        )
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


def test_output_folders_are_protected_and_larger_students_warned(
    teacher: Any, stream: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "mine.txt").write_text("keep me", encoding="utf-8")
    for overwrite, message in ((False, "not empty"), (True, "refusing to delete")):
        with pytest.raises(OutputExistsError, match=message):
            distill(
                teacher,
                None,
                config(**REMOVE_ONE),
                train_data=stream,
                output_dir=tmp_path / "f",
                overwrite=overwrite,
                progress=False,
            )
    assert (tmp_path / "f" / "mine.txt").read_text(encoding="utf-8") == "keep me"

    bigger = make_tiny_llama(seed=1, num_hidden_layers=6)
    with caplog.at_level(logging.WARNING):
        distill(
            teacher,
            bigger,
            config(max_steps=1),
            train_data=stream,
            output_dir=tmp_path / "g",
            progress=False,
        )
    assert "larger than the teacher" in caplog.text
    # --overwrite clears an earlier run only once the new one has passed every check.
    other_vocab = make_tiny_llama(seed=1, num_hidden_layers=1, vocab_size=100)
    with pytest.raises(UserInputError, match="predicts 128 tokens"):
        distill(
            teacher,
            other_vocab,
            config(max_steps=1),
            train_data=stream,
            output_dir=tmp_path / "g",
            overwrite=True,
            progress=False,
        )
    assert (tmp_path / "g" / "final" / "config.json").is_file()


def test_blocks_to_drop() -> None:
    def drop(**spec: Any) -> list[int]:
        return blocks_to_drop(30, StudentFromTeacher(**spec))

    assert drop(remove=10) == list(range(10, 20))  # a contiguous run from the middle
    assert drop(remove=10, position="last") == list(range(19, 29))  # the 10 before the last
    # Centres of ten slices of 2.8 blocks over the interior 1..28.
    assert drop(remove=10, position="evenly") == [2, 5, 8, 10, 13, 16, 19, 22, 24, 27]
    assert drop(drop_layers=[3, -1, 3]) == [3, 29]
    assert blocks_to_drop(5, StudentFromTeacher(remove=3, position="evenly")) == [1, 2, 3]
    with pytest.raises(UserInputError, match="keep the last"):
        blocks_to_drop(4, StudentFromTeacher(remove=4, position="last"))
    with pytest.raises(UserInputError, match="cannot remove 4 of 4"):
        blocks_to_drop(4, StudentFromTeacher(remove=4))
    with pytest.raises(UserInputError, match="interior"):
        blocks_to_drop(4, StudentFromTeacher(remove=3, position="evenly"))


def test_distill_config_validation() -> None:
    with pytest.raises(ConfigError, match="max_steps or epochs"):
        config(max_steps=3, epochs=1.0)
    with pytest.raises(ConfigError, match="reverse KL needs every logit"):
        config(teacher_topk=8, loss={"kd": "reverse_kl"})
    with pytest.raises(ConfigError, match="exactly one of drop_layers and remove"):
        config(student_from_teacher={"remove": 2, "drop_layers": [1]})
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        config(learning_rat=1e-3)
    assert config(train_data="text.txt").train_data.source == "text.txt"  # type: ignore[union-attr]
    assert not config(loss={"alpha": 1.0}).needs_teacher
