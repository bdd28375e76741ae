"""Block-streamed runs (swiss_knife.streaming): the same output as loading the whole model, with
memory that does not grow with the number of blocks, and nothing complete-looking left by a kill.

Every streamed run here reads a checkpoint saved in many small shards (so blocks span files and
files span blocks), through the command line in this process (`cli.main`), once with
``--stream on`` and once with ``--stream off``; the two output folders must hold the same
tensors (bit for bit, same dtype), the same config and the same JSON summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIGS, assert_user_error, build, make_char_tokenizer, sk
from swiss_knife import cli
from swiss_knife.streaming import INDEX_NAME

pytestmark = pytest.mark.usefixtures("single_thread")

TEXT = "the quick brown fox jumps over the lazy dog. " * 300
CALIB = ["--num-samples", "4", "--seq-len", "32"]

METHODS: dict[str, list[str]] = {
    "rtn": ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "16"],
    "gptq": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "16", *CALIB],
    "awq": ["quantize", "--method", "awq", "--bits", "4", "--group-size", "16", *CALIB],
    "static": ["quantize", "--method", "static", *CALIB],
    "bf16": ["quantize", "--method", "bf16"],
    "magnitude": ["prune", "--method", "magnitude", "--sparsity", "0.5"],
    "wanda": ["prune", "--method", "wanda", "--sparsity", "0.5", *CALIB],
    "sparsegpt-2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *CALIB],
    "wanda-owl": ["prune", "--method", "wanda", "--sparsity", "0.5", "--allocation", "owl", *CALIB],
    "magnitude-owl": [
        *("prune", "--method", "magnitude", "--sparsity", "0.5", "--allocation", "owl", *CALIB)
    ],
    "structured": [
        *("prune", "--method", "structured", "--mlp-ratio", "0.25", "--head-ratio", "0.5"),
        *CALIB,
    ],
    "structured-magnitude": [
        *("prune", "--method", "structured", "--mlp-ratio", "0.5", "--importance", "magnitude")
    ],
    "reduce-importance": [
        *("reduce-layers", "--num-layers-to-remove", "1", "--keep-last", "0", "--keep-first"),
        *("0", *CALIB),
    ],
    "reduce-last": [
        *("reduce-layers", "--num-layers-to-keep", "1", "--selection", "last", "--keep-last", "0")
    ],
}
CALIBRATED = {
    *("gptq", "awq", "static", "wanda", "sparsegpt-2:4", "wanda-owl", "magnitude-owl"),
    *("structured", "reduce-importance"),
}
# Checkpoints whose tensor names differ from the model's (transformers renames them on load and
# back on save: GPT-NeoX's embed_out is the model's lm_head) are not streamed.
RENAMED = {"gpt_neox"}
# Architectures whose linears are nn.Linear (GPT-2's Conv1D cannot be saved pack-quantized).
LINEAR_ARCHS = [a for a in TINY_CONFIGS if a != "gpt2" and a not in RENAMED]


def _source(root: Path, arch: str) -> Path:
    """A tiny model of `arch` saved in shards of at most 20 KB, with a tokenizer."""
    folder = root / f"src-{arch}"
    if not folder.exists():
        build(arch).save_pretrained(folder, max_shard_size="20KB")
        make_char_tokenizer().save_pretrained(folder)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _run(capsys: Any, source: Path, out: Path, method: str, mode: str, text: Path) -> Any:
    args = METHODS[method]
    data = ["--calibration-data", str(text)] if method in CALIBRATED else []
    flags = ["--output-dir", str(out), "--stream", mode, "--json", "-q"]
    code = cli.main([args[0], str(source), *args[1:], *data, *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _same_outputs(capsys: Any, tmp_path: Path, arch: str, method: str) -> tuple[Path, Path]:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    source = _source(tmp_path, arch)
    streamed, loaded = tmp_path / f"{method}-on", tmp_path / f"{method}-off"
    summary_on = _run(capsys, source, streamed, method, "on", text)
    summary_off = _run(capsys, source, loaded, method, "off", text)
    a, b = _tensors(streamed), _tensors(loaded)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    config_a = json.loads((streamed / "config.json").read_text())
    config_b = json.loads((loaded / "config.json").read_text())
    assert config_a == config_b
    for key in ("output_dir", "seconds", "disk_bytes"):
        summary_on.pop(key)
        summary_off.pop(key)
    assert summary_on == summary_off
    assert (streamed / INDEX_NAME).is_file()  # really streamed: one shard per block + the rest
    assert not (loaded / INDEX_NAME).exists()
    return streamed, loaded


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_equals_in_memory_for_every_method(
    capsys: Any, tmp_path: Path, method: str
) -> None:
    streamed, _ = _same_outputs(capsys, tmp_path, "llama", method)
    index = json.loads((streamed / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    blocks = json.loads((streamed / "config.json").read_text())["num_hidden_layers"]
    assert blocks == (1 if method.startswith("reduce") else 2)
    assert len(shards) == blocks + 1  # one per block, and one for the tensors outside them
    assert all(name.startswith("model.layers.0.") for name, shard in index["weight_map"].items()
               if shard == shards[0])  # fmt: skip


@pytest.mark.parametrize("arch", LINEAR_ARCHS)
@pytest.mark.parametrize(
    "method", ["gptq", "awq", "wanda", "reduce-importance", "structured-magnitude"]
)
def test_streamed_equals_in_memory_for_every_architecture(
    capsys: Any, tmp_path: Path, arch: str, method: str
) -> None:
    _same_outputs(capsys, tmp_path, arch, method)


def test_streamed_gpt2_prunes_conv1d_layers(capsys: Any, tmp_path: Path) -> None:
    _same_outputs(capsys, tmp_path, "gpt2", "wanda")


def test_renamed_checkpoint_keys_are_not_streamed(tmp_path: Path) -> None:
    source = _source(tmp_path, "gpt_neox")
    args = ("quantize", source, "--method", "rtn", "--bits", "4", "--group-size", "16")
    refused = sk(*args, "--output-dir", tmp_path / "on", "--stream", "on")
    assert "names its tensors unlike the model" in assert_user_error(refused)
    assert not list(tmp_path.glob(".on.*"))  # its work folder is gone too
    auto = sk(*args, "--output-dir", tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr
    assert "not streamed" in auto.stderr and (tmp_path / "auto" / "model.safetensors").is_file()


def test_streamed_output_reloads_with_plain_transformers(capsys: Any, tmp_path: Path) -> None:
    """A fresh process without Swiss Knife loads the streamed GPTQ and Wanda folders and gets
    the logits of the folders written from memory."""
    folders = [_same_outputs(capsys, tmp_path, "llama", m) for m in ("gptq", "wanda")]
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.arange(4, 36).reshape(2, 16)
        for a, b in zip(sys.argv[1::2], sys.argv[2::2]):
            la = AutoModelForCausalLM.from_pretrained(a).eval()(ids).logits
            lb = AutoModelForCausalLM.from_pretrained(b).eval()(ids).logits
            assert torch.equal(la, lb), (a, b)
        assert "swiss_knife" not in sys.modules
        print("ok")
        """
    )
    paths = [str(p) for pair in folders for p in pair]
    done = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_stream_on_refuses_what_cannot_stream(tmp_path: Path) -> None:
    source = _source(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    hqq = sk("quantize", source, "--method", "hqq", "--bits", "4", "--group-size", "16",
             "--output-dir", out, "--stream", "on")  # fmt: skip
    line = assert_user_error(hqq)
    assert "cannot stream" in line and "hqq" in line
    gradual = sk("prune", source, "--method", "wanda", "--sparsity", "0.5", "--gradual-steps",
                 "2", "--calibration-data", text, *CALIB, "--output-dir", out, "--stream", "on")  # fmt: skip
    assert "gradual schedule" in assert_user_error(gradual)
    hidden = sk("prune", source, "--method", "structured", "--hidden-ratio", "0.25", "--importance",
                "magnitude", "--output-dir", out, "--stream", "on")  # fmt: skip
    assert "hidden channels" in assert_user_error(hidden)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_auto_loads_the_model_when_the_stage_cannot_stream(tmp_path: Path) -> None:
    source = _source(tmp_path, "llama")
    out = tmp_path / "out"
    done = sk("prune", source, "--method", "magnitude", "--sparsity", "0.5", "--scope", "global",
              "--output-dir", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "not streamed: a global scope" in done.stderr
    assert (out / "model.safetensors").is_file()


def test_streamed_run_prints_its_human_summary(tmp_path: Path) -> None:
    source = _source(tmp_path, "llama")
    done = sk("quantize", source, "--method", "rtn", "--bits", "4", "--group-size", "16",
              "--output-dir", tmp_path / "out")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "streaming" in done.stderr
    assert "saved to" in done.stdout and "worst layers" in done.stdout.lower()


def test_converting_reads_go_a_slice_of_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor read into another dtype is converted in slices of rows (so a large embedding
    matrix is never whole in both dtypes), to the same values as a whole conversion."""
    from safetensors.torch import save_file

    from swiss_knife import streaming

    table = torch.randn(37, 11).to(torch.bfloat16)
    save_file({"table": table, "norm": torch.randn(5).half()}, str(tmp_path / "model.safetensors"))
    reads: list[int] = []
    read = streaming.CheckpointTensors._read

    def counting(self: Any, name: str, begin: int, end: int) -> torch.Tensor:
        reads.append(end - begin)
        return read(self, name, begin, end)

    monkeypatch.setattr(streaming.CheckpointTensors, "_read", counting)
    monkeypatch.setattr(streaming, "_CHUNK_BYTES", 5 * 11 * 2)  # five rows
    source = streaming.CheckpointTensors(tmp_path)
    converted = source.get("table", torch.float32)
    assert converted.dtype == torch.float32 and torch.equal(converted, table.float())
    assert reads == [5 * 22] * 7 + [2 * 22]
    assert torch.equal(source.get("table"), table)
    assert torch.equal(source.get("norm", torch.float32), source.get("norm").float())


# ------------------------------------------------------------------------------ evaluate


def _evaluate(capsys: Any, source: Path, text: Path, mode: str, *extra: str) -> dict[str, Any]:
    flags = ["--eval-data", str(text), "--window", "64", "--stream", mode, "--json", "-q"]
    code = cli.main(["evaluate", str(source), *flags, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics: dict[str, Any] = json.loads(captured.out)["metrics"]
    return metrics


@pytest.mark.parametrize("arch", [*LINEAR_ARCHS, "gpt2"])
def test_streamed_perplexity_equals_in_memory(capsys: Any, tmp_path: Path, arch: str) -> None:
    """Perplexity computed block by block over all windows is the whole model's, bit for bit,
    and so are the size numbers (non-zeros counted as the blocks went by)."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    source = _source(tmp_path, arch)
    streamed = _evaluate(capsys, source, text, "on", "--batch-size", "3")
    loaded = _evaluate(capsys, source, text, "off", "--batch-size", "3", "--no-speed")
    assert streamed["streamed"] is True and loaded["streamed"] is False
    assert streamed["perplexity"] == loaded["perplexity"]
    assert streamed["perplexity"]["num_windows"] > 3  # several batches, the last one short
    assert streamed["size"] == loaded["size"]
    assert "speed" not in streamed and streamed["memory"]["streamed"] is True


def test_streamed_perplexity_of_a_pruned_model(capsys: Any, tmp_path: Path) -> None:
    """A streamed Wanda output (sharded, half zeros) evaluates streamed to its in-memory
    perplexity and sparsity."""
    streamed_out, _ = _same_outputs(capsys, tmp_path, "llama", "wanda")
    text = tmp_path / "text.txt"
    on = _evaluate(capsys, streamed_out, text, "on")
    off = _evaluate(capsys, streamed_out, text, "off", "--no-speed")
    assert on["perplexity"] == off["perplexity"]
    assert on["size"]["nonzero_params"] == off["size"]["nonzero_params"]
    assert on["size"]["sparsity"] > 0.3


def test_streamed_evaluate_human_output_and_refusals(tmp_path: Path) -> None:
    source = _source(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    done = sk("evaluate", source, "--eval-data", text, "--window", "64", "--stream", "on")
    assert done.returncode == 0, done.stderr
    assert "speed is not measured" in done.stderr and "streaming" in done.stderr
    assert "perplexity" in done.stdout.lower()
    with_reference = sk("evaluate", source, "--eval-data", text, "--stream", "on",
                        "--reference", source)  # fmt: skip
    line = assert_user_error(with_reference)
    assert "cannot stream" in line and "agreement" in line
    renamed = sk("evaluate", _source(tmp_path, "gpt_neox"), "--eval-data", text, "--stream", "on")
    assert "names its tensors unlike the model" in assert_user_error(renamed)


def test_auto_streams_evaluation_only_when_the_model_does_not_fit(
    capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    fits = _evaluate(capsys, source, text, "auto", "--no-speed")
    assert fits["streamed"] is False
    monkeypatch.setattr("swiss_knife.streaming.available_bytes", lambda device: 1000)
    too_big = _evaluate(capsys, source, text, "auto")
    assert too_big["streamed"] is True and "speed" not in too_big
    assert too_big["perplexity"] == fits["perplexity"]


# ------------------------------------------------------------------------------ spilled activations


@pytest.mark.parametrize("method", ["gptq", "sparsegpt-2:4"])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_spilled_activations_give_the_same_output(
    capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, mode: str
) -> None:
    """Activations kept in files (--spill-activations) give the same tensors as in memory,
    streamed or not; the files were used, and their folder is gone afterwards."""
    from swiss_knife.calibration import SpilledActivations

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    source = _source(tmp_path, "llama")
    spill = tmp_path / "spill"
    writes: list[Path] = []
    original = SpilledActivations._write

    def counting(self: Any, path: Path, tensor: torch.Tensor) -> None:
        writes.append(path)
        original(self, path, tensor)

    monkeypatch.setattr(SpilledActivations, "_write", counting)
    extra = ["--calibration-batch-size", "1"]
    with_spill = _run_calibrated(capsys, source, tmp_path / "a", method, mode, text,
                                 [*extra, "--spill-activations", str(spill)])  # fmt: skip
    assert len(writes) >= 4 * 3  # 4 mini-batches captured, then replayed through 2 blocks
    assert spill.is_dir() and not list(spill.iterdir())
    writes.clear()
    in_memory = _run_calibrated(capsys, source, tmp_path / "b", method, mode, text, extra)
    assert not writes
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    for key in ("output_dir", "seconds", "disk_bytes", "config"):
        with_spill.pop(key, None)
        in_memory.pop(key, None)
    assert with_spill == in_memory


def _run_calibrated(
    capsys: Any, source: Path, out: Path, method: str, mode: str, text: Path, extra: list[str]
) -> Any:
    args = METHODS[method]
    flags = ["--calibration-data", str(text), "--output-dir", str(out), "--stream", mode]
    code = cli.main([args[0], str(source), *args[1:], *flags, *extra, "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_streamed_perplexity_with_spilled_hidden_states(capsys: Any, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    source = _source(tmp_path, "qwen2")
    spill = tmp_path / "spill"
    spilled = _evaluate(capsys, source, text, "on", "--spill-activations", str(spill))
    in_memory = _evaluate(capsys, source, text, "on")
    assert spilled["perplexity"] == in_memory["perplexity"]
    assert spill.is_dir() and not list(spill.iterdir())


# ------------------------------------------------------------------------------ memory

# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child of a big pytest process
# would report at least its parent's size.
_MEMORY_SCRIPT = """
import sys
from swiss_knife import cli
if sys.argv[4] == "quantize":
    code = cli.main(["quantize", sys.argv[1], "--method", "rtn", "--bits", "8", "--group-size",
                     "0", "--output-dir", sys.argv[2], "--stream", sys.argv[3], "-q"])
else:
    code = cli.main(["evaluate", sys.argv[1], "--eval-data", sys.argv[5], "--window", "32",
                     "--no-speed", "--stream", sys.argv[3], "-q", "--json"])
assert code == 0
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]))  # KiB
"""


def _peak_kib(source: Path, out: Path, mode: str, verb: str, text: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(source), str(out), mode, verb, str(text)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_streamed_peak_memory_does_not_grow_with_blocks(tmp_path: Path) -> None:
    """Peak RSS of a streamed RTN run, and of a streamed perplexity measurement, on a model of
    2 and of 12 blocks (each about 38 MB in fp32) differs by far less than the 10 extra
    blocks, which a whole-model run does pay. (The peaks of repeated runs vary by some tens of
    MB, hence blocks this large.)"""
    shape = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
             "num_key_value_heads": 12, "head_dim": 64, "vocab_size": 128}  # fmt: skip
    block_mib = (4 * 768 * 768 + 3 * 768 * 3072) * 4 / 2**20
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:2000], encoding="utf-8")
    peaks: dict[tuple[int, str, str], float] = {}
    for blocks in (2, 12):
        folder = tmp_path / f"m{blocks}"
        build("llama", num_hidden_layers=blocks, **shape).save_pretrained(
            folder, max_shard_size="80MB"
        )
        make_char_tokenizer().save_pretrained(folder)
        for verb in ("quantize", "evaluate"):
            for mode in ("on", "off"):
                out = tmp_path / f"o{blocks}{mode}{verb}"
                peaks[blocks, mode, verb] = _peak_kib(folder, out, mode, verb, text) / 1024
    for verb in ("quantize", "evaluate"):
        streamed_growth = peaks[12, "on", verb] - peaks[2, "on", verb]
        loaded_growth = peaks[12, "off", verb] - peaks[2, "off", verb]
        # The whole model's peak grows by the 10 blocks; a streamed one by far less. Generous:
        # late in a full test run, peaks of the same command vary by up to ~3 blocks.
        assert loaded_growth > 8 * block_mib, (verb, peaks)
        assert streamed_growth < 5 * block_mib, (verb, peaks)


_SPILL_SCRIPT = """
import sys
from swiss_knife import cli
code = cli.main(["prune", sys.argv[1], "--method", "wanda", "--sparsity", "0.5",
                 "--calibration-data", sys.argv[2], "--num-samples", sys.argv[3], "--seq-len",
                 "256", "--output-dir", sys.argv[4], "-q", *sys.argv[5:]])
assert code == 0
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]))  # KiB
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_spilled_activations_keep_peak_memory_flat_in_the_sample_count(tmp_path: Path) -> None:
    """Wanda with 8 and with 256 calibration windows of 256 tokens (hidden 768: the 248 extra
    windows' activations are 195 MB in fp32): the peak RSS grows by most of that in memory and
    by far less with --spill-activations (late in a full test run, peaks of the same command
    vary by up to ~80 MB, hence this many windows)."""
    shape = {"hidden_size": 768, "intermediate_size": 1024, "num_attention_heads": 12,
             "num_key_value_heads": 12, "head_dim": 64, "vocab_size": 128,
             "max_position_embeddings": 256}  # fmt: skip
    source = tmp_path / "src"
    build("llama", num_hidden_layers=2, **shape).save_pretrained(source)
    make_char_tokenizer().save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 14, encoding="utf-8")
    extra_mib = 248 * 256 * 768 * 4 / 2**20
    peaks: dict[tuple[int, bool], float] = {}
    for samples in (8, 256):
        for spill in (False, True):
            flags = ["--spill-activations", str(tmp_path / "spill")] if spill else []
            out = tmp_path / f"out-{samples}-{spill}"
            command = [sys.executable, "-c", _SPILL_SCRIPT, str(source), str(text)]
            done = subprocess.run(
                [*command, str(samples), str(out), *flags],
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert done.returncode == 0, done.stderr[-3000:]
            peaks[samples, spill] = int(done.stdout.strip().splitlines()[-1]) / 1024
    assert peaks[256, False] - peaks[8, False] > 0.8 * extra_mib, peaks
    assert peaks[256, True] - peaks[8, True] < 0.5 * extra_mib, peaks


# ------------------------------------------------------------------------------ kills

_KILL_SCRIPT = """
import os, signal, sys
from swiss_knife import cli
from swiss_knife.streaming import BlockStream
leave = BlockStream.leave
def dying_leave(self, index, *, write=True):
    leave(self, index, write=write)
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # block 1 written, blocks 2-3 not
BlockStream.leave = dying_leave
sys.exit(cli.main(["quantize", sys.argv[1], "--method", "rtn", "--bits", "4",
                   "--group-size", "16", "--output-dir", sys.argv[2], "-q"]))
"""


def test_kill_during_streamed_save_leaves_nothing_complete(tmp_path: Path) -> None:
    source = tmp_path / "src"
    build("llama", num_hidden_layers=4).save_pretrained(source, max_shard_size="20KB")
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    partial = list(tmp_path.glob(".out.partial-*"))
    assert len(partial) == 1
    written = sorted(p.name for p in partial[0].iterdir())
    assert written == ["model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors"]
    rerun = sk("quantize", source, "--method", "rtn", "--bits", "4", "--group-size", "16",
               "--output-dir", out)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert not list(tmp_path.glob(".out.partial-*"))  # the dead run's folder is gone
    assert (out / "swiss_knife.json").is_file() and (out / INDEX_NAME).is_file()
    fresh = tmp_path / "fresh"
    assert sk("quantize", source, "--method", "rtn", "--bits", "4", "--group-size", "16",
              "--output-dir", fresh).returncode == 0  # fmt: skip
    a, b = _tensors(out), _tensors(fresh)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ Python API


def test_api_compress_checkpoint_streams_like_the_command_line(capsys: Any, tmp_path: Path) -> None:
    import swiss_knife as sk
    from swiss_knife.config import CalibrationSettings

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    source = _source(tmp_path, "qwen2")
    settings = CalibrationSettings(num_samples=4, seq_len=32)
    config = sk.GPTQConfig(bits=4, group_size=16, calibration=settings)
    streamed = sk.compress_checkpoint(source, config, tmp_path / "api-on", calibration=text)
    loaded = sk.compress_checkpoint(
        source, config, tmp_path / "api-off", calibration=text, stream="off"
    )
    _run(capsys, source, tmp_path / "cli", "gptq", "on", text)
    assert (streamed / INDEX_NAME).is_file() and not (loaded / INDEX_NAME).exists()
    cli_tensors = _tensors(tmp_path / "cli")
    for folder in (streamed, loaded):
        tensors = _tensors(folder)
        assert tensors.keys() == cli_tensors.keys()
        assert all(torch.equal(tensors[n], cli_tensors[n]) for n in tensors)
        assert (folder / "swiss_knife.json").is_file()
    with pytest.raises(sk.UserInputError, match="cannot stream"):
        sk.compress_checkpoint(source, sk.HQQConfig(), tmp_path / "hqq", stream="on")
    assert not (tmp_path / "hqq").exists() and not list(tmp_path.glob(".hqq.*"))


def test_api_compress_checkpoint_takes_token_ids_like_quantize(tmp_path: Path) -> None:
    import swiss_knife as sk

    source = _source(tmp_path, "llama")
    ids = torch.randint(4, 60, (4, 32), generator=torch.Generator().manual_seed(1))
    config = sk.GPTQConfig(bits=4, group_size=16)
    streamed = sk.compress_checkpoint(source, config, tmp_path / "on", calibration=ids, stream="on")
    model = sk.load(str(source), dtype="fp32", device="cpu")
    sk.quantize(model, config, calibration=ids)
    in_memory = sk.save(model, tmp_path / "memory")
    a, b = _tensors(streamed), _tensors(in_memory)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for bad in (ids.float(), ids[0], torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(sk.UserInputError, match="token ids"):
            sk.compress_checkpoint(source, config, tmp_path / "bad", calibration=bad)
    assert not (tmp_path / "bad").exists()


def test_api_load_stream_measures_perplexity_block_by_block(tmp_path: Path) -> None:
    import swiss_knife as sk

    source = _source(tmp_path, "gemma2")
    config = sk.EvaluationConfig.model_validate(
        {"perplexity": {"window": 32}, "speed": {"enabled": False}, "memory": False}
    )
    ids = torch.randint(4, 60, (200,), generator=torch.Generator().manual_seed(0))
    big = sk.load(str(source), stream=True)
    whole = sk.load(str(source))
    streamed = sk.evaluate(big.model, big.tokenizer, config, tokens=ids)
    in_memory = sk.evaluate(whole.model, whole.tokenizer, config, tokens=ids)
    assert streamed.metrics["streamed"] and not in_memory.metrics["streamed"]
    assert streamed.metrics["perplexity"] == in_memory.metrics["perplexity"]
    with pytest.raises(sk.UserInputError, match="cannot stream"):
        sk.load(str(_source(tmp_path, "gpt_neox")), stream=True)


def test_spill_folder_that_cannot_be_made_is_a_one_line_error(tmp_path: Path) -> None:
    source = _source(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    done = sk("prune", source, "--method", "wanda", "--sparsity", "0.5", "--calibration-data",
              text, *CALIB, "--output-dir", tmp_path / "out", "--spill-activations", blocker)  # fmt: skip
    assert "cannot keep the activations" in assert_user_error(done, quiet=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
