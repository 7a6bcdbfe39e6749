"""Numeric runtime of fp4compile: the plain-PyTorch reference of every op.

`formats` rounds to the low-precision grids, `quantize` scales and rounds whole
tensors, `dge` and `occ` are the paper's two fixes, `gemm` the three GEMMs on
quantized operands, `linear_ops` the graph ops the FX pass inserts (with their
backward rules), and `reference` composes them into one linear layer;
`fidelity` measures how close a quantized tensor is to the original (the OCC
study), `hadamard` is the random Hadamard transform of the NVFP4/MXFP4 recipes'
weight gradient, `folded` the reference of the CUDA lowering's OCC compensation
folded into E4M3 activation codes, `stats` the telemetry probes, and `stored`
marks a per-tensor scale that compiled code computes once. Everything here is
plain PyTorch and target-agnostic. The semantic graph
(`fp4_eager`, `fp4_aot_eager`) runs these ops as they are; under `backend="fp4"`
the target's lowering (`fp4compile/lowering/`) replaces some of them with its
own (merged CPU GEMMs, FP8 tensor-core GEMMs, Triton kernels), which are tested
against the ops here. Nothing here imports from there.
"""
