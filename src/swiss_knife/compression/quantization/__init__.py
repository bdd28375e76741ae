"""Weight quantization: integer grids, round-to-nearest, GPTQ, and the compressed-tensors export.

- `grid`: `QuantGrid`, scale/zero-point computation, quantize/dequantize, `QuantizedWeight`.
- `rtn`: round-to-nearest with an optional MSE clip search (data-free).
- `gptq`: GPTQ (Frantar et al., 2022) from a layer's input Hessian.
- `compressed_tensors_format`: save as a compressed-tensors "pack-quantized" checkpoint that
  `transformers` (and vLLM) load.

Nothing is imported here so that `import swiss_knife.compression.quantization` stays cheap.
"""
