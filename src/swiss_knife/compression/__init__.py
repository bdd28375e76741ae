"""Compression methods: quantization (and, later, pruning, layer reduction, distillation).

Each method is split into pure tensor math (free functions on tensors, in its own module) and a
thin orchestrator that walks the model through the calibration engine. Importing this package
loads nothing heavy; import the submodules you need.
"""
