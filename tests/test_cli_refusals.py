"""Requests the CLI used to accept, or answered in the recipe's words (issue 13, items 5, 6, 9).

Each refusal must exit 2 with exactly one `error:` line on stderr, no traceback, and write
nothing. Most cases run `swiss_knife.cli.main` in this process (a subprocess costs seconds of
torch import); one runs the real entry point.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_char_tokenizer, make_tiny_llama
from swiss_knife.cli import main
from swiss_knife.config import MagnitudePruneConfig

pytestmark = pytest.mark.usefixtures("single_thread")

CAL = ["--num-samples", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shared inputs: a tiny Llama (2 blocks, 128 positions), one whose MLP is 172 wide, one
    saved as a pickle, texts; tests write only under their own tmp_path."""
    root = tmp_path_factory.mktemp("refusals")
    tokenizer = make_char_tokenizer()
    paths = {"root": root}
    for name, overrides in (("model", {}), ("wide", {"intermediate_size": 172})):
        make_tiny_llama(seed=0, **overrides).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    pickled = root / "pickled"
    model = make_tiny_llama(seed=0)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    tokenizer.save_pretrained(pickled)
    paths["pickled"] = pickled
    text = "\n\n".join(f"Story {i}: a fox jumps over {i % 7} lazy dogs." for i in range(60))
    (root / "text.txt").write_text(text + "\n", encoding="utf-8")
    (root / "tiny.txt").write_text("hi", encoding="utf-8")  # BOS + 2 characters: 3 tokens
    paths["text"], paths["tiny"] = root / "text.txt", root / "tiny.txt"
    return paths


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([*map(str, args), "-q"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys: pytest.CaptureFixture[str], ws: dict[str, Path], *args: Any) -> str:
    """Run a request that must be refused: exit 2, one `error:` line, nothing written."""
    before = _tree(ws["root"])
    code, out, err = run(capsys, *args)
    assert code == 2, (code, err)
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _tree(ws["root"]) == before
    return lines[0]


def manifest(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "swiss_knife.json").read_text())
    return data


# --------------------------------------------------------------------------- outputs in inputs


def test_distill_output_inside_the_teacher_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("distill", "--teacher", ws["model"], "--student-from-teacher", "remove:1"),
        *("--train-data", ws["text"], "--output-dir", ws["model"] / "distilled"),
    )
    assert line.startswith("error: --output-dir: refusing to write")
    assert f"over the input {ws['model']}" in line


def test_evaluate_output_inside_the_model_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("evaluate", ws["model"], "--no-speed", "--no-perplexity"),
        *("--output", ws["model"] / "reports"),
    )
    assert line.startswith("error: --output: refusing to write")


def test_compare_report_dir_inside_a_model_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("compare", ws["model"], ws["wide"], "--eval-data", ws["text"]),
        *("--report-dir", ws["wide"] / "reports"),
    )
    assert line.startswith("error: --report-dir: refusing to write")
    assert f"over the input {ws['wide']}" in line


# --------------------------------------------------------------------------- contradictions


def test_sparsity_contradicting_the_pattern_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("prune", ws["model"], "--method", "magnitude", "--sparsity", "0.7"),
        *("--pattern", "2:4", "--output-dir", ws["root"] / "out"),
    )
    assert line == (
        "error: --sparsity 0.7 contradicts --pattern 2:4, which zeroes 2 of every 4 weights "
        "(sparsity 0.5); drop --sparsity, or give --sparsity 0.5"
    )


def test_sparsity_agreeing_with_the_pattern_is_accepted(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    code, _, err = run(
        capsys,
        *("prune", ws["model"], "--method", "magnitude", "--sparsity", "0.5"),
        *("--pattern", "2:4", "--output-dir", out),
    )
    assert code == 0, err
    assert manifest(out)["recipe"]["prune"]["sparsity"] == 0.5


def test_the_config_records_the_sparsity_a_pattern_implies() -> None:
    assert MagnitudePruneConfig(pattern="1:4").sparsity == 0.75
    assert MagnitudePruneConfig(pattern="2:4", sparsity=0.5).sparsity == 0.5
    with pytest.raises(ValueError, match=r"sparsity 0\.7 contradicts pattern '2:4'"):
        MagnitudePruneConfig(pattern="2:4", sparsity=0.7)


def test_a_block_named_twice_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("reduce-layers", ws["model"], "--layers", "1,-1", "--keep-last", "0"),
        *("--output-dir", ws["root"] / "out"),
    )
    assert line == (
        "error: layers 1 and -1 both name block 1 of the 2-layer model (negative indices count "
        "from the end); list each block once"
    )


# --------------------------------------------------------------------------- sequence lengths


def test_distill_seq_len_above_the_positions_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("distill", "--teacher", ws["model"], "--student-from-teacher", "remove:1"),
        *("--train-data", ws["text"], "--seq-len", "1000", "--output-dir", ws["root"] / "out"),
    )
    assert line == (
        f"error: --seq-len 1000 exceeds the 128 positions {ws['model']} takes "
        "(max_position_embeddings); use --seq-len 128 or less"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "--method", "gptq", "--group-size", "16"],
        ["prune", "--method", "wanda"],
        ["reduce-layers", "--num-layers-to-remove", "1", "--keep-first", "0"],
    ],
    ids=["quantize", "prune", "reduce-layers"],
)
def test_calibration_seq_len_above_the_positions_is_refused(
    capsys: Any, ws: dict[str, Path], command: list[str]
) -> None:
    line = refused(
        capsys,
        ws,
        command[0],
        ws["model"],
        *command[1:],
        *("--calibration-data", ws["text"], "--num-samples", "2", "--seq-len", "100000"),
        *("--output-dir", ws["root"] / "out"),
    )
    assert line == (
        f"error: --seq-len 100000 exceeds the 128 positions {ws['model']} takes "
        "(max_position_embeddings); use --seq-len 128 or less"
    )


def test_the_default_calibration_length_shrinks_and_is_recorded(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    # The default 512 exceeds the model's 128 positions: the manifest says what really ran.
    out = tmp_path / "reduced"
    code, _, err = run(
        capsys,
        *("reduce-layers", ws["model"], "--num-layers-to-remove", "1", "--keep-first", "0"),
        *("--calibration-data", ws["text"], "--num-samples", "2", "--output-dir", out),
    )
    assert code == 0, err
    assert manifest(out)["recipe"]["reduce_layers"]["calibration"]["seq_len"] == 128


def test_evaluate_on_a_few_tokens_is_refused(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(capsys, ws, "evaluate", ws["model"], "--eval-data", ws["tiny"], "--no-speed")
    assert line == (
        f"error: {ws['tiny']} has 3 tokens, fewer than one perplexity window of 128 (--window "
        "capped at the model's 128 positions); give at least 128 tokens of text, a smaller "
        "--window, or --no-perplexity"
    )
    line = refused(capsys, ws, "evaluate", ws["model"], "--eval-data", ws["tiny"], "--window", "8")
    assert "3 tokens, fewer than one perplexity window of 8;" in line


# --------------------------------------------------------------------------- validate


def test_validate_warns_about_missing_inputs(capsys: Any, tmp_path: Path) -> None:
    assert main(["create-configs", "--output-dir", str(tmp_path / "configs")]) == 0
    capsys.readouterr()
    sample = tmp_path / "configs" / "pipeline.yaml"
    code, out, err = run(capsys, "validate", sample)
    assert code == 0
    assert "valid" in out
    assert err.splitlines() == [
        f"warning: {sample}: model path path/to/model does not exist",
        f"warning: {sample}: data.eval: data file wiki.test.raw does not exist",
        f"warning: {sample}: data.calibration: data file wiki.train.raw does not exist",
    ]
    code, out, err = run(capsys, "validate", sample, "--json")
    assert code == 0 and len(json.loads(out)["missing_inputs"]) == 3


def test_validate_strict_refuses_missing_inputs(capsys: Any, tmp_path: Path) -> None:
    assert main(["create-configs", "--output-dir", str(tmp_path / "configs")]) == 0
    capsys.readouterr()
    sample = tmp_path / "configs" / "quantize.yaml"
    code, out, err = run(capsys, "validate", sample, "--strict")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"error: {sample}: model path path/to/model does not exist; data.eval: data file "
        "wiki.test.raw does not exist; data.calibration: data file wiki.train.raw does not exist"
    ]


def test_validate_is_quiet_when_every_input_exists(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {ws['model']}\ndata: {{eval: {ws['text']}}}\nstages:\n  - {{type: cast}}\n",
        encoding="utf-8",
    )
    code, _, err = run(capsys, "validate", recipe, "--strict")
    assert code == 0 and err == ""


# --------------------------------------------------------------------------- flags, not keys


def test_a_flag_foreign_to_the_method_names_the_flags_it_takes(
    capsys: Any, ws: dict[str, Path]
) -> None:
    out = ws["root"] / "out"
    line = refused(
        capsys,
        ws,
        *("prune", ws["model"], "--method", "structured", "--sparsity", "0.5"),
        *("--output-dir", out),
    )
    assert line == (
        "error: --sparsity does not apply to --method structured; it takes --mlp-ratio, "
        "--head-ratio, --hidden-ratio, --importance, --round-to, --calibration-data with its flags"
    )
    line = refused(
        capsys, ws, "quantize", ws["model"], "--method", "bf16", "--bits", "3", "--output-dir", out
    )
    assert line == "error: --bits does not apply to --method bf16, which takes no options"
    line = refused(
        capsys,
        ws,
        *("quantize", ws["model"], "--method", "rtn", "--threshold", "5", "--damp", "0.1"),
        *("--output-dir", out),
    )
    assert line.startswith(
        "error: --threshold, --damp do not apply to --method rtn; it takes --bits, "
        "--group-size, --symmetric, --bits-override, --grid, --clip-search, --grid-override"
    )
    assert "--calibration-data" not in line  # rtn is data-free


def test_a_bad_flag_value_names_the_flag(capsys: Any, ws: dict[str, Path]) -> None:
    line = refused(
        capsys,
        ws,
        *("quantize", ws["model"], "--method", "rtn", "--bits", "9"),
        *("--output-dir", ws["root"] / "out"),
    )
    assert line == "error: --bits 9: input should be less than or equal to 8"
    line = refused(
        capsys,
        ws,
        *("prune", ws["model"], "--method", "wanda", "--calibration-data", ws["text"]),
        *("--seq-len", "4", "--output-dir", ws["root"] / "out"),
    )
    assert line == "error: --seq-len 4: input should be greater than or equal to 8"


def test_a_config_file_problem_is_reported_in_the_file_terms(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "q.yaml"
    config.write_text("method: rtn\nbitz: 4\n", encoding="utf-8")
    before = _tree(ws["root"])
    code, _, err = run(
        capsys, "quantize", ws["model"], "--config", config, "--output-dir", tmp_path / "out"
    )
    assert code == 2 and _tree(ws["root"]) == before
    assert "unknown key 'bitz' (did you mean 'bits'?)" in err
    # The keys of the method's config, not those of a whole recipe.
    assert "valid keys: bits, " in err and "evaluate_original" not in err


def test_calibration_data_for_a_data_free_method_is_a_warning(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "rtn"
    code, _, err = run(
        capsys,
        *("quantize", ws["model"], "--method", "rtn", "--group-size", "16"),
        *("--calibration-data", ws["text"], "--num-samples", "4", "--output-dir", out),
    )
    assert code == 0, err
    assert err.splitlines() == [
        "warning: --method rtn needs no calibration data; ignoring --calibration-data, "
        "--num-samples"
    ]
    assert "calibration" not in manifest(out)["recipe"]["quantize"]


def test_calibration_data_for_data_free_pruning_is_a_warning(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys,
        *("prune", ws["model"], "--method", "magnitude", "--calibration-data", ws["text"]),
        *("--output-dir", tmp_path / "mag"),
    )
    assert code == 0, err
    assert err.splitlines() == [
        "warning: --method magnitude needs no calibration data; ignoring --calibration-data"
    ]


def test_a_refusal_through_the_real_entry_point() -> None:
    from conftest import assert_user_error, sk

    line = assert_user_error(
        sk(
            *("prune", "./nowhere", "--method", "structured", "--sparsity", "0.5"),
            *("--output-dir", "./nowhere-out", "-q"),
        )
    )
    assert line.startswith("error: --sparsity does not apply to --method structured; it takes")


# --------------------------------------------------------------------------- group sizes


def test_group_size_refusal_lists_what_fits_before_loading(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    # Corrupt weights prove the refusal comes from config.json alone: loading would fail first.
    broken = tmp_path / "wide-broken"
    shutil.copytree(ws["wide"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    code, _, err = run(
        capsys,
        *("quantize", broken, "--method", "gptq", "--group-size", "16"),
        *("--calibration-data", ws["text"], *CAL, "--output-dir", tmp_path / "out"),
    )
    assert code == 2, err
    assert err.splitlines() == [
        "error: group size 16 does not divide every layer's input width, and a partial last "
        "group would not load: 2 layer(s) with 172 inputs (e.g. model.layers.0.mlp.down_proj): "
        "fitting group sizes 2, 4. Choose a group size that fits, --group-size 0 for "
        "per-channel scales, or ignore those layers"
    ]
    assert not (tmp_path / "out").exists()


def test_a_listed_group_size_quantizes(capsys: Any, ws: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "g4"
    code, _, err = run(
        capsys, "quantize", ws["wide"], "--method", "rtn", "--group-size", "4", "--output-dir", out
    )
    assert code == 0, err
    assert manifest(out)["recipe"]["quantize"]["group_size"] == 4


# --------------------------------------------------------------------------- hub ids offline


def test_hub_id_fails_at_once_when_offline(
    capsys: Any, ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    line = refused(capsys, ws, "evaluate", "swiss-knife-test/no-such-model", "--no-speed")
    assert time.perf_counter() - started < 5
    assert line == (
        "error: cannot fetch 'swiss-knife-test/no-such-model' from the Hugging Face hub: offline "
        "mode is on (HF_HUB_OFFLINE), and it is not in the local Hugging Face cache; download the "
        "model elsewhere and pass its local directory or .gguf file"
    )


def test_hub_id_fails_at_once_when_the_hub_is_unreachable(
    capsys: Any, ws: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Nothing listens on port 9 (discard) here: the connection is refused at once. Without the
    # probe, huggingface_hub would retry five times over about 28 s.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    line = refused(capsys, ws, "evaluate", "swiss-knife-test/no-such-model", "--no-speed")
    assert time.perf_counter() - started < 8
    assert "127.0.0.1 cannot be reached (this machine looks offline)" in line


# --------------------------------------------------------------------------- pickles


def test_pickle_weights_load_with_a_warning(
    capsys: Any, ws: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "converted"
    code, _, err = run(capsys, "quantize", ws["pickled"], "--method", "bf16", "--output-dir", out)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "pickle" in line]
    assert len(warnings) == 1, err
    assert "pytorch_model.bin" in warnings[0] and "weights_only=True" in warnings[0]
    assert f"swiss-knife quantize {ws['pickled']} --method bf16" in warnings[0]
    # The suggested command does write safetensors.
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_safetensors_weights_load_without_a_pickle_warning(
    caplog: pytest.LogCaptureFixture, ws: dict[str, Path]
) -> None:
    from swiss_knife.models import load_model

    with caplog.at_level("WARNING", logger="swiss_knife.models"):
        load_model(str(ws["model"]), with_tokenizer=False)
    assert "pickle" not in caplog.text


def test_config_errors_mention_the_method_keys() -> None:
    # format_validation_error resolves a union of stage configs (what the CLI validates).
    from pydantic import TypeAdapter, ValidationError

    from swiss_knife.config import QuantizeConfig, format_validation_error

    with pytest.raises(ValidationError) as info:
        TypeAdapter(QuantizeConfig).validate_python({"type": "quantize", "method": "rtn", "x": 1})
    message = format_validation_error(info.value, QuantizeConfig, "q.yaml")
    assert "valid keys: bits, " in message and "stages" not in message
