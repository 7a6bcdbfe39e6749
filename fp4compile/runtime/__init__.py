"""Numeric runtime of fp4compile: the plain-PyTorch reference of every op.

`formats` rounds to the low-precision grids, `quantize` scales and rounds whole
tensors, `dge` and `occ` are the paper's two fixes, `gemm` the three GEMMs on
quantized operands, `linear_ops` the graph ops the FX pass inserts (with their
backward rules), and `reference` composes them into one linear layer. Everything
here is plain PyTorch and target-agnostic: it is the reference that the lowerings
and generated kernels (`fp4compile/lowering/`) are tested against, and nothing
here imports from there.
"""
