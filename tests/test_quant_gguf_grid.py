"""Quantizing on llama.cpp's own grids (``grid: gguf:...``): RTN and GPTQ round on exactly the
values llama.cpp runs, and ``export --type auto`` writes them without re-rounding.

K grids (Q4_K/Q5_K/Q6_K) run on input widths that are multiples of 256, hence the tiny Llama with
hidden 256 and intermediate 512 (other widths get llama.cpp's 32-weight fallback type); the
32-weight block grids run on the usual 32-wide one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from conftest import corpus, make_char_tokenizer, make_tiny_llama
from swiss_knife.cli import main
from swiss_knife.compression.quantization.api import quantize
from swiss_knife.compression.quantization.awq import AWQConfig
from swiss_knife.compression.quantization.gguf_grid import (
    GRID_FILE,
    K_SPECS,
    rtn_quantize_k,
)
from swiss_knife.compression.quantization.gptq import gptq_quantize, gptq_quantize_k
from swiss_knife.compression.quantization.grid import QuantGrid, fit_weighted_symmetric
from swiss_knife.compression.quantization.weight_only import GPTQConfig, RTNConfig
from swiss_knife.config import CalibrationSettings
from swiss_knife.errors import UserInputError
from swiss_knife.export import export_gguf
from swiss_knife.export.errors import GGUFExportError
from swiss_knife.export.gguf_arch import qk_row_order

pytestmark = pytest.mark.usefixtures("single_thread")

WIDE = {"hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 128}
CAL = CalibrationSettings(num_samples=8, seq_len=64)
HEADS = {"attn_q": 4, "attn_k": 2}  # the tiny Llama's query and kv heads


def ids(seed: int, rows: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(4, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def save(outcome: Any, directory: Path) -> Path:
    outcome.writer(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """GGUF name -> (type, raw bytes/values, float32 values in torch row order)."""
    found = {}
    for tensor in GGUFReader(path).tensors:
        raw = np.asarray(tensor.data)
        values = gguf_quants.dequantize(raw, tensor.tensor_type).reshape(
            [int(d) for d in reversed(tensor.shape)]
        )
        kind = tensor.name.split(".")[-2]
        if kind in HEADS:  # undo llama.cpp's Q/K row order
            order = qk_row_order(values.shape[0], HEADS[kind])
            raw, values = raw[np.argsort(order)], values[np.argsort(order)]
        found[tensor.name] = (tensor.tensor_type.name, raw, values)
    return found


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    }


def logits_error(model: nn.Module, reference: nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        want = reference(tokens).logits
        return float((model(tokens).logits - want).norm() / want.norm())


# ----------------------------------------------------------------------------- tensor math


@pytest.mark.parametrize("grid", sorted(K_SPECS))
def test_gptq_on_a_k_grid_beats_rtn_and_decodes_exactly(grid: str) -> None:
    spec = K_SPECS[grid]
    g = torch.Generator().manual_seed(0)
    # Input channels of log-normal scale, as in real models: the Hessian's diagonal matters.
    mix = torch.eye(512) + 0.1 * torch.randn(512, 512, generator=g)  # correlated inputs
    X = (torch.randn(1024, 512, generator=g) @ mix) * torch.exp(torch.randn(512, generator=g))
    W = 0.05 * torch.randn(64, 512, generator=g)
    H = X.T @ X

    def error(Q: torch.Tensor) -> float:
        return float((X @ (W - Q).T).norm() / (X @ W.T).norm())

    rtn = rtn_quantize_k(W, spec)
    for act_order, static in [(False, False), (True, False), (True, True)]:
        kq, loss = gptq_quantize_k(W, H, spec, act_order=act_order, static_groups=static)
        assert int(kq.levels.max()) <= spec.nmax and loss > 0
        deq = kq.dequantize()
        decoded = gguf_quants.dequantize(kq.to_blocks(), GGMLQuantizationType[spec.kind.upper()])
        assert np.array_equal(deq.numpy(), decoded)  # bit for bit what llama.cpp decodes
        assert error(deq) < 0.7 * error(rtn.dequantize()), (act_order, static)


# ----------------------------------------------------------------------------- K grids, saved


def test_rtn_k_grid_exports_its_blocks_byte_for_byte(tmp_path: Path) -> None:
    """RTN on gguf:q4_k (with down_proj on q6_k): the dense checkpoint holds the exact values,
    `auto` copies the sidecar's blocks, and they are the blocks `--type q4_k` would write from
    the float model (RTN on the grid is llama.cpp's reference quantizer)."""
    float_dir = save_float(tmp_path / "float")
    model = make_tiny_llama(0, **WIDE)
    config = RTNConfig(grid="gguf:q4_k", bits_overrides={"re:.*down_proj": 6})
    assert (config.bits, config.group_size, config.symmetric) == (4, 32, False)
    outcome = quantize(model, config)
    assert outcome.report["gguf_grid"]["types"] == {"q4_k": 12, "q6_k": 2}
    out = save(outcome, tmp_path / "rtn")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    dense = load_file(str(out / "model.safetensors"))
    sidecar = load_file(str(out / GRID_FILE))

    report = export_gguf(out, tmp_path / "rtn.gguf", "auto")
    assert len(report["exact_tensors"]) == 14 and report["source_layout"] == "dense + gguf-grid"
    export_gguf(float_dir, tmp_path / "float-q4_k.gguf", "q4_k", ["re:.*down_proj=q6_k"])
    ours, theirs = gguf_tensors(tmp_path / "rtn.gguf"), gguf_tensors(tmp_path / "float-q4_k.gguf")
    for row in report["tensors"]:
        if not row["exact"]:
            continue
        kind, raw, values = ours[row["name"]]
        module = row["source"].removesuffix(".weight")
        assert kind == ("Q6_K" if "down_proj" in module else "Q4_K")
        assert np.array_equal(values, dense[row["source"]].numpy()), row["name"]
        assert np.array_equal(raw, sidecar[module].numpy()), row["name"]
        assert np.array_equal(raw, theirs[row["name"]][1]), row["name"]
    # In memory the model holds the same values it saved.
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight, dense[f"{name}.weight"])


def save_float(directory: Path) -> Path:
    make_tiny_llama(0, **WIDE).save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


def test_gptq_k_grid_has_lower_output_error_than_rtn_and_plain_export(tmp_path: Path) -> None:
    reference = make_tiny_llama(0, **WIDE)
    calibration, held_out = ids(1), ids(2)
    rtn = quantize(make_tiny_llama(0, **WIDE), RTNConfig(grid="gguf:q4_k")).model
    gptq_outcome = quantize(
        make_tiny_llama(0, **WIDE),
        GPTQConfig(grid="gguf:q4_k", calibration=CAL),
        calibration=calibration,
    )
    # `export --type q4_k` of the float model, read back into a torch model.
    report = export_gguf(save_float(tmp_path / "float"), tmp_path / "q4_k.gguf", "q4_k")
    exported = copy.deepcopy(reference)
    tensors = gguf_tensors(tmp_path / "q4_k.gguf")
    linears = linear_weights(exported)
    with torch.no_grad():
        for row in report["tensors"]:
            module = str(row["source"]).removesuffix(".weight")
            if module in linears:  # the targeted linears only, as RTN and GPTQ quantize them
                assert row["type"] == "q4_k"
                linears[module].copy_(torch.from_numpy(tensors[row["name"]][2]))
    errors = {
        name: (logits_error(m, reference, calibration), logits_error(m, reference, held_out))
        for name, m in [("gptq", gptq_outcome.model), ("rtn", rtn), ("export", exported)]
    }
    assert errors["rtn"] == pytest.approx(errors["export"], rel=1e-4)  # the same grid
    assert errors["gptq"][0] < 0.7 * errors["rtn"][0], errors
    assert errors["gptq"][1] < errors["rtn"][1], errors
    assert errors["gptq"][0] < 0.7 * errors["export"][0], errors


def test_export_refuses_weights_changed_after_quantizing(tmp_path: Path) -> None:
    model = make_tiny_llama(0, **WIDE)
    out = save(quantize(model, RTNConfig(grid="gguf:q6_k")), tmp_path / "q6")
    state = load_file(str(out / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GGUFExportError, match=r"up_proj\.weight: the weight no longer matches"):
        export_gguf(out, tmp_path / "stale.gguf", "auto")
    assert not (tmp_path / "stale.gguf").exists()
    # An explicit other type re-quantizes the dense weights instead.
    assert export_gguf(out, tmp_path / "q8.gguf", "q8_0")["exact_tensors"] == []


# ----------------------------------------------------------------------------- block grids


@pytest.mark.parametrize(
    ("grid", "bits", "symmetric", "gguf_type"),
    [
        ("gguf:q4_0", 4, True, "Q4_0"),
        ("gguf:q4_1", 4, False, "Q4_1"),
        ("gguf:q5_0", 5, True, "Q5_0"),
        ("gguf:q5_1", 5, False, "Q5_1"),
        ("gguf:q8_0", 8, True, "Q8_0"),
    ],
)
def test_block_grids_fix_the_grid_and_export_exactly(
    tmp_path: Path, grid: str, bits: int, symmetric: bool, gguf_type: str
) -> None:
    config = RTNConfig(grid=grid)
    assert (config.bits, config.group_size, config.symmetric) == (bits, 32, symmetric)
    model = make_tiny_llama(0)
    out = save(quantize(model, config), tmp_path / "m")
    report = export_gguf(out, tmp_path / "m.gguf", "auto")
    assert len(report["exact_tensors"]) == 14  # every linear of the two blocks
    tensors = gguf_tensors(tmp_path / "m.gguf")
    weights = linear_weights(model)
    for row in report["tensors"]:
        if row["exact"]:
            kind, _, values = tensors[row["name"]]
            want = weights[row["source"].removesuffix(".weight")].numpy()
            assert kind == gguf_type
            if symmetric:  # fp16 scales: llama.cpp's d is the very scale RTN rounded with
                assert np.array_equal(values, want), row["name"]
            else:  # up to the fp16 rounding of the block offset m
                np.testing.assert_allclose(values, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_gptq_and_awq_on_block_grids(tmp_path: Path) -> None:
    calibration = ids(3)
    gptq = quantize(
        make_tiny_llama(0), GPTQConfig(grid="gguf:q5_0", calibration=CAL), calibration=calibration
    )
    awq = quantize(
        make_tiny_llama(0), AWQConfig(grid="gguf:q4_1", calibration=CAL), calibration=calibration
    )
    for outcome, kind in [(gptq, "q5_0"), (awq, "q4_1")]:
        out = save(outcome, tmp_path / kind)
        report = export_gguf(out, tmp_path / f"{kind}.gguf", "auto")
        assert len(report["exact_tensors"]) == 14 and report["file_type"] == kind


def test_weighted_scale_search_beats_llama_cpps_plain_rounding() -> None:
    """`fit_weighted_symmetric` with equal weights never does worse than Q4_0's reference
    (``d = max / -8``, which is its first candidate), and with unequal weights it lowers the
    weighted error further."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 32, generator=g) * torch.exp(torch.randn(512, 1, generator=g))
    grid = QuantGrid(bits=4, symmetric=True, group_size=32)
    reference = gguf_quants.dequantize(
        gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0
    )

    def error(scale: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w / scale.float()), grid.qmin, grid.qmax)
        return (weights * (w - q * scale.float()) ** 2).sum(dim=1)

    flat = torch.ones_like(w)
    scale, zero = fit_weighted_symmetric(w, flat, grid, scale_dtype=torch.float16)
    assert scale.dtype == torch.float16 and not zero.any()
    theirs = (flat * (w - torch.from_numpy(reference)) ** 2).sum(dim=1)
    assert bool((error(scale, flat) <= theirs * 1.001 + 1e-12).all())
    assert float(error(scale, flat).sum()) < 0.95 * float(theirs.sum())
    # Weights favouring a few columns: the search trades the others' error for theirs.
    skewed = torch.exp(2 * torch.randn(1, 32, generator=g)).expand_as(w)
    weighted, _ = fit_weighted_symmetric(w, skewed, grid, scale_dtype=torch.float16)
    assert float(error(weighted, skewed).sum()) < float(error(scale, skewed).sum())


def test_gptq_weighted_scales_lower_output_error_on_block_grids() -> None:
    """GPTQ on gguf:q4_0 with llama.cpp's importance-weighted scale search (the default)
    against the clip search, on a layer whose input channels have log-normal scales."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2048, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    W = 0.05 * torch.randn(128, 256, generator=g)
    grid = QuantGrid(bits=4, symmetric=True, group_size=32)

    def error(weighted: bool) -> float:
        qw, _ = gptq_quantize(W, X.T @ X, grid, act_order=True, static_groups=True,
                              clip_search=True, scale_dtype=torch.float16,
                              weighted_scales=weighted)  # fmt: skip
        return float((X @ (W - qw.dequantize().float()).T).norm() / (X @ W.T).norm())

    assert error(True) < error(False)
    assert GPTQConfig(grid="gguf:q4_0").weighted_scales


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_scale_refit_lowers_the_objective_and_keeps_the_integers(act_order: bool) -> None:
    """The joint refit of each row's block scales (integers fixed) on correlated inputs: every
    row's damped objective is no worse, the layer's total drops, and the held-out output error
    drops too; the integers are GPTQ's and the scales stay exact in fp16."""
    g = torch.Generator().manual_seed(2)
    mix = 0.3 * torch.randn(256, 256, generator=g) + torch.eye(256)
    X = torch.randn(4096, 256, generator=g) @ mix
    held_out = torch.randn(1024, 256, generator=g) @ mix
    W = 0.05 * torch.randn(96, 256, generator=g)
    W[:5, 32:64] = 0.0  # all-zero blocks: their scale is free and must stay finite
    H = X.T @ X
    grid = QuantGrid(bits=4, symmetric=True, group_size=32)
    common: dict[str, Any] = {"act_order": act_order, "static_groups": act_order,
                              "scale_dtype": torch.float16, "weighted_scales": True}  # fmt: skip
    base, loss = gptq_quantize(W, H, grid, **common)
    refit, refit_loss = gptq_quantize(W, H, grid, refit_scales=True, **common)
    assert torch.equal(base.q, refit.q)
    assert refit.scale.dtype == torch.float16 and bool(torch.isfinite(refit.scale).all())
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(256)

    def rows(qw: Any) -> torch.Tensor:
        E = W - qw.dequantize().float()
        return ((E @ damped) * E).sum(dim=1)

    assert bool((rows(refit) <= rows(base) * (1 + 1e-5)).all())
    assert refit_loss < 0.98 * loss
    assert refit_loss == pytest.approx(float(rows(refit).sum()), rel=1e-4)

    def output_error(qw: Any) -> float:
        return float((held_out @ (W - qw.dequantize().float()).T).norm())

    assert output_error(refit) < output_error(base)
    assert GPTQConfig(grid="gguf:q4_0").refit_scales


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(grid="gguf:q4_0", group_size=64), "fixes bits 4, group_size 32, symmetric true"),
        (dict(grid="gguf:q4_1", symmetric=True), "contradicts symmetric true"),
        (dict(grid="gguf:q4_k", bits=6), "contradicts bits 6"),
        (
            dict(grid="gguf:q4_k", bits_overrides={"re:.*down_proj": 8}),
            "family has bits 4 (gguf:q4_k), 5 (gguf:q5_k)",
        ),
        (dict(grid="gguf:q9_k"), "Input should be"),
    ],
)
def test_contradictions_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTQConfig(**config)


def test_awq_grid_settings() -> None:
    assert AWQConfig(grid=11).scale_grid == 11  # a recipe written before `grid` named a grid
    with pytest.raises(ValidationError, match=r"awq does not quantize on llama\.cpp's K grids"):
        AWQConfig(grid="gguf:q4_k")


@pytest.mark.parametrize(
    ("grid", "fallback"), [("gguf:q4_k", "Q5_0"), ("gguf:q5_k", "Q5_1"), ("gguf:q6_k", "Q8_0")]
)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_k_grid_falls_back_as_llama_cpp_does(
    tmp_path: Path, grid: str, fallback: str, method: str
) -> None:
    """down_proj reads 320 inputs, which 256 does not divide: it gets llama.cpp's fallback
    block type, in the sidecar with the K layers, and `auto` writes those very bytes."""
    model = make_tiny_llama(0, hidden_size=256, intermediate_size=320)
    if method == "rtn":
        outcome = quantize(model, RTNConfig(grid=grid))
    else:
        outcome = quantize(model, GPTQConfig(grid=grid, calibration=CAL), calibration=ids(1))
    kind = grid.removeprefix("gguf:")
    assert outcome.report["gguf_grid"]["types"] == {kind: 12, fallback.lower(): 2}
    out = save(outcome, tmp_path / "k")
    dense = load_file(str(out / "model.safetensors"))
    report = export_gguf(out, tmp_path / "k.gguf", "auto")
    assert len(report["exact_tensors"]) == 14
    tensors = gguf_tensors(tmp_path / "k.gguf")
    for row in report["tensors"]:
        if row["exact"]:
            want = fallback if "down_proj" in row["source"] else kind.upper()
            name = row["name"]
            assert tensors[name][0] == want, name
            assert np.array_equal(tensors[name][2], dense[row["source"]].numpy()), name
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight, dense[f"{name}.weight"])


def test_gptq_fallback_layers_beat_rtn_on_their_outputs() -> None:
    """On the fallback block layers GPTQ's error feedback works as on any integer grid."""
    reference = make_tiny_llama(0, hidden_size=256, intermediate_size=320)
    calibration = ids(1)
    rtn = quantize(copy.deepcopy(reference), RTNConfig(grid="gguf:q4_k")).model
    gptq = quantize(
        copy.deepcopy(reference),
        GPTQConfig(grid="gguf:q4_k", calibration=CAL),
        calibration=calibration,
    ).model
    assert logits_error(gptq, reference, calibration) < logits_error(rtn, reference, calibration)


def test_k_grid_refuses_widths_that_no_block_divides() -> None:
    model = make_tiny_llama(0, hidden_size=256, intermediate_size=200)
    with pytest.raises(UserInputError) as info:
        quantize(model, RTNConfig(grid="gguf:q5_k"))
    message = str(info.value)
    assert "\n" not in message
    assert "model.layers.0.mlp.down_proj has 200 inputs" in message
    assert "multiples of 32 (and of 256 for the K types' super-blocks)" in message


MIX = {r"re:model\.layers\.0\.mlp\.down_proj": "gguf:q4_1"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_grid_overrides_mix_block_types_as_llama_cpp_does(tmp_path: Path, method: str) -> None:
    """gguf:q4_0 with layer 0's down_proj on Q4_1 (llama.cpp's Q4_0 + imatrix mix): saved dense
    + the block sidecar, reloaded by plain transformers, exported with auto integer for integer
    into a GGUF with the same mix."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(0, **WIDE)
    settings: dict[str, Any] = {"grid": "gguf:q4_0", "grid_overrides": MIX}
    config = (GPTQConfig(**settings, calibration=CAL) if method == "gptq"
              else RTNConfig(**settings))  # fmt: skip
    outcome = quantize(model, config, calibration=ids(1) if method == "gptq" else None)
    assert outcome.report["gguf_grid"]["types"] == {"q4_0": 13, "q4_1": 1}
    assert "model\\.layers\\.0\\.mlp\\.down_proj on Q4_1" in outcome.steps[0]
    out = save(outcome, tmp_path / method)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    dense = load_file(str(out / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight, dense[f"{name}.weight"]), name
        assert torch.equal(reloaded.get_submodule(name).weight, weight), name
    report = export_gguf(out, tmp_path / f"{method}.gguf", "auto")
    assert len(report["exact_tensors"]) == 14
    tensors = gguf_tensors(tmp_path / f"{method}.gguf")
    for row in report["tensors"]:
        if not row["exact"]:
            continue
        kind, _, values = tensors[row["name"]]
        assert kind == ("Q4_1" if row["source"].startswith("model.layers.0.mlp.down") else "Q4_0")
        assert np.array_equal(values, dense[row["source"]].numpy()), row["name"]


def test_grid_overrides_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match=r"grid overrides need a llama\.cpp grid"):
        GPTQConfig(grid_overrides=MIX)
    with pytest.raises(ValidationError, match=r"re:x=int: the grid must be one of gguf:q4_0"):
        RTNConfig(grid="gguf:q4_0", grid_overrides={"re:x": "int"})
    with pytest.raises(ValidationError, match="grid_overrides"):
        AWQConfig(grid="gguf:q4_0", grid_overrides=MIX)  # one grid for every layer
    with pytest.raises(UserInputError, match="matches none"):
        quantize(make_tiny_llama(0, **WIDE), RTNConfig(grid="gguf:q4_0",
                                                     grid_overrides={"re:nothing": "gguf:q8_0"}))  # fmt: skip
    model = save_float(tmp_path / "float")
    capsys.readouterr()
    code, _, err = run(
        capsys, "quantize", model, "--method", "rtn", "--grid", "gguf:q4_0", "--grid-override",
        "re:.*down_proj=gguf:q4_1", "--stream", "on", "--output-dir", tmp_path / "on", "-q",
    )  # fmt: skip
    assert code == 2 and "grid overrides writes a GGUF block sidecar" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "on").exists()
    code, out, err = run(
        capsys, "quantize", model, "--method", "rtn", "--grid", "gguf:q4_0", "--grid-override",
        "re:.*down_proj=gguf:q4_1", "--output-dir", tmp_path / "mix",
    )  # fmt: skip
    assert code == 0, err
    assert "re:.*down_proj on Q4_1" in out, out
    types = json.loads((tmp_path / "mix" / "swiss_knife.json").read_text())["stage_report"]
    assert types["gguf_grid"]["types"] == {"q4_0": 12, "q4_1": 2}


# ----------------------------------------------------------------------------- command line


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_gptq_on_q4_k_then_export_auto(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_float(tmp_path / "float")
    text = tmp_path / "calibration.txt"
    text.write_text(corpus(200), encoding="utf-8")
    out = tmp_path / "gptq"
    code, _, err = run(
        capsys, "quantize", model, "--method", "gptq", "--grid", "gguf:q4_k",
        "--calibration-data", text, "--num-samples", "4", "--seq-len", "64",
        "--output-dir", out, "-q",
    )  # fmt: skip
    assert code == 0, err
    assert (out / GRID_FILE).is_file()
    recipe = json.loads((out / "swiss_knife.json").read_text())
    assert "gguf:q4_k" in json.dumps(recipe)
    code, stdout, err = run(
        capsys,
        "export",
        out,
        "--type",
        "auto",
        "--output-file",
        tmp_path / "g.gguf",
        "--json",
        "-q",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["file_type"] == "q4_k" and len(report["exact_tensors"]) == 14

    code, _, err = run(
        capsys, "quantize", model, "--method", "rtn", "--grid", "gguf:q4_0", "--group-size", "64",
        "--output-dir", tmp_path / "bad", "-q",
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "group_size 64" in lines[0], err
