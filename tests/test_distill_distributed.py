"""Two CPU processes under `accelerate launch` (DDP over gloo) give the single-process result.

The command line runs under `accelerate launch --multi_gpu --num_processes 2` with
`--device cpu`, which makes accelerate start two processes with torchrun and join them over gloo
(`accelerate launch --cpu` alone starts one process unless MPI is installed). Each process takes
half of every global batch (batch size 2 each), so the run must match one process with batch
size 4: same batches, gradients averaged by DDP instead of over one larger batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import swiss_knife
from conftest import corpus, make_char_tokenizer, make_tiny_llama
from swiss_knife.compression.distillation.api import distill
from swiss_knife.config import DataConfig, DistillConfig, validate_dict
from swiss_knife.data import load_token_stream
from swiss_knife.models import load_model

pytestmark = pytest.mark.slow

SETTINGS: dict[str, Any] = {
    "max_steps": 6,
    "seq_len": 32,
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "eval_every": 3,
    "eval_windows": 8,
    "save_every": 3,
    "log_every": 1,
    "loss": {"alpha": 0.3, "temperature": 2.0, "hidden_weight": 0.5, "hidden_loss": "mse"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_records(directory: Path) -> list[dict[str, Any]]:
    lines = (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_two_process_run_matches_one_process(tmp_path: Path) -> None:
    tokenizer = make_char_tokenizer()
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    make_tiny_llama(seed=0, num_hidden_layers=3, initializer_range=0.2).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    # Narrower than the teacher: the hidden-state projections train under DDP too.
    narrow = make_tiny_llama(seed=1, num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    narrow.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    text = tmp_path / "train.txt"
    text.write_text(corpus(300), encoding="utf-8")

    src = Path(swiss_knife.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    # Launch settings on the command line, so no accelerate config file on this machine counts.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "swiss_knife.cli", "distill",
        "--teacher", teacher_dir, "--student", student_dir, "--train-data", text,
        "--batch-size", "2", "--output-dir", tmp_path / "two", "--device", "cpu", "--json",
        "--max-steps", "6", "--seq-len", "32", "--learning-rate", "3e-3", "--warmup-steps", "2",
        "--eval-every", "3", "--eval-windows", "8", "--save-every", "3", "--log-every", "1",
        "--alpha", "0.3", "--temperature", "2", "--hidden-weight", "0.5", "--hidden-loss", "mse",
    ]  # fmt: skip
    launched = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, env=env, timeout=300
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    summary = json.loads(launched.stdout)  # only the main process prints
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = load_model(str(teacher_dir), device="cpu")
        stream = load_token_stream(DataConfig(source=str(text)), teacher.tokenizer)
        config = validate_dict(DistillConfig, {**SETTINGS, "batch_size": 4}, "single")
        single = distill(
            teacher,
            load_model(str(student_dir), device="cpu", with_tokenizer=False),
            config,
            train_data=stream,
            output_dir=tmp_path / "one",
            cpu=True,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)

    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    one = load_file(str(single.final_dir / "model.safetensors"))
    assert two.keys() == one.keys()
    start = load_file(str(student_dir / "model.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
    assert any(not torch.equal(one[k], start[k]) for k in one)  # it did train

    # Every logged loss and held-out evaluation agrees, and both ran the same steps.
    two_records, one_records = train_records(tmp_path / "two"), train_records(tmp_path / "one")
    assert [(r["event"], r["step"]) for r in two_records] == [
        (r["event"], r["step"]) for r in one_records
    ]
    for a, b in zip(two_records, one_records, strict=True):
        for key in ("loss", "ce", "kd", "hidden", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
        if "eval_tokens" in b:
            assert a["eval_tokens"] == b["eval_tokens"]
    # Each process saved its own random state in the checkpoints.
    last = tmp_path / "two" / "checkpoints" / "step-00000006"
    assert {p.name for p in last.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
