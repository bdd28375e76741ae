"""Every format Swiss Knife saves reloads with plain transformers, in a process without Swiss Knife.

Each method runs once on a tiny random Llama loaded from disk (as the CLI does), and its output
folder is written with the same writer the CLI uses. One fresh subprocess, which imports only
torch and transformers (it checks that ``swiss_knife`` never got imported), loads every folder
with ``AutoModelForCausalLM.from_pretrained(folder)`` and runs a fixed batch of token ids. Its
logits must equal those of ``swiss_knife.load_model`` in this process and those of the compressed
model still in memory, so a reload that initialises layers randomly (the way transformers treats
tensors it does not recognise: a warning, nothing more) fails here, as does a missing, unexpected
or mis-shaped key.

The sparse-bitmask folder is the exception, by design (see
``swiss_knife.compression.pruning.sparse_format``): transformers 5.x with compressed-tensors >= 0.15
has no sparse decompressor, so the folder keeps its weights out of ``model.safetensors`` and a
plain ``from_pretrained`` must refuse it. The subprocess checks that, then decodes the tensors
with compressed-tensors' own ``unpack_bitmasks`` into a dense state dict, which must compute the
same logits: the layout is the one compressed-tensors defines, not one only we can read.

bitsandbytes and torchao formats skip, with the reason, where the package is missing or its CPU
kernels fail on this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_char_tokenizer, make_tiny_llama
from swiss_knife import config as C
from swiss_knife.errors import MissingDependencyError
from swiss_knife.models import load_model, save_model

pytestmark = pytest.mark.usefixtures("single_thread")

# Hidden 64 / intermediate 128 suit every kernel: bitsandbytes' 4-bit CPU tiles (32 x 64),
# 4-bit groups of 32, torchao's int8 layouts.
MODEL = {"hidden_size": 64, "intermediate_size": 128}
IDS = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(1))
CALIB = {"num_samples": 4, "seq_len": 32}
SUBPROCESS_TIMEOUT_S = 300


@dataclass(frozen=True)
class Case:
    verb: str  # "quantize", "prune" or "reduce_layers"
    make_config: Callable[[], Any]
    quant_method: str | None  # config.json's quantization_config.quant_method (None: dense)
    ct_format: str | None = None  # compressed-tensors `format`, where there is one
    needs: str | None = None  # optional backend: "bitsandbytes" or "torchao"


CASES: dict[str, Case] = {
    "dense-magnitude": Case("prune", lambda: C.MagnitudePruneConfig(sparsity=0.5), None),
    "dense-bf16": Case("quantize", lambda: C.HalfPrecisionConfig(method="bf16"), None),
    "pack-quantized-rtn4": Case(
        "quantize",
        lambda: C.RTNConfig(bits=4, group_size=32),
        "compressed-tensors",
        "pack-quantized",
    ),
    "pack-quantized-rtn8": Case(
        "quantize",
        lambda: C.RTNConfig(bits=8, group_size=None),
        "compressed-tensors",
        "pack-quantized",
    ),
    # Asymmetric grids (HQQ; RTN/AWQ with symmetric: false): compressed-tensors 0.18-0.20 leave
    # the zero point unpacked on transformers' plain path, so transformers loads them with
    # CompressedTensorsConfig(dequantize=True) (see compressed_tensors_format.py).
    "pack-quantized-hqq-asymmetric": Case(
        "quantize",
        lambda: C.HQQConfig(bits=4, group_size=32),
        "compressed-tensors",
        "pack-quantized",
    ),
    "int-quantized-static": Case(
        "quantize",
        lambda: C.StaticInt8Config(calibration=CALIB),
        "compressed-tensors",
        "int-quantized",
    ),
    "sparse-bitmask": Case(
        "prune",
        lambda: C.MagnitudePruneConfig(sparsity=0.5, save_format="sparse-bitmask"),
        "compressed-tensors",
    ),
    "bitsandbytes-8bit": Case(
        "quantize", lambda: C.BnB8bitConfig(), "bitsandbytes", needs="bitsandbytes"
    ),
    "bitsandbytes-4bit": Case(
        "quantize", lambda: C.BnB4bitConfig(), "bitsandbytes", needs="bitsandbytes"
    ),
    "torchao-dynamic": Case("quantize", lambda: C.DynamicInt8Config(), "torchao", needs="torchao"),
    "torchao-weight-only": Case(
        "quantize", lambda: C.DynamicInt8Config(weight_only=True), "torchao", needs="torchao"
    ),
    "structured": Case(
        "prune",
        lambda: C.StructuredPruneConfig(mlp_ratio=0.25, head_ratio=0.5, calibration=CALIB),
        None,
    ),
    "layer-reduced": Case(
        "reduce_layers", lambda: C.LayerReductionConfig(layers=[1], keep_last=0), None
    ),
}
SPARSE = "sparse-bitmask"


# ----------------------------------------------------------------------------- the subprocess

# Runs in a fresh interpreter: torch, transformers (and, for the sparse folder only,
# safetensors and compressed-tensors' bit unpacking). argv: spec.json, output folder.
PLAIN_LOADER = r"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

torch.set_num_threads(1)
spec = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
ids = torch.tensor(spec["ids"])
results = {}


def run(model):
    with torch.no_grad():
        return model(ids).logits.float().contiguous()


def decode_sparse_bitmask(folder):
    # What compressed-tensors <= 0.14 did to decompress, with its bit unpacking, which 0.20 keeps.
    from compressed_tensors.utils.helpers import unpack_bitmasks

    state = load_file(str(folder / "sparse-bitmask.safetensors"))
    for key in [k for k in state if k.endswith(".bitmask")]:
        prefix = key[: -len(".bitmask")]
        shape = [int(v) for v in state.pop(prefix + ".shape").tolist()]
        values = state.pop(prefix + ".compressed")
        state.pop(prefix + ".row_offsets")
        mask = unpack_bitmasks(state.pop(key), shape)
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[mask] = values
        state[prefix + ".weight"] = dense
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state).eval()


for name, folder in spec["folders"].items():
    folder = Path(folder)
    result = results[name] = {}
    kwargs = {}
    if name in spec["dequantize"]:
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True, **kwargs
        )
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        if name == spec["sparse"]:
            save_file({"logits": run(decode_sparse_bitmask(folder))}, str(out / f"{name}.safetensors"))
        continue
    result["loading_info"] = {key: sorted(map(str, value)) for key, value in info.items() if value}
    result["dtype"] = str(model.dtype)
    save_file({"logits": run(model.eval())}, str(out / f"{name}.safetensors"))

results["swiss_knife_imported"] = any(m.split(".")[0] == "swiss_knife" for m in sys.modules)
(out / "results.json").write_text(json.dumps(results))
"""


# ----------------------------------------------------------------------------- producing


@dataclass
class Produced:
    folder: Path | None
    memory_logits: torch.Tensor | None  # the compressed model's, before saving
    dense_logits: torch.Tensor | None  # the input model's
    skip: str | None = None


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _bnb_problem() -> str | None:
    """Why bitsandbytes cannot run here, found by running its CPU kernels once; None if it can."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        return f"bitsandbytes is not importable ({type(exc).__name__}: {exc})"
    version = getattr(bnb, "__version__", "?")
    if "cpu" not in getattr(bnb, "supported_torch_devices", ()):
        return f"bitsandbytes {version} has no CPU backend"
    try:
        weight = torch.randn(32, 64)
        packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
        bnb.functional.dequantize_4bit(packed, state)
        layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer.to("cpu")(torch.randn(2, 64))
    except Exception as exc:
        return f"bitsandbytes {version} CPU kernels fail here ({type(exc).__name__}: {exc})"
    return None


def _torchao_problem() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'swiss-knife[torchao]')"
    return None


def _produce(case: Case, source: Path, output: Path) -> Produced:
    from swiss_knife.compression.layers import reduce_layers
    from swiss_knife.compression.pruning import prune
    from swiss_knife.compression.quantization.api import quantize

    loaded = load_model(str(source), device="cpu")
    model = loaded.model
    dense = _logits(model)
    config = case.make_config()
    try:
        if case.verb == "quantize":
            outcome: Any = quantize(model, config, calibration=CALIBRATION, device="cpu")
        elif case.verb == "prune":
            outcome = prune(model, config, calibration=CALIBRATION, device="cpu")
        else:
            outcome = reduce_layers(model, config, calibration=None, device="cpu")
    except MissingDependencyError as exc:
        return Produced(None, None, None, skip=str(exc))
    memory = _logits(outcome.model)
    folder = save_model(outcome.model, output, tokenizer=loaded.tokenizer, writer=outcome.writer)
    return Produced(folder, memory, dense)


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Produced]:
    root = tmp_path_factory.mktemp("plain-reload")
    source = root / "input"
    make_tiny_llama(seed=0, **MODEL).save_pretrained(source)
    make_char_tokenizer().save_pretrained(source)
    problems = {"bitsandbytes": _bnb_problem(), "torchao": _torchao_problem()}
    outputs: dict[str, Produced] = {}
    for name, case in CASES.items():
        problem = problems.get(case.needs) if case.needs else None
        if problem is not None:
            outputs[name] = Produced(None, None, None, skip=problem)
        else:
            outputs[name] = _produce(case, source, root / name)
    return outputs


@pytest.fixture(scope="module")
def plain(
    produced: dict[str, Produced], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One fresh interpreter loads every folder; {name: result, with "logits" where it ran}."""
    out = tmp_path_factory.mktemp("plain-logits")
    folders = {name: str(p.folder) for name, p in produced.items() if p.folder is not None}
    spec = out / "spec.json"
    dequantize = [name for name in folders if "asymmetric" in name]
    spec.write_text(
        json.dumps(
            {"ids": IDS.tolist(), "folders": folders, "sparse": SPARSE, "dequantize": dequantize}
        )
    )
    script = out / "plain_loader.py"
    script.write_text(PLAIN_LOADER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(script), str(spec), str(out)],
        cwd=out,  # not the checkout: nothing of ours on the path but the installed package
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    from safetensors.torch import load_file

    for name in folders:
        file = out / f"{name}.safetensors"
        if file.is_file():
            results[name]["logits"] = load_file(str(file))["logits"]
    return results


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # Same kernels, same thread count: the logits agree to the last bit in practice; the slack is
    # for reductions ordered differently. bf16 logits carry 8 bits of mantissa.
    rtol, atol = (2e-2, 1e-2) if dtype == torch.bfloat16 else (1e-4, 1e-5)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _ours(folder: Path) -> tuple[torch.Tensor, torch.dtype]:
    model = load_model(str(folder), with_tokenizer=False, device="cpu").model
    return _logits(model), model.dtype


def _get(produced: dict[str, Produced], name: str) -> Produced:
    result = produced[name]
    if result.skip is not None:
        pytest.skip(result.skip)
    assert result.folder is not None
    return result


# ----------------------------------------------------------------------------- the tests


def test_the_loader_process_never_imported_swiss_knife(plain: dict[str, Any]) -> None:
    assert plain["swiss_knife_imported"] is False


@pytest.mark.parametrize("name", [name for name in CASES if name != SPARSE])
def test_plain_from_pretrained_matches_swiss_knife(
    name: str, produced: dict[str, Produced], plain: dict[str, Any]
) -> None:
    case = CASES[name]
    made = _get(produced, name)
    assert made.folder is not None and made.memory_logits is not None
    assert made.dense_logits is not None
    config = json.loads((made.folder / "config.json").read_text())
    qconfig = config.get("quantization_config")
    if case.quant_method is None:
        assert qconfig is None
    else:
        assert qconfig["quant_method"] == case.quant_method
        if case.ct_format is not None:
            assert qconfig["format"] == case.ct_format

    result = plain[name]
    assert "error" not in result, result.get("error")
    # transformers only warns about these; any one of them means weights were left random.
    assert result.get("loading_info", {}) == {}
    ours, dtype = _ours(made.folder)
    assert result["dtype"] == str(dtype)
    _assert_same(result["logits"], ours, dtype)
    # Not garbage: what the compressed model computed before it was saved ...
    _assert_same(ours, made.memory_logits, dtype)
    # ... which itself still resembles the input model.
    cosine = torch.nn.functional.cosine_similarity(
        made.memory_logits.flatten(), made.dense_logits.flatten(), dim=0
    )
    assert cosine > 0.8, f"{name}: cosine {cosine:.3f} to the input model"


def test_sparse_bitmask_is_refused_by_plain_from_pretrained_and_decodes_with_compressed_tensors(
    produced: dict[str, Produced], plain: dict[str, Any]
) -> None:
    from compressed_tensors.config import BitmaskConfig
    from safetensors import safe_open

    from swiss_knife.compression.pruning.sparse_format import PARTS, SPARSE_WEIGHTS_NAME

    made = _get(produced, SPARSE)
    assert made.folder is not None and made.memory_logits is not None
    assert not (made.folder / "model.safetensors").exists()
    qconfig = json.loads((made.folder / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert "config_groups" not in qconfig
    sparsity = BitmaskConfig.model_validate(qconfig["sparsity_config"])
    assert sparsity.format == "sparse-bitmask"
    assert sparsity.targets == ["Linear"] and sparsity.ignore == ["lm_head"]
    assert 0.3 < (sparsity.global_sparsity or 0.0) < 0.5
    with safe_open(str(made.folder / SPARSE_WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    compressed = {key.rsplit(".", 1)[0] for key in keys if key.endswith(".bitmask")}
    assert len(compressed) == 2 * 7  # every linear of both blocks
    for prefix in compressed:
        assert {f"{prefix}.{part}" for part in PARTS} <= keys
        assert f"{prefix}.weight" not in keys

    result = plain[SPARSE]
    # A loud refusal, not a model with random layers.
    assert result["error"].startswith("OSError") and "model.safetensors" in result["error"]
    ours, dtype = _ours(made.folder)
    _assert_same(result["logits"], ours, dtype)
    _assert_same(ours, made.memory_logits, dtype)


def test_every_quantization_method_is_covered() -> None:
    """A new quantization method must add its format here (or say which case covers it)."""
    from swiss_knife.compression.quantization.base import get_method, method_names

    covered = {type(case.make_config()) for case in CASES.values()}
    # GPTQ and AWQ write RTN's pack-quantized layout; fp16 shares bf16's config (dense).
    same_layout = {"gptq": C.RTNConfig, "awq": C.RTNConfig}
    for method in method_names():
        config_class = same_layout.get(method, get_method(method).config_class)
        assert config_class in covered, f"{method}: no plain-reload case for its format"
