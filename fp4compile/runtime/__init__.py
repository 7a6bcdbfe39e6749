"""Numeric runtime of fp4compile.

`formats` rounds to the low-precision grids, `quantize` scales and rounds whole
tensors, `dge` and `occ` are the paper's two fixes, and `reference` composes them
into one linear layer. Everything here is plain PyTorch: it is the reference that
the generated kernels are tested against, and it is also what the FX pass inserts
(Inductor traces these functions into its own fused kernels).
"""
