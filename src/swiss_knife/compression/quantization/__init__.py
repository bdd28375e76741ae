"""Weight quantization: the `quantize` verb (`api`), its registry (`base`) and one module per method.

- `grid`: `QuantGrid`, scale/zero-point computation, quantize/dequantize, `QuantizedWeight`.
- `rtn`: round-to-nearest with an optional MSE clip search (data-free).
- `gptq`: GPTQ (Frantar et al., 2022) from a layer's input Hessian.
- `compressed_tensors_format`: which grid each targeted layer gets (`plan_grids`) and saving as a
  compressed-tensors "pack-quantized" checkpoint that `transformers` (and vLLM) load.
- every other module is one method (`weight_only` holds RTN and GPTQ), found by the registry.

Nothing is imported here so that `import swiss_knife.compression.quantization` stays cheap.
"""
