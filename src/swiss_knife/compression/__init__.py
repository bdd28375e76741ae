"""Compression methods: quantization, pruning, layer reduction (`layers`), distillation.

Each method is split into pure tensor math (free functions on tensors, in its own module) and a
thin orchestrator that walks the model through the calibration engine. What both quantization and
pruning use lives here, below both packages, so that neither imports the other: `metrics`
(SQNR, the sensitivity table), `hessian` (the damped inverse Hessian GPTQ and SparseGPT solve
with) and `checkpoint` (writing a compressed-tensors checkpoint). Importing this package loads
nothing heavy; import the submodules you need.
"""
