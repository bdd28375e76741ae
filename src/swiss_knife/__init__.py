"""Swiss Knife: make large language models small, and measure what it cost.

Importing the package is cheap: names are loaded on first use, so `import swiss_knife` pulls in
neither torch nor transformers, and touches no GPU.

    import swiss_knife as sk
    model = sk.load("path/to/model")
    sk.quantize(model, sk.GPTQConfig(bits=4, group_size=64), calibration="wiki.txt")
    sk.save(model, "out")

Every registered method's config is available here by its class name (`sk.RTNConfig`,
`sk.SparseGPTPruneConfig`, ...), found through the method registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "api",
    "compress_checkpoint": "api",
    "save": "api",
    "quantize": "api",
    "prune": "api",
    "export_gguf": "api",
    "Compressed": "api",
    "CastConfig": "config",
    "CompressionConfig": "recipe",
    "DataConfig": "config",
    "DistillConfig": "config",
    "EvaluationConfig": "config",
    "EvaluateStageConfig": "config",
    "LayerReductionConfig": "config",
    "ModelSpec": "config",
    "load_config": "config",
    "load_recipe": "recipe",
    "save_config": "config",
    "load_model": "models",
    "save_model": "models",
    "cast_model": "models",
    "LoadedModel": "models",
    "read_documents": "data",
    "load_token_stream": "data",
    "sample_calibration": "data",
    "token_windows": "data",
    "evaluate": "evaluation",
    "evaluate_gguf": "evaluation.llama_cpp",
    "EvaluationReport": "evaluation",
    "write_reports": "evaluation",
    "run_recipe": "pipeline",
    "distill": "compression.distillation.api",
    "resolve_device": "device",
    "device_info": "device",
    "get_arch": "arch",
    "reduce_layers": "compression.layers",
    "SwissKnifeError": "errors",
    "UserInputError": "errors",
}

__all__ = [
    "CastConfig",
    "Compressed",
    "CompressionConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluateStageConfig",
    "EvaluationConfig",
    "EvaluationReport",
    "LayerReductionConfig",
    "LoadedModel",
    "ModelSpec",
    "SwissKnifeError",
    "UserInputError",
    "__version__",
    "cast_model",
    "compress_checkpoint",
    "device_info",
    "distill",
    "evaluate",
    "evaluate_gguf",
    "export_gguf",
    "get_arch",
    "load",
    "load_config",
    "load_model",
    "load_recipe",
    "load_token_stream",
    "prune",
    "quantize",
    "read_documents",
    "reduce_layers",
    "resolve_device",
    "run_recipe",
    "sample_calibration",
    "save",
    "save_config",
    "save_model",
    "token_windows",
    "write_reports",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name.endswith("Config") and not name.startswith("_"):
            # A method's config, wherever its module is (swiss_knife.config finds it).
            config = importlib.import_module(".config", __name__)
            try:
                value = getattr(config, name)
            except AttributeError:
                pass
            else:
                globals()[name] = value
                return value
        raise AttributeError(f"module 'swiss_knife' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .api import Compressed, compress_checkpoint, export_gguf, load, prune, quantize, save
    from .arch import get_arch
    from .compression.distillation.api import distill
    from .compression.layers import reduce_layers
    from .config import (
        CastConfig,
        DataConfig,
        DistillConfig,
        EvaluateStageConfig,
        EvaluationConfig,
        LayerReductionConfig,
        ModelSpec,
        load_config,
        save_config,
    )
    from .data import load_token_stream, read_documents, sample_calibration, token_windows
    from .device import device_info, resolve_device
    from .errors import SwissKnifeError, UserInputError
    from .evaluation.evaluate import EvaluationReport, evaluate
    from .evaluation.llama_cpp import evaluate_gguf
    from .evaluation.report import write_reports
    from .models import LoadedModel, cast_model, load_model, save_model
    from .pipeline import run_recipe
    from .recipe import CompressionConfig, load_recipe
